#!/usr/bin/env bash
# vzkit demo on the embedded default: a relocatable root (./demo-root, or $VZKIT_ROOT) whose
# only storage is the built-in `local` dir storage. Builds a tiny OS template on the spot,
# creates a container from it (`pct create`), writes into its volumes, backs it up
# (`vzdump`), reads the backed-up config (`pvesm extractconfig`), restores it as a new
# container (`pct restore`), compares the two trees and runs the restored container on LXC.
# Needs root (loop devices, mounts). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# VZKIT_BIN: a directory of already-built vzkit binaries (skips the release build).
if [ -z "${VZKIT_BIN:-}" ]; then
    cargo build --release --locked --workspace
fi
B=${VZKIT_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release}
export VZKIT_ROOT=${VZKIT_ROOT:-$PWD/demo-root}

cleanup() {
    # Unmount anything the demo left mounted (deepest first); keep the files for inspection.
    findmnt -rn -o TARGET | awk -v root="$VZKIT_ROOT/" 'index($0, root) == 1' | sort -r |
    while read -r m; do
        umount -d "$m" || umount -l -d "$m"
    done
}
trap cleanup EXIT
cleanup
rm -rf "$VZKIT_ROOT"
mkdir -p "$VZKIT_ROOT/etc/pve/lxc"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "VZKIT_ROOT=$VZKIT_ROOT (no storage.cfg: the embedded 'local' dir storage is used)"

# A small Debian-flavoured template: busybox plus the files OS type detection looks at.
tpl=$(mktemp -d)
mkdir -p "$tpl"/{bin,sbin,etc,root,tmp,var/log,dev,proc,sys}
cp /bin/busybox "$tpl/bin/busybox"
for app in sh ls cat echo mkdir rm cp mv ln ps hostname; do ln -s busybox "$tpl/bin/$app"; done
ln -s ../bin/busybox "$tpl/sbin/init"
echo 12.0 > "$tpl/etc/debian_version"
printf 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n' > "$tpl/etc/os-release"
echo 'root:x:0:0:root:/root:/bin/sh' > "$tpl/etc/passwd"
echo 'root:x:0:' > "$tpl/etc/group"
chmod 1777 "$tpl/tmp"
cache=$VZKIT_ROOT/var/lib/vz/template/cache
mkdir -p "$cache"
tar -C "$tpl" --numeric-owner -czf "$cache/demo-debian-12_1.0_amd64.tar.gz" .
rm -rf "$tpl"

step "$B/pvesm" status
step "$B/pvesm" list local --content vztmpl
step "$B/pct" create 100 local:vztmpl/demo-debian-12_1.0_amd64.tar.gz --rootfs local:1 \
    --mp0 local:0.5,mp=/srv/data,backup=1,acl=1 --hostname demo --memory 512
step "$B/pct" config 100
step "$B/pct" mount 100
root=$VZKIT_ROOT/var/lib/lxc/100/rootfs
echo "hello from vzkit" > "$root/srv/data/hello.txt"
setfacl -m u:1000:rw "$root/srv/data/hello.txt"
truncate -s 64M "$root/root/sparse.img"
step ls -l "$root" "$root/srv/data"
step "$B/pct" unmount 100

step "$B/vzdump" 100 --storage local --compress zstd --notes-template '{{guestname}} demo backup'
step "$B/pvesm" list local --content backup
volid=$("$B/pvesm" list local --content backup --output-format json | sed -n 's/.*"volid":"\([^"]*\)".*/\1/p' | head -1)
step "$B/pvesm" extractconfig "$volid"

step "$B/pct" restore 101 "$volid" --storage local --hostname demo-restored
step "$B/pct" config 101
step "$B/pct" mount 100
step "$B/pct" mount 101
# Compare both containers' trees (rootfs and mount point): names, types, modes, owners,
# sizes, link targets, contents, ACLs. `lost+found` belongs to each new filesystem and
# `etc/vzdump` is where the archive carried the config.
list() {
    (cd "$1" && find . \( -name lost+found -o -path ./etc/vzdump \) -prune -o \
        -printf '%p %y %m %U:%G %s %l\n' | sort)
    (cd "$1" && find . -name lost+found -prune -o -type f -print0 | sort -z | xargs -0 md5sum)
    getfacl -P -n "$1/srv/data/hello.txt" 2>/dev/null | tail -n +2
}
a=$(list "$VZKIT_ROOT/var/lib/lxc/100/rootfs")
b=$(list "$VZKIT_ROOT/var/lib/lxc/101/rootfs")
if [ "$a" = "$b" ]; then
    echo "restored tree matches the original ($(echo "$a" | wc -l) lines compared)"
else
    diff <(echo "$a") <(echo "$b")
    exit 1
fi
step du -h --apparent-size "$VZKIT_ROOT/var/lib/lxc/101/rootfs/root/sparse.img"
step du -h "$VZKIT_ROOT/var/lib/lxc/101/rootfs/root/sparse.img"
step "$B/pct" unmount 101
step "$B/pct" unmount 100
# The restored container runs on LXC (busybox init, no network).
step "$B/pct" start 101
step "$B/pct" status 101
step "$B/pct" exec 101 -- cat /srv/data/hello.txt
step "$B/pct" exec 101 -- hostname
step "$B/pct" stop 101
step "$B/pct" list
step "$B/pvesm" list local
