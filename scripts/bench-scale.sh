#!/usr/bin/env bash
# Costs that must not grow with the history, managed backups against a bare push, and many
# domains at once, measured side by side in one run; each figure is printed with its target
# and "ok" or "OVER". A benchmark, not a test: it fails only when a command fails or a backup
# does not match its disk.
#  1. `checkpoint-create-as` with no other checkpoint and with N-1 others, against the process
#     floor (`vbackup list`): the Nth within 1.25x of the 1st and within 2.5x of the floor;
#  2. `checkpoint-delete --children` of a chain of D checkpoints (on top of the N above),
#     against the cost of one create at that size: at most 5 creates;
#  2b. managed `backup-create --wait` (a full backup of a small sparse disk) with B backups
#     recorded against the same with one: at most 1.25x;
#  3. managed `backup-create --wait` against `backup-begin --wait` of the same disk of SIZE
#     random data (both push, both creating a checkpoint), full and incremental (DIRTY written):
#     at most 1.3x;
#  4. managed pull full (`backup-create --pull --wait`) against `nbdcopy` of the same pull
#     export into a qcow2 file (through qemu-nbd) plus `sync`: at least 0.9x the speed;
#  5. `backup-restore` of the 3-deep chain (full + 2 incrementals) against `qemu-img convert`
#     of the chain plus `sync`: at least 0.9x the speed;
#  6. a managed incremental (push and pull) with DIRTY written on a BIG sparse disk, against the
#     same incremental on a SMALL one (medians of ROUNDS): at most 1.2x;
#  7. PAR domains (disk of PSIZE random data each) backed up by PAR concurrent
#     `backup-create --wait`, against one after another: at most 1.1x;
#  8. the peak RSS (VmHWM) of the vbackup process of the managed pull full (4.), without the
#     helpers it starts: under 64 MiB;
#  9. the simulator: seeds/s of 200-step histories with all faults (a history per core at a
#     time): at least 300.
# Every time is a whole process run (median of ROUNDS where noted); the domains are started
# managed domains (qemu-storage-daemon kept running).
#
# Usage: [N=300] [D=100] [B=200] [ROUNDS=7] [SIZE=1G] [DIRTY=10M] [BIG=64G] [SMALL=1G] [PAR=8]
#        [PSIZE=256M] [SEEDS=1000] [VBACKUP=path] scripts/bench-scale.sh [WORKDIR]
# (VBACKUP: another vbackup binary to measure, e.g. an older build, instead of this tree's.)
# The defaults are small (N=50 D=20 B=20 ROUNDS=3 SIZE=64M DIRTY=4M BIG=2G SMALL=256M PAR=4
# PSIZE=32M SEEDS=200) so that CI can run it as a smoke test; the targets are for the sizes
# above.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${VBACKUP:-}" ]; then
    BIN=$VBACKUP
else
    cargo build --release -q -p vbackup-cli --manifest-path "$ROOT/Cargo.toml"
    BIN="$ROOT/target/release/vbackup"
fi

N=${N:-50}
D=${D:-20}
B=${B:-20}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-64M}
DIRTY=${DIRTY:-4M}
BIG=${BIG:-2G}
SMALL=${SMALL:-256M}
PAR=${PAR:-4}
PSIZE=${PSIZE:-32M}
SEEDS=${SEEDS:-200}

OWN_WORK=""
if [ -z "${1:-}" ]; then OWN_WORK=1; fi
WORK=${1:-$(mktemp -d /var/tmp/vbackup-bench-scale.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ST="$WORK/state"
V() { "$BIN" --state-dir "$ST" "$@"; }
DOMAINS=(scale)
cleanup() {
    for d in "${DOMAINS[@]}"; do
        V domjobabort "$d" >/dev/null 2>&1 || true
        V shutdown "$d" >/dev/null 2>&1 || true
    done
    if [ -n "$OWN_WORK" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Milliseconds since T0 (from `date +%s%N`).
since_ms() { echo "scale=3; ($(date +%s%N) - $1) / 1000000" | bc; }
# Milliseconds one command takes, as a whole process; its output is discarded.
ms() {
    local t0
    t0=$(date +%s%N)
    "$@" >/dev/null
    since_ms "$t0"
}
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { echo "scale=3; $1 / $2" | bc; }

echo "work directory: $WORK (N=$N D=$D B=$B ROUNDS=$ROUNDS SIZE=$SIZE DIRTY=$DIRTY BIG=$BIG SMALL=$SMALL PAR=$PAR PSIZE=$PSIZE SEEDS=$SEEDS)"
qemu-img create -q -f qcow2 "$WORK/disk.qcow2" 64M
V define scale --disk "vda=$WORK/disk.qcow2" >/dev/null
V start scale >/dev/null

# The floor: a process that opens the store and prints.
floors=()
for _ in $(seq "$ROUNDS"); do floors+=("$(ms V list)"); done
floor=$(med "${floors[@]}")

# The 1st checkpoint: created into an empty history, then deleted again (not timed).
firsts=()
for r in $(seq "$ROUNDS"); do
    firsts+=("$(ms V checkpoint-create-as scale "first$r")")
    V checkpoint-delete scale "first$r" >/dev/null
done
first=$(med "${firsts[@]}")

# N-1 checkpoints, then the Nth, timed the same way.
for i in $(seq $((N - 1))); do V checkpoint-create-as scale "c$i" >/dev/null; done
nths=()
for r in $(seq "$ROUNDS"); do
    nths+=("$(ms V checkpoint-create-as scale "nth$r")")
    V checkpoint-delete scale "nth$r" >/dev/null
done
nth=$(med "${nths[@]}")

# A chain of D checkpoints on top, deleted with its root in one command.
for i in $(seq "$D"); do V checkpoint-create-as scale "d$i" >/dev/null; done
before=$(V checkpoint-list scale --name | wc -l)
delete=$(ms V checkpoint-delete scale d1 --children)
after=$(V checkpoint-list scale --name | wc -l)
if [ "$((before - after))" != "$D" ]; then
    echo "checkpoint-delete --children removed $((before - after)) checkpoints, not $D" >&2
    exit 1
fi

FIGURES=()
# fig NAME VALUE UNIT [TARGET-TEXT CMP LIMIT]: one line of the final table.
fig() {
    local line
    line=$(printf '%-60s %10s %-3s' "$1" "$2" "$3")
    if [ -n "${4:-}" ]; then
        local ok=OVER
        if [ "$5" = "<=" ] && [ "$(echo "$2 <= $6" | bc)" = 1 ]; then ok=ok; fi
        if [ "$5" = ">=" ] && [ "$(echo "$2 >= $6" | bc)" = 1 ]; then ok=ok; fi
        line="$line (target $4) $ok"
    fi
    FIGURES+=("$line")
}
fig "vbackup list (process floor)" "$floor" ms
fig "checkpoint-create-as, 1st checkpoint" "$first" ms
fig "checkpoint-create-as, checkpoint $N" "$nth" ms
r1=$(ratio "$nth" "$first")
r2=$(ratio "$nth" "$floor")
fig "  checkpoint $N / 1st" "$r1" x "<= 1.25x" "<=" 1.25
fig "  checkpoint $N / floor" "$r2" x "<= 2.5x" "<=" 2.5
fig "checkpoint-delete --children of $D checkpoints" "$delete" ms
r3=$(ratio "$delete" "$nth")
fig "  in creates (checkpoint $N)" "$r3" "" "<= 5 creates" "<=" 5
V shutdown scale >/dev/null

sec() { echo "scale=3; $1 / 1000" | bc; }
uuid_of() { sed -n 's/.*"uuid": *"\([^"]*\)".*/\1/p' | head -n 1; }
# A started managed domain NAME with one qcow2 disk of SIZE (random data unless "sparse").
new_domain() {
    local name=$1 size=$2 kind=${3:-random}
    if [ "$kind" = sparse ]; then
        qemu-img create -q -f qcow2 "$WORK/$name.qcow2" "$size"
    else
        head -c "$size" /dev/urandom > "$WORK/$name.raw"
        qemu-img convert -f raw -O qcow2 "$WORK/$name.raw" "$WORK/$name.qcow2"
        rm -f "$WORK/$name.raw"
    fi
    V define "$name" --disk "vda=$WORK/$name.qcow2" >/dev/null
    V start "$name" >/dev/null
    DOMAINS+=("$name")
    mkdir -p "$WORK/$name-backups"
    V backup-set-default-target "$name" "$WORK/$name-backups" >/dev/null
}
# Guest writes of LEN random bytes at OFFSET through the domain's guest export.
guest_write() {
    local name=$1 offset=$2 len=$3
    head -c "$len" /dev/urandom > "$WORK/$name.write"
    qemu-io -f raw -c "write -s $WORK/$name.write $offset $len" \
        "nbd+unix:///guest-vda?socket=$ST/run/$name/nbd.sock" >/dev/null
    rm -f "$WORK/$name.write"
}
push_xml() { # TARGET [INCREMENTAL]
    local inc=""
    if [ -n "${2:-}" ]; then inc="<incremental>$2</incremental>"; fi
    echo "<domainbackup mode='push'>$inc<disks><disk name='vda' type='file'><target file='$1'/><driver type='qcow2'/></disk></disks></domainbackup>"
}

# 2b. A managed backup with one backup recorded, then with B: each timed backup is deleted
# again (not timed), so the count stays put.
timed_backup() { # NAME: milliseconds of one backup-create --wait, whose backup is then deleted
    local t0 t uuid
    t0=$(date +%s%N)
    uuid=$(V backup-create "$1" --wait --json | uuid_of)
    t=$(since_ms "$t0")
    V backup-delete "$uuid" >/dev/null
    echo "$t"
}
new_domain many 64M sparse
V backup-create many --wait >/dev/null
ones=()
for _ in $(seq "$ROUNDS"); do ones+=("$(timed_backup many)"); done
for _ in $(seq $((B - 1))); do V backup-create many --wait >/dev/null; done
bths=()
for _ in $(seq "$ROUNDS"); do bths+=("$(timed_backup many)"); done
one_backup=$(med "${ones[@]}"); bth_backup=$(med "${bths[@]}")
V shutdown many >/dev/null
fig "managed backup-create --wait, 1 backup recorded" "$one_backup" ms
fig "managed backup-create --wait, $B backups recorded" "$bth_backup" ms
fig "  $B backups / 1" "$(ratio "$bth_backup" "$one_backup")" x "<= 1.25x" "<=" 1.25

# 3. Managed backup-create --wait against backup-begin --wait, push, full and incremental.
new_domain mb "$SIZE"
begins=(); creates=(); ibegins=(); icreates=()
for r in $(seq "$ROUNDS"); do
    rm -f "$WORK/bb-full.qcow2" "$WORK/bb-inc.qcow2"
    push_xml "$WORK/bb-full.qcow2" > "$WORK/bb-full.xml"
    echo "<domaincheckpoint><name>bf$r</name></domaincheckpoint>" > "$WORK/bf.xml"
    sync
    begins+=("$(ms V backup-begin mb "$WORK/bb-full.xml" "$WORK/bf.xml" --wait)")
    sync
    t0=$(date +%s%N)
    full_uuid=$(V backup-create mb --wait --json | uuid_of)
    creates+=("$(since_ms "$t0")")
    [ -n "$full_uuid" ] || { echo "backup-create printed no uuid" >&2; exit 1; }
    guest_write mb 0 "$DIRTY"
    push_xml "$WORK/bb-inc.qcow2" "bf$r" > "$WORK/bb-inc.xml"
    echo "<domaincheckpoint><name>bi$r</name></domaincheckpoint>" > "$WORK/bi.xml"
    sync
    ibegins+=("$(ms V backup-begin mb "$WORK/bb-inc.xml" "$WORK/bi.xml" --wait)")
    sync
    icreates+=("$(ms V backup-create mb --parent "$full_uuid" --wait)")
    V checkpoint-delete mb "bf$r" >/dev/null
    V checkpoint-delete mb "bi$r" >/dev/null
    if [ "$r" != "$ROUNDS" ]; then V backup-delete mb --all >/dev/null; fi
done
begin=$(med "${begins[@]}"); create=$(med "${creates[@]}")
ibegin=$(med "${ibegins[@]}"); icreate=$(med "${icreates[@]}")
fig "backup-begin --wait, full push of $SIZE" "$begin" ms
fig "managed backup-create --wait, full push of $SIZE" "$create" ms
fig "  managed / backup-begin, full" "$(ratio "$create" "$begin")" x "<= 1.3x" "<=" 1.3
fig "backup-begin --wait, incremental push ($DIRTY dirty)" "$ibegin" ms
fig "managed backup-create --wait, incremental push" "$icreate" ms
fig "  managed / backup-begin, incremental" "$(ratio "$icreate" "$ibegin")" x "<= 1.3x" "<=" 1.3

# 5. Restore of a 3-deep chain (the full and incremental above, one more incremental) against
# qemu-img convert of the chain.
chain=$(V backup-list mb --json | tr -d ' \n' | grep -o '"uuid":"[^"]*"' | cut -d'"' -f4)
full_uuid=$(echo "$chain" | head -n 1)
inc_uuid=$(echo "$chain" | sed -n 2p)
guest_write mb "$DIRTY" "$DIRTY"
top_uuid=$(V backup-create mb --parent "$inc_uuid" --wait --json | uuid_of)
top_image=$(V backup-info "$top_uuid" --json | tr -d ' \n' | grep -o '"path":"[^"]*"' | head -n 1 | cut -d'"' -f4)
converts=(); restores=()
for r in $(seq "$ROUNDS"); do
    rm -rf "$WORK/convert.qcow2" "$WORK/restore"
    sync
    converts+=("$(ms sh -c "qemu-img convert -O qcow2 '$top_image' '$WORK/convert.qcow2' && sync")")
    rm -f "$WORK/convert.qcow2"
    mkdir -p "$WORK/restore"
    sync
    restores+=("$(ms sh -c "'$BIN' --state-dir '$ST' backup-restore '$top_uuid' --dir '$WORK/restore' && sync")")
done
convert=$(med "${converts[@]}"); restore=$(med "${restores[@]}")
qemu-img compare -q "$top_image" "$WORK/restore/"*vda* || { echo "restored image differs" >&2; exit 1; }
rm -rf "$WORK/restore"
fig "qemu-img convert + sync of the 3-deep chain" "$convert" ms
fig "backup-restore + sync of the same chain" "$restore" ms
fig "  speed of restore / convert" "$(ratio "$convert" "$restore")" x ">= 0.9x" ">=" 0.9
V backup-delete mb --all >/dev/null

# 4. and 8. Managed pull full against nbdcopy of the same export; the pull's peak RSS.
cat > "$WORK/pull.xml" <<XML
<domainbackup mode='pull'><server transport='unix' socket='$ST/run/mb/nbd.sock'/><disks><disk name='vda' type='file'><scratch file='$WORK/scratch.qcow2'/></disk></disks></domainbackup>
XML
copies=(); pulls=(); rss=0
for r in $(seq "$ROUNDS"); do
    rm -f "$WORK/nbdcopy.qcow2" "$WORK/scratch.qcow2"
    uri=$(V backup-begin mb "$WORK/pull.xml" | grep -o 'nbd+unix://[^ ,;]*' | head -n 1)
    [ -n "$uri" ] || { echo "backup-begin printed no export" >&2; exit 1; }
    qemu-img create -q -f qcow2 "$WORK/nbdcopy.qcow2" "$SIZE"
    sync
    copies+=("$(ms sh -c "nbdcopy '$uri' -- [ qemu-nbd -f qcow2 '$WORK/nbdcopy.qcow2' ] && sync")")
    V domjobabort mb >/dev/null
    sync
    t0=$(date +%s%N)
    # The peak RSS of the vbackup process itself (VmHWM), not of the helpers it starts.
    "$BIN" --state-dir "$ST" backup-create mb --pull --wait >/dev/null &
    pid=$!
    kib=0
    while kill -0 "$pid" 2>/dev/null; do
        hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        if [ -n "$hwm" ] && [ "$hwm" -gt "$kib" ]; then kib=$hwm; fi
        sleep 0.01
    done
    wait "$pid"
    sync
    pulls+=("$(since_ms "$t0")")
    if [ "$kib" -gt "$rss" ]; then rss=$kib; fi
    V backup-delete mb --all >/dev/null
done
copy=$(med "${copies[@]}"); pull=$(med "${pulls[@]}")
fig "nbdcopy of the pull export into qcow2 + sync, $SIZE" "$copy" ms
fig "managed backup-create --pull --wait, full of $SIZE" "$pull" ms
fig "  speed of managed pull / nbdcopy" "$(ratio "$copy" "$pull")" x ">= 0.9x" ">=" 0.9
fig "peak RSS of vbackup during the managed pull" "$(echo "scale=1; $rss / 1024" | bc)" MiB "< 64 MiB" "<=" 64
V shutdown mb >/dev/null

# 6. Incrementals with DIRTY written on a BIG sparse disk against a SMALL one (medians of
# ROUNDS, each an incremental on the same full backup).
for d in big:$BIG small:$SMALL; do
    name=${d%%:*}; size=${d#*:}
    new_domain "$name" "$size" sparse
    guest_write "$name" 0 "$DIRTY"
    base=$(V backup-create "$name" --wait --json | uuid_of)
    pushes=(); pulls=()
    for r in $(seq "$ROUNDS"); do
        guest_write "$name" "$DIRTY" "$DIRTY"
        sync
        pushes+=("$(ms V backup-create "$name" --parent "$base" --wait)")
        guest_write "$name" "$DIRTY" "$DIRTY"
        sync
        pulls+=("$(ms V backup-create "$name" --parent "$base" --pull --wait)")
    done
    eval "${name}_push=$(med "${pushes[@]}")"
    eval "${name}_pull=$(med "${pulls[@]}")"
    V shutdown "$name" >/dev/null
done
fig "managed incremental push, $DIRTY dirty of $SMALL" "$small_push" ms
fig "managed incremental push, $DIRTY dirty of $BIG sparse" "$big_push" ms
fig "  $BIG / $SMALL, push" "$(ratio "$big_push" "$small_push")" x "<= 1.2x" "<=" 1.2
fig "managed incremental pull, $DIRTY dirty of $SMALL" "$small_pull" ms
fig "managed incremental pull, $DIRTY dirty of $BIG sparse" "$big_pull" ms
fig "  $BIG / $SMALL, pull" "$(ratio "$big_pull" "$small_pull")" x "<= 1.2x" "<=" 1.2

# 7. PAR domains: one after another, then all at once (fulls each time).
for i in $(seq "$PAR"); do new_domain "p$i" "$PSIZE"; done
sync
t0=$(date +%s%N)
for i in $(seq "$PAR"); do V backup-create "p$i" --wait >/dev/null; done
sync
serial=$(since_ms "$t0")
for i in $(seq "$PAR"); do V backup-delete "p$i" --all >/dev/null; done
sync
t0=$(date +%s%N)
pids=()
for i in $(seq "$PAR"); do V backup-create "p$i" --wait >/dev/null & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
sync
parallel=$(since_ms "$t0")
for i in $(seq "$PAR"); do V shutdown "p$i" >/dev/null; done
fig "$PAR x backup-create --wait ($PSIZE each), one after another" "$serial" ms
fig "$PAR x backup-create --wait, concurrently" "$parallel" ms
fig "  concurrent / one after another" "$(ratio "$parallel" "$serial")" x "<= 1.1x" "<=" 1.1

# 9. The simulator.
sweep=$(cargo run --release -q -p vbackup-sim --manifest-path "$ROOT/Cargo.toml" -- sweep --seeds "0..$SEEDS" | head -n 1)
echo "$sweep" | grep -q " 0 failed" || { echo "simulator sweep failed: $sweep" >&2; exit 1; }
rate=$(echo "$sweep" | sed -n 's/.* \([0-9]*\) seeds\/s.*/\1/p')
threads=$(echo "$sweep" | sed -n 's/.* \([0-9]*\) thread(s).*/\1/p')
fig "simulator, 200-step histories with all faults, $threads thread(s)" "$rate" "s/s" ">= 300 seeds/s" ">=" 300

echo
printf '%s\n' "${FIGURES[@]}"
