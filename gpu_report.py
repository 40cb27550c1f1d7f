"""gpu_report: the GPU check's report.md, which gpu_check.sh writes after each step and prints
last.

    python3 gpu_report.py REPORT_DIR [WORK_DIR]

From REPORT_DIR alone, as the GPU machine returns it: log.txt (the versions, each step's output,
exit and seconds; the CUDA tests' summary), gpu.csv (the card), bench.json and compare.json
(bench.py's figures, written after each row or section); and WORK_DIR's slice/ (the hopper slice's
run folder), if given. So report.md can be made again on any machine, without CUDA. One table of
every figure, each rate beside one eager run alone, and Table 3's GPU-hours projected from them.
A figure that a step cut short did not measure reads "n/a"; a row an error replaced shows the
error's start.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

STEP_START = re.compile(r"^=== (\w+): (.*)$")            # gpu_check.sh's lines around each step
STEP_END = re.compile(r"^=== (\w+): (exit \S+ after \d+ s|skipped.*)$")


def read_json(path: Path) -> dict:
    """A figures file, {} if missing or cut short (a step killed mid-write, before bench.py wrote
    them atomically)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def figures(report: Path) -> dict:
    """bench.json's figures with the compare step's rows beside them ({} if bench never wrote)."""
    b = read_json(report / "bench.json")
    b.update({k: v for k, v in read_json(report / "compare.json").items()
              if k.startswith(("procs_", "compiled_", "cudagraphs_", "busy_"))})
    return b


def read_log(report: Path) -> tuple[str, list[tuple[str, str, str]], dict[str, list[str]]]:
    """log.txt -> (the versions line, each step's (name, exit, seconds), each step's output)."""
    log = report / "log.txt"
    versions, status, output, step = "", [], {}, None
    for line in (log.read_text().splitlines() if log.exists() else []):
        end, start = STEP_END.match(line), STEP_START.match(line)
        if end:
            words = end.group(2).split()
            status.append((end.group(1), *((words[1], words[3]) if words[0] == "exit"
                                           else (end.group(2), ""))))
            step = None
        elif start and start.group(1) == "versions":
            versions = start.group(2)
        elif start:
            step = start.group(1)
            output[step] = []
        elif step:
            output[step].append(line)
    return versions, status, output


def device_name(report: Path) -> str:
    """The card's name from gpu.csv (nvidia-smi's), so no CUDA is needed here."""
    lines = (report / "gpu.csv").read_text().splitlines() if (report / "gpu.csv").exists() else []
    return lines[1].split(",")[0].strip() if len(lines) > 1 else "unknown GPU"


BUSY = {"train_steps_per_s": "LaMo", "pack_lamo": "LaMo",
        "pack_lamo+lm": "LaMo + (2, 1024) LM batch",
        "compiled_lamo": "LaMo, --compile", "cudagraphs_lamo": "LaMo, CUDA graphs"}


def busy_rows(b: dict, top: int = 3) -> list[tuple[str, str, str, str, str]]:
    """What bounds each profiled step (measure.device_busy): (configuration, wall ms a step = runs
    / run-steps/s, device-busy ms a step and its share of the wall, busy ms per run-step, the
    top kernels). Busy near 100%: the device's work bounds the step, and only less of it per run
    gains; far below: the host's launching does."""
    rows = []
    for key, busy in b.items():
        if not key.startswith("busy_") or not busy:
            continue
        row = key.removeprefix("busy_")                  # the rate's key: compiled_lamo_16
        alone = row == "train_steps_per_s"
        runs = 1 if alone else int(row.split("_")[2])
        pack = row.startswith("pack_") or runs > 1
        kind = BUSY[row if alone else row.rsplit('_', 1)[0]]
        if not row.startswith(("compiled_", "cudagraphs_")):   # bench.py's own rows
            kind += ", --compile" if b.get("compile") else ", eager"
        name = f"{kind}: " + (f"a pack of {runs}" if pack else "one run alone")
        rate = b.get(row)
        if "error" in busy or not isinstance(rate, (int, float)):
            rows.append((name, "n/a", busy.get("error", "n/a")[:60].replace("|", "/"), "", ""))
            continue
        wall = 1e3 * runs / rate
        kernels = "; ".join(f"{short(n)} {ms:.2f}" for n, ms in busy["top"][:top])
        rows.append((name, f"{wall:.2f}", f"{busy['ms']:.2f} ({busy['ms'] / wall:.0%})",
                     f"{busy['ms'] / runs:.2f}", kernels))
    return rows


def short(kernel: str) -> str:
    """A CUDA kernel's name, its first 60 characters past the namespaces that every aten kernel
    shares: 'vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::BFloat16>...'."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "at::"):
        kernel = kernel.replace(noise, "")
    return kernel[:60].replace("|", "/")


def value(b: dict, key: str, spec: str) -> str:
    """A figure formatted, or "n/a" where its step never measured it."""
    return format(b[key], spec) if b.get(key) is not None else "n/a"


def bench_rows(b: dict) -> list[tuple[str, str, str]]:
    """(measurement, value, peak GPU GB) of each of bench.py's figures."""
    val = lambda k, f: value(b, k, f)
    gb = lambda k: val(k, ".2f")
    alone = {"lamo": b.get("train_steps_per_s"), "dt": b.get("train_steps_per_s_dt"),
             "lamo+lm": b.get("train_steps_per_s_with_lm")}

    def times(v, model="lamo"):  # a rate and its ratio to one eager run alone, or an error's start
        if isinstance(v, str):
            return v[:60]
        return f"{v:.3g}" + (f" ({v / alone[model]:.1f}x)" if alone[model] else "")

    def runs(k):                 # compiled_lamo_16 -> a pack's rate; compiled_lamo_1 -> a run's
        R = k.split("_")[2]
        return "steps/s of one run alone" if R == "1" else f"run-steps/s, a pack of {R}"

    rows = lambda prefix: [(k, v) for k, v in b.items() if k.startswith(prefix)
                           and not k.endswith("_gb")]
    table = [(f"LaMo training steps/s (GPT-2 small shape, B=64 K=20, {b.get('precision', '?')})",
              val("train_steps_per_s", ".3g"), gb("train_peak_gpu_gb")),
             ("  the same, timed again at the end of bench (after its profiles)",
              val("train_steps_per_s_again", ".3g"), ""),
             ("  same + (2, 1024) LM batch", val("train_steps_per_s_with_lm", ".3g"),
              gb("train_peak_gpu_gb_with_lm")),
             ("DT preset training steps/s", val("train_steps_per_s_dt", ".3g"),
              gb("train_peak_gpu_gb_dt"))]
    table += [(f"LaMo training steps/s at B={B} ({int(B) / 64:g}x the tokens of one run)",
               f"{v:.3g}", "") for B, v in b.get("train_steps_per_s_by_batch", {}).items()]
    table += [(f"run-steps/s, a pack of {k.split('_')[2]} {k.split('_')[1]} runs (x one run "
               "alone)", times(v, k.split("_")[1]), gb(k + "_peak_gpu_gb"))
              for k, v in rows(("pack_lamo_", "pack_dt_", "pack_lamo+lm_"))]
    table += [(f"evaluation env-steps/s, a pack of {k.split('_')[2]} LaMo runs, "
               f"{b[k.removesuffix('_env_steps_per_s') + '_episodes']} episodes in one rollout",
               f"{v:.0f}", "") for k, v in rows("pack_eval_") if k.endswith("_env_steps_per_s")]
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
    # the sections bench.py was asked for (QUICK=1 leaves evaluation and sampling out): what one
    # of them did not measure reads n/a, the others are left out
    asked = b.get("sections", ("train", "packs", "eval", "sampling"))
    if "eval" not in asked:
        return table + sampling_rows(b, asked)
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
               f"worker processes", f"{v:.0f}", "") for k, v in rows("eval_workers_")
              if k.endswith("_env_steps_per_s")]
    return table + sampling_rows(b, asked)


def sampling_rows(b: dict, asked) -> list[tuple[str, str, str]]:
    """bench.py's sampling section, if it was asked for."""
    if "sampling" not in asked:
        return []
    val = lambda k, f: value(b, k, f)
    return [("batch sampling ms, loop / vectorised",
             f"{val('sample_loop_ms', '.2f')} / {val('sample_vectorised_ms', '.3f')}", ""),
            ("Atari batch sampling ms, official loop / ours",
             f"{val('atari_sample_loop_ms', '.0f')} / "
             f"{val('atari_sample_vectorised_ms', '.1f')}", "")]


def slice_rows(b: dict, run: Path) -> list[tuple[str, str, str]]:
    """The hopper slice's training speed and evaluation cost from its run folder, extrapolated to
    the protocol's 100k steps and 40 evaluations, and Table 3's GPU-hours: 36 LaMo + 36 DT runs,
    40 evaluations each at the slice's cost (LaMo's; DT's are cheaper). Training from b: one run
    at a time, and as packs of the R with the most run-steps/s; evaluations as packs at bench's
    pack-evaluation env-steps/s, for episodes as long as the slice's, where it was measured."""
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    eval_steps = {r["step"] for r in evals}
    # training speed: log intervals after the first (warm-up) that contain no evaluation
    sps = [r["steps_per_s"] for r in rows if "steps_per_s" in r and r["step"] > 100
           and r["step"] - 100 not in eval_steps]
    if not (sps and evals):
        return []
    train_sps = statistics.median(sps)
    eval_s = statistics.mean(r["eval_s"] for r in evals)
    length = statistics.mean(e["length_mean"] for r in evals for e in r["eval"].values())
    cfg = json.loads((run / "config.json").read_text())
    episodes = cfg["eval_episodes"] * len(cfg["targets"].split(","))
    hours = (100_000 / train_sps + 40 * eval_s) / 3600
    worst = (100_000 / train_sps + 40 * eval_s * 1000 / length) / 3600
    table = [("hopper slice: training steps/s (median of 100-step intervals)",
              f"{train_sps:.3g}", ""),
             (f"hopper slice: seconds per evaluation ({episodes} episodes, mean length "
              f"{length:.0f})", f"{eval_s:.1f}", ""),
             ("hopper protocol extrapolated: 100k steps + 40 evaluations, hours",
              f"{hours:.2f}", ""),
             ("  same if every episode ran its 1000 steps, hours", f"{worst:.2f}", "")]
    rate = [v for k, v in b.items() if k.startswith("pack_eval_")
            and k.endswith("_env_steps_per_s")]
    evals_h = 72 * 40 * eval_s / 3600
    evals_h_packed = 72 * 40 * episodes * length / max(rate) / 3600 if rate else evals_h
    return table + table3_rows(b, evals_h, evals_h_packed)


def table3_rows(b: dict, evals_h: float | None = None, evals_h_packed: float | None = None
                ) -> list[tuple[str, str, str]]:
    """Table 3's GPU-hours: 36 LaMo + 36 DT runs of 100k steps, one run at a time and as packs
    of the R with the most run-steps/s, plus their evaluations' hours where the slice measured
    them (slice_rows; else training alone)."""
    if not ("train_steps_per_s" in b and "train_steps_per_s_dt" in b):
        return []
    plus = lambda h: "" if h is None else f" + {h:.1f}"
    what = "training + evaluation" if evals_h is not None else "training (no slice: no evaluation)"
    alone_h = 36e5 * (1 / b["train_steps_per_s"] + 1 / b["train_steps_per_s_dt"]) / 3600
    best = {m: max(((b[k], k.split("_")[2]) for k in b if k.startswith(f"pack_{m}_")
                    and not k.endswith("_gb") and isinstance(b[k], (int, float))), default=None)
            for m in ("lamo", "dt")}
    table = [(f"Table 3 projected, one run at a time: {what}, GPU-hours",
              f"{alone_h:.1f}{plus(evals_h)}", "")]
    if all(best.values()):
        packed = 36e5 * (1 / best["lamo"][0] + 1 / best["dt"][0]) / 3600
        table += [(f"Table 3 projected, packs of {best['lamo'][1]} LaMo / {best['dt'][1]} "
                   f"DT runs: {what}, GPU-hours", f"{packed:.1f}{plus(evals_h_packed)}", "")]
    return table


def report(report: Path, work: Path | None = None) -> str:
    """report.md's text: each step's exit and seconds, the CUDA tests' summary, every figure."""
    versions, status, output = read_log(report)
    lines = [f"# lamo GPU check: {device_name(report)}", "",
             f"{versions or 'versions not logged'}, command `bash gpu_check.sh`", "",
             "| step | exit | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {rc} | {seconds} |" for name, rc, seconds in status]
    tests = [line for line in output.get("tests", []) if line.strip()]
    lines += ["", "CUDA tests: " + (tests[-1] if tests else "no output")]
    lines += [f"    {line}" for line in tests if line.startswith(("fp32:", "bf16:"))]
    b = figures(report)
    table = (bench_rows(b) if b else []) + ((work and slice_rows(b, work / "slice"))
                                            or table3_rows(b))
    if table:
        lines += ["", "| measurement | value | peak GPU GB |", "| --- | --- | --- |"]
        lines += [f"| {a} | {v} | {g} |" for a, v, g in table]
    busy = busy_rows(b)
    if busy:
        lines += ["", "What bounds a step (torch.profiler's kernel time over 3 steps against the "
                  "step's wall time; ms a step, top kernels in ms a step):", "",
                  "| configuration | wall ms | GPU busy ms | busy ms per run-step | "
                  "top kernels |", "| --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in busy]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Write REPORT_DIR/report.md; print it with --print."""
    args = list(sys.argv[1:] if argv is None else argv)
    show = "--print" in args
    paths = [Path(x) for x in args if x != "--print"]
    text = report(*paths)
    (paths[0] / "report.md").write_text(text)
    if show:
        print("\n" + text, end="")


if __name__ == "__main__":
    main()
