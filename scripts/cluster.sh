#!/usr/bin/env bash
# Runs a three-replica dispatcher cluster and two TaskManagers on loopback in the
# foreground, as their supervisor: replica data under $CLUSTER_DATA/<id>, TaskManager
# work directories under $CLUSTER_DATA/tm-<n>, every log line prefixed with its process.
#
# When a replica or TaskManager exits (say, `kill -9` of the leader), the script says
# which one and how it ended, keeps the others running, and starts it again after
# $CLUSTER_RESTART_DELAY seconds on the same data: a failover demo needs the survivors
# to elect a new leader and the old one to rejoin, not the whole cluster to stop.
# A process that keeps dying within seconds of its start (a taken port, a bad data
# directory) is given up on after five tries, and then the whole cluster stops.
#
# Ctrl-C (SIGINT) or SIGTERM stops everything: TaskManagers first (so that they can stop
# their tasks and unregister while the replicas still answer), then the replicas; each
# gets SIGTERM and, after $CLUSTER_STOP_GRACE seconds, SIGKILL. Only processes this
# script started are signalled, by their own pids.
#
#   scripts/cluster.sh            # or: make cluster
#   DISPATCHER_LOG=debug scripts/cluster.sh
#   CLUSTER_BASE_PORT=7101 CLUSTER_DATA=/tmp/d CLUSTER_BIN=target/release scripts/cluster.sh
#
# Environment (relative paths are taken from the directory the script is run in):
#   CLUSTER_BASE_PORT      replica n listens on 127.0.0.1:BASE+n-1 (default 7001)
#   CLUSTER_DATA           data directory (default ./data in the repository)
#   CLUSTER_BIN            directory holding dispatcher and taskmanager; when set,
#                          nothing is built (default: cargo builds them into target/debug)
#   CLUSTER_RESTART_DELAY  seconds before a dead process is started again (default 2)
#   CLUSTER_STOP_GRACE     seconds between SIGTERM and SIGKILL when stopping (default 10)
#
# Needs bash 5.1 or later (`wait -n -p` names the process that exited).
set -euo pipefail

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
    echo "cluster.sh: needs bash 5.1 or later (this is $BASH_VERSION)" >&2
    exit 1
fi

caller_dir=$PWD
absolute() {
    case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$caller_dir/$1" ;;
    esac
}

cd "$(dirname "$0")/.."
repo_dir=$PWD

base_port=${CLUSTER_BASE_PORT:-7001}
if ! [[ $base_port =~ ^[0-9]+$ ]] || ((base_port < 1 || base_port > 65533)); then
    echo "cluster.sh: CLUSTER_BASE_PORT=$base_port is not a port (1-65533)" >&2
    exit 2
fi
if [[ -n ${CLUSTER_DATA:-} ]]; then data=$(absolute "$CLUSTER_DATA"); else data=$repo_dir/data; fi
restart_delay=${CLUSTER_RESTART_DELAY:-2}
stop_grace=${CLUSTER_STOP_GRACE:-10}
if ! [[ $restart_delay =~ ^[0-9]+(\.[0-9]+)?$ && $stop_grace =~ ^[0-9]+$ ]]; then
    echo "cluster.sh: CLUSTER_RESTART_DELAY (seconds) and CLUSTER_STOP_GRACE (whole seconds) must be numbers" >&2
    exit 2
fi
if [[ -n ${CLUSTER_BIN:-} ]]; then
    bin=$(absolute "$CLUSTER_BIN")
else
    # Only the packages with the binaries the cluster and the Quick start use (dispatcher
    # from the first; taskmanager and dispatchctl from the second), not the test and
    # benchmark tools, which would double a fresh checkout's first build.
    cargo build --bins -p dispatcher-server -p dispatcher-client
    bin=$repo_dir/target/debug
fi
for b in dispatcher taskmanager; do
    if [[ ! -x $bin/$b ]]; then
        echo "cluster.sh: $bin/$b is missing (build it, or point CLUSTER_BIN at it)" >&2
        exit 1
    fi
done

replicas=(1 2 3)
tms=(1 2)
addr() { echo "127.0.0.1:$((base_port + $1 - 1))"; }
initial=""
endpoints=""
for id in "${replicas[@]}"; do
    initial+="${initial:+,}$id=$(addr "$id")"
    endpoints+="${endpoints:+,}$(addr "$id")"
done

say() { echo "[cluster] $*" >&2; }

declare -A pid_of=()     # name ("replica 2", "tm-1") -> pid of the running process
declare -A name_of=()    # pid -> name
declare -A started_at=() # name -> $SECONDS at its start
declare -A fast_fails=() # name -> exits in a row within 10 s of starting
pause_pid=""
stopping=""

# `$!` of `cmd > >(sed ...) &` is cmd itself (bash execs a simple command in the forked
# child), so the pids recorded here are the dispatcher and taskmanager processes that
# `dispatchctl cluster status` shows, and no one else's.
start() {
    local name=$1
    case $name in
    "replica "*)
        local id=${name#replica }
        mkdir -p "$data/$id"
        "$bin/dispatcher" --id "$id" --listen "$(addr "$id")" --data-dir "$data/$id" \
            --initial-cluster "$initial" \
            > >(sed -u "s/^/[replica $id] /") 2>&1 &
        ;;
    tm-*)
        local n=${name#tm-}
        "$bin/taskmanager" --id "tm-$n" --slots 4 --dispatchers "$endpoints" \
            --label "rack=r$n" --work-dir "$data/tm-$n" \
            > >(sed -u "s/^/[tm-$n] /") 2>&1 &
        ;;
    esac
    pid_of[$name]=$!
    name_of[$!]=$name
    started_at[$name]=$SECONDS
    say "$name: pid $!"
}

# Whether a process we started is still running as far as bash knows (bash reaps its
# children itself; a pid it has reaped may belong to someone else by now).
running() {
    local p
    for p in $(jobs -rp); do
        [[ $p == "$1" ]] && return 0
    done
    return 1
}

# Sends a signal to one process this script started: only a plain positive pid above 1
# (never 0, 1 or a negative group id, which would reach other processes), through bash's
# builtin, never the external `kill` program (procps-ng 4.0.2 misreads negative pids).
signal_child() {
    local sig=$1 p=$2
    [[ $p =~ ^[0-9]+$ ]] && ((p > 1)) || return 0
    builtin kill "-$sig" "$p" 2>/dev/null || true
}

# SIGTERM to some of our processes, SIGKILL to those still running after the grace.
stop_group() {
    local pids=() p deadline name
    for name in "$@"; do
        p=${pid_of[$name]:-}
        if [[ -n $p ]] && running "$p"; then
            pids+=("$p")
            signal_child TERM "$p"
        fi
    done
    deadline=$((SECONDS + stop_grace))
    while ((SECONDS < deadline)); do
        local left=()
        for p in "${pids[@]}"; do running "$p" && left+=("$p"); done
        ((${#left[@]} == 0)) && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do
        if running "$p"; then
            say "${name_of[$p]} (pid $p) did not stop within ${stop_grace} s: SIGKILL"
            signal_child KILL "$p"
        fi
    done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

stop() {
    local code=${1:-0}
    trap - INT TERM EXIT
    stopping=1
    if [[ -n $pause_pid ]] && running "$pause_pid"; then
        signal_child TERM "$pause_pid"
        wait "$pause_pid" 2>/dev/null || true
    fi
    say "stopping the TaskManagers, then the replicas"
    local names=()
    for n in "${tms[@]}"; do names+=("tm-$n"); done
    stop_group "${names[@]}"
    names=()
    for id in "${replicas[@]}"; do names+=("replica $id"); done
    stop_group "${names[@]}"
    say "stopped"
    exit "$code"
}
trap 'stop 0' INT TERM
trap 'stop 1' EXIT

how() {
    local status=$1 sig
    if ((status > 128)); then
        sig=$((status - 128))
        case $sig in
        1) sig="$sig (SIGHUP)" ;; 2) sig="$sig (SIGINT)" ;; 3) sig="$sig (SIGQUIT)" ;;
        6) sig="$sig (SIGABRT)" ;; 9) sig="$sig (SIGKILL)" ;; 11) sig="$sig (SIGSEGV)" ;;
        15) sig="$sig (SIGTERM)" ;;
        esac
        echo "was killed by signal $sig, exit status $status"
    else
        echo "exited with status $status"
    fi
}

mkdir -p "$data"
for id in "${replicas[@]}"; do start "replica $id"; done
for n in "${tms[@]}"; do start "tm-$n"; done
say "cluster up: endpoints $endpoints, data under $data (Ctrl-C to stop)"

while true; do
    dead=""
    status=0
    wait -n -p dead "${pid_of[@]}" || status=$?
    # No pid: wait was interrupted by a signal, whose trap stops everything.
    [[ -z ${dead:-} ]] && continue
    name=${name_of[$dead]}
    unset "name_of[$dead]"
    if ((SECONDS - started_at[$name] < 10)); then
        fast_fails[$name]=$((${fast_fails[$name]:-0} + 1))
    else
        fast_fails[$name]=0
    fi
    if ((fast_fails[$name] >= 5)); then
        say "$name (pid $dead) $(how "$status"), the fifth time within 10 s of its start: giving up"
        stop 1
    fi
    say "$name (pid $dead) $(how "$status"); the others keep running; restarting it in ${restart_delay} s"
    # In the background, so that Ctrl-C during the pause is handled at once.
    sleep "$restart_delay" &
    pause_pid=$!
    wait "$pause_pid" || true
    pause_pid=""
    [[ -n $stopping ]] && break
    start "$name"
done
