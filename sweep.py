"""sweep: run a grid of lamo.py runs (tasks x data ratios x variants x seeds) until it is complete,
and gather the paper's table or figure from it.

    python sweep.py --grid table3                  # the paper's Table 3 (MuJoCo): 72 runs
    python sweep.py --grid fig5 --dry-run          # list Fig. 5's runs and commands; run nothing
    python sweep.py --grid paper                   # everything the paper reports, each run once
    python sweep.py --env hopper-medium-v2 --frac 0.1 1 --seed 0 1 2 --model lamo dt --name hop \\
        --jobs 4 --gpus 0,1 -- --steps 50000         # the flags after -- go to every lamo.py run
    python sweep.py --grid table3 --shard 3/8      # a fixed eighth of the grid (a Slurm array task)
    python sweep.py --grid fig5 --aggregate        # run nothing; write the table from what exists
    python sweep.py --grid table3 --wandb lamo     # every new run logs to W&B, grouped by cell

Grids: the paper's tables (table1 Kitchen, table2 Atari, table3 MuJoCo; the appendix's table8, 9,
10, 11, 15, 16) and ablation figures (fig4, 5, 6, 10), read from paper.py, so they are the cells and
columns the paper reports. A column is a variant (VARIANTS: LaMo, DT, or LaMo with one setting
changed); --env/--frac/--model narrow a grid. Without --grid the grid is every --env x --frac x
--model (default: lamo dt) x --seed (default: 0 1 2).

Every run is an ordinary lamo.py run folder, sweeps/<name>/<task>_f<ratio>_<model>[+<flag>=<value>
...]_s<seed>, named by the flags it adds to the task's defaults, with its output in
sweeps/<name>/logs/<run>.log. Every grid defaults to one folder, sweeps/paper/, so a run that two
grids ask for (Table 16's LaMo is Table 3's; Fig. 6's λ 0.1 on Kitchen is Table 1's) is one folder,
trained once. Run the same command again to continue: runs with a summary.json are skipped, runs
with a ckpt.pt resume from it (with the flags they started with), runs killed before their first
checkpoint start over. Failed runs are reported at the end with the last lines of their log; the
others go on. Exit status: 0 all done, 1 some failed, 2 bad input, 130 stopped by Ctrl-C (the
running runs checkpoint and stop; the next invocation resumes them).

The table (printed, and written to results_<grid>.md, .csv and .png in sweeps/<name>/; results.*
without --grid): for each line (task, ratio, variant) and each return target, the mean over seeds of
each seed's last-20% mean (summary.json's `last20`); the line's value is the best target's mean ±
std over the seeds present, with numpy's default population std (ddof=0). The paper's numbers stand
beside ours (a figure's marked ≈, read off its plot); a line with no finished seed is "—",
never 0.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import progress
from lamo import PRESETS
from tasks import PAPER_FIGURES, PAPER_TABLES, TASKS

LAMO = Path(__file__).resolve().with_name("lamo.py")
MODELS = ("lamo", "dt")                    # the paper's two models; --model's default
SEEDS = (0, 1, 2)                          # the paper's three seeds per cell
PAPER_GRID = "paper"                       # --grid paper: every grid below, each run once
# --grid -> the paper's table or figure (paper.py) whose cells and variants it runs.
GRIDS = {"table1": "Table 1", "table2": "Table 2", "table3": "Table 3",
         "table8": "Table 8", "table9": "Table 9", "table10": "Table 10", "table11": "Table 11",
         "table15": "Table 15", "table16": "Table 16",
         "fig4": "Fig. 4", "fig5": "Fig. 5", "fig6": "Fig. 6", "fig10": "Fig. 10"}
SET_BY_SWEEP = {"--env", "--frac", "--seed", "--model", "--out", "--resume", "--eval-only",
                "--wandb", "--wandb-group"}          # lamo.py flags the sweep itself gives
INTERRUPTED = (130, -signal.SIGINT)   # lamo.py's exit after a Ctrl-C checkpoint; an uncaught Ctrl-C
LOG_TAIL = 8                          # log lines shown for a failed run


class SweepError(Exception):
    """Bad input: printed as one `error: ...` line, exit status 2."""


# ============================================================================ 1. the grid
@dataclass(frozen=True)
class Variant:
    """A column of the paper's tables and figures: lamo.py's --model, and the settings (Config
    fields) it changes from that model's defaults on the task."""
    model: str
    label: str
    settings: tuple[tuple[str, object], ...] = ()


VARIANTS = {
    "lamo": Variant("lamo", "LaMo"),
    "dt": Variant("dt", "DT"),
    "lamo-linear": Variant("lamo", "LaMo, linear embeddings", (("embed", "linear"),)),
    "lamo-full": Variant("lamo", "LaMo, full fine-tuning", (("finetune", "full"),)),
    "lamo-frozen": Variant("lamo", "LaMo, frozen (no LoRA)", (("finetune", "frozen"),)),
    "lamo-lm": Variant("lamo", "LaMo, λ 0.1", (("lm_coef", 0.1),)),
    "lamo-nolm": Variant("lamo", "LaMo, λ 0", (("lm_coef", 0.0),)),
    "lamo-nopt": Variant("lamo", "LaMo w/o pre-training", (("pretrained", "none"),)),
    "lamo-gpt2": Variant("lamo", "LaMo, GPT-2 small", (("pretrained", "gpt2"),)),
    "lamo-gpt2-medium": Variant("lamo", "LaMo, GPT-2 medium", (("pretrained", "gpt2-medium"),)),
}
# Cells whose LaMo the paper ran on more than the defaults: GPT-2 medium for Kitchen Complete 30%
# and Partial 100% (Table 1). In a paper grid every LaMo variant of such a cell keeps it unless the
# variant sets --pretrained itself (Fig. 10's sizes, Table 15's w/o pre-training), so an ablation
# changes one thing from the LaMo it is compared with (Fig. 6's λ 0 on Complete 30% is GPT-2
# medium).
CELL_SETTINGS = {("kitchen-complete-v2", 0.3): (("pretrained", "gpt2-medium"),),
                 ("kitchen-partial-v2", 1.0): (("pretrained", "gpt2-medium"),)}


@dataclass(frozen=True)
class Cell:
    """What one run folder per seed holds: a task, a data ratio, a model and the lamo.py flags it
    adds to the task's defaults. Its name says all of them, so the same run asked for by two grids
    (or two variants that resolve to the same flags) is one folder."""
    task: str
    frac: float
    model: str
    flags: tuple[str, ...] = ()       # --flag value pairs

    @property
    def name(self) -> str:
        pairs = zip(self.flags[::2], self.flags[1::2])
        return f"{self.task}_f{self.frac:g}_{self.model}" + "".join(
            f"+{flag.removeprefix('--')}={value}" for flag, value in pairs)


@dataclass(frozen=True)
class Entry:
    """A line of a grid's table: the paper's (task, ratio, variant) and the cell that fills it."""
    variant: str
    cell: Cell


@dataclass(frozen=True)
class Run:
    cell: Cell
    seed: int

    @property
    def name(self) -> str:
        return f"{self.cell.name}_s{self.seed}"


def task_defaults(task: str, model: str) -> dict:
    """What lamo.py's resolve() fills in for this task and model: the task's recipe, then the
    model's preset."""
    if task not in TASKS:
        raise SweepError(f"--env {task!r}: not a task of tasks.py, whose defaults a variant's "
                         f"settings are compared with; known: {', '.join(TASKS)}")
    return {**asdict(getattr(TASKS[task], model)), **PRESETS[model]}


def make_cell(task: str, frac: float, variant: str, in_grid: bool) -> Cell:
    """The cell of a variant on (task, ratio). A setting equal to the task's default gives no flag,
    so a variant that is the default run on this task (Fig. 6's λ 0.1 on Kitchen, Fig. 10's GPT-2
    small) is the very run of the main tables, trained once. Flags are sorted by name, so the
    same settings always name the same folder."""
    v = VARIANTS[variant]
    settings = dict(v.settings)
    if in_grid and v.model == "lamo":
        settings = {**dict(CELL_SETTINGS.get((task, frac), ())), **settings}
    if settings:    # only a variant with settings needs the task's entry in tasks.py
        defaults = task_defaults(task, v.model)
        settings = {k: value for k, value in settings.items() if value != defaults[k]}
    flags = []
    for key, value in sorted(settings.items()):
        flags += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else value]
    return Cell(task, frac, v.model, tuple(flags))


def grid_variants(source: str) -> list[str]:
    """A table's or figure's variants, in the paper's order: the keys of its cells."""
    book = PAPER_FIGURES if source in PAPER_FIGURES else PAPER_TABLES
    return list(dict.fromkeys(v for scores in book[source].values() for v in scores))


def grid_entries(grid: str | None, envs, fracs, variants) -> dict[str | None, list[Entry]]:
    """--grid: {grid: its (task, ratio, variant) entries}, the paper's cells narrowed by --env,
    --frac and --model (variant names) if given; --grid paper: every grid that keeps an entry.
    Without --grid: {None: every --env x --frac x --model (default: LaMo and DT)}."""
    for v in variants or ():
        if v not in VARIANTS:
            raise SweepError(f"--model {v!r}: choose among {', '.join(VARIANTS)}")
    if grid is None:
        if not envs or not fracs:
            raise SweepError(f"give --grid ({' | '.join([*GRIDS, PAPER_GRID])}), "
                             "or --env and --frac")
        entries = [Entry(v, make_cell(env, frac, v, in_grid=False))
                   for env in envs for frac in fracs for v in variants or MODELS]
        return {None: list(dict.fromkeys(entries))}     # --frac 0.1 0.1 is one cell, not two
    if grid != PAPER_GRID and grid not in GRIDS:
        raise SweepError(f"--grid {grid!r}: choose one of {', '.join([*GRIDS, PAPER_GRID])}")
    tables = {}
    for name in GRIDS if grid == PAPER_GRID else [grid]:
        book = PAPER_FIGURES if GRIDS[name] in PAPER_FIGURES else PAPER_TABLES
        entries = [Entry(v, make_cell(task, frac, v, in_grid=True))
                   for (task, frac), scores in book[GRIDS[name]].items()
                   if (not envs or task in envs) and (not fracs or frac in fracs)
                   for v in scores if not variants or v in variants]
        if entries:
            tables[name] = entries
    if not tables:
        raise SweepError(f"no cell of --grid {grid} has the --env/--frac/--model given")
    return tables


def grid_cells(tables: dict[str | None, list[Entry]]) -> list[Cell]:
    """Every cell of the grids, once: a run two grids share is trained once."""
    return list(dict.fromkeys(e.cell for entries in tables.values() for e in entries))


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


def pack_args(job: tuple[Run, ...], sweep_dir: Path, lamo_flags: list[str], wandb: str | None,
              cuda: bool = False) -> list[str]:
    """lamo.py's arguments for a job: one run (lamo_args), or a pack of runs that differ only in
    --frac and --seed (make_jobs), with one value of each per run and a run folder each; a pack
    of checkpointed runs gets their folders after --resume."""
    if len(job) == 1:
        return lamo_args(job[0], sweep_dir / job[0].name, lamo_flags, wandb, cuda)
    device = ["--device", "cuda"] if cuda else []
    folders = [str(sweep_dir / run.name) for run in job]
    if run_state(sweep_dir / job[0].name) == "resume":
        return ["--resume", *folders, *device]
    cell = job[0].cell
    args = ["--env", cell.task, "--frac", *(str(run.cell.frac) for run in job),
            "--seed", *(str(run.seed) for run in job), "--model", cell.model, "--out", *folders,
            *cell.flags, *lamo_flags]
    if wandb:
        args += ["--wandb", wandb, "--wandb-group", *(run.cell.name for run in job)]
    return args + device


def ckpt_step(run_dir: Path) -> int:
    """The step a run's checkpoint holds (memory-mapped: its tensors are not read)."""
    return torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=False,
                      mmap=True)["step"]


def make_jobs(todo: list[Run], sweep_dir: Path, pack: int,
              lamo_flags: list[str]) -> list[tuple[Run, ...]]:
    """--pack R: the runs to do, grouped into packs of at most R runs that lamo.py can train in
    lockstep in one process (pack.py): the same task, model and flags, so they differ only in
    --frac and --seed, and in the same state (new, or checkpointed at the same step). Runs with a
    token-counted lr schedule (Atari) go alone, as lamo.py refuses to pack them. Packs keep the
    runs' seed-major order. R = 1: one run per job."""
    groups: dict[tuple, list[Run]] = {}
    for run in todo:
        task = TASKS.get(run.cell.task)
        alone = (pack == 1 or task is None
                 or getattr(task, run.cell.model).warmup_tokens > 0)
        run_dir = sweep_dir / run.name
        state = ckpt_step(run_dir) if not alone and run_state(run_dir) == "resume" else "new"
        key = (run.name,) if alone else (run.cell.task, run.cell.model, run.cell.flags, state)
        groups.setdefault(key, []).append(run)
    jobs = [tuple(runs[i:i + pack]) for runs in groups.values() for i in range(0, len(runs), pack)]
    order = {run: i for i, run in enumerate(todo)}
    return sorted(jobs, key=lambda job: order[job[0]])


def job_name(job: tuple[Run, ...]) -> str:
    """A job's log file: its run's name, or for a pack its first run's and how many runs."""
    return job[0].name if len(job) == 1 else f"pack_{job[0].name}+{len(job) - 1}"


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
def run_all(todo: list[tuple[Run, ...]], sweep_dir: Path, lamo_flags: list[str],
            wandb: str | None, jobs: int,
            gpus: list[str]) -> tuple[list[tuple[Run, int, Path]], bool]:
    """Run the jobs of `todo` (a run, or a pack of runs: make_jobs), `jobs` at a time.
    -> ([(failed run, exit status, its log)], whether Ctrl-C stopped it)."""
    queue, running, failed, stop = list(todo), {}, [], []
    free_slots = list(range(jobs))
    # Redrawn every 5 s at most, so a day-long sweep's log stays small; the ETA from the average
    # time per run since the start (smoothing=0: runs end in bursts); no monitor thread, as
    # launch()'s preexec_fn is only safe in a process without threads.
    tqdm.monitor_interval = 0
    bar = progress(total=sum(map(len, todo)), desc=f"sweep {sweep_dir.name}", unit="run",
                   dynamic_ncols=True, mininterval=5, miniters=0, smoothing=0)

    def on_signal(signum, _frame):
        # SIGINT (Ctrl-C) or SIGTERM (e.g. Slurm): each run checkpoints after its current step
        # and exits 130; the next invocation resumes it.
        stop.append(signum)
        tqdm.write(f"{signal.Signals(signum).name}: asking {len(running)} running jobs to "
                   "checkpoint and stop (again: abort them, losing the steps since their last "
                   "evaluation)")
        for proc in list(running):
            proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    def loading() -> bool:
        # lamo.py makes its run folders once its models, data and corpus are loaded, downloads
        # included. One job at a time in that phase: two runs downloading one file into one
        # .part at once would collide.
        return any(not (sweep_dir / run.name).exists()
                   for job, _, _ in running.values() for run in job)

    try:
        while running or (queue and not stop):
            while queue and free_slots and not stop and not loading():
                job, slot = queue.pop(0), free_slots.pop(0)
                for run in job:
                    if run_state(sweep_dir / run.name) == "restart":
                        shutil.rmtree(sweep_dir / run.name)     # lamo.py refuses a non-empty --out
                args = pack_args(job, sweep_dir, lamo_flags, wandb, cuda=bool(gpus))
                proc = launch(args, sweep_dir / "logs" / f"{job_name(job)}.log",
                              child_env(slot, jobs, gpus))
                running[proc] = (job, slot, time.time())
                if stop:                        # a signal that came while it was starting
                    proc.send_signal(signal.SIGINT)
            for proc in [p for p in running if p.poll() is not None]:
                job, slot, t0 = running.pop(proc)
                free_slots.append(slot)
                for run in job:
                    outcome = outcome_of(run, proc.returncode, sweep_dir, stopped=bool(stop))
                    tqdm.write(f"{outcome:<11} {run.name} ({time.time() - t0:.0f} s)")
                    if outcome == "FAILED":
                        log = sweep_dir / "logs" / f"{job_name(job)}.log"
                        failed.append((run, proc.returncode, log))
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
    """done | interrupted (it will resume or restart next time) | FAILED. A run of a pack that
    finished while a pack-mate failed is done."""
    if (sweep_dir / run.name / "summary.json").exists() and (returncode == 0 or not stopped):
        return "done"
    if returncode != 0 and (stopped or returncode in INTERRUPTED):
        return "interrupted"
    return "FAILED"


def report_failures(failed: list[tuple[Run, int, Path]]):
    for run, returncode, log_path in failed:
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


def paper_value(grid: str | None, task: str, frac: float, variant: str) -> tuple | None:
    """(mean, std or None, source, approximate) of the paper for one line of a table. A grid
    compares with its own table or figure only, so a figure's ≈ values never stand beside a
    table's exact ones; a sweep without --grid takes the first of the paper's tables that has the
    line (never a figure)."""
    if grid is not None and GRIDS[grid] in PAPER_FIGURES:
        mean = PAPER_FIGURES[GRIDS[grid]].get((task, frac), {}).get(variant)
        return None if mean is None else (mean, None, GRIDS[grid], True)
    for source in [GRIDS[grid]] if grid is not None else PAPER_TABLES:
        score = PAPER_TABLES[source].get((task, frac), {}).get(variant)
        if score is not None:
            return (*score, source, False)
    return None


def table_rows(grid: str | None, entries: list[Entry], seeds, sweep_dir: Path) -> list[dict]:
    rows = []
    for entry in entries:
        cell = entry.cell
        summaries = [read_summary(sweep_dir / Run(cell, seed).name) for seed in seeds]
        present = [s for s in summaries if s is not None]
        ours = cell_result(present) or {"target": None, "mean": None, "std": None,
                                        "target_means": {}}
        paper = paper_value(grid, cell.task, cell.frac, entry.variant) or (None, None, None, False)
        rows.append({"task": cell.task, "ratio": cell.frac, "variant": entry.variant,
                     "model": cell.model, "flags": shlex.join(cell.flags), "run": cell.name,
                     "seeds": len(present), "seeds_expected": len(seeds), **ours,
                     **dict(zip(("paper_mean", "paper_std", "paper_table", "paper_approx"),
                                paper))})
    return rows


def pm(mean, std) -> str:
    """mean ± std; the mean alone where the paper gives no std; — where there is no value."""
    if mean is None:
        return "—"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def paper_text(r: dict) -> str:
    if r["paper_mean"] is None:
        return "—"
    if r["paper_approx"]:
        return f"≈ {r['paper_mean']:g} ({r['paper_table']})"
    return f"{pm(r['paper_mean'], r['paper_std'])} ({r['paper_table']})"


def label(variant: str) -> str:
    return VARIANTS[variant].label


def markdown(rows: list[dict], name: str, grid: str | None) -> str:
    """A line per (task, ratio, variant); a grid of more than two variants (Tables 15 and 16, the
    figures) first gets them side by side, a column per variant, as the paper lays them out."""
    what = "" if grid is None else f", grid `{grid}` (the paper's {GRIDS[grid]})"
    lines = [f"Sweep `{name}`{what}: normalised score.", ""]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if len(variants) > 2:
        by_cell = {}
        for r in rows:
            by_cell.setdefault((r["task"], r["ratio"]), {})[r["variant"]] = r
        lines += ["Side by side, ours / paper:", "",
                  "| task | ratio | " + " | ".join(map(label, variants)) + " |",
                  "| --- | ---: |" + " ---: |" * len(variants)]
        for (task, ratio), line in by_cell.items():
            values = [f"{pm(r['mean'], r['std'])} / {paper_text(r).rsplit(' (', 1)[0]}"
                      if r else "" for r in map(line.get, variants)]
            lines.append(f"| {task} | {ratio:g} | " + " | ".join(values) + " |")
        lines.append("")
    lines += ["| task | ratio | variant | ours | paper | target | seeds | lamo.py flags |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['ratio']:g} | {label(r['variant'])} "
                     f"| {pm(r['mean'], r['std'])} | {paper_text(r)} | {r['target'] or '—'} "
                     f"| {r['seeds']}/{r['seeds_expected']} | {r['flags'] or 'defaults'} |")
    lines += ["", "ours: for the best return target, the mean ± std (population, ddof=0) over the "
              "seeds present of each seed's mean score over its evaluations in the last 20% of "
              "training; the best target is the one with the highest mean over seeds. paper: "
              "Shi et al., ICLR 2024, over 3 seeds. —: no finished seed (or no paper value). "
              "lamo.py flags: what the run adds to the task's defaults (tasks.py)."]
    if any(r["paper_approx"] for r in rows):
        lines += ["", f"≈ read from the paper's figure ({GRIDS[grid]}): means read off its bars "
                  "(± 2-5 points), not printed numbers and never mixed with the tables' exact "
                  "values (e.g. Breakout 10%: ≈185 in Figs. 4 and 5, 136.9 in Table 2)."]
    if any(r["paper_std"] is None and r["paper_mean"] is not None and not r["paper_approx"]
           for r in rows):
        lines += ["", "A paper value without ± has no std: Table 9's DT (copied from IQL's paper) "
                  "and Table 16's w/o pre-training (its std was not transcribed; see the paper)."]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path):
    """Full-precision numbers; empty fields where a value is missing. paper_approx: 1 for a value
    read from the paper's figure."""
    columns = ["task", "ratio", "variant", "model", "flags", "run", "seeds", "seeds_expected",
               "target", "mean", "std", "paper_mean", "paper_std", "paper_table", "paper_approx",
               "target_means"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            means = ";".join(f"{t}:{m!r}" for t, m in r["target_means"].items())
            writer.writerow({**{k: "" if r[k] is None else r[k] for k in columns[:-1]},
                             "paper_approx": int(r["paper_approx"]), "target_means": means})


def plot(rows: list[dict], path: Path, title: str):
    """Laid out like the paper's figures: a panel per (task, ratio), its own y scale, a bar per
    variant (ours: mean ± std over seeds; a cell with no finished seed says so, not 0) and the
    paper's value as a black marker on it, right of centre: filled, with the paper's ± std, for a
    table; hollow for a value read from a figure."""
    import matplotlib                     # imported here: only the table step pays for it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    panels = list(dict.fromkeys((r["task"], r["ratio"]) for r in rows))
    by_line = {(r["task"], r["ratio"], r["variant"]): r for r in rows}
    colors = {v: "0.6" if v == "dt" else plt.get_cmap("tab10")(i) for i, v in enumerate(variants)}
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    # constrained layout: the title above and the legend below get the room they need
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols + 0.6, 2.4 * nrows + 1.0),
                             squeeze=False, layout="constrained")
    for ax, (task, ratio) in zip(axes.flat, panels):
        for i, variant in enumerate(variants):
            r = by_line.get((task, ratio, variant))
            if r is None:
                continue
            if r["mean"] is None:
                ax.text(i, 0, "no run", rotation=90, ha="center", va="bottom", fontsize=8,
                        color="0.4")
            else:
                ax.bar(i, r["mean"], 0.75, yerr=r["std"], capsize=3, color=colors[variant],
                       error_kw={"lw": 1, "ecolor": "0.2"})
                if r["seeds"] < r["seeds_expected"]:
                    ax.annotate(f"{r['seeds']}/{r['seeds_expected']} seeds", (i, 0), ha="center",
                                va="bottom", fontsize=7, color="w")
            if r["paper_mean"] is not None:
                # beside the bar's centre, so its ± std stays apart from ours
                ax.errorbar(i + 0.2, r["paper_mean"], yerr=r["paper_std"], fmt="D", ms=5, color="k",
                            mfc="w" if r["paper_approx"] else "k", capsize=4, lw=1)
        ax.set_title(f"{task.removesuffix('-v2')} {100 * ratio:g}%", fontsize=9)
        ax.set_xticks([])
        ax.set_xlim(-0.6, len(variants) - 0.4)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    approx = any(r["paper_approx"] for r in rows)
    handles = [Patch(color=colors[v], label=f"{label(v)} (ours)") for v in variants]
    handles.append(Line2D([], [], marker="D", ls="", color="k", mfc="w" if approx else "k",
                          label="paper: ≈ read from the paper's figure" if approx
                          else "paper (table value ± std)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3),
               fontsize=8, frameon=False)
    fig.suptitle(f"{title}\nbars: ours, mean ± std over seeds; diamonds: the paper", fontsize=10)
    fig.supylabel("normalised score", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(tables: dict[str | None, list[Entry]], seeds, sweep_dir: Path):
    """Per grid, results_<grid>.md/.csv/.png (a sweep without --grid: results.*), so the grids
    sharing a folder of runs keep their tables apart."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for grid, entries in tables.items():
        stem = "results" if grid is None else f"results_{grid}"
        rows = table_rows(grid, entries, seeds, sweep_dir)
        text = markdown(rows, sweep_dir.name, grid)
        (sweep_dir / f"{stem}.md").write_text(text)
        write_csv(rows, sweep_dir / f"{stem}.csv")
        source = "" if grid is None else f", {grid}: the paper's {GRIDS[grid]}"
        plot(rows, sweep_dir / f"{stem}.png", f"sweep {sweep_dir.name}{source}")
        print(f"\n{text}\nwrote {sweep_dir}/{stem}.md, {stem}.csv, {stem}.png")


# ============================================================================ 5. entry point
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """sweep.py's own flags, and the lamo.py flags after `--`."""
    ours, lamo_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- go to every lamo.py run, e.g. "
                                       "-- --steps 50000 --device cuda.")
    p.add_argument("--grid", help=f"a paper table or figure: {' | '.join(GRIDS)}; "
                                  f"{PAPER_GRID}: all of them, each run once")
    p.add_argument("--env", nargs="+", help="tasks, e.g. hopper-medium-v2 walker2d-medium-v2")
    p.add_argument("--frac", nargs="+", type=float, help="data ratios, e.g. 0.005 0.01 0.1 1")
    p.add_argument("--seed", nargs="+", type=int, default=list(SEEDS), help="default: 0 1 2")
    p.add_argument("--model", nargs="+", metavar="VARIANT",
                   help=f"variants: {' | '.join(VARIANTS)} (default: a grid's, else lamo dt)")
    p.add_argument("--name", help=f"sweeps/<name>/ holds the runs (default: {PAPER_GRID} for "
                                  "every grid, so grids share their runs; else 'sweep')")
    p.add_argument("--jobs", type=int, default=1, help="lamo.py processes at once (default 1)")
    p.add_argument("--pack", type=int, default=1, metavar="R",
                   help="train up to R compatible runs (same task, variant and state; other "
                        "ratios and seeds) as one pack in one process (default 1: one run each)")
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
    if args.pack < 1:
        raise SweepError(f"--pack {args.pack}: must be >= 1 (1: one run per process)")
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
        tables = grid_entries(args.grid, args.env, args.frac, args.model)
        seeds = list(dict.fromkeys(args.seed))
        runs = make_runs(grid_cells(tables), seeds)
        if args.shard:
            runs = shard(runs, *parse_shard(args.shard))
        # Every paper grid defaults to one folder: a run two grids ask for is one folder, trained
        # once.
        sweep_dir = Path("sweeps") / (args.name or (PAPER_GRID if args.grid else "sweep"))
        if args.aggregate:
            write_tables(tables, seeds, sweep_dir)
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
    if args.grid:
        print("  runs per grid (a run two grids share counts in each): " + ", ".join(
            f"{grid} {len(grid_cells({grid: e})) * len(seeds)}" for grid, e in tables.items()))
    todo = make_jobs([run for run, state in states.items() if state != "done"], sweep_dir,
                     args.pack, lamo_flags)
    if args.pack > 1:
        print(f"  {sum(map(len, todo))} runs to do as {len(todo)} jobs (--pack {args.pack})")
    if args.dry_run:
        for run, state in states.items():
            if state == "done":
                print(f"  {state:<8} {run.name}")
        for job in todo:
            run_args = pack_args(job, sweep_dir, lamo_flags, args.wandb, cuda=bool(gpus))
            state = states[job[0]] + (f", pack of {len(job)}" if len(job) > 1 else "")
            print(f"  {state:<8} python lamo.py {shlex.join(run_args)}")
        return 0

    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / "sweep.json").exists():
        (sweep_dir / "sweep.json").write_text(json.dumps({"lamo_flags": lamo_flags}))
    failed, stopped = run_all(todo, sweep_dir, lamo_flags, args.wandb, args.jobs, gpus) \
        if todo else ([], False)
    if stopped:
        print("stopped; run the same command again to resume")
        return 130
    report_failures(failed)
    if args.shard:
        print(f"shard {args.shard} finished; gather the table with the same command, "
              "--aggregate instead of --shard")
    else:
        write_tables(tables, seeds, sweep_dir)
    if failed:
        print(f"\n{len(failed)} of {sum(map(len, todo))} runs failed (logs in "
              f"{sweep_dir / 'logs'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
