#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine runs README's own sbatch script (taken out of
# README.md, not a copy) on a tiny grid: 2 DT runs on a collected Hopper dataset, as 2 array
# shards, one of them requeued mid-run (scontrol requeue), then README's `afterany` aggregation job.
# It checks that every run ran in exactly one shard, that the requeued run continued from its
# checkpoint, that the table appears, and that the logs hold plain lines (no \r redraws).
#
#   sudo bash tests/slurm_check.sh    # as root: installs slurm-wlm and munge with apt if absent
#
# Python: $PYTHON, else the python3 on PATH, with lamo's requirements installed. It starts munged
# (if no munge daemon answers), slurmctld and slurmd with a config in a temporary folder, and stops
# what it started, by PID, when it ends. .ci/run runs it after the test suite.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=$(command -v "${PYTHON:-python3}")
fail() { echo "slurm_check.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root, to install and start munged, slurmctld and slurmd"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null \
        || fail "needs slurm-wlm and munge, and there is no apt-get to install them"
    echo "installing slurm-wlm and munge with apt-get ..."
    { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
        > /tmp/slurm_check_apt.log 2>&1 \
        || fail "apt-get install slurm-wlm munge failed (see /tmp/slurm_check_apt.log)"
fi
T0=$SECONDS
WORK=$(mktemp -d /tmp/lamo-slurm.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    done
}
trap cleanup EXIT

# ---------------------------------------------------------------- the cluster
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    [ -f /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1 \
        || create-munge-key >/dev/null 2>&1 \
        || fail "no /etc/munge/munge.key and it could not be created"
    munged --force --pid-file="$WORK/munged.pid" || fail "munged did not start"
    PIDS+=("$(cat "$WORK/munged.pid")")
fi
HOST=$(hostname -s)
mkdir -p "$WORK/spool" "$WORK/state"
export SLURM_CONF="$WORK/slurm.conf"
MEMORY=$(free -m | awk '/^Mem:/ {print int($2 * 0.8)}') \
    || fail "free -m failed"                     # MB for Slurm: 80% of this machine's memory
cat > "$SLURM_CONF" <<EOF
ClusterName=lamo-check
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmdSpoolDir=$WORK/spool
StateSaveLocation=$WORK/state
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$(nproc) RealMemory=$MEMORY State=UNKNOWN
PartitionName=check Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -c || fail "slurmctld did not start (see $WORK/slurmctld.log)"
sleep 1; PIDS+=("$(cat "$WORK/slurmctld.pid")")
slurmd || fail "slurmd did not start (see $WORK/slurmd.log)"
sleep 1; PIDS+=("$(cat "$WORK/slurmd.pid")")
for _ in $(seq 60); do [ "$(sinfo -h -o %t)" = idle ] && break; sleep 1; done
[ "$(sinfo -h -o %t)" = idle ] || fail "the node is not idle: $(sinfo -h -o '%t %E')"
echo "cluster up: $(sinfo -h -o '%P %D %t %c CPUs')"

# ---------------------------------------------------------------- the repository, data and script
mkdir "$WORK/repo"
(cd "$REPO" && git ls-files -z | xargs -0 cp --parents -t "$WORK/repo")
mkdir -p "$WORK/repo/.venv/bin"              # README's script activates .venv: this Python
printf 'export PATH="%s:$PATH"\n' "$(dirname "$PY")" > "$WORK/repo/.venv/bin/activate"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$WORK/repo/.venv/bin/python"
chmod +x "$WORK/repo/.venv/bin/python"
cd "$WORK/repo"
# README's sbatch script: the first ```bash block of its Slurm section, and its aggregation command
awk '/^### On a Slurm cluster/ {s=1} s && /^```bash/ {b=1; next} b && /^```/ {exit} b' README.md \
    > table3.sbatch
grep -q '^exec python sweep.py' table3.sbatch \
    || fail "no sbatch script found in README's Slurm section"
WRAP=$(sed -n 's/^#.*--wrap "\(.*\)"$/\1/p' table3.sbatch)
[ -n "$WRAP" ] || fail "no aggregation command (--wrap) in README's sbatch script"
OMP_NUM_THREADS=1 "$PY" data.py collect --env Hopper-v4 --policy noisy --episodes 20 \
    --max-steps 200 --out "$WORK/hop.hdf5" > /dev/null 2>&1 || fail "data.py collect failed"
GRID=(--env hopper-medium-v2 --frac 1 --model dt --seed 0 1)
LAMO=(-- --data "$WORK/hop.hdf5" --steps 400 --eval-every 50 --eval-episodes 1 --eval-max-steps 50
      --log-every 50)

# ---------------------------------------------------------------- submit, requeue, aggregate
# The shrunk resources (no GPU, 1 CPU, 2 array tasks) override the script's #SBATCH lines.
job=$(sbatch --parsable --array=0-1 --gres=none --cpus-per-task=1 --time=30:00 table3.sbatch \
      "${GRID[@]}" "${LAMO[@]}") || fail "sbatch of README's script was refused"
agg=$(sbatch --parsable --dependency=afterany:"$job" --output=aggregate.out \
      --wrap "${WRAP//\$PWD/$PWD} ${GRID[*]}") || fail "sbatch of the aggregation job was refused"
echo "submitted array $job (2 shards) and aggregation $agg"
runs=sweeps/paper                           # every grid's default folder
for _ in $(seq 300); do                     # requeue shard 0 once its run has a checkpoint
    ls "$runs"/*_s0/ckpt.pt >/dev/null 2>&1 && break; sleep 1
done
ls "$runs"/*_s0/ckpt.pt >/dev/null 2>&1 || fail "shard 0 wrote no checkpoint in 5 minutes"
scontrol requeue "${job}_0" || fail "scontrol requeue ${job}_0 failed"
echo "requeued ${job}_0 after its first checkpoint"
for _ in $(seq 900); do
    [ -z "$(squeue -h -j "$job,$agg" 2>/dev/null)" ] && break; sleep 1
done
queued=$(squeue -h -j "$job,$agg") || true     # jobs ended long ago: "Invalid job id"
[ -z "$queued" ] || fail "jobs still queued after 15 minutes: $queued"

# ---------------------------------------------------------------- checks
for run in hopper-medium-v2_f1_dt_s0 hopper-medium-v2_f1_dt_s1; do
    step=$("$PY" -c "import json; print(json.load(open('$runs/$run/summary.json'))['step'])" \
           2>/dev/null) || fail "$run has no summary.json (shard outputs: $(tail -n 5 slurm-*.out))"
    [ "$step" = 400 ] || fail "$run ended at step $step, not 400"
    shards=$(grep -l "done  *$run" slurm-"$job"_*.out | wc -l)
    [ "$shards" = 1 ] || fail "$run finished in $shards shards, not exactly one"
done
log0="$runs/logs/hopper-medium-v2_f1_dt_s0.log"
stopped=$(sed -n 's/^interrupted at step \([0-9]*\); checkpoint saved.*/\1/p' "$log0" | head -n 1)
[ -n "$stopped" ] || fail "the requeued run saved no checkpoint when Slurm stopped it"
grep -q "^resuming .*_s0 at step $stopped\$" "$log0" \
    || fail "the requeued run did not resume at step $stopped, where it stopped"
grep -q "hopper-medium-v2" "$runs/results_table3.md" 2>/dev/null \
    || fail "the aggregation job wrote no table"
! grep -l $'\r' slurm-*.out aggregate.out "$runs"/logs/*.log \
    || fail "carriage returns in the logs above"
echo "--- a shard's Slurm log (slurm-${job}_1.out), first lines:"
head -n 8 "slurm-${job}_1.out"
echo "--- the requeued run's log, its resumption:"
grep -m 1 -B 1 "^interrupted at step" "$log0"
grep -m 1 "^resuming" "$log0"
echo "--- the table:"
cat "$runs/results_table3.md"
echo "slurm check passed in $((SECONDS - T0)) s"
