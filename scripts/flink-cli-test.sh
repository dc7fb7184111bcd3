#!/usr/bin/env bash
# Flink's own CLI as a client of a dispatcher cluster: `flink list` and `flink cancel`
# from Apache Flink's distribution, against the replicas' HTTP listeners (Flink's REST
# API), with the outcome checked through dispatchctl.
#
# Installs what it needs when missing: a Java runtime from Debian's packages
# (openjdk-17-jre-headless, needs root) and Flink's distribution from PyPI (the
# `apache-flink` package ships bin/flink and its jars; installed with --no-deps into a
# virtualenv under target/, so no pandas or pyarrow).
#
# Two clusters of three replicas on loopback with --http-listen, one TaskManager each:
#
# 1. Plain text, no tokens: Flink's CLI as it comes, `flink list -m HOST:PORT` on a
#    follower lists a running job under "Running/Restarting Jobs" and a job too big to
#    be placed under "Scheduled Jobs", with their ids (32 hex digits) and names.
# 2. Secured as deployed (TLS with `dispatchctl dev-certs` certificates, tokens): the CLI
#    speaks HTTPS trusting the cluster's CA (a PKCS12 truststore made with keytool) and
#    sends the token through FLINK_REST_CLIENT_HEADERS. Without a token `flink list`
#    fails with our 401 message; with a `read` token it lists, and its `flink cancel` is
#    refused (403) and changes nothing; with a `submit` token `flink cancel` cancels the
#    job (dispatchctl sees CANCELED) and `flink list -a` shows it terminated; cancelling
#    an unknown id fails with our reason.
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
if ! command -v java >/dev/null 2>&1 || ! command -v keytool >/dev/null 2>&1; then
    if ((EUID != 0)); then
        fail "no java (or keytool) on PATH, and installing openjdk-17-jre-headless needs root"
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
        for log in "$work"/*/*.log; do
            [[ -f $log ]] || continue
            echo "--- $log (last lines)"
            tail -n 15 "$log"
        done
    fi
    if [[ ${FLINK_TEST_KEEP:-} != 1 ]]; then rm -rf "$work"; fi
    exit "$status"
}
trap cleanup EXIT

wait_until() { # seconds, description, command...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out waiting for $what"
        sleep 0.2
    done
}

# Starts three replicas and a TaskManager under $work/$1; secured when $2 is "tls".
# Sets: dir, endpoints, rest (a follower's REST address), ctl_args.
start_cluster() {
    local name=$1 mode=$2
    dir=$work/$name
    mkdir -p "$dir"
    # Free loopback ports; a command substitution waits until python has closed them.
    local ports_text
    ports_text=$(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()')
    local -a ports
    read -r -a ports <<<"$ports_text"
    local initial="1=127.0.0.1:${ports[0]},2=127.0.0.1:${ports[1]},3=127.0.0.1:${ports[2]}"
    endpoints="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}"
    local -a secure=() tm_secure=()
    ctl_args=(--endpoints "$endpoints")
    if [[ $mode == tls ]]; then
        "$bin/dispatchctl" dev-certs --out "$dir/certs" --replicas 3 >/dev/null 2>&1 || fail "dev-certs"
        ctl_args+=(--ca "$dir/certs/ca.crt" --token-file "$dir/certs/admin.token")
    fi
    for id in 1 2 3; do
        if [[ $mode == tls ]]; then
            secure=(--tls-cert "$dir/certs/replica-$id.crt" --tls-key "$dir/certs/replica-$id.key"
                --tls-ca "$dir/certs/ca.crt" --bootstrap-token-file "$dir/certs/admin.token")
        fi
        "$bin/dispatcher" --id "$id" --listen "127.0.0.1:${ports[id - 1]}" --data-dir "$dir/data-$id" \
            --initial-cluster "$initial" --http-listen "127.0.0.1:${ports[id + 2]}" "${secure[@]}" \
            >"$dir/replica-$id.log" 2>&1 &
        pids+=($!)
    done
    wait_until 60 "a leader ($name)" leader_known
    if [[ $mode == tls ]]; then
        make_token taskmanager tms --task-manager 'tm-*' >"$dir/certs/taskmanager.token"
        tm_secure=(--ca "$dir/certs/ca.crt" --token-file "$dir/certs/taskmanager.token")
    fi
    "$bin/taskmanager" --id tm-1 --slots 4 --dispatchers "$endpoints" --work-dir "$dir/tm-1" \
        "${tm_secure[@]}" >"$dir/tm-1.log" 2>&1 &
    pids+=($!)
    wait_until 60 "the TaskManager ($name)" tm_registered
    local leader follower
    leader=$(ctl -o json cluster status | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"])')
    follower=$((leader % 3 + 1))
    rest="127.0.0.1:${ports[follower + 2]}"
    say "$name cluster up: leader is replica $leader; Flink's CLI talks to replica $follower's REST API at $rest"
}
ctl() { "$bin/dispatchctl" "${ctl_args[@]}" "$@"; }
state_is() { ctl -o json job status "$1" | grep -q "\"state\": \"$2\""; }
leader_known() { ctl -o json cluster status | grep -q '"leader_id": [1-9]'; }
tm_registered() { ctl taskmanager list | grep -q tm-1; }
make_token() { # role name [flags...]: the secret on stdout
    local role=$1 name=$2 deadline=$((SECONDS + 30))
    shift 2
    until ctl token create --role "$role" --name "$name" "$@" 2>/dev/null; do
        ((SECONDS < deadline)) || fail "creating the $role token"
        sleep 0.3
    done
}
submit_jobs() { # sets running, waiting (ids) and running_hex, waiting_hex
    cat >"$dir/too-big.toml" <<'EOF'
name = "waits-for-slots"

[[vertices]]
name = "wide"
parallelism = 8
task = { sleep = { duration_ms = 1000 } }
EOF
    running=$(ctl job submit examples/streaming.toml)
    waiting=$(ctl job submit "$dir/too-big.toml")
    wait_until 60 "the streaming job to run" state_is "$running" RUNNING
    running_hex=${running//-/}
    waiting_hex=${waiting//-/}
}
# `flink ARGS...` into $dir/$out_name.out; shows it; returns flink's status.
run_flink() {
    local out_name=$1
    shift
    local t0=$SECONDS status=0
    "$flink" "$@" >"$dir/$out_name.out" 2>&1 || status=$?
    say "flink $1 ($((SECONDS - t0)) s, exit $status):"
    grep -v '^\s*at \|^\s*\.\.\. [0-9]* more' "$dir/$out_name.out" | sed 's/^/    /'
    return "$status"
}
check_list() { # file: the running job as running, the waiting one as scheduled
    awk '/Running\/Restarting Jobs/{r=1} /Scheduled Jobs/{r=0} r' "$1" |
        grep -q ": $running_hex : streaming (RUNNING)" || fail "flink list does not show $running_hex as running"
    awk '/Scheduled Jobs/{s=1} s' "$1" |
        grep -q ": $waiting_hex : waits-for-slots (CREATED)" || fail "flink list does not show $waiting_hex as scheduled"
}

# --- 1. Plain text, no tokens ---------------------------------------------------------------
start_cluster plain plain
submit_jobs
run_flink list list -m "$rest" || fail "flink list failed"
check_list "$dir/list.out"

# --- 2. TLS and tokens ------------------------------------------------------------------------
start_cluster secured tls
submit_jobs
read_token=$(make_token read flink-reader)
submit_token=$(make_token submit flink-ci)
keytool -importcert -noprompt -alias dispatcher-ca -file "$dir/certs/ca.crt" \
    -keystore "$dir/certs/truststore.p12" -storetype PKCS12 -storepass changeit >/dev/null 2>&1 ||
    fail "keytool could not make a truststore of the cluster's CA"
# Flink's REST client defaults to one TLS 1.2 RSA-CBC suite; rustls offers only AEAD suites.
tls=(-Dsecurity.ssl.rest.enabled=true
    -Dsecurity.ssl.rest.truststore="$dir/certs/truststore.p12"
    -Dsecurity.ssl.rest.truststore-password=changeit
    -Dsecurity.ssl.rest.truststore-type=PKCS12
    -Dsecurity.ssl.algorithms=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
# Flink's CLI sends the lines of FLINK_REST_CLIENT_HEADERS as headers (NAME:VALUE).
as_token() { FLINK_REST_CLIENT_HEADERS="Authorization:Bearer $1" "${@:2}"; }

if run_flink list-no-token list -m "$rest" "${tls[@]}"; then
    fail "flink list without a token succeeded"
fi
grep -q "needs a token" "$dir/list-no-token.out" || fail "flink list without a token did not say why"

as_token "$read_token" run_flink list list -m "$rest" "${tls[@]}" || fail "flink list with a read token failed"
check_list "$dir/list.out"

if as_token "$read_token" run_flink cancel-read cancel -m "$rest" "${tls[@]}" "$running_hex"; then
    fail "flink cancel with a read token succeeded"
fi
grep -q "needs role admin or submit" "$dir/cancel-read.out" || fail "flink cancel with a read token did not say why"
state_is "$running" RUNNING || fail "a refused cancel changed the job"

as_token "$submit_token" run_flink cancel cancel -m "$rest" "${tls[@]}" "$running_hex" ||
    fail "flink cancel with a submit token failed"
grep -q "Cancelled job $running_hex" "$dir/cancel.out" || fail "flink cancel did not report the cancellation"
wait_until 60 "dispatchctl to see the job CANCELED" state_is "$running" CANCELED
say "dispatchctl: job $running is CANCELED"

as_token "$read_token" run_flink list-all list -a -m "$rest" "${tls[@]}" || fail "flink list -a failed"
awk '/Terminated Jobs/{t=1} t' "$dir/list-all.out" |
    grep -q ": $running_hex : streaming (CANCELED)" || fail "flink list -a does not show the cancelled job"

if as_token "$submit_token" run_flink cancel-unknown cancel -m "$rest" "${tls[@]}" 00000000000000000000000000000000; then
    fail "flink cancel of an unknown job succeeded"
fi
grep -q "not found" "$dir/cancel-unknown.out" || fail "flink cancel of an unknown job did not say why"
state_is "$waiting" CREATED || fail "the waiting job changed state"

say "PASS in $((SECONDS - started)) s"
