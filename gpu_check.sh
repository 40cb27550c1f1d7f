#!/usr/bin/env bash
# lamo's GPU check: one command for a GPU machine. Measured on an H200: tests 52-65 s, bench
# 103 s (before --pack-attention and --pack-eval), slice 110 s, plus the wheels and the data; on
# an H100 (QUICK=1, below): tests 99 s, bench 160 s, compare 223 s. Under a 10-minute cap a
# call, give QUICK=1 STEPS="tests bench compare", or STEPS: "tests bench" in one call, then
# "compare" in the next, on the same warm machine.
#
#   bash gpu_check.sh [REPORT_DIR]          # default: gpu_report/
#   STEPS="tests bench" bash gpu_check.sh   # some of the steps (default: tests bench compare slice)
#   QUICK=1 STEPS="tests bench compare" bash gpu_check.sh   # the three in one 10-minute call
#
# 1. the CUDA tests (pytest -m cuda: a step against the CPU, --resume, --eval-only, batched
#    evaluation, --compile, sweep.py --gpus, the batchers' pinned copies, packs, a pack with
#    dropout eager, compiled and as CUDA graphs);
# 2. bench.py --device cuda (LaMo on GPT-2 small's shape with and without the LM batch, the DT
#    preset, evaluation batched vs one at a time, sampling, peak GPU memory per section), with
#    torch.profiler's top 15 operators of one training step, one evaluation forward and one step
#    of a pack of 16 (by input shape: of 4), run-steps/s of packs of 1, 4, 8 and 16 runs (pack.py)
#    for LaMo and DT, and of 1 and 4 LaMo runs with the (2, 1024) LM batch (Kitchen's), the
#    pack of 16 through SDPA's fused kernels (they failed under vmap in torch 2.11), the
#    evaluation with its envs in 1 and N worker processes (--eval-workers), and the evaluation
#    of a pack of 16 (--pack-eval);
# 2b. compare: what a pack must beat, or could gain: 1, 4 and 8 LaMo training processes at once
#    on the GPU (sweep.py --jobs N --gpus 0), LaMo alone and a pack of 16 with --compile, and
#    both with --compile-mode reduce-overhead (CUDA graphs); with 2, what bounds each LaMo row's
#    step: the GPU's busy time (torch.profiler's kernels over 3 steps) against its wall time;
# 3. a timed 2,000-step slice of the hopper protocol (LaMo, B=64, K=20, 2 evaluations of 4 targets
#    x 20 episodes) on a Hopper dataset collected here, extrapolated to the paper's 100k steps,
#    and with bench.json's figures, Table 3's GPU-hours one run at a time and as packs.
# The GPT-2 body is GPT-2 small's shape with random weights (--pretrained none): the same compute
# as OpenAI's weights, which a machine without network cannot download.
# REPORT_DIR gets report.md (gpu_report.py, written after every step and printed last), log.txt
# (the versions, every step's output, exit and seconds), gpu.csv, bench.json, compare.json,
# profile.txt and the slice's curve.png: 7 files. `python3 gpu_report.py REPORT_DIR` makes
# report.md again from them on any machine. Exit status 1 if a step failed or was skipped.
# A GPU machine without gymnasium, mujoco and ale-py: run `bash ../shared/gpu/wheels.sh` on a
# machine with network first; the .whl/ folder it fills is installed from here.
set -uo pipefail
cd "$(dirname "$0")"
REPORT=$(realpath -m "${1:-gpu_report}")
VERSIONS=$(python3 -c "import torch, sys; print(f'torch {torch.__version__}, CUDA \
{torch.version.cuda}'); sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null) || {
    echo "gpu_check.sh: no CUDA GPU visible to torch here; run it on a GPU machine" >&2; exit 1; }
mkdir -p "$REPORT"
echo "=== versions: $VERSIONS" >> "$REPORT/log.txt"
WORK=$(mktemp -d)
if ! python3 -c "import gymnasium, mujoco, ale_py" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || {
        echo "gpu_check.sh: gymnasium/mujoco/ale-py missing and no .whl/ folder;" \
             "run ../shared/gpu/wheels.sh where there is network" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" .whl/*.whl || exit 1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export MUJOCO_GL=disable PYTHONUNBUFFERED=1   # no rendering; the image has no libEGL
STEPS=" ${STEPS:-tests bench compare slice} "
[[ $STEPS == *" slice "* ]] && STEPS+="collect "
FAILED=0
step() {   # step NAME SECONDS CMD...: run with a time limit, log it, record its status and time
    local name=$1 limit=$2; shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    if [[ -n ${DEADLINE:-} ]]; then     # no step past the deadline: report.md must come back
        local left=$((DEADLINE - SECONDS - 25))         # its kill's 15 s and the report's 10
        if ((left < 20)); then
            echo "=== $name: skipped, ${left} s left before the ${DEADLINE}-s deadline" \
                | tee -a "$REPORT/log.txt"
            FAILED=1
            return 0
        fi
        ((limit > left)) && limit=$left
    fi
    local t0=$SECONDS
    echo "=== $name: $*" | tee -a "$REPORT/log.txt"
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$REPORT/log.txt"
    local rc=${PIPESTATUS[0]}
    ((rc == 0)) || FAILED=1
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$REPORT/log.txt"
    python3 gpu_report.py "$REPORT" "$WORK" || FAILED=1    # a later kill keeps this one
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    > "$REPORT/gpu.csv" 2>&1
# QUICK=1: tests, bench and compare in one call under 10 minutes (a 570-s deadline), for a session
# whose device time is 15 minutes with the machine's start: bench leaves out what no pack changes
# (evaluation, sampling) and the fused kernels that failed under vmap; compare, the processes
# (4 at once: 2.5x one run on an H100), and B=1024 (measured once: 8.15 steps/s). On an H100
# the three took 99, 160 and 223 s, with 4 processes and B=1024, a profile that failed, and
# before the CUDA-graph pack's test and row, the LM packs and the busy profiles: these limits are
# a guess, not yet run; the deadline cuts the last step short rather than lose the report (each
# row of bench.py is saved as it is measured).
if [[ ${QUICK:-0} == 1 ]]; then
    # a deadline of 570 s from the start, for a 600-s call: the last step gets what is left
    LIMITS=(140 200 260) BENCH=(--sections train packs) PROCS=() DEADLINE=${DEADLINE:-570}
else
    LIMITS=(150 230 420) BENCH=(--batch-sizes 256 1024 --pack-attention cudnn flash efficient)
    PROCS=(1 4 8)
fi
step tests "${LIMITS[0]}" python3 -m pytest -m cuda -q -rP -p no:cacheprovider -p no:logging \
    test_cuda.py
step bench "${LIMITS[1]}" python3 bench.py --device cuda --train-steps 20 \
    --out "$REPORT/bench.json" --profile "$REPORT/profile.txt" "${BENCH[@]}" --pack-eval 16
step compare "${LIMITS[2]}" python3 bench.py --device cuda --train-steps 20 --sections \
    --compiled 16 --processes "${PROCS[@]}" --out "$REPORT/compare.json"
step collect 90 python3 data.py collect --env Hopper-v4 --policy noisy --episodes 300 \
    --max-steps 1000 --out "$WORK/hopper.hdf5"
step slice 110 python3 lamo.py --env hopper-medium-v2 --data "$WORK/hopper.hdf5" --pretrained none \
    --device cuda --steps 2000 --eval-every 1000 --log-every 100 --out "$WORK/slice"
cp "$WORK/slice/curve.png" "$REPORT/slice_curve.png" 2>/dev/null

python3 gpu_report.py "$REPORT" "$WORK" --print || FAILED=1
rm -rf "$WORK"
exit $FAILED
