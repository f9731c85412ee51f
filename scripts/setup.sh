#!/usr/bin/env bash
# Installs what vzkit's build, demo and tests need on a fresh Debian machine (as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

packages=(
    acl attr e2fsprogs util-linux mount tar zstd gzip lzop pigz
    qemu-utils coreutils findutils btrfs-progs zfs-fuse rsync
    lxc lxcfs busybox-static uidmap bridge-utils debootstrap
    linux-image-amd64 qemu-system-x86 lvm2 thin-provisioning-tools quota
    ceph-mon ceph-osd ceph-common qemu-system-common qemu-block-extra uuid-runtime
    tgt libiscsi-bin open-iscsi udev restic bc xfsprogs time
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
