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

Grids (grids.py): the paper's tables (table1 Kitchen, table2 Atari, table3 MuJoCo; the appendix's
table8, 9, 10, 11, 15, 16) and ablation figures (fig4, 5, 6, 10), read from paper.py, so they are
the cells and columns the paper reports. A column is a variant (VARIANTS: LaMo, DT, or LaMo with
one setting changed); --env/--frac/--model narrow a grid (each value must select some of it).
Without --grid the grid is every --env x --frac x --model (default: lamo dt) x --seed (default:
0 1 2). The flags after -- go to every new run, in full (lamo.py's names), and none that a cell
sets itself (a variant's --embed linear, Kitchen Complete 30%'s --pretrained gpt2-medium).

Every run is an ordinary lamo.py run folder, sweeps/<name>/<task>_f<ratio>_<model>[+<flag>=<value>
...]_s<seed>, named by the flags it adds to the task's defaults, with its output in
sweeps/<name>/logs/<run>.log. Every grid defaults to one folder, sweeps/paper/, so a run that two
grids ask for (Table 16's LaMo is Table 3's; Fig. 6's λ 0.1 on Kitchen is Table 1's) is one folder,
trained once. Run the same command again to continue: runs with a summary.json are skipped, runs
with a ckpt.pt resume from it (with the flags they started with), runs killed before their first
checkpoint start over. Failed runs are reported at the end with the last lines of their log; the
others go on. The sweep locks each run it starts (sweeps/<name>/locks/), so two sweeps on one
folder never run one run twice: a run another sweep holds is left to it ("busy"; the counts at
the start and --dry-run show it by its folder's state). Exit status: 0 all done; 1 some failed,
were interrupted from outside the sweep (run again: they resume) or were left to another sweep
(run again after it ends); 2 bad input; 130 stopped by Ctrl-C (the running runs checkpoint and
stop; the next invocation resumes them; failures before it are reported).

The table (results.py; printed, and written to results_<grid>.md, .csv and .png in sweeps/<name>/;
results.* without --grid): for each line (task, ratio, variant) and each return target, the mean
over seeds of each seed's last-20% mean (summary.json's `last20`); the line's value is the best
target's mean ± std over the seeds present, with numpy's default population std (ddof=0). The
paper's numbers stand beside ours (a figure's marked ≈, read off its plot; without --grid, a
table's line whose run has this run's model and flags), unless flags after -- change what the
runs train (then "—": other settings than the paper's; results.changes_the_method); a line with no
finished seed is "—", never 0.
"""
from __future__ import annotations

import argparse
import ctypes
import difflib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import lamo
from data import progress
from grids import (GRIDS, PAPER_GRID, SEEDS, VARIANTS, Entry, Run, SweepError, grid_cells,
                   grid_entries, make_runs)
from pack import PER_RUN
from results import write_tables
from tasks import TASKS

LAMO = Path(__file__).resolve().with_name("lamo.py")
SET_BY_SWEEP = {"--env", "--frac", "--seed", "--model", "--out", "--resume", "--eval-only",
                "--wandb", "--wandb-group"}          # lamo.py flags the sweep itself gives
INTERRUPTED = (130, -signal.SIGINT)   # lamo.py's exit after a Ctrl-C checkpoint; an uncaught Ctrl-C
LOG_TAIL = 8                          # log lines shown for a failed run


# ============================================================================ 1. shards
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
    # The cell's flags and the sweep's never name the same flag (check_cell_flags refuses it), so
    # neither overrides the other.
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
    --frac and --seed, and in the same state (new, or checkpointed at the same step). Packs keep
    the runs' seed-major order. R = 1: one run per job."""
    groups: dict[tuple, list[Run]] = {}
    for run in todo:
        alone = pack == 1 or run.cell.task not in TASKS
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


def launch(args: list[str], log_path: Path, env: dict[str, str],
           locks: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start lamo.py with its stdout and stderr appended to log_path, after a header line; it
    inherits the file descriptors `locks` (its runs' locks: lock_run)."""
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
                                preexec_fn=interrupt_if_orphaned if LIBC else None,
                                pass_fds=locks)


def lock_run(sweep_dir: Path, run: Run) -> int | None:
    """Take the run's lock, sweeps/<name>/locks/<run>.lock: -> the file descriptor holding it, or
    None if another sweep holds it. Two sweeps on one folder (two grids sharing sweeps/paper/)
    would otherwise each see the other's loading run as one to restart, delete it and start a
    second process in it. The sweep takes it before it inspects, deletes or starts a run, and
    its lamo.py inherits it (launch): flock belongs to the open file, shared by both, so the lock
    lasts while either lives, through a run's last checkpoint after the sweep was killed. flock
    works on local disks and on NFSv4 (Linux emulates it there with POSIX locks); a filesystem
    without it is a SweepError, not a sweep that runs unlocked."""
    path = sweep_dir / "locks" / f"{run.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        os.close(fd)
        raise SweepError(f"cannot lock {path} ({e.strerror}): the sweep locks each run with "
                         "flock, which this filesystem lacks; put sweeps/ where it has flock (a "
                         "local disk, NFSv4)") from e
    return fd


def lock_job(sweep_dir: Path, job: tuple[Run, ...]) -> dict[Run, int] | None:
    """Every run of the job locked ({run: its lock}), or none of them (None) if another sweep
    holds one."""
    locks = {}
    for run in job:
        fd = lock_run(sweep_dir, run)
        if fd is None:
            for held in locks.values():
                os.close(held)
            return None
        locks[run] = fd
    return locks


def log_tail(log_path: Path, n: int = LOG_TAIL) -> list[str]:
    """The last n lines of the log's latest launch, each progress bar reduced to its last state."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    latest = text.rsplit("\n=== ", 1)[-1]
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in latest.splitlines()[1:]]
    return [line for line in lines if line][-n:]


# ============================================================================ 3. many runs at once
@dataclass
class Ended:
    """How run_all ended: the runs that failed (run, exit status, its log); those interrupted from
    outside while the sweep ran on (someone's kill -INT: they resume next time, but are not done);
    those left to another sweep that held their lock; and whether Ctrl-C stopped the sweep."""
    failed: list[tuple[Run, int, Path]] = field(default_factory=list)
    interrupted: list[Run] = field(default_factory=list)
    busy: list[Run] = field(default_factory=list)
    stopped: bool = False


def run_all(todo: list[tuple[Run, ...]], sweep_dir: Path, lamo_flags: list[str],
            wandb: str | None, jobs: int, gpus: list[str]) -> Ended:
    """Run the jobs of `todo` (a run, or a pack of runs: make_jobs), `jobs` at a time, each with
    its runs' locks (lock_run); a job another sweep holds a run of is left to it."""
    queue, running, end, stop = list(todo), {}, Ended(), []
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
                   for job, _, _, _ in running.values() for run in job)

    def take(job: tuple[Run, ...]) -> tuple[tuple[Run, ...], dict[Run, int]]:
        """The job, locked, as it is now: another sweep may have finished or checkpointed some of
        its runs since make_jobs looked, so the finished ones are done and the rest are grouped
        again by their state, the first group here, the others back to the front of the queue.
        -> ((), {}) if another sweep holds a run of it, or none is left to do."""
        locks = lock_job(sweep_dir, job)
        if locks is None:
            for run in job:
                tqdm.write(f"{'busy':<11} {run.name} (another sweep is running it)")
            end.busy.extend(job)
            return (), {}
        for run in [run for run in job if run_state(sweep_dir / run.name) == "done"]:
            tqdm.write(f"{'done':<11} {run.name} (by another sweep)")
            bar.update(1)
            os.close(locks.pop(run))
        if not locks:
            return (), {}
        first, *rest = make_jobs(list(locks), sweep_dir, len(locks), lamo_flags)
        for run in [run for part in rest for run in part]:
            os.close(locks.pop(run))
        queue[:0] = rest
        return first, locks

    try:
        while running or (queue and not stop):
            while queue and free_slots and not stop and not loading():
                job, locks = take(queue.pop(0))
                if not job:
                    continue
                slot = free_slots.pop(0)
                for run in job:
                    if run_state(sweep_dir / run.name) == "restart":
                        shutil.rmtree(sweep_dir / run.name)     # lamo.py refuses a non-empty --out
                args = pack_args(job, sweep_dir, lamo_flags, wandb, cuda=bool(gpus))
                proc = launch(args, sweep_dir / "logs" / f"{job_name(job)}.log",
                              child_env(slot, jobs, gpus), tuple(locks.values()))
                running[proc] = (job, slot, time.time(), locks)
                if stop:                        # a signal that came while it was starting
                    proc.send_signal(signal.SIGINT)
            for proc in [p for p in running if p.poll() is not None]:
                job, slot, t0, locks = running.pop(proc)
                for fd in locks.values():       # lamo.py has ended: its runs are free again
                    os.close(fd)
                free_slots.append(slot)
                for run in job:
                    outcome = outcome_of(run, proc.returncode, sweep_dir, stopped=bool(stop))
                    tqdm.write(f"{outcome:<11} {run.name} ({time.time() - t0:.0f} s)")
                    if outcome == "FAILED":
                        log = sweep_dir / "logs" / f"{job_name(job)}.log"
                        end.failed.append((run, proc.returncode, log))
                    if outcome == "INTERRUPTED":
                        end.interrupted.append(run)
                    if outcome in ("done", "FAILED"):
                        bar.update(1)
            bar.set_postfix_str(f"running {len(running)}, left {len(queue)}, "
                                f"failed {len(end.failed)}", refresh=False)
            bar.update(0)       # redraws if 5 s have passed, so the elapsed time moves
            time.sleep(0.2)
    finally:
        for proc in running:        # only after an exception in the loop: stop the runs cleanly
            proc.send_signal(signal.SIGINT)
        for proc, (_, _, _, locks) in running.items():
            proc.wait()
            for fd in locks.values():
                os.close(fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        bar.close()
    end.stopped = bool(stop)
    return end


def outcome_of(run: Run, returncode: int, sweep_dir: Path, stopped: bool) -> str:
    """done | interrupted (the sweep stopped it; it resumes or restarts next time) | INTERRUPTED
    (it exited as after a Ctrl-C while the sweep was not stopped: someone else interrupted it;
    it resumes next time, but is reported: the sweep is not done) | FAILED. A run of a pack that
    finished while a pack-mate failed is done."""
    if (sweep_dir / run.name / "summary.json").exists() and (returncode == 0 or not stopped):
        return "done"
    if returncode != 0 and stopped:
        return "interrupted"
    if returncode in INTERRUPTED:
        return "INTERRUPTED"
    return "FAILED"


def report_failures(failed: list[tuple[Run, int, Path]]):
    for run, returncode, log_path in failed:
        print(f"\nFAILED {run.name} (exit status {returncode}); the end of {log_path}:")
        for line in log_tail(log_path):
            print(f"    {line}")


# ============================================================================ 4. entry point
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
    p.add_argument("--gpus", default="",
                   help="e.g. 0,1: worker i gets GPU i mod count, among those "
                        "CUDA_VISIBLE_DEVICES shows; runs get --device cuda")
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
    # Every flag in full: lamo.py's argparse would take --se for --seed, past the checks below.
    known = lamo.flag_names()
    for token in lamo_flags:
        flag = token.split("=")[0]
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=3)
            hint = (f"did you mean {' or '.join(close)}?" if close
                    else "python lamo.py --help lists them")
            raise SweepError(f"{flag} after --: not a lamo.py flag (give flags in full); {hint}")
    taken = [f for f in lamo_flags if f.split("=")[0] in SET_BY_SWEEP]
    if taken:
        raise SweepError(f"{taken[0]} after --: the sweep sets it per run; use sweep.py's own "
                         f"--env/--frac/--seed/--model/--name/--wandb")
    per_run = {"--" + k.replace("_", "-") for k in PER_RUN}
    for flag, value, more in zip(lamo_flags, lamo_flags[1:], lamo_flags[2:]):
        if flag in per_run and not more.startswith("--"):   # several values: a pack of its own
            raise SweepError(f"{flag} {value} {more} after --: one value, for every run; the "
                             f"grid says which runs there are")
    return visible_gpus([g.strip() for g in gpus])


def check_cell_flags(tables: dict[str | None, list[Entry]], lamo_flags: list[str]):
    """A flag after -- that a cell sets itself would override it (argparse keeps the last), and
    its column would be another's run under its name (Fig. 4's linear embeddings given --embed
    mlp): refused, naming the first cell that sets it."""
    given = {f.split("=")[0] for f in lamo_flags if f.startswith("--")}
    for entries in tables.values():
        for entry in entries:
            for flag in entry.cell.flags[::2]:
                if flag in given:
                    raise SweepError(
                        f"{flag} after --: the run {entry.cell.name} (--model {entry.variant}) "
                        f"sets {flag} itself, and the flags after -- would override it; leave "
                        f"{flag} out, narrow --model to variants that do not set it, or choose "
                        "it by --model (a variant of grids.VARIANTS) under a new --name")


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
        check_cell_flags(tables, lamo_flags)
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
    try:
        end = run_all(todo, sweep_dir, lamo_flags, args.wandb, args.jobs, gpus) if todo \
            else Ended()
    except SweepError as e:         # a run's lock could not be taken (lock_run)
        print(f"error: {e}", file=sys.stderr)
        return 2
    report_failures(end.failed)
    if end.stopped:
        print("stopped; run the same command again to resume")
        return 130
    if args.shard:
        print(f"shard {args.shard} finished; gather the table with the same command, "
              "--aggregate instead of --shard")
    else:
        write_tables(tables, seeds, sweep_dir)
    if end.failed:
        print(f"\n{len(end.failed)} of {sum(map(len, todo))} runs failed (logs in "
              f"{sweep_dir / 'logs'})")
    if end.interrupted:
        print(f"\n{len(end.interrupted)} runs were interrupted from outside the sweep; run the "
              "same command again to resume them")
    if end.busy:
        print(f"\n{len(end.busy)} runs were left to another sweep that is running them; run the "
              "same command again after it ends")
    return 1 if end.failed or end.interrupted or end.busy else 0


if __name__ == "__main__":
    sys.exit(main())
