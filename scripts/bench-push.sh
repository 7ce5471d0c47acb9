#!/usr/bin/env bash
# Benchmarks of vbackup against real qemu-storage-daemon, printing figures (not a test):
#  1. full push backup of a 1 GiB image of random data through `vbackup backup-begin --wait`,
#     against `qemu-img convert` + `sync` of the same image in the same run (ratio >= 0.9 wanted,
#     ratio = baseline time / vbackup time);
#  2. incremental push backup with 1% of the clusters dirty, end to end (< 0.5 s wanted);
#  3. `checkpoint-create-as` end-to-end latency on an attached domain, median of 20.
# Every vbackup time is a whole process run (daemon start, QMP, job, daemon quit).
#
# With --vm, only figure 1, against a real running VM instead: qemu-system-x86_64 (KVM where
# /dev/kvm opens, else TCG) with the 1 GiB image on virtio-blk, attached with
# `vbackup define NAME --qmp SOCKET`; full push `backup-begin --wait` while the guest idles
# (it sits in the firmware, there is no guest OS), against `qemu-img convert` + `sync` of the
# same image taken offline (a copy made before the VM starts). The VM is stopped by its pid.
#
# Usage: [ROUNDS=N] scripts/bench-push.sh [--vm] [WORKDIR]   (default: a new directory under
# /var/tmp, removed at the end)
set -euo pipefail

VM_MODE=""
if [ "${1:-}" = "--vm" ]; then VM_MODE=1; shift; fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release -q -p vbackup-cli --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/vbackup"

OWN_WORK=""
if [ -z "${1:-}" ]; then OWN_WORK=1; fi
WORK=${1:-$(mktemp -d /var/tmp/vbackup-bench.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ST="$WORK/state"
V() { "$BIN" --state-dir "$ST" "$@"; }
QSD_PID=""
VM_PID=""
cleanup() {
    V domjobabort bench >/dev/null 2>&1 || true
    V shutdown bench >/dev/null 2>&1 || true
    if [ -n "$QSD_PID" ]; then kill "$QSD_PID" 2>/dev/null || true; wait "$QSD_PID" 2>/dev/null || true; fi
    if [ -n "$VM_PID" ]; then
        V domjobabort vm >/dev/null 2>&1 || true
        # The VM is a daemon, not our child: stop it by its pid and wait until it is gone.
        kill "$VM_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$VM_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    # A directory the script made itself goes (it holds several GiB); a given one is kept.
    if [ -n "$OWN_WORK" ]; then rm -rf "$WORK"; fi
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
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ROUNDS=${ROUNDS:-5}

if [ -n "$VM_MODE" ]; then
    accel=tcg
    if ( exec 3<>/dev/kvm ) 2>/dev/null; then accel=kvm; fi
    # The baseline reads an offline copy: the running QEMU holds the image's lock, and the
    # copy has the same content and layout.
    cp "$WORK/disk.qcow2" "$WORK/offline.qcow2"
    sync
    qemu-system-x86_64 -accel "$accel" -m 64 -display none -nodefaults -daemonize \
        -pidfile "$WORK/qemu.pid" \
        -blockdev "driver=file,filename=$WORK/disk.qcow2,node-name=libvirt-1-storage" \
        -blockdev "driver=qcow2,file=libvirt-1-storage,node-name=libvirt-1-format" \
        -device virtio-blk-pci,drive=libvirt-1-format,id=vda \
        -qmp "unix:$WORK/qmp.sock,server=on,wait=off"
    VM_PID=$(cat "$WORK/qemu.pid")
    echo "VM pid $VM_PID (accel $accel)"
    V define vm --qmp "$WORK/qmp.sock" >/dev/null
    cat > "$WORK/full.xml" <<XML
<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='$WORK/full.qcow2'/><driver type='qcow2'/></disk></disks></domainbackup>
XML
    bases=()
    fulls=()
    for r in $(seq "$ROUNDS"); do
        rm -f "$WORK/copy.qcow2"
        sync
        t=$(now)
        qemu-img convert -f qcow2 -O qcow2 "$WORK/offline.qcow2" "$WORK/copy.qcow2"
        sync
        bases+=("$(elapsed "$t")")
        rm -f "$WORK/copy.qcow2" "$WORK/full.qcow2"
        sync
        t=$(now)
        V backup-begin vm "$WORK/full.xml" --wait >/dev/null
        sync
        fulls+=("$(elapsed "$t")")
        # The guest idles, so what the VM saw is what the offline copy holds.
        qemu-img compare -q "$WORK/offline.qcow2" "$WORK/full.qcow2" || { echo "full backup differs"; exit 1; }
        printf 'round %d: convert+sync %.3f s, vbackup %.3f s, ratio %.2f\n' "$r" "${bases[-1]}" \
            "${fulls[-1]}" "$(echo "${bases[-1]} / ${fulls[-1]}" | bc -l)"
    done
    base=$(med "${bases[@]}")
    full=$(med "${fulls[@]}")
    printf '\n%-66s %s\n' "figure (real VM, accel $accel, $ROUNDS rounds)" "value"
    printf '%-66s %.3f s\n' "qemu-img convert + sync of the offline image (median)" "$base"
    printf '%-66s %.3f s\n' "vbackup backup-begin --wait, full push from the VM + sync (median)" "$full"
    printf '%-66s %.2f (>= 0.9 wanted)\n' "ratio of medians baseline / vbackup" "$(echo "$base / $full" | bc -l)"
    exit 0
fi

# 1. Full push against qemu-img convert + sync, alternating for ROUNDS rounds (default 5) so
# that both see the same machine; medians are compared. Each vbackup round creates checkpoint
# c<round>; the last round's backup is the base of the incremental below.
V define bench --disk "vda=$WORK/disk.qcow2" >/dev/null
bases=()
fulls=()
for r in $(seq "$ROUNDS"); do
    rm -f "$WORK/copy.qcow2"
    sync
    t=$(now)
    qemu-img convert -f qcow2 -O qcow2 "$WORK/disk.qcow2" "$WORK/copy.qcow2"
    sync
    bases+=("$(elapsed "$t")")
    rm -f "$WORK/copy.qcow2" "$WORK/full.qcow2"
    sync
    cat > "$WORK/full.xml" <<EOF
<domainbackup mode='push'><disks><disk name='vda' type='file'><target file='$WORK/full.qcow2'/><driver type='qcow2'/></disk></disks></domainbackup>
EOF
    echo "<domaincheckpoint><name>c$r</name></domaincheckpoint>" > "$WORK/c$r.xml"
    t=$(now)
    V backup-begin bench "$WORK/full.xml" "$WORK/c$r.xml" --wait >/dev/null
    sync
    fulls+=("$(elapsed "$t")")
    qemu-img compare -q "$WORK/disk.qcow2" "$WORK/full.qcow2" || { echo "full backup differs"; exit 1; }
    printf 'round %d: convert+sync %.3f s, vbackup %.3f s, ratio %.2f\n' "$r" "${bases[-1]}" \
        "${fulls[-1]}" "$(echo "${bases[-1]} / ${fulls[-1]}" | bc -l)"
done
base=$(med "${bases[@]}")
full=$(med "${fulls[@]}")
last=c$ROUNDS

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
<domainbackup mode='push'><incremental>$last</incremental><disks><disk name='vda' type='file'><target file='$WORK/inc.qcow2'/><driver type='qcow2'/></disk></disks></domainbackup>
EOF
echo "<domaincheckpoint><name>inc</name></domaincheckpoint>" > "$WORK/inc-c.xml"
t=$(now)
V backup-begin bench "$WORK/inc.xml" "$WORK/inc-c.xml" --wait >/dev/null
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
printf '%-52s %.3f s\n' "qemu-img convert + sync, 1 GiB random (median)" "$base"
printf '%-52s %.3f s\n' "vbackup backup-begin --wait (full push) + sync (median)" "$full"
printf '%-52s %.2f (>= 0.9 wanted)\n' "ratio of medians baseline / vbackup" "$(echo "$base / $full" | bc -l)"
printf '%-52s %.3f s (< 0.5 s wanted)\n' "incremental push, 1% clusters dirty, end to end" "$inc"
printf '%-52s %.1f ms\n' "checkpoint-create-as, attached, median of 20" "$(echo "$median * 1000" | bc -l)"
