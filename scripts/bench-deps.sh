#!/usr/bin/env bash
# Installs what `dispatch-bench` compares against: etcd 3.4 (Debian package etcd-server,
# /usr/bin/etcd) and ZooKeeper 3.8 (Debian package zookeeper, jars under
# /usr/share/zookeeper and /usr/share/java), plus a headless JRE if `java` is missing.
# It installs only what is missing, runs `apt-get update` only when it installs, and
# never leaves a system service running: the benchmark starts its own clusters on free
# ports. zookeeperd (the ZooKeeper service package) is deliberately not installed.
#
#   sudo scripts/bench-deps.sh        # as root on Debian 12 (bookworm)
set -euo pipefail

zk_jar=/usr/share/java/zookeeper.jar
policy=/usr/sbin/policy-rc.d

packages=()
if ! command -v etcd >/dev/null 2>&1; then
    packages+=(etcd-server)
else
    echo "bench-deps: etcd present: $(command -v etcd)"
fi
if [[ ! -e "$zk_jar" ]]; then
    packages+=(zookeeper)
else
    echo "bench-deps: ZooKeeper present: $(readlink -f "$zk_jar")"
fi
if ! command -v java >/dev/null 2>&1; then
    packages+=(default-jre-headless)
else
    echo "bench-deps: java present: $(command -v java)"
fi

if [[ ${#packages[@]} -eq 0 ]]; then
    echo "bench-deps: nothing to install"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "bench-deps: must run as root to install: ${packages[*]}" >&2
    exit 1
fi

# etcd processes that ran before the install are not ours to stop.
before=" $(pgrep -x etcd | tr '\n' ' ' || true) "

# Keep package scripts from starting services: invoke-rc.d and deb-systemd-invoke obey
# policy-rc.d, and 101 means "action forbidden". Leave an existing one (Docker images
# ship one) untouched; remove only the one this script put there.
own_policy=false
cleanup() {
    if $own_policy; then
        rm -f "$policy"
        echo "bench-deps: removed temporary $policy"
    fi
}
trap cleanup EXIT
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=true
    echo "bench-deps: installed temporary $policy (exit 101) so no service starts"
fi

echo "bench-deps: apt-get update"
apt-get update -q
echo "bench-deps: apt-get install ${packages[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"

# If a package script started etcd anyway (say, on 2379), stop and disable it.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
for pid in $(pgrep -x etcd || true); do
    [[ "$pid" =~ ^[0-9]+$ ]] && ((pid > 1)) || continue
    [[ "$before" == *" $pid "* ]] && continue
    echo "bench-deps: stopping etcd pid $pid that the package started"
    kill -TERM "$pid" 2>/dev/null || true
done

echo "bench-deps: etcd: $(etcd --version 2>/dev/null | head -n 1 || echo missing)"
echo "bench-deps: ZooKeeper: $(readlink -f "$zk_jar" 2>/dev/null || echo missing)"
echo "bench-deps: java: $(java -version 2>&1 | head -n 1 || echo missing)"
