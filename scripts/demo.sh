#!/usr/bin/env bash
# vzkit demo on the embedded default: a relocatable root (./demo-root, or $VZKIT_ROOT) whose
# only storage is the built-in `local` dir storage. Creates a container config, allocates and
# formats its volumes, mounts them, writes into them, and lists the storage.
# Needs root (loop devices, mounts). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked --workspace
B=$PWD/target/release
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

cat > "$VZKIT_ROOT/etc/pve/lxc/100.conf" <<'CONF'
#vzkit demo container
arch: amd64
hostname: demo
memory: 512
ostype: debian
CONF
echo "VZKIT_ROOT=$VZKIT_ROOT (no storage.cfg: the embedded 'local' dir storage is used)"
step "$B/pvesm" status
step "$B/pct" set 100 --rootfs local:1 --mp0 local:0.5,mp=/srv/data,backup=1,acl=1 --mp1 local:0,mp=/srv/share
step "$B/pct" config 100
step "$B/pct" mount 100
root=$VZKIT_ROOT/var/lib/lxc/100/rootfs
step findmnt -R "$root"
echo "hello from vzkit" > "$root/srv/data/hello.txt"
step ls -l "$root/srv/data"
step "$B/pct" list
step "$B/pct" unmount 100
step "$B/pct" resize 100 rootfs +512M
step "$B/pvesm" list local
step "$B/pvesm" list local --output-format json-pretty
