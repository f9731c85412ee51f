#!/usr/bin/env bash
# Benchmark: vzkit's deduplicating store (`dedup` storage) against restic and vzkit's own
# vzdump to tar.zst, on the same container and the same series of versions, in one run.
#
# Builds a container (rootfs on a loop-mounted ext4 image of the `local` dir storage, created
# with the real pct binary) holding >= 1 GB of container-like data: real binaries (a copy of
# /usr/bin), many small files (/usr/share/{doc,man,locale}), incompressible blobs,
# compressible logs. Then 10 versions: version 1 as built, versions 2..10 each change ~1% of
# the files (appends to docs), append 1 MiB to a log, rename ~0.5% of the man pages and
# overwrite 1 MiB inside a blob. Measured:
#   * dedup:  vzdump --storage backups --mode stop (metadata change detection), per version,
#             plus an unchanged re-backup of version 1 (its volume image unchanged: the tree
#             is taken over unwalked) and one more after a writable mount of the volume
#             (which changes the image but no file: the tree is guided by the volume's
#             inode table, so hardly anything is walked);
#   * tar.zst: vzdump --storage archives --compress zstd --mode stop, per version;
#   * restic: restic backup of the rootfs mounted read-only, per version, plus an
#             unchanged re-backup of version 1;
# first backup, unchanged re-backup, 1%-change re-backup (version 2), total store size after
# 10 versions (du of the store / repository / the 10 archives), restore of version 10
# (pct restore for dedup and tar.zst, which includes creating and formatting the volume;
# restic restore into a directory). Every measured step starts after a `sync` (untimed),
# so that none pays for the write-back of the one before. First backups and restores of
# dedup and tar.zst are repeated (BENCH_ROUNDS, default 5, alternating which goes first)
# and reported as medians; the unchanged and 1% change ratios are to the median first
# backup.
# Targets: first backup no slower than tar.zst; unchanged <= 5% of the first; 1% change
# <= 10%; store size <= restic's; restore no slower than from the tar.zst.
#
# The three repositories (the dedup store, the directory of the tar.zst archives, the restic
# repository) share one backup file system: by default a fresh journaled ext4 on a loop
# image, as a backup disk would be; BENCH_BACKUP_FS=scratch puts them on the file system of
# BENCH_DIR instead (creating chunk files costs much more on an ext4 without a journal,
# which checks every free inode it considers for recent deletion).
# Needs root, restic, zstd, e2fsprogs, util-linux and about 12 GB free below BENCH_DIR.
# Usage: scripts/bench-dedup.sh
# Environment: BENCH_DIR (scratch parent, default /var/tmp), BENCH_BACKUP_FS (ext4 |
# scratch), BENCH_ROUNDS. The machine should be idle: the load average is printed with the results.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p vzkit-cli -p vzkit-dedup >&2
BIN=${CARGO_TARGET_DIR:-target}/release
ROOT=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vzkit-bench-dedup-XXXXXX")
export VZKIT_ROOT=$ROOT TZ=UTC RESTIC_PASSWORD=bench
VMID=900
STORE=$ROOT/srv/dedup
REPO=$ROOT/srv/restic
DUMP=$ROOT/srv/dump

cleanup() {
    set +e
    "$BIN/pct" unmount "$VMID" >/dev/null 2>&1
    findmnt -rn -o TARGET | grep "^$ROOT" | sort -r | while read -r m; do umount -d "$m"; done
    rm -rf "$ROOT"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l | xargs printf '%.2f'; }

BACKUP_FS=${BENCH_BACKUP_FS:-ext4}
mkdir -p "$ROOT/srv"
if [ "$BACKUP_FS" = ext4 ]; then
    truncate -s 16G "$ROOT/backup.img"
    mkfs.ext4 -q -F "$ROOT/backup.img"
    mount -o loop "$ROOT/backup.img" "$ROOT/srv"
fi
mkdir -p "$ROOT/etc/pve/lxc" "$STORE" "$REPO" "$DUMP"
cat >"$ROOT/etc/pve/storage.cfg" <<CFG
dir: local
	path $ROOT/var/lib/vz
	content rootdir,images,vztmpl

dir: archives
	path $DUMP
	content backup

dedup: backups
	path $STORE
	content backup
CFG
printf 'arch: amd64\nhostname: bench\nmemory: 512\nostype: debian\n' >"$ROOT/etc/pve/lxc/$VMID.conf"
"$BIN/pct" set "$VMID" --rootfs local:3 >&2

# Loop devices are shared with whatever else runs on the host: a mount can lose a race for
# one; such steps are retried (timings are taken from the successful attempt only).
mount_ct() {
    local i out
    for i in 1 2 3; do
        if out=$("$BIN/pct" mount "$VMID" 2>&1); then
            sed -n "s/^mounted CT $VMID in '\(.*\)'$/\1/p" <<<"$out"
            return 0
        fi
        echo "retrying pct mount: $out" >&2
        "$BIN/pct" unmount "$VMID" >/dev/null 2>&1 || true
        sleep 2
    done
    return 1
}

echo "== building the container tree" >&2
CT=$(mount_ct)
mkdir -p "$CT/usr" "$CT/usr/share" "$CT/random" "$CT/var/log"
cp -a /usr/bin "$CT/usr/bin"
for d in doc man locale; do cp -a "/usr/share/$d" "$CT/usr/share/$d"; done
for i in 1 2; do head -c 64M /dev/urandom >"$CT/random/blob$i"; done
for f in 1 2; do
    seq 1 1200000 | awk -v f="$f" '{ printf "2024-05-%02d 12:%02d:%02d host%d sshd[%d]: session %d opened for user u%d from 10.0.%d.%d\n", $1%28+1, $1%60, ($1*7)%60, f, $1%32768, $1, $1%97, $1%256, ($1*13)%256 }' >"$CT/var/log/app$f.log"
done
head -c 40M /dev/urandom | base64 -w 100 >"$CT/var/log/base64.txt"
SIZE=$(du -sb "$CT" | cut -f1)
FILES=$(find "$CT" -type f | wc -l)
"$BIN/pct" unmount "$VMID"
sync
echo "== tree: $SIZE bytes, $FILES files" >&2

change() { # version number
    local v=$1 CT
    CT=$(mount_ct)
    find "$CT/usr/share/doc" -type f | sort | awk -v v="$v" 'NR % 100 == v % 100' | while read -r f; do
        echo "changed in version $v" >>"$f"
    done
    find "$CT/usr/share/man" -type f -name '*.gz' | sort | awk -v v="$v" 'NR % 200 == v' | while read -r f; do
        mv "$f" "$f.v$v"
    done
    seq 1 12000 | awk -v v="$v" '{ printf "2024-06-%02d version %d line %d appended\n", v, v, $1 }' >>"$CT/var/log/app1.log"
    head -c 1M /dev/urandom | dd of="$CT/random/blob1" bs=1M seek=$((v * 3)) conv=notrunc status=none
    "$BIN/pct" unmount "$VMID"
    sync
}

declare -A T
# Every measured step starts with no dirty data left from the one before (sync, untimed).
timed() { # key, log, command...
    local key=$1 log=$2 t i
    shift 2
    for i in 1 2 3; do
        sync
        t=$(now)
        if "$@" >"$log" 2>&1; then T[$key]=$(since "$t"); return 0; fi
        echo "retrying $key: $(tail -2 "$log")" >&2
        sleep 2
    done
    return 1
}
dedup() { timed "dedup-$1" "$ROOT/dedup-$1.log" "$BIN/vzdump" "$VMID" --storage backups --mode stop; }
tarzst() { timed "tar-$1" "$ROOT/tar-$1.log" "$BIN/vzdump" "$VMID" --storage archives --compress zstd --mode stop; }
# restic reads the volume mounted read-only, as vzdump does (a writable mount would change
# the image, and with it what the next backups find changed).
IMAGE=$ROOT/var/lib/vz/images/$VMID/vm-$VMID-disk-0.raw
RO=$ROOT/mnt/restic-ro
resticb() {
    local t dev
    mkdir -p "$RO"
    dev=$(losetup -r --find --show "$IMAGE")
    mount -o ro "$dev" "$RO"
    sync
    t=$(now); (cd "$RO" && restic -q -r "$REPO" backup . >"$ROOT/restic-$1.log" 2>&1); T[restic-$1]=$(since "$t")
    umount "$RO"
    losetup -d "$dev"
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {printf "%.2f", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
ROUNDS=${BENCH_ROUNDS:-5}
# First backups vary more between runs than the two tools differ: ROUNDS extra first
# backups of each into an empty store / archive directory, alternating which goes first;
# the first backup reported is the median of these and version 1's.
for r in $(seq 1 "$ROUNDS"); do
    echo "== first backup, round $r" >&2
    if [ $((r % 2)) = 1 ]; then
        tarzst "f$r"; rm -f "$DUMP"/dump/*; dedup "f$r"; rm -rf "$STORE"/ct "$STORE"/.chunks
    else
        dedup "f$r"; rm -rf "$STORE"/ct "$STORE"/.chunks; tarzst "f$r"; rm -f "$DUMP"/dump/*
    fi
    sleep 1
done

restic -q -r "$REPO" init >&2
echo "restic repository: $(restic -r "$REPO" cat config | tr -d '\n ')" >&2
for v in 1 2 3 4 5 6 7 8 9 10; do
    if [ "$v" -gt 1 ]; then change "$v"; fi
    echo "== version $v" >&2
    tarzst "$v"; sleep 1
    dedup "$v"; sleep 1
    resticb "$v"
    if [ "$v" = 1 ]; then
        sleep 1; dedup 1b; resticb 1b
        grep -h "files: \|unchanged since" "$ROOT/dedup-1b.log" >&2 || true
        # The same unchanged tree after a writable mount (which changes the image):
        # walked, every file reused by its stat key.
        mount_ct >/dev/null; "$BIN/pct" unmount "$VMID"; sleep 1.1; dedup 1c
        grep -h "files: \|unchanged since" "$ROOT/dedup-1c.log" >&2 || true
    fi
    [ "$v" = 2 ] && { grep -h "files: \|chunks: " "$ROOT/dedup-2.log" >&2 || true; }
done

DEDUP_SIZE=$(du -sb --exclude=dump "$STORE" | cut -f1)
RESTIC_SIZE=$(du -sb "$REPO" | cut -f1)
TAR_SIZE=$(du -cb "$DUMP"/dump/*.tar.zst | tail -1 | cut -f1)
CHUNKS=$(find "$STORE/.chunks" -type f | wc -l)

echo "== restores of version 10" >&2
LAST_TAR=$(ls "$DUMP"/dump/*.tar.zst | sort | tail -1)
LAST_SNAP=$("$BIN/pvesm" list backups --output-format json | tr ',' '\n' | sed -n 's/.*"volid":"\(backups:backup[^"]*\)".*/\1/p' | sort | tail -1)
# ROUNDS restores of each, alternating which goes first; the medians are reported.
# Each restored container is removed again (untimed), so that the scratch space needed stays
# at about 12 GB.
drop_ct() { rm -f "$ROOT/etc/pve/lxc/$1.conf"; rm -rf "$ROOT/var/lib/vz/images/$1"; }
restore_tar() { sync; t=$(now); "$BIN/pct" restore "$1" "archives:backup/$(basename "$LAST_TAR")" --storage local >/dev/null; T[restore-tar-$2]=$(since "$t"); drop_ct "$1"; }
restore_dedup() { sync; t=$(now); "$BIN/pct" restore "$1" "$LAST_SNAP" --storage local >/dev/null; T[restore-dedup-$2]=$(since "$t"); drop_ct "$1"; }
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        restore_tar $((900 + 10 * r + 1)) "$r"; restore_dedup $((900 + 10 * r + 2)) "$r"
    else
        restore_dedup $((900 + 10 * r + 2)) "$r"; restore_tar $((900 + 10 * r + 1)) "$r"
    fi
done
rounds() { for r in $(seq 1 "$ROUNDS"); do printf '%s ' "${T[$1-$r]}"; done; }
rounds_f() { for r in $(seq 1 "$ROUNDS"); do printf '%s ' "${T[$1-f$r]}"; done; }
T[restore-tar]=$(median $(rounds restore-tar))
T[restore-dedup]=$(median $(rounds restore-dedup))
T[first-dedup]=$(median $(rounds_f dedup) "${T[dedup-1]}")
T[first-tar]=$(median $(rounds_f tar) "${T[tar-1]}")
mkdir -p "$ROOT/restic-restore"
sync; t=$(now); restic -q -r "$REPO" restore latest --target "$ROOT/restic-restore" >/dev/null; T[restore-restic]=$(since "$t")

percent() { echo "scale=1; 100 * $1 / $2" | bc -l; }
inner() { sed -n 's/.*snapshot size .* in \([0-9.]*\)s$/\1/p' "$ROOT/dedup-$1.log" | tail -1; }
echo
echo "tree: $SIZE bytes, $FILES files; $(nproc) cores; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "backup file system: $BACKUP_FS ($(findmnt -no SOURCE,FSTYPE -T "$STORE" | tr '\n' ' '))"
echo "dedup store: $CHUNKS chunk files; first backup's store write: $(inner 1)s"
echo "chunk file bytes: $(find "$STORE/.chunks" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')"
printf '| %-32s | %12s | %12s | %12s |\n' "" "vzkit dedup" "restic" "vzdump tar.zst"
printf '|%s|%s|%s|%s|\n' "----------------------------------" "--------------" "--------------" "----------------"
printf '| %-32s | %11ss | %11ss | %11ss |\n' "first backup (median)" "${T[first-dedup]}" "${T[restic-1]}" "${T[first-tar]}"
printf '| %-32s | %11ss | %11ss | %12s |\n' "unchanged re-backup" "${T[dedup-1b]}" "${T[restic-1b]}" "(full)"
printf '| %-32s | %11s%% | %11s%% | %12s |\n' "  of first backup" "$(percent "${T[dedup-1b]}" "${T[first-dedup]}")" "$(percent "${T[restic-1b]}" "${T[restic-1]}")" "-"
printf '| %-32s | %11ss | %12s | %12s |\n' "  image touched, inode-guided" "${T[dedup-1c]}" "-" "-"
printf '| %-32s | %11s%% | %12s | %12s |\n' "  of first backup" "$(percent "${T[dedup-1c]}" "${T[first-dedup]}")" "-" "-"
printf '| %-32s | %11ss | %11ss | %11ss |\n' "1% change re-backup (version 2)" "${T[dedup-2]}" "${T[restic-2]}" "${T[tar-2]}"
printf '| %-32s | %11s%% | %11s%% | %12s |\n' "  of first backup" "$(percent "${T[dedup-2]}" "${T[first-dedup]}")" "$(percent "${T[restic-2]}" "${T[restic-1]}")" "-"
printf '| %-32s | %11ss | %12s | %12s |\n' "  1% change, store write only" "$(inner 2)" "-" "-"
printf '| %-32s | %10sMB | %10sMB | %10sMB |\n' "size after 10 versions" "$((DEDUP_SIZE / 1000000))" "$((RESTIC_SIZE / 1000000))" "$((TAR_SIZE / 1000000))"
printf '| %-32s | %11ss | %11ss | %11ss |\n' "restore of version 10 (median)" "${T[restore-dedup]}" "${T[restore-restic]}" "${T[restore-tar]}"
echo
echo "first backups (s): dedup $(rounds_f dedup)${T[dedup-1]}; tar.zst $(rounds_f tar)${T[tar-1]} (rounds, then version 1)"
echo "restores (s): dedup $(rounds restore-dedup); tar.zst $(rounds restore-tar)"
echo "per version (s): dedup $(for v in 1 2 3 4 5 6 7 8 9 10; do printf '%s ' "${T[dedup-$v]}"; done)"
echo "per version (s): restic $(for v in 1 2 3 4 5 6 7 8 9 10; do printf '%s ' "${T[restic-$v]}"; done)"
echo "per version (s): tar.zst $(for v in 1 2 3 4 5 6 7 8 9 10; do printf '%s ' "${T[tar-$v]}"; done)"
