#!/usr/bin/env bash
# Starts a three-replica dispatcher cluster and two TaskManagers on loopback in the
# foreground: replica data under ./data/<id>, TaskManager work directories under
# ./data/tm-<n>, every log line prefixed with its process. Ctrl-C stops them all.
#
#   scripts/cluster.sh            # or: make cluster
#   DISPATCHER_LOG=debug scripts/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --bins
bin=target/debug
initial="1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"
pids=()

stop() {
    trap - INT TERM EXIT
    echo "stopping replicas: ${pids[*]}" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

for id in 1 2 3; do
    mkdir -p "data/$id"
    "$bin/dispatcher" --id "$id" --listen "127.0.0.1:700$id" --data-dir "data/$id" \
        --initial-cluster "$initial" \
        > >(sed -u "s/^/[replica $id] /") 2>&1 &
    pids+=("$!")
done

endpoints="127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
for n in 1 2; do
    "$bin/taskmanager" --id "tm-$n" --slots 4 --dispatchers "$endpoints" \
        --label "rack=r$n" --work-dir "data/tm-$n" \
        > >(sed -u "s/^/[tm-$n] /") 2>&1 &
    pids+=("$!")
done

echo "cluster up: endpoints 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 (Ctrl-C to stop)" >&2
wait -n "${pids[@]}" || true
echo "a process exited; stopping the others" >&2
