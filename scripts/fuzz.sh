#!/usr/bin/env bash
# Runs vzkit's libFuzzer targets (fuzz/) for a while each, seeding the archive targets with
# archives GNU tar writes with PVE's flags. Needs root (ACLs, devices in the seeds), a nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
#   bash scripts/fuzz.sh [seconds per target] [target...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    targets=(tar_reader extract pct_conf mount_point storage_cfg volume_id vzdump_conf)
fi
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is required (cargo install cargo-fuzz)" >&2; exit 1; }

# Seeds for the archive targets: a small tree with the member kinds PVE archives carry.
seeds=$(mktemp -d)
trap 'rm -rf "$seeds"' EXIT
t=$seeds/tree
mkdir -p "$t/etc/vzdump" "$t/dir/sub"
echo "arch: amd64" > "$t/etc/vzdump/pct.conf"
: > "$t/etc/vzdump/pct.fw"
printf 'hello\n' > "$t/dir/file"
ln "$t/dir/file" "$t/dir/hardlink"
ln -s ../dir/file "$t/dir/sub/link"
ln -s /etc/passwd "$t/abs-link"
truncate -s 1M "$t/sparse"
printf 'data' | dd of="$t/sparse" bs=1 seek=524288 conv=notrunc status=none
mkfifo "$t/fifo"
mknod "$t/null" c 1 3
chmod 4755 "$t/dir/file"
setfacl -m u:1000:rw "$t/dir/file" 2>/dev/null || true
setfattr -n user.vzkit -v seed "$t/dir/file" 2>/dev/null || true
long=$t/$(printf 'n%.0s' {1..120})/$(printf 'm%.0s' {1..120})
mkdir -p "$(dirname "$long")" && echo long > "$long"
flags=(--one-file-system -p --sparse --numeric-owner --acls --xattrs
    --xattrs-include='user.*' --xattrs-include=security.capability)
for target in tar_reader extract; do
    c=fuzz/corpus/$target
    mkdir -p "$c"
    tar -C "$t" "${flags[@]}" -cf - ./etc/vzdump/pct.conf ./etc/vzdump/pct.fw ./ |
        { printf '\0'; cat; } > "$c/seed-pve-layout"
    tar -C "$t" --format=gnu -cf - ./dir | { printf '\0'; cat; } > "$c/seed-gnu"
    tar -C "$t" --format=posix -cf - ./dir ./sparse | { printf '\2'; cat; } > "$c/seed-pax-unpriv"
done

for target in "${targets[@]}"; do
    echo "fuzz: $target for ${secs}s"
    (cd fuzz && cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048)
done
