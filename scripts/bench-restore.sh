#!/usr/bin/env bash
# Restore speed: `pct restore` (vzkit's extraction) against `zstd -d | tar x` with PVE's
# restore flags, on the same >= 500 MB mixed tree archived by GNU tar with vzdump's flags.
# Prints both times and their ratio (vzkit / GNU tar; target <= 1.0).
#
# Usage (as root): bash scripts/bench-restore.sh [SIZE_MB]   (default 600)
# BENCH_DIR selects the scratch directory (default: a new one under /tmp); it is removed at
# the end. The release binaries are built with cargo (CARGO_TARGET_DIR is honoured).
set -euo pipefail

size_mb=${1:-600}
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/target}
bench=${BENCH_DIR:-$(mktemp -d /tmp/vzkit-bench-XXXXXX)}
mkdir -p "$bench"
cleanup() { rm -rf "$bench"; }
trap cleanup EXIT

(cd "$here" && cargo build --release -q -p vzkit-cli)
pct="$target/release/pct"

common_flags=(--one-file-system -p --sparse --numeric-owner --acls --xattrs
  '--xattrs-include=user.*' --xattrs-include=security.capability
  --warning=no-file-ignored --warning=no-xattr-write)

echo "building a ${size_mb} MB mixed tree in $bench/src ..."
src=$bench/src
mkdir -p "$src"/{small1k,small4k,small16k,mid256k,text,big,etc,links}
per=$((size_mb / 6))
# Incompressible small and medium files from one random blob, cut with split.
head -c "$((per / 2))M" /dev/urandom > "$bench/blob"
split -b 1k -a 5 "$bench/blob" "$src/small1k/f_"
head -c "${per}M" /dev/urandom > "$bench/blob"
split -b 4k -a 5 "$bench/blob" "$src/small4k/f_"
head -c "${per}M" /dev/urandom > "$bench/blob"
split -b 16k -a 5 "$bench/blob" "$src/small16k/f_"
head -c "${per}M" /dev/urandom > "$bench/blob"
split -b 256k -a 4 "$bench/blob" "$src/mid256k/f_"
rm "$bench/blob"
# Compressible text files and large files, one sparse.
set +o pipefail # `yes` ends with SIGPIPE
yes 'the quick brown fox jumps over the lazy dog 0123456789' | head -c "${per}M" > "$bench/text"
set -o pipefail
split -b 64k -a 4 "$bench/text" "$src/text/t_"
rm "$bench/text"
head -c "$((per / 2))M" /dev/urandom > "$src/big/random.bin"
truncate -s 2G "$src/big/sparse.img"
head -c 8M /dev/urandom | dd of="$src/big/sparse.img" bs=1M seek=1000 conv=notrunc status=none
# Metadata variety: owners, modes, symlinks, hard links, an ACL and an xattr.
echo 12 > "$src/etc/debian_version"
chown -R 1000:1000 "$src/small4k"
chmod 0600 "$src"/small16k/f_aaa*
for i in $(seq 1 500); do ln -s "../small1k/f_aaaaa" "$src/links/l$i"; done
for i in $(seq 1 200); do ln "$src/mid256k/f_aaaa" "$src/links/h$i"; done
setfacl -m u:1234:rw "$src/etc/debian_version" || true
setfattr -n user.bench -v yes "$src/etc/debian_version" || true

echo "archiving with GNU tar (vzdump flags) | zstd ..."
mkdir -p "$bench/tmp/etc/vzdump"
printf 'arch: amd64\nhostname: bench\nostype: debian\nrootfs: local:100/vm-100-disk-0.raw,size=8G\n' \
  > "$bench/tmp/etc/vzdump/pct.conf"
: > "$bench/tmp/etc/vzdump/pct.fw"
archive=$bench/vzdump-lxc-100-2026_01_01-00_00_00.tar.zst
tar cpf - --totals "${common_flags[@]}" --one-file-system --warning=no-file-ignored \
  --directory="$bench/tmp" ./etc/vzdump/pct.conf ./etc/vzdump/pct.fw \
  --directory="$src" --no-anchored ./ 2>/dev/null | zstd -q -T0 > "$archive"
rm -rf "$src"
du -sh "$archive"

drop_caches() {
  sync
  if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
  cat "$archive" > /dev/null   # both sides read the archive from the page cache
}

min() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (a < b ? a : b) }'; }
TIMEFORMAT='%R %U %S'

# Alternating rounds; the best wall time of each side counts (the machine may be shared).
# CPU time (user + system, all processes of the side) is shown as well.
rounds=${ROUNDS:-3}
best_tar=999999
best_ours=999999
for r in $(seq 1 "$rounds"); do
  mkdir -p "$bench/tar-dst"
  drop_caches
  read -r tar_s tar_u tar_y < <({ time (
    zstd -q -d -c "$archive" | tar xpf - --totals "${common_flags[@]}" \
      -C "$bench/tar-dst" --skip-old-files --anchored --exclude './dev/*' 2>/dev/null
    sync
  ); } 2>&1)
  rm -rf "$bench/tar-dst"

  export VZKIT_ROOT=$bench/root
  mkdir -p "$VZKIT_ROOT"
  drop_caches
  read -r ours_s ours_u ours_y < <({ time (
    "$pct" restore 900 "$archive" --rootfs local:0 > /dev/null 2> "$bench/pct.err" ||
      touch "$bench/pct.failed"
    sync
  ); } 2>&1)
  if [ -e "$bench/pct.failed" ]; then
    cat "$bench/pct.err" >&2
    exit 1
  fi
  rm -rf "$VZKIT_ROOT"

  printf 'round %d: GNU tar %.2f s (cpu %.2f s), vzkit %.2f s (cpu %.2f s)\n' "$r" \
    "$tar_s" "$(awk -v a="$tar_u" -v b="$tar_y" 'BEGIN { print a + b }')" \
    "$ours_s" "$(awk -v a="$ours_u" -v b="$ours_y" 'BEGIN { print a + b }')"
  best_tar=$(min "$best_tar" "$tar_s")
  best_ours=$(min "$best_ours" "$ours_s")
done

ratio=$(awk -v a="$best_ours" -v b="$best_tar" 'BEGIN { printf "%.3f", a / b }')
printf 'archive: %s\n' "$(du -h "$archive" | cut -f1)"
printf 'GNU tar (zstd -d | tar x), best of %d: %.2f s\n' "$rounds" "$best_tar"
printf 'vzkit (pct restore), best of %d:       %.2f s\n' "$rounds" "$best_ours"
printf 'ratio vzkit / GNU tar:                 %s\n' "$ratio"
