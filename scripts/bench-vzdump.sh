#!/usr/bin/env bash
# Benchmark: vzdump (release build) against PVE's own pipeline on the same container tree.
#
# Builds a container (rootfs on a loop-mounted ext4 image of the `local` dir storage, created
# with the real pct/pvesm binaries) holding >= 500 MB of mixed data: random files, compressible
# log-like text, many small files, a sparse file. Then measures, in this one run:
#   * vzdump with its defaults (zstd, all cores) and with --zstd 1 / --zstd <cores>;
#   * PVE's pipeline on the same mounted tree: tar <PVE flags> | zstd --threads=1 (PVE's
#     default) and | zstd --threads=<cores>;
# and prints wall times (median and best of $RUNS rounds; every round runs each configuration
# once, and ratios are taken within a round), CPU time and archive sizes. Every run
# reads the container's file system through a fresh mount (vzdump mounts it itself, the PVE
# pipeline gets a fresh read-only mount per run, as PVE's vzdump does), with the image file
# itself in the host's page cache; each archive is written to the same scratch directory.
# Targets (issue 3): defaults <= 0.6x of PVE's --threads=1 pipeline; at equal thread counts
# no slower; archive size within 5%.
#
# Needs root, tar, zstd, e2fsprogs, util-linux, perl. Usage: scripts/bench-vzdump.sh
# Environment: RUNS (default 5), BENCH_DIR (scratch parent, default /var/tmp).
# The machine should be otherwise idle: on a shared host the spread between runs is large.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
CORES=$(nproc)
cargo build --release -p vzkit-cli >&2
BIN=${CARGO_TARGET_DIR:-target}/release
ROOT=$(mktemp -d "${BENCH_DIR:-/var/tmp}/vzkit-bench-XXXXXX")
export VZKIT_ROOT=$ROOT TZ=UTC
VMID=900
MNT=$ROOT/mnt/bench-src
OUT=$ROOT/out

cleanup() {
    set +e
    "$BIN/pct" unmount "$VMID" >/dev/null 2>&1
    findmnt -rn -o TARGET | grep "^$ROOT" | sort -r | while read -r m; do umount -d "$m"; done
    rm -rf "$ROOT"
}
trap cleanup EXIT

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "== building the container tree in $ROOT" >&2
mkdir -p "$ROOT/etc/pve/lxc" "$OUT"
printf 'arch: amd64\nhostname: bench\nmemory: 512\nostype: debian\n' >"$ROOT/etc/pve/lxc/$VMID.conf"
"$BIN/pct" set "$VMID" --rootfs local:2 >&2
CTROOT=$("$BIN/pct" mount "$VMID" | sed -n "s/^mounted CT $VMID in '\(.*\)'$/\1/p")
mkdir -p "$CTROOT/random" "$CTROOT/var/log" "$CTROOT/srv/small" "$CTROOT/opt"
for i in 1 2 3 4; do head -c 50M /dev/urandom >"$CTROOT/random/blob$i"; done
perl -e '
    my ($root) = @ARGV; my $seed = 42;
    sub rnd { $seed = ($seed * 1103515245 + 12345) % 2147483648; return $seed; }
    my @words = qw(kernel systemd sshd cron nginx postgres connection accepted closed
                   timeout request response user session started stopped error warning);
    for my $f (1..5) {
        open(my $fh, ">", "$root/var/log/app$f.log") or die;
        my $size = 0;
        while ($size < 50*1024*1024) {
            my $l = sprintf("2024-%02d-%02d %02d:%02d:%02d host%d %s[%d]: %s %s id=%08x %s\n",
                rnd()%12+1, rnd()%28+1, rnd()%24, rnd()%60, rnd()%60, rnd()%4,
                $words[rnd()%@words], rnd()%32768, $words[rnd()%@words],
                $words[rnd()%@words], rnd(), $words[rnd()%@words]);
            print $fh $l; $size += length($l);
        }
        close $fh;
    }
    for my $d (1..300) {
        mkdir "$root/srv/small/d$d";
        for my $n (1..100) {
            open(my $fh, ">", "$root/srv/small/d$d/f$n") or die;
            my $len = 512 + rnd() % 3584;
            if ($n % 2) { print $fh join("", map { chr(32 + rnd() % 90) } 1..$len) }
            else { print $fh ("config_value_$d = $n\n" x ($len / 20 + 1)) }
            close $fh;
        }
    }
' "$CTROOT"
head -c 40M /dev/urandom | base64 -w 100 >"$CTROOT/opt/base64.txt"
truncate -s 1G "$CTROOT/opt/sparse.img"
for off in 0 100 300 700 1000; do
    head -c 1M /dev/urandom | dd of="$CTROOT/opt/sparse.img" bs=1M seek="$off" conv=notrunc status=none
done
"$BIN/pct" unmount "$VMID" >&2

# PVE's tar invocation for a stopped container (pve-container PVE/VZDump/LXC.pm), on the
# rootfs mounted read-only as vzdump mounts it. PVE mounts the volume for every backup, so
# every run starts from a fresh mount (not timed), like vzdump's own runs: both read the
# container's file system cold through a new loop device.
mkdir -p "$MNT" "$ROOT/pvetmp/etc/vzdump"
cp "$ROOT/etc/pve/lxc/$VMID.conf" "$ROOT/pvetmp/etc/vzdump/pct.conf"
: >"$ROOT/pvetmp/etc/vzdump/pct.fw"
IMG=$ROOT/var/lib/vz/images/$VMID/vm-$VMID-disk-0.raw
mount -o ro,loop,noload "$IMG" "$MNT"
DATA=$(df -B1 --output=used "$MNT" | tail -1)
umount -d "$MNT"
pve_pipeline() { # threads output
    tar cpf - --totals --one-file-system -p --sparse --numeric-owner --acls --xattrs \
        --xattrs-include='user.*' --xattrs-include=security.capability \
        --warning=no-file-ignored --warning=no-xattr-write \
        --one-file-system --warning=no-file-ignored \
        --directory="$ROOT/pvetmp" ./etc/vzdump/pct.conf ./etc/vzdump/pct.fw \
        --directory="$MNT" --anchored \
        --exclude=./tmp/?* --exclude=./var/tmp/?* --exclude=./var/run/?*.pid ./ \
        2>/dev/null | zstd -q --threads="$1" >"$2"
}
vzdump_run() { "$BIN/vzdump" "$VMID" --dumpdir "$OUT" --compress zstd --quiet "$@"; }

declare -A TIME BEST CPU SIZE RUN
run_once() { # pve|vzdump name round command...
    local kind=$1 name=$2 round=$3; shift 3
    rm -rf "${OUT:?}"/*
    if [ "$kind" = pve ]; then mount -o ro,loop,noload "$IMG" "$MNT"; fi
    local TIMEFORMAT='%R %U %S' t
    t=$( { time "$@" >/dev/null 2>&1; } 2>&1 )
    if [ "$kind" = pve ]; then umount -d "$MNT"; fi
    RUN[$name,$round]=$(echo "$t" | awk '{print $1}')
    RUN[$name,cpu,$round]=$(echo "$t" | awk '{print $2 + $3}')
    SIZE[$name]=$(find "$OUT" -name '*.tar.zst' -printf '%s\n' | head -1)
}
summarize() { # name
    local name=$1 times=() cpus=()
    for r in $(seq "$RUNS"); do
        times+=("${RUN[$name,$r]}")
        cpus+=("${RUN[$name,cpu,$r]}")
    done
    TIME[$name]=$(printf '%s\n' "${times[@]}" | median)
    BEST[$name]=$(printf '%s\n' "${times[@]}" | sort -n | head -1)
    CPU[$name]=$(printf '%s\n' "${cpus[@]}" | median)
    printf '%-34s median %6.2f s  best %6.2f s  cpu %6.2f s  %12s bytes\n' "$name" \
        "${TIME[$name]}" "${BEST[$name]}" "${CPU[$name]}" "${SIZE[$name]}" >&2
}
# The median over rounds of a/b measured in the same round (robust against load drift).
paired() { # a b
    for r in $(seq "$RUNS"); do
        awk -v a="${RUN[$1,$r]}" -v b="${RUN[$2,$r]}" 'BEGIN {printf "%.4f\n", a / b}'
    done | median
}

echo "== warming the host page cache (image file)" >&2
cat "$IMG" >/dev/null

echo "== measuring ($RUNS runs each; $CORES cores; $((DATA / 1000000)) MB in the tree)" >&2
P1="PVE: tar | zstd --threads=1"
PN="PVE: tar | zstd --threads=$CORES"
V0="vzdump (defaults)"
V1="vzdump --zstd 1"
VN="vzdump --zstd $CORES"
# Rounds: every configuration once per round, so that all of them see the same load.
for round in $(seq "$RUNS"); do
    run_once pve "$P1" "$round" pve_pipeline 1 "$OUT/pve.tar.zst"
    run_once vzdump "$V0" "$round" vzdump_run
    run_once pve "$PN" "$round" pve_pipeline "$CORES" "$OUT/pve.tar.zst"
    run_once vzdump "$V1" "$round" vzdump_run --zstd 1
    run_once vzdump "$VN" "$round" vzdump_run --zstd "$CORES"
    echo "   round $round done" >&2
done
for n in "$P1" "$PN" "$V0" "$V1" "$VN"; do summarize "$n"; done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
row() { # name
    printf '| %s | %s s | %s s | %s | %s s | %s |\n' "${1//|/\\|}" "${TIME[$1]}" "${BEST[$1]}" \
        "$(paired "$1" "$P1")" "${CPU[$1]}" "${SIZE[$1]}"
}
echo
echo "vzdump benchmark: $CORES cores, $((DATA / 1000000)) MB of container data (random, log text, 30000 small files, sparse), $RUNS runs"
echo "| run | wall (median) | wall (best) | vs PVE default (median of per-round ratios) | CPU (user+sys, median) | archive bytes |"
echo "|---|---|---|---|---|---|"
for n in "$P1" "$PN" "$V0" "$V1" "$VN"; do row "$n"; done
echo
echo "targets: defaults/PVE default = $(paired "$V0" "$P1") (<= 0.6);" \
    "equal threads: 1 -> $(paired "$V1" "$P1"), $CORES -> $(paired "$VN" "$PN") (<= 1);" \
    "size: $(ratio "${SIZE[$V0]}" "${SIZE[$P1]}") (within 0.95..1.05)"
