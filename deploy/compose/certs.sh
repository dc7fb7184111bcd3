#!/bin/sh
# The compose cluster's one-shot `certs` service (run by the image's /bin/sh, which has
# no tools but its builtins, dispatchctl, cat and sleep): on the first `up`, a
# development CA, the three replicas' certificates (named replica-<i> and dispatcher-<i>,
# also 127.0.0.1 for the published ports) and an admin token, into the `certs` volume
# that the replicas mount. Only what they need goes there: not the CA key, nor the
# client certificates dev-certs also makes (those stay in this container's /tmp, gone
# with it). A volume that has a CA already is left alone: the cluster knows its admin
# token.
set -eu
if [ -e /certs/ca.crt ]; then
    echo "certs: /certs has a CA already; nothing to do"
    exit 0
fi
umask 077
# stdout is the export lines for a shell in this container, of no use here.
/usr/local/bin/dispatchctl dev-certs --out /tmp/certs --replicas 3 --force >/dev/null
for f in replica-1.crt replica-1.key replica-2.crt replica-2.key replica-3.crt \
    replica-3.key admin.token ca.crt; do
    # ca.crt last: its presence says the set is complete.
    cat "/tmp/certs/$f" >"/certs/$f"
done
: >/tmp/certs/ca.key
echo "certs: wrote the CA certificate, the replicas' certificates and keys and the admin token into /certs"
