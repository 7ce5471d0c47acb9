#!/usr/bin/env bash
# Costs that must not grow with the history (issue 14), measured side by side in one run on a
# started managed domain (qemu-storage-daemon kept running), each figure printed with its
# target. A benchmark, not a test: it prints figures and fails only when a command fails.
#  1. `checkpoint-create-as` with no other checkpoint and with N-1 others, against the process
#     floor (`vbackup list`): the Nth within 1.25x of the 1st and within 2.5x of the floor;
#  2. `checkpoint-delete --children` of a chain of D checkpoints (on top of the N above),
#     against the cost of one create at that size: at most 5 creates.
# Every time is a whole process run, the median of ROUNDS runs (the deletion: one run).
#
# Usage: [N=300] [D=100] [ROUNDS=7] [VBACKUP=path] scripts/bench-scale.sh [WORKDIR]
# (VBACKUP: another vbackup binary to measure, e.g. an older build, instead of this tree's.)
# The defaults are small (N=50, D=20, ROUNDS=5) so that CI can run it as a smoke test; the
# issue's figures are N=300 D=100.
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
ROUNDS=${ROUNDS:-5}

OWN_WORK=""
if [ -z "${1:-}" ]; then OWN_WORK=1; fi
WORK=${1:-$(mktemp -d /var/tmp/vbackup-bench-scale.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ST="$WORK/state"
V() { "$BIN" --state-dir "$ST" "$@"; }
cleanup() {
    V shutdown scale >/dev/null 2>&1 || true
    if [ -n "$OWN_WORK" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Milliseconds one command takes, as a whole process; its output is discarded.
ms() {
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo "scale=3; ($t1 - $t0) / 1000000" | bc
}
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { echo "scale=3; $1 / $2" | bc; }
verdict() { if [ "$(echo "$1 <= $2" | bc)" = 1 ]; then echo "ok"; else echo "OVER"; fi; }

echo "work directory: $WORK (N=$N checkpoints, D=$D deleted, ROUNDS=$ROUNDS)"
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

printf '%-52s %9s ms\n' "vbackup list (process floor)" "$floor"
printf '%-52s %9s ms\n' "checkpoint-create-as, 1st checkpoint" "$first"
printf '%-52s %9s ms\n' "checkpoint-create-as, checkpoint $N" "$nth"
r1=$(ratio "$nth" "$first")
r2=$(ratio "$nth" "$floor")
printf '%-52s %9sx  (target <= 1.25x) %s\n' "  checkpoint $N / 1st" "$r1" "$(verdict "$r1" 1.25)"
printf '%-52s %9sx  (target <= 2.5x)  %s\n' "  checkpoint $N / floor" "$r2" "$(verdict "$r2" 2.5)"
printf '%-52s %9s ms\n' "checkpoint-delete --children of $D checkpoints" "$delete"
r3=$(ratio "$delete" "$nth")
printf '%-52s %9s   (target <= 5 creates) %s\n' "  in creates (checkpoint $N)" "$r3" "$(verdict "$r3" 5)"
