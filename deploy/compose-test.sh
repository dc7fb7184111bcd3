#!/usr/bin/env bash
# The compose cluster tested for real on this machine's Docker engine: bring it up (with
# TLS and tokens, as deploy/compose.yaml provisions them), check that a call without the
# token or without TLS is refused and that the TaskManagers see only their own token,
# submit a job from the host, `docker kill` the leader (3 times) and check a new one is
# elected with no task restarted, disconnect a replica from the network and see it catch
# up, do a rolling restart, `docker restart` every replica (3 times) and see every job
# come back. Prints the medians. Everything it starts it removes (containers, network,
# volumes). Skips, saying so, when no Docker engine answers.
#
#   make image && make compose-test
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
    echo "compose-test: SKIPPED: no Docker engine answers on this machine"
    exit 0
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
project="dispatcher-ctest-$$"
dc=("${compose[@]}" -p "$project" -f deploy/compose.yaml)
# The host's dispatchctl gets the cluster's CA and admin token by flag (copied out of the
# `certs` volume once the cluster is up); variables of the caller's shell must not mix in.
unset DISPATCHER_CA DISPATCHER_CERT DISPATCHER_KEY DISPATCHER_TOKEN DISPATCHER_TOKEN_FILE DISPATCHCTL_ENDPOINTS
plain_ctl=(target/release/dispatchctl --endpoints 127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103)
work=$(mktemp -d)
ctl=("${plain_ctl[@]}" --timeout 30 --ca "$work/ca.crt" --token-file "$work/admin.token")

cleanup() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "compose-test: FAILED (exit $rc); replica logs:" >&2
        "${dc[@]}" logs --tail=30 >&2 || true
    fi
    "${dc[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$work"
    exit $rc
}
trap cleanup EXIT

now() { python3 -c 'import time; print(time.monotonic())'; }
elapsed_ms() { python3 -c "print(round(($(now) - $1) * 1000))"; }
fail() { echo "compose-test: $*" >&2; exit 1; }

# cluster_json -> prints "LEADER CONVERGED" (leader id or 0; 1 when every replica is
# reachable and at the same applied index and digest).
cluster_view() {
    "${ctl[@]}" -o json cluster status --digest 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
rs = s["replicas"]
leader = s.get("leader_id") or 0
ok = len(rs) == 3 and all(r["reachable"] for r in rs)
same = ok and len({(r["applied_index"], r["state_digest"]) for r in rs}) == 1
print(leader, 1 if same else 0)' 2>/dev/null || echo "0 0"
}

wait_until() { # SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + limit ))
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for: $what"
        sleep 0.2
    done
}
converged() { set -- $(cluster_view); [ "$1" != 0 ] && [ "$2" = 1 ]; }
leader_id() { set -- $(cluster_view); echo "$1"; }
container() { "${dc[@]}" ps -q "$1"; }

cat > "$work/long.toml" <<'SPEC'
name = "long-running"
[[vertices]]
name = "work"
parallelism = 4
task = { sleep = { duration_ms = 3600000 } }
SPEC
cat > "$work/tiny.toml" <<'SPEC'
name = "tiny"
[[vertices]]
name = "v"
parallelism = 1
task = { sleep = { duration_ms = 1 } }
SPEC

job_view() { # JOB -> "STATE ALL_RUNNING MAX_ATTEMPT"
    "${ctl[@]}" -o json job status "$1" | python3 -c '
import json, sys
j = json.load(sys.stdin)
ts = j["tasks"]
print(j["state"], int(all(t["state"] == "RUNNING" for t in ts)), max(t["attempt"] for t in ts))'
}
job_running() { set -- $(job_view "$1"); [ "$1" = RUNNING ] && [ "$2" = 1 ]; }

median() { python3 -c 'import sys, statistics; print(round(statistics.median(float(x) for x in sys.argv[1:])))' "$@"; }

echo "== up"
# Returns once the one-shot services (certificates, the TaskManagers' token) are done.
"${dc[@]}" up -d
(umask 077 && "${dc[@]}" exec -T dispatcher-1 cat /certs/ca.crt >"$work/ca.crt" &&
    "${dc[@]}" exec -T dispatcher-1 cat /certs/admin.token >"$work/admin.token")
wait_until 90 "a leader and three converged replicas" converged
echo "leader: $(leader_id)"

echo "== security on"
status=0
"${plain_ctl[@]}" --timeout 5 --ca "$work/ca.crt" job list >/dev/null 2>&1 || status=$?
[ "$status" = 7 ] || fail "a call without a token exited with $status, not 7 (not allowed)"
"${plain_ctl[@]}" --timeout 5 --token-file "$work/admin.token" job list >/dev/null 2>&1 &&
    fail "a plain-text call to the TLS ports succeeded"
tms_registered() {
    [ "$("${ctl[@]}" -o json taskmanager list | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')" = 2 ]
}
wait_until 60 "both TaskManagers registered with their token" tms_registered
tokens=$("${ctl[@]}" -o json token list | python3 -c '
import json, sys
print(" ".join(sorted(t["name"] + ":" + t["role"] for t in json.load(sys.stdin))))')
[ "$tokens" = "admin:admin taskmanagers:taskmanager" ] || fail "tokens: $tokens"
"${dc[@]}" exec -T tm-1 cat /certs/taskmanager.token >/dev/null ||
    fail "tm-1 has no /certs/taskmanager.token"
"${dc[@]}" exec -T tm-1 cat /certs/admin.token >/dev/null 2>&1 &&
    fail "a TaskManager container can read the admin token"
echo "no token: refused (7); plain text: refused; TaskManagers registered with their own token (tokens: $tokens)"

echo "== submit from the host"
job=$("${ctl[@]}" job submit "$work/long.toml")
wait_until 60 "the job's 4 tasks RUNNING on the TaskManagers" job_running "$job"
jobs=("$job")

echo "== docker kill of the leader (3 trials)"
kills=()
for trial in 1 2 3; do
    leader=$(leader_id)
    cid=$(container "dispatcher-$leader")
    t0=$(now)
    docker kill "$cid" >/dev/null
    until id=$("${ctl[@]}" job submit "$work/tiny.toml" 2>/dev/null); do sleep 0.01; done
    ms=$(elapsed_ms "$t0")
    jobs+=("$id")
    new=$(leader_id)
    [ "$new" != "$leader" ] || fail "no new leader after killing $leader"
    set -- $(job_view "$job")
    [ "$1" = RUNNING ] && [ "$2" = 1 ] && [ "$3" = 1 ] || fail "a task was restarted by the failover: $*"
    echo "trial $trial: killed leader $leader, new leader $new, next accepted submission after ${ms} ms; no task restarted"
    kills+=("$ms")
    docker start "$cid" >/dev/null
    wait_until 60 "the killed replica caught up" converged
done

echo "== network disconnect and reconnect of a follower"
leader=$(leader_id)
follower=$(( leader % 3 + 1 ))
cid=$(container "dispatcher-$follower")
network="${project}_dispatcher"
docker network disconnect "$network" "$cid"
for _ in 1 2 3 4 5; do jobs+=("$("${ctl[@]}" job submit "$work/tiny.toml")"); done
docker network connect --alias "dispatcher-$follower" "$network" "$cid"
wait_until 60 "the reconnected replica $follower caught up" converged
echo "replica $follower caught up after reconnecting"

echo "== rolling restart, one replica at a time"
for r in 1 2 3; do
    docker restart "$(container "dispatcher-$r")" >/dev/null
    wait_until 60 "replica $r back and caught up" converged
    echo "replica $r restarted and caught up"
done

echo "== docker restart of every replica (3 trials)"
restarts=()
for trial in 1 2 3; do
    t0=$(now)
    docker restart "$(container dispatcher-1)" "$(container dispatcher-2)" "$(container dispatcher-3)" >/dev/null
    until id=$("${ctl[@]}" job submit "$work/tiny.toml" 2>/dev/null); do sleep 0.05; done
    ms=$(elapsed_ms "$t0")
    jobs+=("$id")
    echo "trial $trial: all replicas restarted, writes accepted after ${ms} ms"
    restarts+=("$ms")
    wait_until 60 "all replicas converged" converged
done
for j in "${jobs[@]}"; do
    "${ctl[@]}" job status "$j" >/dev/null || fail "job $j is missing after the restarts"
done
set -- $(job_view "$job")
[ "$1" = RUNNING ] || fail "the long job is $1 after the restarts"
echo "every one of ${#jobs[@]} jobs came back; the long job is RUNNING (max attempt $3)"

echo "== result"
echo "docker kill of the leader -> next accepted submission: median $(median "${kills[@]}") ms (${kills[*]})"
echo "docker restart of all replicas -> writes accepted: median $(median "${restarts[@]}") ms (${restarts[*]})"
echo "compose-test: PASSED"
