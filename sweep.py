"""sweep: run a grid of lamo.py runs (tasks x data ratios x models x seeds) until it is complete,
and gather the paper's table from it.

    python sweep.py --grid table3                  # the paper's Table 3 (MuJoCo): 72 runs
    python sweep.py --grid table3 --dry-run        # list the runs and their commands; run nothing
    python sweep.py --env hopper-medium-v2 --frac 0.1 1 --seed 0 1 2 --model lamo dt --name hop \\
        --jobs 4 --gpus 0,1 -- --steps 50000         # the flags after -- go to every lamo.py run
    python sweep.py --grid table3 --shard 3/8      # a fixed eighth of the grid (a Slurm array task)
    python sweep.py --grid table3 --aggregate      # run nothing; write the table from what exists
    python sweep.py --grid table3 --wandb lamo     # every new run logs to W&B, grouped by cell

Grids: table1 (Kitchen), table2 (Atari), table3 (MuJoCo), read from tasks.PAPER_TABLES, so they are
the cells the paper reports; --env/--frac/--model narrow a grid. Without --grid the grid is every
--env x --frac x --model (default: lamo dt) x --seed (default: 0 1 2).

Every run is an ordinary lamo.py run folder, sweeps/<name>/<task>_f<ratio>_<model>_s<seed>, with its
output in sweeps/<name>/logs/<run>.log. Run the same command again to continue: runs with a
summary.json are skipped, runs with a ckpt.pt resume from it (with the flags they started with),
runs killed before their first checkpoint start over. Failed runs are reported at the end with the
last lines of their log; the others go on. Exit status: 0 all done, 1 some failed, 2 bad input,
130 stopped by Ctrl-C (the running runs checkpoint and stop; the next invocation resumes them).

The table (printed, and written to results.md, results.csv and results.png in sweeps/<name>/): for
each cell (task, ratio, model) and each return target, the mean over seeds of each seed's last-20%
mean (summary.json's `last20`); the cell's value is the best target's mean ± std over the seeds
present, with numpy's default population std (ddof=0). The paper's numbers stand beside ours; a cell
with no finished seed is "—", never 0.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import progress
from tasks import PAPER, PAPER_TABLES

LAMO = Path(__file__).resolve().with_name("lamo.py")
MODELS = ("lamo", "dt")                    # the paper's two columns
SEEDS = (0, 1, 2)                          # the paper's three seeds per cell
GRIDS = {"table1": "Table 1", "table2": "Table 2", "table3": "Table 3"}   # --grid -> PAPER_TABLES
# Cells of the paper's grids that need more than lamo.py's defaults: the paper ran LaMo on GPT-2
# medium for Kitchen Complete at 30% and Partial at 100%.
GRID_FLAGS = {("kitchen-complete-v2", 0.3, "lamo"): ("--pretrained", "gpt2-medium"),
              ("kitchen-partial-v2", 1.0, "lamo"): ("--pretrained", "gpt2-medium")}
SET_BY_SWEEP = {"--env", "--frac", "--seed", "--model", "--out", "--resume", "--eval-only",
                "--wandb", "--wandb-group"}          # lamo.py flags the sweep itself gives
INTERRUPTED = (130, -signal.SIGINT)   # lamo.py's exit after a Ctrl-C checkpoint; an uncaught Ctrl-C
LOG_TAIL = 8                          # log lines shown for a failed run
MODEL_NAMES = {"lamo": "LaMo", "dt": "DT"}


class SweepError(Exception):
    """Bad input: printed as one `error: ...` line, exit status 2."""


# ============================================================================ 1. the grid
@dataclass(frozen=True)
class Cell:
    """One cell of a table: a task, a data ratio and a model, plus any lamo.py flags it needs."""
    task: str
    frac: float
    model: str
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.task}_f{self.frac:g}_{self.model}"


@dataclass(frozen=True)
class Run:
    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}_s{self.seed}"


def grid_cells(grid: str | None, envs, fracs, models) -> list[Cell]:
    """--grid: the paper's cells, narrowed by --env/--frac if given; else every --env x --frac.
    Each (task, ratio) is crossed with --model (default: LaMo and DT)."""
    if grid is None:
        if not envs or not fracs:
            raise SweepError(f"give --grid ({' | '.join(GRIDS)}), or --env and --frac")
        pairs = [(env, frac) for env in envs for frac in fracs]
    elif grid not in GRIDS:
        raise SweepError(f"--grid {grid!r}: choose one of {', '.join(GRIDS)}")
    else:
        pairs = [(env, frac) for env, frac in PAPER_TABLES[GRIDS[grid]]
                 if (not envs or env in envs) and (not fracs or frac in fracs)]
        if not pairs:
            raise SweepError(f"no cell of --grid {grid} has the --env/--frac given")
    cells = [Cell(env, frac, model, GRID_FLAGS.get((env, frac, model), ()) if grid else ())
             for env, frac in pairs for model in models or MODELS]
    return list(dict.fromkeys(cells))       # --frac 0.1 0.1 is one cell, not two


def make_runs(cells: list[Cell], seeds) -> list[Run]:
    """Seed-major order: a sweep cut short leaves every cell with its first seeds, not a few
    cells complete and the rest empty."""
    return [Run(cell, seed) for seed in dict.fromkeys(seeds) for cell in cells]


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not int(m[1]) < int(m[2]):
        raise SweepError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 (Slurm: "
                         "--array=0-<N-1> and $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m[1]), int(m[2])


def shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """Every count-th run of the grid sorted by name, from the index-th: over index = 0..count-1
    each run is in exactly one shard, whatever the order of the command's flags; sorting by name
    also spreads each shard over many cells."""
    mine = {run.name for run in sorted(runs, key=lambda r: r.name)[index::count]}
    return [run for run in runs if run.name in mine]


# ============================================================================ 2. one run
def run_state(run_dir: Path) -> str:
    """done: it has its summary; resume: it has a checkpoint; restart: a folder with nothing worth
    keeping (killed before its first checkpoint); new: no folder."""
    if (run_dir / "summary.json").exists():
        return "done"
    if (run_dir / "ckpt.pt").exists():
        return "resume"
    return "restart" if run_dir.exists() else "new"


def lamo_args(run: Run, run_dir: Path, lamo_flags: list[str], wandb: str | None,
              cuda: bool = False) -> list[str]:
    """lamo.py's arguments for this run. A resumed run gets only --resume: its config.json holds
    every flag it started with (and lamo.py refuses changes to most of them). cuda (--gpus): the
    run is told to train on CUDA, resumed or not, so a run that sees no GPU fails at once instead
    of training GPT-2 on the CPU for days (device auto would)."""
    device = ["--device", "cuda"] if cuda else []
    if run_state(run_dir) == "resume":
        return ["--resume", str(run_dir), *device]
    args = ["--env", run.cell.task, "--frac", str(run.cell.frac), "--seed", str(run.seed),
            "--model", run.cell.model, "--out", str(run_dir)]
    # The sweep's own lamo flags come after the cell's, so that they win (argparse keeps the last).
    args += [*run.cell.flags, *lamo_flags]
    if wandb:
        args += ["--wandb", wandb, "--wandb-group", run.cell.name]
    return args + device


def threads_per_job(jobs: int) -> int:
    """cores // jobs, the cores being Slurm's --cpus-per-task where Slurm says so (a node may not
    bind a job to its cores, and then every core of the node looks available), else this
    process's CPU affinity."""
    cores = os.environ.get("SLURM_CPUS_PER_TASK") or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return max(1, int(cores or 1) // jobs)


def child_env(slot: int, jobs: int, gpus: list[str]) -> dict[str, str]:
    """What worker `slot` (0..jobs-1) adds to the environment of the runs it starts: its share of
    the cores, which torch reads at start-up (two default-threaded runs on 2 cores were each ~10x
    slower than one alone), fixed by --jobs so a resumed run uses as many threads as it started
    with; and with --gpus, one GPU, round-robin over the slots, so --jobs above the GPU count
    shares them."""
    threads = str(threads_per_job(jobs))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def interrupt_if_orphaned():
    """Runs in the child before lamo.py starts: Linux sends it SIGINT if the sweep dies, even by
    kill -9, so it checkpoints and exits instead of running on with no one watching."""
    PR_SET_PDEATHSIG = 1
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def launch(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start lamo.py with its stdout and stderr appended to log_path, after a header line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        settings = " ".join(f"{k}={v}" for k, v in env.items())
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {settings} "
                  f"python lamo.py {shlex.join(args)}\n")
        log.flush()
        # A session of its own: a Ctrl-C at the terminal reaches the sweep only, which passes it on
        # once (a second SIGINT would make lamo.py abort without its checkpoint).
        return subprocess.Popen([sys.executable, str(LAMO), *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True,
                                preexec_fn=interrupt_if_orphaned if LIBC else None)


def log_tail(log_path: Path, n: int = LOG_TAIL) -> list[str]:
    """The last n lines of the log's latest launch, each progress bar reduced to its last state."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    latest = text.rsplit("\n=== ", 1)[-1]
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in latest.splitlines()[1:]]
    return [line for line in lines if line][-n:]


# ============================================================================ 3. many runs at once
def run_all(todo: list[Run], sweep_dir: Path, lamo_flags: list[str], wandb: str | None, jobs: int,
            gpus: list[str]) -> tuple[list[tuple[Run, int]], bool]:
    """Run `todo`, `jobs` at a time. -> ([(failed run, exit status)], whether Ctrl-C stopped it)."""
    queue, running, failed, stop = list(todo), {}, [], []
    free_slots = list(range(jobs))
    # Redrawn every 5 s at most, so a day-long sweep's log stays small; the ETA from the average
    # time per run since the start (smoothing=0: runs end in bursts); no monitor thread, as
    # launch()'s preexec_fn is only safe in a process without threads.
    tqdm.monitor_interval = 0
    bar = progress(total=len(todo), desc=f"sweep {sweep_dir.name}", unit="run", dynamic_ncols=True,
               mininterval=5, miniters=0, smoothing=0)

    def on_signal(signum, _frame):
        # SIGINT (Ctrl-C) or SIGTERM (e.g. Slurm): each run checkpoints after its current step
        # and exits 130; the next invocation resumes it.
        stop.append(signum)
        tqdm.write(f"{signal.Signals(signum).name}: asking {len(running)} running runs to "
                   "checkpoint and stop (again: abort them, losing the steps since their last "
                   "evaluation)")
        for proc in list(running):
            proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    def loading() -> bool:
        # lamo.py makes its run folder once its model, data and corpus are loaded, downloads
        # included. One run at a time in that phase: two runs downloading one file into one
        # .part at once would collide.
        return any(not (sweep_dir / run.name).exists() for run, _, _ in running.values())

    try:
        while running or (queue and not stop):
            while queue and free_slots and not stop and not loading():
                run, slot = queue.pop(0), free_slots.pop(0)
                run_dir = sweep_dir / run.name
                if run_state(run_dir) == "restart":
                    shutil.rmtree(run_dir)      # lamo.py refuses a non-empty --out
                args = lamo_args(run, run_dir, lamo_flags, wandb, cuda=bool(gpus))
                proc = launch(args, sweep_dir / "logs" / f"{run.name}.log",
                              child_env(slot, jobs, gpus))
                running[proc] = (run, slot, time.time())
                if stop:                        # a signal that came while it was starting
                    proc.send_signal(signal.SIGINT)
            for proc in [p for p in running if p.poll() is not None]:
                run, slot, t0 = running.pop(proc)
                free_slots.append(slot)
                outcome = outcome_of(run, proc.returncode, sweep_dir, stopped=bool(stop))
                tqdm.write(f"{outcome:<11} {run.name} ({time.time() - t0:.0f} s)")
                if outcome == "FAILED":
                    failed.append((run, proc.returncode))
                if outcome != "interrupted":
                    bar.update(1)
            bar.set_postfix_str(f"running {len(running)}, left {len(queue)}, failed {len(failed)}",
                                refresh=False)
            bar.update(0)       # redraws if 5 s have passed, so the elapsed time moves
            time.sleep(0.2)
    finally:
        for proc in running:        # only after an exception in the loop: stop the runs cleanly
            proc.send_signal(signal.SIGINT)
        for proc in running:
            proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
    return failed, bool(stop)


def outcome_of(run: Run, returncode: int, sweep_dir: Path, stopped: bool) -> str:
    """done | interrupted (it will resume or restart next time) | FAILED."""
    if returncode == 0 and (sweep_dir / run.name / "summary.json").exists():
        return "done"
    if returncode != 0 and (stopped or returncode in INTERRUPTED):
        return "interrupted"
    return "FAILED"


def report_failures(failed: list[tuple[Run, int]], sweep_dir: Path):
    for run, returncode in failed:
        log_path = sweep_dir / "logs" / f"{run.name}.log"
        print(f"\nFAILED {run.name} (exit status {returncode}); the end of {log_path}:")
        for line in log_tail(log_path):
            print(f"    {line}")


# ============================================================================ 4. the table
def cell_result(summaries: list[dict]) -> dict | None:
    """The paper's rule for one cell, from the summary.json of each seed present: per target, the
    mean over seeds of each seed's last-20% mean; the cell is the best target's mean and its
    population std (ddof=0) over the seeds. None if no seed is present."""
    if not summaries:
        return None
    # Targets high to low, so a tie goes to the higher one, the same way every time.
    targets = sorted(set.intersection(*(set(s["targets"]) for s in summaries)), key=float,
                     reverse=True)
    if not targets:
        return None
    per_target = {t: [s["targets"][t]["last20"] for s in summaries] for t in targets}
    means = {t: float(np.mean(scores)) for t, scores in per_target.items()}
    best = max(targets, key=means.get)
    return {"target": best, "mean": means[best], "std": float(np.std(per_target[best])),
            "target_means": means}


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):     # not finished, or being written
        return None


def table_rows(cells: list[Cell], seeds, sweep_dir: Path) -> list[dict]:
    rows = []
    for cell in cells:
        summaries = [read_summary(sweep_dir / Run(cell, seed).name) for seed in seeds]
        present = [s for s in summaries if s is not None]
        ours = cell_result(present) or {"target": None, "mean": None, "std": None,
                                        "target_means": {}}
        paper_mean, paper_std, paper_table = PAPER.get((cell.task, cell.frac, cell.model),
                                                       (None, None, None))
        rows.append({"task": cell.task, "ratio": cell.frac, "model": cell.model,
                     "seeds": len(present), "seeds_expected": len(seeds), **ours,
                     "paper_mean": paper_mean, "paper_std": paper_std, "paper_table": paper_table})
    return rows


def pm(mean, std) -> str:
    return "—" if mean is None else f"{mean:.1f} ± {std:.1f}"


def markdown(rows: list[dict], name: str) -> str:
    lines = [f"Sweep `{name}`: normalised score.", "",
             "| task | ratio | model | ours | paper | target | seeds |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        paper = "—" if r["paper_mean"] is None else \
            f"{pm(r['paper_mean'], r['paper_std'])} ({r['paper_table']})"
        lines.append(f"| {r['task']} | {r['ratio']:g} | {MODEL_NAMES.get(r['model'], r['model'])} "
                     f"| {pm(r['mean'], r['std'])} | {paper} | {r['target'] or '—'} "
                     f"| {r['seeds']}/{r['seeds_expected']} |")
    lines += ["", "ours: for the best return target, the mean ± std (population, ddof=0) over the "
              "seeds present of each seed's mean score over its evaluations in the last 20% of "
              "training; the best target is the one with the highest mean over seeds. paper: "
              "Shi et al., ICLR 2024, mean ± std over 3 seeds. —: no finished seed (or no paper "
              "value)."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path):
    """Full-precision numbers; empty fields where a value is missing."""
    columns = ["task", "ratio", "model", "seeds", "seeds_expected", "target", "mean", "std",
               "paper_mean", "paper_std", "paper_table", "target_means"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            means = ";".join(f"{t}:{m!r}" for t, m in r["target_means"].items())
            writer.writerow({**{k: "" if r[k] is None else r[k] for k in columns[:-1]},
                             "target_means": means})


def plot(rows: list[dict], path: Path, name: str):
    """Ours vs the paper per cell, error bars = std over seeds; a missing cell is marked, not 0."""
    import matplotlib                     # imported here: only the table step pays for it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.arange(len(rows))
    ours = [(np.nan, 0) if r["mean"] is None else (r["mean"], r["std"]) for r in rows]
    paper = [(np.nan, 0) if r["paper_mean"] is None else (r["paper_mean"], r["paper_std"])
             for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.5))
    ax.bar(x - 0.2, [m for m, _ in ours], 0.4, yerr=[s for _, s in ours], capsize=3, label="ours")
    ax.bar(x + 0.2, [m for m, _ in paper], 0.4, yerr=[s for _, s in paper], capsize=3,
           label="paper", color="0.75")
    for i, r in enumerate(rows):
        if r["mean"] is None:
            ax.annotate("missing", (x[i] - 0.2, 0), rotation=90, ha="center", va="bottom",
                        fontsize=7, color="0.4")
    labels = [f"{r['task']} {r['ratio']:g} {MODEL_NAMES.get(r['model'], r['model'])}"
              for r in rows]
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="normalised score", title=f"sweep {name}: ours vs paper (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table(cells: list[Cell], seeds, sweep_dir: Path):
    rows = table_rows(cells, seeds, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, sweep_dir.name)
    (sweep_dir / "results.md").write_text(text)
    write_csv(rows, sweep_dir / "results.csv")
    plot(rows, sweep_dir / "results.png", sweep_dir.name)
    print(f"\n{text}\nwrote {sweep_dir}/results.md, results.csv, results.png")


# ============================================================================ 5. entry point
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """sweep.py's own flags, and the lamo.py flags after `--`."""
    ours, lamo_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- go to every lamo.py run, e.g. "
                                       "-- --steps 50000 --device cuda.")
    p.add_argument("--grid", help=f"a paper table: {' | '.join(GRIDS)}")
    p.add_argument("--env", nargs="+", help="tasks, e.g. hopper-medium-v2 walker2d-medium-v2")
    p.add_argument("--frac", nargs="+", type=float, help="data ratios, e.g. 0.005 0.01 0.1 1")
    p.add_argument("--seed", nargs="+", type=int, default=list(SEEDS), help="default: 0 1 2")
    p.add_argument("--model", nargs="+", help="lamo and/or dt (default: both)")
    p.add_argument("--name", help="sweeps/<name>/ holds the runs (default: the grid's name, "
                                  "else 'sweep')")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--gpus", default="", help="e.g. 0,1: worker i gets GPU i mod count, among "
                                              "those CUDA_VISIBLE_DEVICES shows; runs get --device cuda")
    p.add_argument("--shard", help="I/N: run only the I-th of N fixed shares of the grid")
    p.add_argument("--wandb", metavar="PROJECT", help="log every new run to this W&B project, "
                                                      "grouped by cell")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="list the runs; run nothing")
    what.add_argument("--aggregate", action="store_true",
                      help="run nothing; write the table from the summaries there are")
    return p.parse_args(ours), lamo_flags


def check_input(args, lamo_flags: list[str]) -> list[str]:
    """One-line errors for what argparse cannot see. -> the --gpus list."""
    if args.jobs < 1:
        raise SweepError(f"--jobs {args.jobs}: must be >= 1")
    gpus = args.gpus.split(",") if args.gpus else []
    if any(not g.strip() for g in gpus):
        raise SweepError(f"--gpus {args.gpus!r}: expected a comma-separated list, e.g. 0,1")
    if gpus and any(f.split("=")[0] == "--device" for f in lamo_flags):
        raise SweepError("--gpus gives every run --device cuda; drop the --device after --")
    if args.name is not None and not re.fullmatch(r"\w[\w.+-]*", args.name):
        raise SweepError(f"--name {args.name!r}: letters, digits and . _ + -, starting with "
                         "a letter or digit")
    taken = [f for f in lamo_flags if f.split("=")[0] in SET_BY_SWEEP]
    if taken:
        raise SweepError(f"{taken[0]} after --: the sweep sets it per run; use sweep.py's own "
                         f"--env/--frac/--seed/--model/--name/--wandb")
    return visible_gpus([g.strip() for g in gpus])


def visible_gpus(indices: list[str]) -> list[str]:
    """--gpus indices -> each worker's CUDA_VISIBLE_DEVICES. An index counts among the GPUs this
    process sees, through its own CUDA_VISIBLE_DEVICES (as Slurm or a shared machine sets it): under
    CUDA_VISIBLE_DEVICES=5,7, --gpus 1 is GPU 7, never someone else's GPU 1."""
    if not indices:
        return []
    count = torch.cuda.device_count()        # honours CUDA_VISIBLE_DEVICES; starts no CUDA context
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([g.strip() for g in parent.split(",")] if parent is not None
           else [str(i) for i in range(count)])
    for g in indices:
        if not g.isdigit() or int(g) >= count:
            seen = f"indices 0..{count - 1}" if count else "none; drop --gpus to run on the CPU"
            raise SweepError(f"--gpus {g}: not a CUDA GPU this process sees "
                             f"(torch.cuda.device_count() is {count}: {seen})")
    return [ids[int(g)] for g in indices]


def check_same_flags(sweep_dir: Path, lamo_flags: list[str]):
    """The flags after -- are part of a sweep's identity: runs of one table must share them."""
    saved = sweep_dir / "sweep.json"
    if saved.exists():
        before = json.loads(saved.read_text())["lamo_flags"]
        if before != lamo_flags:
            raise SweepError(f"sweep {sweep_dir} was started with the lamo.py flags "
                             f"[{shlex.join(before)}], not [{shlex.join(lamo_flags)}]; give the "
                             "same, or a new --name")


def main(argv=None) -> int:
    args, lamo_flags = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        gpus = check_input(args, lamo_flags)
        cells = grid_cells(args.grid, args.env, args.frac, args.model)
        seeds = list(dict.fromkeys(args.seed))
        runs = make_runs(cells, seeds)
        if args.shard:
            runs = shard(runs, *parse_shard(args.shard))
        sweep_dir = Path("sweeps") / (args.name or args.grid or "sweep")
        if args.aggregate:
            write_table(cells, seeds, sweep_dir)
            return 0
        check_same_flags(sweep_dir, lamo_flags)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    states = {run: run_state(sweep_dir / run.name) for run in runs}
    counts = ", ".join(f"{sum(s == k for s in states.values())} {k}"
                       for k in ("done", "resume", "restart", "new"))
    shard_note = f" (shard {args.shard})" if args.shard else ""
    print(f"sweep {sweep_dir}{shard_note}: {len(runs)} runs: {counts}")
    if args.dry_run:
        for run, state in states.items():
            run_args = lamo_args(run, sweep_dir / run.name, lamo_flags, args.wandb, cuda=bool(gpus))
            print(f"  {state:<8} python lamo.py {shlex.join(run_args)}")
        return 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / "sweep.json").exists():
        (sweep_dir / "sweep.json").write_text(json.dumps({"lamo_flags": lamo_flags}))
    todo = [run for run, state in states.items() if state != "done"]
    failed, stopped = run_all(todo, sweep_dir, lamo_flags, args.wandb, args.jobs, gpus) \
        if todo else ([], False)
    if stopped:
        print("stopped; run the same command again to resume")
        return 130
    report_failures(failed, sweep_dir)
    if args.shard:
        print(f"shard {args.shard} finished; gather the table with the same command, "
              "--aggregate instead of --shard")
    else:
        write_table(cells, seeds, sweep_dir)
    if failed:
        print(f"\n{len(failed)} of {len(todo)} runs failed (logs in {sweep_dir / 'logs'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
