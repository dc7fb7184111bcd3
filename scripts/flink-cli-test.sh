#!/usr/bin/env bash
# Flink's own CLI as a client of a dispatcher cluster: `flink list` and `flink cancel`
# from Apache Flink's distribution, against the replicas' HTTP listeners (Flink's REST
# API), with the outcome checked through dispatchctl.
#
# Installs what it needs when missing: a Java runtime from Debian's packages
# (openjdk-17-jre-headless, needs root) and Flink's distribution from PyPI (the
# `apache-flink` package ships bin/flink and its jars; installed with --no-deps into a
# virtualenv under target/, so no pandas or pyarrow). Then it starts three replicas in
# plain text without tokens on loopback (Flink's CLI sends no bearer token) with
# --http-listen, one TaskManager with 4 slots, submits a job that runs and one too big
# to be placed (it waits, CREATED), and checks that:
#   - `flink list -m` on a follower lists the running job under "Running/Restarting Jobs"
#     and the waiting one under "Scheduled Jobs", with their ids (32 hex digits) and names;
#   - `flink cancel -m` on a follower cancels the running job (dispatchctl sees CANCELED);
#   - `flink list -a` shows it among the terminated jobs;
#   - `flink cancel` of an unknown id fails with the dispatcher's reason.
#
#   scripts/flink-cli-test.sh            # or: make flink-cli-test
#
# Environment: FLINK_TEST_BIN (directory with dispatcher, taskmanager, dispatchctl;
# default target/debug), FLINK_TEST_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=${FLINK_TEST_BIN:-$repo/target/debug}
venv=$repo/target/flink-cli
flink_version=2.3.0
started=$SECONDS

say() { echo "flink-cli-test: $*"; }
fail() {
    say "FAIL: $*"
    exit 1
}

for b in dispatcher taskmanager dispatchctl; do
    [[ -x $bin/$b ]] || fail "$bin/$b is missing: cargo build --bins first (make flink-cli-test does)"
done

# --- Java and Flink's distribution ---------------------------------------------------
if ! command -v java >/dev/null 2>&1; then
    if ((EUID != 0)); then
        fail "no java on PATH, and installing openjdk-17-jre-headless needs root"
    fi
    say "installing a Java runtime (openjdk-17-jre-headless)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
fi
if [[ ! -f $venv/.installed-$flink_version ]]; then
    say "installing Flink $flink_version's distribution from PyPI into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        "apache-flink==$flink_version" "apache-flink-libraries==$flink_version"
    touch "$venv/.installed-$flink_version"
fi
flink=$(echo "$venv"/lib/python3*/site-packages/pyflink/bin/flink)
[[ -f $flink ]] || fail "no bin/flink in the apache-flink package under $venv"
chmod +x "$(dirname "$flink")"/*
say "tools ready after $((SECONDS - started)) s (java: $(java -version 2>&1 | head -1))"

# --- A cluster ---------------------------------------------------------------------------
work=$(mktemp -d "$repo/target/flink-cli-test.XXXXXX")
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
    if [[ ${FLINK_TEST_KEEP:-} != 1 ]]; then rm -rf "$work"; fi
    exit "$status"
}
trap cleanup EXIT

# Free loopback ports; a command substitution waits until python has closed them.
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
        >"$work/replica-$id.log" 2>&1 &
    pids+=($!)
done
"$bin/taskmanager" --id tm-1 --slots 4 --dispatchers "$endpoints" --work-dir "$work/tm-1" \
    >"$work/tm-1.log" 2>&1 &
pids+=($!)
ctl() { "$bin/dispatchctl" --endpoints "$endpoints" "$@"; }

wait_until() { # seconds, description, command...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out waiting for $what"
        sleep 0.2
    done
}
state_is() { ctl -o json job status "$1" | grep -q "\"state\": \"$2\""; }
leader_known() { ctl -o json cluster status | grep -q '"leader_id": [1-9]'; }
tm_registered() { ctl taskmanager list | grep -q tm-1; }

wait_until 60 "a leader" leader_known
wait_until 60 "the TaskManager" tm_registered
leader=$(ctl -o json cluster status | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"])')
follower=$((leader % 3 + 1))
rest="127.0.0.1:${ports[follower + 2]}"
say "cluster up: leader is replica $leader; Flink's CLI talks to replica $follower's REST API at $rest"

running=$(ctl job submit examples/streaming.toml)
cat >"$work/too-big.toml" <<'EOF'
name = "waits-for-slots"

[[vertices]]
name = "wide"
parallelism = 8
task = { sleep = { duration_ms = 1000 } }
EOF
waiting=$(ctl job submit "$work/too-big.toml")
wait_until 60 "the streaming job to run" state_is "$running" RUNNING
running_hex=${running//-/}
waiting_hex=${waiting//-/}

# --- flink list ---------------------------------------------------------------------------
t0=$SECONDS
"$flink" list -m "$rest" >"$work/list.out" 2>&1 || { cat "$work/list.out"; fail "flink list failed"; }
say "flink list ($((SECONDS - t0)) s):"
sed 's/^/    /' "$work/list.out"
awk '/Running\/Restarting Jobs/{r=1} /Scheduled Jobs/{r=0} r' "$work/list.out" |
    grep -q ": $running_hex : streaming (RUNNING)" || fail "flink list does not show $running_hex as running"
awk '/Scheduled Jobs/{s=1} s' "$work/list.out" |
    grep -q ": $waiting_hex : waits-for-slots (CREATED)" || fail "flink list does not show $waiting_hex as scheduled"

# --- flink cancel ---------------------------------------------------------------------------
t0=$SECONDS
"$flink" cancel -m "$rest" "$running_hex" >"$work/cancel.out" 2>&1 || { cat "$work/cancel.out"; fail "flink cancel failed"; }
say "flink cancel ($((SECONDS - t0)) s):"
sed 's/^/    /' "$work/cancel.out"
grep -q "Cancelled job $running_hex" "$work/cancel.out" || fail "flink cancel did not report the cancellation"
wait_until 60 "dispatchctl to see the job CANCELED" state_is "$running" CANCELED
say "dispatchctl: job $running is CANCELED"

"$flink" list -a -m "$rest" >"$work/list-all.out" 2>&1 || { cat "$work/list-all.out"; fail "flink list -a failed"; }
awk '/Terminated Jobs/{t=1} t' "$work/list-all.out" |
    grep -q ": $running_hex : streaming (CANCELED)" || { cat "$work/list-all.out"; fail "flink list -a does not show the cancelled job"; }

if "$flink" cancel -m "$rest" 00000000000000000000000000000000 >"$work/unknown.out" 2>&1; then
    fail "flink cancel of an unknown job succeeded"
fi
grep -q "not found" "$work/unknown.out" || { cat "$work/unknown.out"; fail "flink cancel of an unknown job did not say why"; }
state_is "$waiting" CREATED || fail "the waiting job changed state"

say "PASS in $((SECONDS - started)) s"
