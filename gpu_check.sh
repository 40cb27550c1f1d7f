#!/usr/bin/env bash
# lamo's GPU check: one command for a GPU machine, about 8 minutes on an H200. Measured there:
# tests 52-65 s, bench 103 s (before --pack-attention and --pack-eval), slice 110 s, plus the
# wheels and the data; the compare step is new (limit 7 minutes: three compilations and three
# process counts, never timed). Under a 10-minute cap a call, give STEPS: "tests bench" in one
# call, then "compare" in the next, on the same warm machine.
#
#   bash gpu_check.sh [REPORT_DIR]          # default: gpu_report/
#   STEPS="tests bench" bash gpu_check.sh   # some of the steps (default: tests bench compare slice)
#   QUICK=1 STEPS="tests bench compare" bash gpu_check.sh   # the three in one 10-minute call
#
# 1. the CUDA tests (pytest -m cuda: a step against the CPU, --resume, --eval-only, batched
#    evaluation, --compile, sweep.py --gpus, the batchers' pinned copies, packs, a pack with
#    dropout eager and compiled: its test is new, so the limit has room for its compilation);
# 2. bench.py --device cuda (LaMo on GPT-2 small's shape with and without the LM batch, the DT
#    preset, evaluation batched vs one at a time, sampling, peak GPU memory per section), with
#    torch.profiler's top 15 operators of one training step, one evaluation forward and one step
#    of a pack of 16, run-steps/s of packs of 1, 4, 8 and 16 runs (pack.py) for LaMo and DT, the
#    pack of 16 through SDPA's fused kernels (they failed under vmap in torch 2.11), the
#    evaluation with its envs in 1 and N worker processes (--eval-workers), and the evaluation of
#    a pack of 16 (--pack-eval);
# 2b. compare: what a pack must beat, or could gain: 1, 4 and 8 LaMo training processes at once
#    on the GPU (sweep.py --jobs N --gpus 0), LaMo alone and a pack of 16 with --compile, and
#    LaMo alone with --compile-mode reduce-overhead (CUDA graphs);
# 3. a timed 2,000-step slice of the hopper protocol (LaMo, B=64, K=20, 2 evaluations of 4 targets
#    x 20 episodes) on a Hopper dataset collected here, extrapolated to the paper's 100k steps,
#    and with bench.json's figures, Table 3's GPU-hours one run at a time and as packs.
# The GPT-2 body is GPT-2 small's shape with random weights (--pretrained none): the same compute
# as OpenAI's weights, which a machine without network cannot download.
# REPORT_DIR gets report.md (printed last), log.txt (every step's output), gpu.csv, bench.json,
# compare.json, profile.txt and the slice's curve.png: 7 files.
# A GPU machine without gymnasium, mujoco and ale-py: run `bash ../shared/gpu/wheels.sh` on a
# machine with network first; the .whl/ folder it fills is installed from here.
set -uo pipefail
cd "$(dirname "$0")"
REPORT=$(realpath -m "${1:-gpu_report}")
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || {
    echo "gpu_check.sh: no CUDA GPU visible to torch here; run it on a GPU machine" >&2; exit 1; }
mkdir -p "$REPORT"
WORK=$(mktemp -d)
if ! python3 -c "import gymnasium, mujoco, ale_py" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: gymnasium/mujoco/ale-py missing and no .whl/ folder; run ../shared/gpu/wheels.sh where there is network" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl || exit 1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export MUJOCO_GL=disable PYTHONUNBUFFERED=1   # no rendering; the image has no libEGL
STEPS=" ${STEPS:-tests bench compare slice} "
step() {   # step NAME SECONDS CMD...: run with a time limit, log it, record its status and time
    local name=$1 limit=$2; shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    local t0=$SECONDS
    echo "=== $name: $*" | tee -a "$REPORT/log.txt"
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" | tee -a "$REPORT/log.txt"
    local rc=${PIPESTATUS[0]}
    echo "$name $rc $((SECONDS - t0))" >> "$WORK/status"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$REPORT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$REPORT/gpu.csv" 2>&1
# QUICK=1: tests, bench and compare in one call under 10 minutes (585 s of limits), for a session
# whose device time is 15 minutes with the machine's start: bench leaves out what no pack changes
# (evaluation, sampling) and the fused kernels that failed under vmap; compare, the processes
# (4 at once: 2.5x one run on an H100). On an H100 the three took 99, 160 and 223 s, with
# 4 processes and before the CUDA-graph pack's test and row.
if [[ ${QUICK:-0} == 1 ]]; then
    LIMITS=(135 175 275) BENCH=(--sections train packs --batch-sizes 1024) PROCS=()
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
if [[ $STEPS == *" slice "* ]]; then
    timeout 90 python3 data.py collect --env Hopper-v4 --policy noisy --episodes 300 \
        --max-steps 1000 --out "$WORK/hopper.hdf5" > /dev/null 2>&1 || echo "collect failed" >> "$WORK/status"
fi
step slice 110 python3 lamo.py --env hopper-medium-v2 --data "$WORK/hopper.hdf5" --pretrained none \
    --device cuda --steps 2000 --eval-every 1000 --log-every 100 --out "$WORK/slice"
cp "$WORK/slice/curve.png" "$REPORT/slice_curve.png" 2>/dev/null

python3 - "$REPORT" "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path
import torch
report, work = Path(sys.argv[1]), Path(sys.argv[2])
status = {l.split()[0]: l.split()[1:] for l in (work / "status").read_text().splitlines()}
name = torch.cuda.get_device_name()
lines = [f"# lamo GPU check: {name}", "",
         f"torch {torch.__version__}, CUDA {torch.version.cuda}, command `bash gpu_check.sh`", "",
         "| step | exit | seconds |", "| --- | --- | --- |"]
lines += [f"| {k} | {v[0]} | {v[1] if len(v) > 1 else ''} |" for k, v in status.items()]
tests = (work / "tests.log").read_text().splitlines() if (work / "tests.log").exists() else []
lines += ["", "CUDA tests: " + (tests[-1] if tests else "no output")]
lines += [f"    {l}" for l in tests if l.startswith(("fp32:", "bf16:"))]
table = []
b = json.loads((report / "bench.json").read_text()) if (report / "bench.json").exists() else {}
if (report / "compare.json").exists():       # the compare step's rows, beside bench's own
    compare = json.loads((report / "compare.json").read_text())
    b.update({k: v for k, v in compare.items()
              if k.startswith(("procs_", "compiled_", "cudagraphs_"))})
# bench.json is written after each of bench.py's sections: a bench cut short leaves rows "n/a"
val = lambda k, f: format(b[k], f) if b.get(k) is not None else "n/a"
gb = lambda k: val(k, ".2f")
alone = {"lamo": b.get("train_steps_per_s"), "dt": b.get("train_steps_per_s_dt")}


def times(v, model="lamo"):      # a rate and its ratio to one eager run alone, or an error's start
    if isinstance(v, str):
        return v[:60]
    return f"{v:.3g}" + (f" ({v / alone[model]:.1f}x)" if alone[model] else "")


def runs(k):                     # compiled_lamo_16 -> a pack's rate; compiled_lamo_1 -> a run's
    R = k.split("_")[2]
    return "steps/s of one run alone" if R == "1" else f"run-steps/s, a pack of {R}"


rows = lambda prefix: [(k, v) for k, v in b.items() if k.startswith(prefix)
                       and not k.endswith("_gb")]
if b:
    table += [(f"LaMo training steps/s (GPT-2 small shape, B=64 K=20, {b.get('precision', '?')})",
               val("train_steps_per_s", ".3g"), gb("train_peak_gpu_gb")),
              ("  same + (2, 1024) LM batch", val("train_steps_per_s_with_lm", ".3g"),
               gb("train_peak_gpu_gb_with_lm")),
              ("DT preset training steps/s", val("train_steps_per_s_dt", ".3g"),
               gb("train_peak_gpu_gb_dt"))]
    table += [(f"LaMo training steps/s at B={B} ({int(B) / 64:g}x the tokens of one run)",
               f"{v:.3g}", "") for B, v in b.get("train_steps_per_s_by_batch", {}).items()]
    table += [(f"run-steps/s, a pack of {k.split('_')[2]} {k.split('_')[1]} runs (x one run "
               "alone)", times(v, k.split("_")[1]), gb(k + "_peak_gpu_gb"))
              for k, v in rows(("pack_lamo_", "pack_dt_"))]
    for R in [k.split("_")[2] for k in b if k.startswith("pack_eval_") and k.endswith("_s")
              and not k.endswith("per_s")]:
        table += [(f"evaluation env-steps/s, a pack of {R} LaMo runs, "
                   f"{b[f'pack_eval_{R}_episodes']} episodes in one rollout",
                   f"{b[f'pack_eval_{R}_env_steps_per_s']:.0f}", "")]
    table += [(f"LaMo with --compile: {runs(k)} (x one eager run alone)", times(v),
               gb(k + "_peak_gpu_gb")) for k, v in rows("compiled_")]
    table += [(f"LaMo with --compile --compile-mode reduce-overhead (CUDA graphs): {runs(k)} "
               "(x one eager run alone)", times(v), gb(k + "_peak_gpu_gb"))
              for k, v in rows("cudagraphs_")]
    table += [(f"run-steps/s, {k.split('_')[2]} LaMo training processes at once on the GPU "
               "(x one eager run alone)", times(v), "") for k, v in rows("procs_")]
    table += [(f"run-steps/s, a pack of {k.split('_')[3]} {k.split('_')[2]} runs, attention "
               f"through SDPA's {k.split('_')[1]} kernel", times(v) if isinstance(v, str)
               else f"{v:.3g}", "") for k, v in rows("packattn_")]
    table += [(f"evaluation env-steps/s, {b.get('eval_episodes')} episodes batched "
               f"({b.get('eval_model')})", val("eval_batched_env_steps_per_s", ".0f"),
               gb("eval_peak_gpu_gb")),
              (f"  the first {b.get('eval_sequential_episodes')} of them one at a time",
               val("eval_sequential_env_steps_per_s", ".0f"), ""),
              ("  env stepping alone (MuJoCo's floor)",
               val("eval_env_alone_env_steps_per_s", ".0f"), ""),
              ("  model forward ms per episode, batch of 1 / batched",
               f"{val('forward_ms_per_episode_batch_1', '.2f')} / "
               f"{val('forward_ms_per_episode_batched', '.3f')}", "")]
    table += [(f"evaluation env-steps/s, {b['eval_episodes']} episodes, {k.split('_')[2]} env "
               f"worker processes", f"{b[k]:.0f}", "") for k in b
              if k.startswith("eval_workers_") and k.endswith("_env_steps_per_s")]
    table += [("batch sampling ms, loop / vectorised",
               f"{val('sample_loop_ms', '.2f')} / {val('sample_vectorised_ms', '.3f')}", ""),
              ("Atari batch sampling ms, official loop / ours",
               f"{val('atari_sample_loop_ms', '.0f')} / "
               f"{val('atari_sample_vectorised_ms', '.1f')}", "")]
metrics = work / "slice" / "metrics.jsonl"
if metrics.exists():
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    eval_steps = {r["step"] for r in evals}
    # training speed: log intervals after the first (warm-up) that contain no evaluation
    sps = [r["steps_per_s"] for r in rows if "steps_per_s" in r and r["step"] > 100
           and r["step"] - 100 not in eval_steps]
    if sps and evals:
        train_sps = statistics.median(sps)
        eval_s = statistics.mean(r["eval_s"] for r in evals)
        length = statistics.mean(e["length_mean"] for r in evals for e in r["eval"].values())
        cfg = json.loads((work / "slice" / "config.json").read_text())
        episodes = cfg["eval_episodes"] * len(cfg["targets"].split(","))
        hours = (100_000 / train_sps + 40 * eval_s) / 3600
        worst = (100_000 / train_sps + 40 * eval_s * 1000 / length) / 3600
        table += [("hopper slice: training steps/s (median of 100-step intervals)", f"{train_sps:.3g}", ""),
                  (f"hopper slice: seconds per evaluation ({episodes} episodes, mean length {length:.0f})",
                   f"{eval_s:.1f}", ""),
                  ("hopper protocol extrapolated: 100k steps + 40 evaluations, hours", f"{hours:.2f}", ""),
                  ("  same if every episode ran its 1000 steps, hours", f"{worst:.2f}", "")]
        # Table 3: 36 LaMo + 36 DT runs of 100k steps, 40 evaluations each at the slice's cost
        # (LaMo's; DT's are cheaper). Training from bench.json: one run at a time, and as packs
        # of the R with the most run-steps/s; evaluations as packs at bench's pack-evaluation
        # env-steps/s, for episodes as long as the slice's, where it was measured.
        if "train_steps_per_s" in b and "train_steps_per_s_dt" in b:
            evals_h = 72 * 40 * eval_s / 3600
            alone_h = 36e5 * (1 / b["train_steps_per_s"] + 1 / b["train_steps_per_s_dt"]) / 3600
            best = {m: max(((b[k], k.split("_")[2]) for k in b if k.startswith(f"pack_{m}_")
                            and not k.endswith("_gb")), default=None) for m in ("lamo", "dt")}
            rate = [v for k, v in b.items() if k.startswith("pack_eval_")
                    and k.endswith("_env_steps_per_s")]
            if rate:
                evals_h_packed = 72 * 40 * episodes * length / max(rate) / 3600
            if all(best.values()):
                packed = 36e5 * (1 / best["lamo"][0] + 1 / best["dt"][0]) / 3600
                table += [("Table 3 projected, one run at a time: training + evaluation, "
                           "GPU-hours", f"{alone_h:.1f} + {evals_h:.1f}", ""),
                          (f"Table 3 projected, packs of {best['lamo'][1]} LaMo / "
                           f"{best['dt'][1]} DT runs: training + evaluation, GPU-hours",
                           f"{packed:.1f} + {evals_h_packed if rate else evals_h:.1f}", "")]
if table:
    lines += ["", "| measurement | value | peak GPU GB |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table]
(report / "report.md").write_text("\n".join(lines) + "\n")
print("\n" + "\n".join(lines))
EOF
rm -rf "$WORK"
