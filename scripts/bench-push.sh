#!/usr/bin/env bash
# Benchmarks of vbackup against real qemu-storage-daemon, printing figures (not a test):
#  1. full push backup of a 1 GiB image of random data through `vbackup backup-begin --wait`,
#     against `qemu-img convert` + `sync` of the same image in the same run (ratio >= 0.9 wanted,
#     ratio = baseline time / vbackup time);
#  2. incremental push backup with 1% of the clusters dirty, end to end (< 0.5 s wanted);
#  3. `checkpoint-create-as` end-to-end latency on an attached domain, median of 20.
# Every vbackup time is a whole process run (daemon start, QMP, job, daemon quit).
#
# Usage: scripts/bench-push.sh [WORKDIR]   (default: a new directory under /var/tmp)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q -p vbackup-cli --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/vbackup"

WORK=${1:-$(mktemp -d /var/tmp/vbackup-bench.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ST="$WORK/state"
V() { "$BIN" --state-dir "$ST" "$@"; }
QSD_PID=""
cleanup() {
    V domjobabort bench >/dev/null 2>&1 || true
    V shutdown bench >/dev/null 2>&1 || true
    if [ -n "$QSD_PID" ]; then kill "$QSD_PID" 2>/dev/null || true; wait "$QSD_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }

echo "work directory: $WORK"
echo "preparing a 1 GiB qcow2 image of random data..."
head -c 1G /dev/urandom > "$WORK/random.raw"
qemu-img convert -f raw -O qcow2 "$WORK/random.raw" "$WORK/disk.qcow2"
rm -f "$WORK/random.raw"
sync

# 1. Baseline: qemu-img convert + sync.
rm -f "$WORK/copy.qcow2"
t=$(now)
qemu-img convert -f qcow2 -O qcow2 "$WORK/disk.qcow2" "$WORK/copy.qcow2"
sync
base=$(elapsed "$t")
rm -f "$WORK/copy.qcow2"
sync

V define bench --disk "vda=$WORK/disk.qcow2" >/dev/null
cat > "$WORK/full.xml" <<EOF
<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='$WORK/full.qcow2'/><driver type='qcow2'/></disk></disks></domainbackup>
EOF
echo "<domaincheckpoint><name>c1</name></domaincheckpoint>" > "$WORK/c1.xml"
t=$(now)
V backup-begin bench "$WORK/full.xml" "$WORK/c1.xml" --wait >/dev/null
sync
full=$(elapsed "$t")
qemu-img compare -q "$WORK/disk.qcow2" "$WORK/full.qcow2" || { echo "full backup differs"; exit 1; }

# 2. Incremental with 1% of the 64 KiB clusters dirty (the daemon is stopped between commands,
# so the "guest" writes straight into the image).
clusters=$((1024 * 1024 / 64))
dirty=$((clusters / 100))
args=()
for i in $(shuf -i 0-$((clusters - 1)) -n "$dirty"); do
    args+=(-c "write -P 0x5a $((i * 65536)) 65536")
done
qemu-io -f qcow2 "${args[@]}" "$WORK/disk.qcow2" >/dev/null
cat > "$WORK/inc.xml" <<EOF
<domainbackup mode='push'><incremental>c1</incremental><disks><disk name='vda' type='file'><target file='$WORK/inc.qcow2'/><driver type='qcow2'/></disk></disks></domainbackup>
EOF
echo "<domaincheckpoint><name>c2</name></domaincheckpoint>" > "$WORK/c2.xml"
t=$(now)
V backup-begin bench "$WORK/inc.xml" "$WORK/c2.xml" --wait >/dev/null
inc=$(elapsed "$t")
qemu-img rebase -u -F qcow2 -b "$WORK/full.qcow2" "$WORK/inc.qcow2"
qemu-img compare -q "$WORK/disk.qcow2" "$WORK/inc.qcow2" || { echo "incremental backup differs"; exit 1; }

# 3. checkpoint-create-as on an attached domain (a qemu-storage-daemon we run ourselves).
qemu-img create -q -f qcow2 "$WORK/att.qcow2" 64M
qemu-storage-daemon \
    --blockdev "driver=file,node-name=att-file,filename=$WORK/att.qcow2" \
    --blockdev "driver=qcow2,node-name=att-fmt,file=att-file" \
    --chardev "socket,id=mon,path=$WORK/att-qmp.sock,server=on,wait=off" \
    --monitor chardev=mon >"$WORK/att-qsd.log" 2>&1 &
QSD_PID=$!
for _ in $(seq 100); do [ -S "$WORK/att-qmp.sock" ] && break; sleep 0.05; done
V define att --disk "vda=$WORK/att.qcow2" --qmp "$WORK/att-qmp.sock" >/dev/null
lat=()
for i in $(seq 20); do
    t=$(now)
    V checkpoint-create-as att "k$i" >/dev/null
    lat+=("$(elapsed "$t")")
done
median=$(printf '%s\n' "${lat[@]}" | sort -g | awk '{a[NR]=$1} END {print (a[10]+a[11])/2}')

printf '\n%-52s %s\n' "figure" "value"
printf '%-52s %.3f s\n' "qemu-img convert + sync, 1 GiB random" "$base"
printf '%-52s %.3f s\n' "vbackup backup-begin --wait (full push) + sync" "$full"
printf '%-52s %.2f (>= 0.9 wanted)\n' "ratio baseline / vbackup" "$(echo "$base / $full" | bc -l)"
printf '%-52s %.3f s (< 0.5 s wanted)\n' "incremental push, 1% clusters dirty, end to end" "$inc"
printf '%-52s %.1f ms\n' "checkpoint-create-as, attached, median of 20" "$(echo "$median * 1000" | bc -l)"
