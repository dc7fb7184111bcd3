#!/usr/bin/env bash
# The web dashboard in a real browser: headless Chromium from Debian's packages, driven by
# Playwright for Python (using that Chromium, so no browser is downloaded), against a live
# secured cluster (three replicas with TLS, tokens and --http-listen; two TaskManagers).
# tests/dashboard/test_dashboard.py signs in with a token, watches a submitted job reach
# RUNNING and FINISHED on the page, cancels one from the page (and checks it with
# dispatchctl), sees a read token's cancel refused, and writes a screenshot of each page
# to target/dashboard-screenshots/.
#
#   scripts/dashboard-test.sh        # or: make dashboard-test
#
# Installs when missing: chromium (apt, needs root) and Playwright into
# target/dashboard-venv (PyPI). Environment: DASHBOARD_TEST_BIN (directory with
# dispatcher, taskmanager, dispatchctl; default target/debug), DASHBOARD_TEST_KEEP=1
# keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=${DASHBOARD_TEST_BIN:-$repo/target/debug}
venv=$repo/target/dashboard-venv
shots=$repo/target/dashboard-screenshots
started=$SECONDS

say() { echo "dashboard-test: $*"; }
fail() {
    say "FAIL: $*"
    exit 1
}

for b in dispatcher taskmanager dispatchctl; do
    [[ -x $bin/$b ]] || fail "$bin/$b is missing: cargo build --bins first (make dashboard-test does)"
done

chromium=$(command -v chromium || true)
if [[ -z $chromium ]]; then
    ((EUID == 0)) || fail "no chromium on PATH, and installing it (apt-get install chromium) needs root"
    say "installing chromium from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    chromium=$(command -v chromium)
fi
if [[ ! -f $venv/.installed ]] || [[ tests/dashboard/requirements.txt -nt $venv/.installed ]]; then
    say "installing Playwright for Python into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/dashboard/requirements.txt
    touch "$venv/.installed"
fi
say "tools ready after $((SECONDS - started)) s ($("$chromium" --version 2>/dev/null | head -1))"

work=$(mktemp -d "$repo/target/dashboard-test.XXXXXX")
pids=()
cleanup() {
    local status=$?
    for p in "${pids[@]}"; do
        # Our own children only, by their positive pids (the bash builtin, kill(2)).
        builtin kill -TERM "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if ((status != 0)); then
        for log in "$work"/*.log; do
            [[ -f $log ]] || continue
            echo "--- $log (last lines)"
            tail -n 15 "$log"
        done
    fi
    if [[ ${DASHBOARD_TEST_KEEP:-} != 1 ]]; then rm -rf "$work"; fi
    exit "$status"
}
trap cleanup EXIT

certs=$work/certs
"$bin/dispatchctl" dev-certs --out "$certs" --replicas 3 >/dev/null 2>&1 || fail "dev-certs"
ports_text=$(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()')
read -r -a ports <<<"$ports_text"
initial="1=127.0.0.1:${ports[0]},2=127.0.0.1:${ports[1]},3=127.0.0.1:${ports[2]}"
endpoints="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
for id in 1 2 3; do
    "$bin/dispatcher" --id "$id" --listen "127.0.0.1:${ports[id - 1]}" --data-dir "$work/data-$id" \
        --initial-cluster "$initial" --http-listen "127.0.0.1:${ports[id + 2]}" \
        --tls-cert "$certs/replica-$id.crt" --tls-key "$certs/replica-$id.key" \
        --tls-ca "$certs/ca.crt" --bootstrap-token-file "$certs/admin.token" \
        >"$work/replica-$id.log" 2>&1 &
    pids+=($!)
done
ctl() { "$bin/dispatchctl" --endpoints "$endpoints" --ca "$certs/ca.crt" --token-file "$certs/admin.token" "$@"; }
wait_until() { # seconds, description, command...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out waiting for $what"
        sleep 0.2
    done
}
leader_known() { ctl -o json cluster status | grep -q '"leader_id": [1-9]'; }
wait_until 60 "a leader" leader_known
make_token() { # role name [extra...] -> secret on stdout
    local role=$1 name=$2
    shift 2
    local deadline=$((SECONDS + 30))
    until ctl token create --role "$role" --name "$name" "$@" 2>/dev/null; do
        ((SECONDS < deadline)) || fail "creating the $role token"
        sleep 0.3
    done
}
make_token taskmanager taskmanagers --task-manager 'tm-*' >"$certs/taskmanager.token"
make_token read viewer >"$certs/read.token"
for n in 1 2; do
    "$bin/taskmanager" --id "tm-$n" --slots 4 --dispatchers "$endpoints" --label "rack=r$n" \
        --work-dir "$work/tm-$n" --ca "$certs/ca.crt" --token-file "$certs/taskmanager.token" \
        >"$work/tm-$n.log" 2>&1 &
    pids+=($!)
done
tms_registered() { [[ $(ctl taskmanager list | grep -c 'tm-') -ge 2 ]]; }
wait_until 60 "two TaskManagers" tms_registered
say "cluster up after $((SECONDS - started)) s"

rm -rf "$shots"
mkdir -p "$shots"
DASHBOARD_URL="https://127.0.0.1:${ports[3]}" \
    DASHBOARD_FOLLOWER_URL="https://127.0.0.1:${ports[4]}" \
    DASHBOARD_ADMIN_TOKEN="$(cat "$certs/admin.token")" \
    DASHBOARD_READ_TOKEN="$(cat "$certs/read.token")" \
    DASHBOARD_CTL="$bin/dispatchctl" \
    DASHBOARD_CTL_ARGS="--endpoints $endpoints --ca $certs/ca.crt --token-file $certs/admin.token" \
    DASHBOARD_WORK="$work" \
    DASHBOARD_SHOTS="$shots" \
    DASHBOARD_CHROMIUM="$chromium" \
    "$venv/bin/python" tests/dashboard/test_dashboard.py
say "PASS in $((SECONDS - started)) s; screenshots in $shots"
