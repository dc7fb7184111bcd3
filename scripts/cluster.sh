#!/usr/bin/env bash
# Runs a three-replica dispatcher cluster and two TaskManagers on loopback in the
# foreground, as their supervisor: replica data under $CLUSTER_DATA/<id>, TaskManager
# work directories under $CLUSTER_DATA/tm-<n>, every log line prefixed with its process.
#
# With TLS and tokens, as a cluster should run: the first start writes a development CA,
# the replicas' certificates and an admin token into $CLUSTER_DATA/certs (`dispatchctl
# dev-certs`; kept and reused afterwards), every replica serves TLS with its
# certificate and is given the admin token as --bootstrap-token-file (the cluster
# creates that token once, when it first has a leader), and once the cluster answers,
# a `taskmanager` token for the ids tm-* is made with the admin token and kept in
# $CLUSTER_DATA/certs/taskmanager.token (mode 0600) for the TaskManagers. At the end it
# prints the line to export in another shell (DISPATCHER_CA, DISPATCHER_TOKEN_FILE).
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
#   CLUSTER_HTTP_BASE_PORT replica n serves HTTPS (Flink REST API, /metrics, dashboard)
#                          on 127.0.0.1:BASE+n-1 (default 8081)
#   CLUSTER_DATA           data directory (default ./data in the repository); the
#                          certificates and tokens are in its certs/ subdirectory
#   CLUSTER_BIN            directory holding dispatcher, taskmanager and dispatchctl; when set,
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
for b in dispatcher taskmanager dispatchctl; do
    if [[ ! -x $bin/$b ]]; then
        echo "cluster.sh: $bin/$b is missing (build it, or point CLUSTER_BIN at it)" >&2
        exit 1
    fi
done

replicas=(1 2 3)
tms=(1 2)
addr() { echo "127.0.0.1:$((base_port + $1 - 1))"; }
http_base_port=${CLUSTER_HTTP_BASE_PORT:-8081}
if ! [[ $http_base_port =~ ^[0-9]+$ ]] || ((http_base_port < 1 || http_base_port > 65533)); then
    echo "cluster.sh: CLUSTER_HTTP_BASE_PORT=$http_base_port is not a port (1-65533)" >&2
    exit 2
fi
http_addr() { echo "127.0.0.1:$((http_base_port + $1 - 1))"; }
initial=""
endpoints=""
for id in "${replicas[@]}"; do
    initial+="${initial:+,}$id=$(addr "$id")"
    endpoints+="${endpoints:+,}$(addr "$id")"
done

say() { echo "[cluster] $*" >&2; }

# Every TLS file and token is passed by flag below; a shell that exported the variables
# of another cluster (or of this one, as the README says) must not add to them (a token
# and a token file together are refused) or replace them.
unset DISPATCHER_CA DISPATCHER_CERT DISPATCHER_KEY DISPATCHER_TOKEN DISPATCHER_TOKEN_FILE \
    DISPATCHER_TLS_CERT DISPATCHER_TLS_KEY DISPATCHER_TLS_CA DISPATCHER_BOOTSTRAP_TOKEN_FILE

certs=$data/certs
tm_token=$certs/taskmanager.token
# The admin token and CA, as dispatchctl flags: for the TaskManagers' token.
admin_ctl=("$bin/dispatchctl" --endpoints "$endpoints" --timeout 5
    --ca "$certs/ca.crt" --token-file "$certs/admin.token")

mkdir -p "$data"
# A cluster whose replicas have no data yet bootstraps afresh and knows no token but the
# admin one: a TaskManager token kept from an earlier cluster would be refused.
fresh=1
for id in "${replicas[@]}"; do [[ -e $data/$id ]] && fresh=""; done
if [[ ! -e $certs/ca.crt ]]; then
    # Without --force: files of an earlier set (the admin token a cluster in $data knows)
    # are never overwritten; dev-certs names the file it refuses to replace.
    if ! out=$("$bin/dispatchctl" dev-certs --out "$certs" --replicas "${#replicas[@]}" 2>&1 >/dev/null); then
        echo "cluster.sh: dispatchctl dev-certs --out $certs failed:" >&2
        echo "$out" >&2
        echo "cluster.sh: remove $certs (and $data, whose cluster knows its admin token) to start afresh" >&2
        exit 1
    fi
    say "wrote a development CA, the replicas' certificates and an admin token into $certs"
fi
if [[ -n $fresh && -e $tm_token ]]; then
    say "new replica data: $tm_token belongs to an earlier cluster, making a new one"
    rm -f "$tm_token"
fi

declare -A pid_of=()     # name ("replica 2", "tm-1") -> pid of the running process
declare -A name_of=()    # pid -> name
declare -A started_at=() # name -> $SECONDS at its start
declare -A fast_fails=() # name -> exits in a row within 10 s of starting
aux_pid="" # a pause or a dispatchctl call the script waits for
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
            --initial-cluster "$initial" --http-listen "$(http_addr "$id")" \
            --tls-cert "$certs/replica-$id.crt" --tls-key "$certs/replica-$id.key" \
            --tls-ca "$certs/ca.crt" --bootstrap-token-file "$certs/admin.token" \
            > >(sed -u "s/^/[replica $id] /") 2>&1 &
        ;;
    tm-*)
        local n=${name#tm-}
        "$bin/taskmanager" --id "tm-$n" --slots 4 --dispatchers "$endpoints" \
            --label "rack=r$n" --work-dir "$data/tm-$n" \
            --ca "$certs/ca.crt" --token-file "$tm_token" \
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
    if [[ -n $aux_pid ]] && running "$aux_pid"; then
        signal_child TERM "$aux_pid"
        wait "$aux_pid" 2>/dev/null || true
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

# Runs a command in the background and waits for it: bash runs a trap only between
# foreground commands, so Ctrl-C or SIGTERM during a pause or a call is handled at once
# (stop() ends the command through aux_pid). Returns the command's status.
wait_aux() {
    "$@" &
    aux_pid=$!
    local code=0
    wait "$aux_pid" || code=$?
    aux_pid=""
    return "$code"
}

# The TaskManagers' token: made with the admin token once the cluster answers (a token
# refused for a while is normal: the admin token exists once the first leader has
# committed it), kept in $tm_token (mode 0600). Gives up, stopping everything, after 60 s
# or at once on a replica that died or a dispatchctl usage error.
make_tm_token() {
    local tmp=$certs/.taskmanager.token.new err=$certs/.taskmanager.token.err
    local deadline=$((SECONDS + 60)) code id p
    while true; do
        for id in "${replicas[@]}"; do
            p=${pid_of[replica $id]}
            if ! running "$p"; then
                code=0
                wait "$p" 2>/dev/null || code=$?
                say "replica $id (pid $p) $(how "$code") while the cluster was starting (its log is above)"
                stop 1
            fi
        done
        (umask 077 && : >"$tmp")
        code=0
        wait_aux "${admin_ctl[@]}" token create --role taskmanager --name taskmanagers \
            --task-manager 'tm-*' >"$tmp" 2>"$err" || code=$?
        if ((code == 0)); then
            chmod 600 "$tmp"
            mv -f "$tmp" "$tm_token"
            rm -f "$err"
            say "made the TaskManagers' token (role taskmanager, ids tm-*) in $tm_token"
            return 0
        fi
        if ((code == 4)) && grep -q "already exists" "$err"; then
            # The cluster has it but its secret was lost with the file: replace it.
            say "the cluster has a token named taskmanagers but no $tm_token: revoking it for a new one"
            wait_aux "${admin_ctl[@]}" token revoke taskmanagers >/dev/null 2>"$err" || true
        fi
        if ((code == 2 || SECONDS >= deadline)); then
            say "cannot make the TaskManagers' token (dispatchctl exit status $code): $(cat "$err")"
            if ((code == 7)); then
                say "the cluster refuses $certs/admin.token: if $data holds a cluster made with other certificates, remove $data to start afresh"
            fi
            rm -f "$tmp" "$err"
            stop 1
        fi
        wait_aux sleep 0.5 || true
    done
}

for id in "${replicas[@]}"; do start "replica $id"; done
[[ -s $tm_token ]] || make_tm_token
for n in "${tms[@]}"; do start "tm-$n"; done
say "cluster up: endpoints $endpoints, data under $data, TLS and tokens on (Ctrl-C to stop)"
say "to talk to it from another shell, export:"
if ((base_port != 7001)); then
    echo "export DISPATCHCTL_ENDPOINTS=$endpoints"
fi
echo "export DISPATCHER_CA=$certs/ca.crt DISPATCHER_TOKEN_FILE=$certs/admin.token"
say "dashboard: https://$(http_addr 1)/ (trust $certs/ca.crt; sign in with the token in $certs/admin.token)"

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
    aux_pid=$!
    wait "$aux_pid" || true
    aux_pid=""
    [[ -n $stopping ]] && break
    start "$name"
done
