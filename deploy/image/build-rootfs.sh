#!/usr/bin/env bash
# Assembles the root file system of the dispatcher image from this project's own release
# binaries and the host's shared libraries they link, so the image can be built FROM
# scratch on a machine where no base image can be pulled.
#
#   deploy/image/build-rootfs.sh target/release target/image/rootfs
set -euo pipefail
bin_dir=${1:?release binary directory}
root=${2:?output root}

rm -rf "$root"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/data" "$root/tmp" "$root/work" \
    "$root/certs" "$root/tm-certs"
chmod 1777 "$root/tmp"

for b in dispatcher dispatchctl taskmanager; do
    install -m 0755 "$bin_dir/$b" "$root/usr/local/bin/$b"
done

# Every shared library the binaries need, at the path the loader expects (ldd prints
# "name => /path (addr)" or "/path (addr)" for the loader itself).
for b in dispatcher dispatchctl taskmanager; do
    ldd "$bin_dir/$b" | awk '/=> \// { print $3 } /^\s*\// { print $1 }'
done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# The loader is also looked up through /lib64 on x86-64.
if [ -e /lib64/ld-linux-x86-64.so.2 ] && [ ! -e "$root/lib64/ld-linux-x86-64.so.2" ]; then
    mkdir -p "$root/lib64"
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi

# Command tasks run through /bin/sh in the examples: ship a shell and the few tools the
# examples use, with their libraries.
for tool in /bin/sh /bin/sleep /bin/echo /bin/cat; do
    real=$(readlink -f "$tool")
    mkdir -p "$root$(dirname "$tool")"
    cp -L "$real" "$root$tool"
    ldd "$real" 2>/dev/null | awk '/=> \// { print $3 } /^\s*\// { print $1 }' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
    done
done

# A non-root user owning the data and work directories.
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
dispatcher:x:10001:10001:dispatcher:/data:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
dispatcher:x:10001:
GROUP
echo "hosts: files dns" > "$root/etc/nsswitch.conf"
# The data and work directories must be writable by the non-root user, and so must the
# mount points of the compose cluster's certificate volumes (its one-shot services write
# them as that user). COPY into a scratch image makes everything root's, so they are
# world-writable with the sticky bit (named volumes start from these permissions).
chmod 1777 "$root/data" "$root/work" "$root/certs" "$root/tm-certs"
echo "rootfs ready in $root ($(du -sh "$root" | cut -f1))"
