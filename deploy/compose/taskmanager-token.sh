#!/bin/sh
# The compose cluster's one-shot `taskmanager-token` service (run by the image's
# /bin/sh: builtins, dispatchctl, cat and sleep only), once every replica is healthy:
# makes the TaskManagers' token (role taskmanager, TaskManager ids tm-*) with the admin
# token, and writes it with the CA certificate into the `tm-certs` volume, which is all
# the TaskManagers mount. A volume that has them already is left alone.
set -u
out=/tm-certs
if [ -s "$out/taskmanager.token" ] && [ -s "$out/ca.crt" ]; then
    echo "taskmanager-token: $out has the token already; nothing to do"
    exit 0
fi
ctl() {
    /usr/local/bin/dispatchctl --endpoints "$DISPATCHERS" --timeout 10 \
        --ca /certs/ca.crt --token-file /certs/admin.token "$@"
}
umask 077
tries=0
while :; do
    ctl token create --role taskmanager --name taskmanagers --task-manager 'tm-*' \
        >"$out/taskmanager.token" && break
    status=$?
    : >"$out/taskmanager.token"
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
        echo "taskmanager-token: cannot make the TaskManagers' token (dispatchctl exit status $status); giving up" >&2
        exit 1
    fi
    # 7: the admin token is not committed yet (the first leader creates it just after
    # it is elected). 4: a token of that name exists, from a run that lost its secret:
    # replace it.
    if [ "$status" -eq 4 ]; then
        ctl token revoke taskmanagers >/dev/null || true
    fi
    sleep 1
done
cat /certs/ca.crt >"$out/ca.crt"
echo "taskmanager-token: wrote $out/taskmanager.token and $out/ca.crt"
