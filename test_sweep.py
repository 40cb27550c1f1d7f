"""sweep.py's tests: offline, CPU. A tiny grid (DT preset shrunk to 1 layer, d=32, on a collected
Hopper dataset; 2 ratios x 2 seeds, 100 steps) is run, run again, interrupted and resumed, and made
to fail; the grids, shards, commands and the table's rule are checked without running anything,
and the sweep's handling of runs stopped, interrupted from outside or held by another sweep with a
stand-in for lamo.py that ends in a blink."""
import csv
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import grids
import lamo
import results
import sweep
from data import collect
from tasks import PAPER_TABLES

REPO = Path(__file__).resolve().parent
GRID = ["--env", "hopper-medium-v2", "--frac", "0.5", "1", "--seed", "0", "1", "--model", "dt"]


def tiny(data: Path) -> list[str]:
    """lamo.py flags for a run of a few seconds: checkpoints every 20 steps, 2 return targets."""
    return ["--", "--n-layer", "1", "--n-embd", "32", "--data", str(data), "--steps", "100",
            "--eval-every", "20", "--log-every", "20", "--eval-episodes", "1",
            "--targets", "100,50", "--batch-size", "16", "--lr", "1e-3", "--warmup", "10"]


def offline_env(cwd: Path) -> dict:
    """Nothing is downloaded (LAMO_CACHE, in case); the sweep splits this process's cores, as the
    tests expect, even inside a Slurm job (whose SLURM_CPUS_PER_TASK it would take instead)."""
    env = {**os.environ, "LAMO_CACHE": str(cwd / "cache")}
    env.pop("SLURM_CPUS_PER_TASK", None)
    return env


def sweep_py(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "sweep.py"), *args], cwd=cwd,
                          env=offline_env(cwd), capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def launch_time(log: Path) -> float:
    """When the sweep started this run, from its log's header line (to the second)."""
    stamp = " ".join(log.read_text().splitlines()[1].split()[1:3])
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


def files(folder: Path) -> dict:
    """Every file under folder with its size and mtime: what a launched run would change."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working folder (the sweeps' cwd) holding a 10-episode Hopper dataset."""
    work = tmp_path_factory.mktemp("sweep")
    collect("Hopper-v4", "noisy", episodes=10, out=work / "tiny.hdf5", max_steps=60)
    return work


@pytest.fixture(scope="module")
def sweep_a(work):
    """The tiny grid, run once without interruption, two runs at a time (threads split)."""
    return sweep_py(*GRID, "--name", "A", "--jobs", "2", *tiny(work / "tiny.hdf5"), cwd=work)


# ----------------------------------------------------------------------------- running sweeps
def test_sweep_runs_and_writes_the_table(work, sweep_a):
    assert sweep_a.returncode == 0, sweep_a.stdout + sweep_a.stderr
    a = work / "sweeps" / "A"
    runs = sorted(p.parent.name for p in a.glob("*/summary.json"))
    assert runs == [f"hopper-medium-v2_f{f}_dt_s{s}" for f in ("0.5", "1") for s in (0, 1)]
    rows = read_csv(a / "results.csv")
    assert [(r["ratio"], r["model"], r["seeds"]) for r in rows] == [("0.5", "dt", "2"),
                                                                    ("1.0", "dt", "2")]
    for r in rows:    # the cell's mean is the best target's mean over the seeds' last-20% means
        frac = "0.5" if r["ratio"] == "0.5" else "1"
        summaries = [json.loads((a / f"hopper-medium-v2_f{frac}_dt_s{s}/summary.json").read_text())
                     for s in (0, 1)]
        means = {t: np.mean([s["targets"][t]["last20"] for s in summaries]) for t in ("100", "50")}
        assert float(r["mean"]) == max(means.values()) and r["target"] == max(means, key=means.get)
    md = (a / "results.md").read_text()
    # trained with other settings than the paper's (the flags after --): no paper value beside
    flags = " ".join(tiny(work / "tiny.hdf5")[1:])
    assert f"| hopper-medium-v2 | 1 | DT | {float(rows[1]['mean']):.1f} ± " in md
    assert f"| — | {rows[1]['target']} | 2/2 | {flags} |" in md
    assert "60.9" not in md and "trained with other settings than the paper's" in md
    assert (a / "results.png").stat().st_size > 0
    # --jobs 2: each run got half of this machine's cores, as its log's header line records
    cores = len(os.sched_getaffinity(0))
    header = (a / "logs" / "hopper-medium-v2_f1_dt_s0.log").read_text().splitlines()[1]
    assert f"OMP_NUM_THREADS={max(1, cores // 2)} " in header and "--out sweeps/A/" in header
    # one run at a time in its loading phase: each started after the one before it had loaded
    # (lamo.py makes the run folder, config.json first, once its data is loaded)
    starts = sorted((launch_time(a / "logs" / f"{run}.log"), run) for run in runs)
    for (_, before), (start, _) in zip(starts, starts[1:]):
        assert start >= int((a / before / "config.json").stat().st_mtime)


def test_second_invocation_runs_nothing(work, sweep_a, monkeypatch, capsys):
    a = work / "sweeps" / "A"
    before = {p: v for p, v in files(a).items() if not p.name.startswith("results.")}
    again = sweep_py(*GRID, "--name", "A", "--jobs", "2", *tiny(work / "tiny.hdf5"), cwd=work)
    assert again.returncode == 0, again.stderr
    assert "4 runs: 4 done, 0 resume, 0 restart, 0 new" in again.stdout
    # Every launch appends a header line to the run's log and a run rewrites its folder:
    # nothing changed, so no lamo.py was started.
    assert {p: v for p, v in files(a).items() if not p.name.startswith("results.")} == before
    # other lamo.py flags for the same sweep are refused before anything runs
    monkeypatch.chdir(work)
    after = files(a)
    assert sweep.main([*GRID, "--name", "A", "--", "--steps", "7"]) == 2
    assert capsys.readouterr().err.startswith("error: sweep sweeps/A was started with")
    assert files(a) == after


def test_interrupted_sweep_resumes_to_the_same_table(work, sweep_a):
    """Ctrl-C once two runs are done and another has a checkpoint; the next invocation skips the
    two, resumes the third, and ends with the table of the uninterrupted sweep A, to the last digit
    (lamo.py's resume is bit for bit on CPU)."""
    b = work / "sweeps" / "B"
    args = [sys.executable, str(REPO / "sweep.py"), *GRID, "--name", "B", "--jobs", "2",
            *tiny(work / "tiny.hdf5")]
    proc = subprocess.Popen(args, cwd=work, env=offline_env(work), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    def midway():
        done = len(list(b.glob("*/summary.json")))
        return done >= 2 and len(list(b.glob("*/ckpt.pt"))) > done

    deadline = time.time() + 120
    while not midway() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    stopped = [p.parent for p in b.glob("*/ckpt.pt") if not (p.parent / "summary.json").exists()]
    assert stopped, "no run was stopped between its first checkpoint and its end"
    assert len(list(b.glob("*/summary.json"))) in (2, 3)
    again = sweep_py(*GRID, "--name", "B", "--jobs", "2", *tiny(work / "tiny.hdf5"), cwd=work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f" {len(stopped)} resume," in again.stdout
    for run in stopped:
        assert "resuming" in (b / "logs" / f"{run.name}.log").read_text()
    assert (b / "results.csv").read_text() == (work / "sweeps" / "A" / "results.csv").read_text()


def test_failing_run_is_reported_and_the_rest_finish(work):
    """Ratio 0 is refused by lamo.py: that run fails, the ratio-0.5 run beside it still finishes."""
    c = sweep_py("--env", "hopper-medium-v2", "--frac", "0.5", "0", "--seed", "0", "--model", "dt",
                 "--name", "C", "--jobs", "2", *tiny(work / "tiny.hdf5"), cwd=work)
    assert c.returncode == 1, c.stdout + c.stderr
    report = c.stdout.split("FAILED hopper-medium-v2_f0_dt_s0 (exit status 1)", 1)[1]
    assert "error:" in report and "--frac" in report             # the end of its log
    assert (work / "sweeps" / "C" / "hopper-medium-v2_f0.5_dt_s0" / "summary.json").exists()
    assert "| hopper-medium-v2 | 0 | DT | — | — | — | 0/1 |" in c.stdout   # missing, not 0
    assert "1 of 2 runs failed" in c.stdout


# ----------------------------------------------------------------------------- nothing run
def test_table3_dry_run_lists_the_72_runs(tmp_path, monkeypatch, capsys):
    out = sweep_py("--grid", "table3", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    commands = [line.split() for line in out.stdout.splitlines() if "python lamo.py" in line]
    cells = {(c[c.index("--env") + 1], float(c[c.index("--frac") + 1]), c[c.index("--model") + 1],
              int(c[c.index("--seed") + 1])) for c in commands}
    assert len(commands) == len(cells) == 72 == 3 * 4 * 2 * 3
    assert cells == {(task, frac, model, seed) for task, frac in PAPER_TABLES["Table 3"]
                     for model in ("lamo", "dt") for seed in (0, 1, 2)}
    assert {c[1] for c in cells} == {0.005, 0.01, 0.1, 1.0}
    assert not (tmp_path / "sweeps").exists()                  # a dry run writes nothing
    # Kitchen: GPT-2 medium for the paper's LaMo cells Complete 30% and Partial 100% only
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--grid", "table1", "--dry-run"]) == 0
    table1 = [line for line in capsys.readouterr().out.splitlines() if "python lamo.py" in line]
    kitchen = [line for line in table1 if "--env kitchen-" in line]
    medium = [line for line in kitchen if "--pretrained gpt2-medium" in line]
    assert len(kitchen) == 36 and len(medium) == 6
    reacher = [ln for ln in table1 if "--env reacher2d-" in ln]
    assert len(table1) == 36 + 18 == len(kitchen) + len(reacher)
    assert all("--model lamo" in line and ("complete-v2 --frac 0.3 " in line or
                                           "partial-v2 --frac 1.0 " in line) for line in medium)


def test_shards_cover_the_grid_exactly_once():
    runs = grids.make_runs(grids.grid_cells(grids.grid_entries("table3", None, None, None)),
                           grids.SEEDS)
    shuffled = random.Random(0).sample(runs, len(runs))
    for count in range(1, 8):
        shards = [sweep.shard(runs, i, count) for i in range(count)]
        names = [run.name for s in shards for run in s]
        assert sorted(names) == sorted(run.name for run in runs)      # every run, none twice
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [set(s) for s in shards] == [set(sweep.shard(shuffled, i, count))
                                            for i in range(count)]    # fixed, whatever the order
    assert sweep.parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "-1/8", "1", "a/b", "1/0", "1/2/3"):
        with pytest.raises(sweep.SweepError):
            sweep.parse_shard(bad)


def test_commands_and_worker_environments(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)     # else the cores are Slurm's
    cell = grids.Cell("hopper-medium-v2", 0.1, "lamo", ("--pretrained", "gpt2-medium"))
    run, run_dir = grids.Run(cell, 2), tmp_path / "r"
    args = sweep.lamo_args(run, run_dir, ["--steps", "10"], "proj")
    assert args == ["--env", "hopper-medium-v2", "--frac", "0.1", "--seed", "2", "--model", "lamo",
                    "--out", str(run_dir), "--pretrained", "gpt2-medium", "--steps", "10",
                    "--wandb", "proj", "--wandb-group",
                    "hopper-medium-v2_f0.1_lamo+pretrained=gpt2-medium"]
    run_dir.mkdir()
    assert sweep.run_state(run_dir) == "restart"
    (run_dir / "ckpt.pt").write_bytes(b"")
    assert sweep.run_state(run_dir) == "resume"
    assert sweep.lamo_args(run, run_dir, ["--steps", "10"], "proj") == ["--resume", str(run_dir)]
    assert sweep.lamo_args(run, run_dir, [], None, cuda=True) == [
        "--resume", str(run_dir), "--device", "cuda"]
    (run_dir / "summary.json").write_text("{}")
    assert sweep.run_state(run_dir) == "done"
    # 3 workers on 2 GPUs: round-robin
    envs = [sweep.child_env(slot, 3, ["0", "1"]) for slot in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert "CUDA_VISIBLE_DEVICES" not in sweep.child_env(0, 1, [])
    cores = len(os.sched_getaffinity(0))
    # a value given twice is one run, not two processes writing one folder
    cells = grids.grid_cells(grids.grid_entries(None, ["hopper-medium-v2"], [0.1, 0.1],
                                                ["dt", "dt"]))
    assert [r.name for r in grids.make_runs(cells, [0, 0, 1])] == [
        "hopper-medium-v2_f0.1_dt_s0", "hopper-medium-v2_f0.1_dt_s1"]
    assert sweep.child_env(0, 1, [])["MKL_NUM_THREADS"] == str(cores)


def test_threads_split_by_hand(monkeypatch):
    """On 8 cores: --jobs 1, 2, 3, 8, 16 give each run 8, 4, 2, 1, 1 threads (whole cores, at
    least 1)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)     # else the cores are Slurm's
    for jobs, threads in {1: "8", 2: "4", 3: "2", 8: "1", 16: "1"}.items():
        env = sweep.child_env(jobs - 1, jobs, [])
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == threads, jobs


def test_runs_are_seed_major_and_ties_go_to_the_higher_target():
    cells = grids.grid_cells(grids.grid_entries(None, ["hopper-medium-v2"], [0.1, 1.0], ["dt"]))
    assert [r.name for r in grids.make_runs(cells, [0, 1])] == [
        "hopper-medium-v2_f0.1_dt_s0", "hopper-medium-v2_f1_dt_s0",
        "hopper-medium-v2_f0.1_dt_s1", "hopper-medium-v2_f1_dt_s1"]
    # a tie between targets goes to the higher one, by value (120 > 90, though "90" > "120" as text)
    tie = results.cell_result([summary(t90=50, t120=50), summary(t90=40, t120=40)])
    assert (tie["target"], tie["mean"], tie["std"]) == ("120", 45, 5)
    assert results.cell_result([summary(t90=51, t120=50)])["target"] == "90"
    # only the targets every seed was evaluated at
    assert results.cell_result([summary(t90=5, t120=50), summary(t90=7)])["target_means"] == \
        {"90": 6}


def summary(**last20) -> dict:
    """A made-up summary.json: {target: last-20% mean}; its final and best scores differ from it,
    so a table of either is not the paper's rule."""
    targets = {t.lstrip("t"): {"final": v - 3, "best": v + 7, "last20": v, "n_last20": 8}
               for t, v in last20.items()}
    best = max(targets, key=lambda t: targets[t]["last20"])
    return {"step": 100_000, "targets": targets, "headline": targets[best]["last20"],
            "headline_target": best}


def test_table_rule_against_numbers_by_hand(tmp_path, monkeypatch, capsys):
    made_up = {   # (ratio, model, seed) -> summary; (1, dt) has no seed at all
        (0.1, "dt", 0): summary(t3600=50, t1800=55), (0.1, "dt", 1): summary(t3600=60, t1800=65),
        (0.1, "dt", 2): summary(t3600=70, t1800=40),
        (0.1, "lamo", 0): summary(t3600=80, t1800=90),
        (0.1, "lamo", 1): summary(t3600=70, t1800=90),
        (1, "lamo", 2): summary(t3600=33.3, t1800=11.1)}
    for (frac, model, seed), s in made_up.items():
        run_dir = tmp_path / "sweeps" / "H" / f"hopper-medium-v2_f{frac:g}_{model}_s{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(s))
    monkeypatch.chdir(tmp_path)
    argv = ["--env", "hopper-medium-v2", "--frac", "0.1", "1", "--name", "H", "--aggregate"]
    assert sweep.main(argv) == 0
    rows = {(float(r["ratio"]), r["model"]): r for r in read_csv(tmp_path / "sweeps/H/results.csv")}
    # DT 10%: target 3600 has mean 60 over seeds (1800: 53.3), though two of the three seeds did
    # better at 1800 (the mean of the seeds' own best would be 63.3); std = sqrt(200 / 3).
    dt = rows[0.1, "dt"]
    assert (dt["target"], dt["seeds"], dt["seeds_expected"]) == ("3600", "3", "3")
    assert float(dt["mean"]) == pytest.approx(60) and float(dt["std"]) == pytest.approx(8.164966)
    assert (dt["paper_mean"], dt["paper_std"], dt["paper_table"]) == ("57.3", "3.8", "Table 3")
    assert {t: float(m) for t, m in (x.split(":") for x in dt["target_means"].split(";"))} == \
        {"3600": 60, "1800": np.mean([55, 65, 40])}               # every target's, in full

    def cell(r):
        return r["target"], r["seeds"], r["mean"] and float(r["mean"]), r["std"] and float(r["std"])
    assert cell(rows[0.1, "lamo"]) == ("1800", "2", 90, 0)    # two seeds present
    assert cell(rows[1.0, "lamo"]) == ("3600", "1", 33.3, 0)  # one seed present
    assert cell(rows[1.0, "dt"]) == ("", "0", "", "")         # none: empty, not 0
    md = (tmp_path / "sweeps/H/results.md").read_text()
    assert "| hopper-medium-v2 | 0.1 | DT | 60.0 ± 8.2 | 57.3 ± 3.8 (Table 3) | 3600 | 3/3 |" \
        in md
    assert "| hopper-medium-v2 | 1 | DT | — | 60.9 ± 3.3 (Table 3) | — | 0/3 |" in md
    assert (tmp_path / "sweeps/H/results.png").stat().st_size > 0
    assert md in capsys.readouterr().out                       # printed as well as written


@pytest.mark.parametrize("argv, message", [
    (["--grid", "table99"], "--grid 'table99'"),
    (["--grid", "fig5", "--model", "lamo-lineer"], "--model 'lamo-lineer'"),
    (["--grid", "table3", "--model", "lamo-full"], "no cell of --grid table3"),
    (["--env", "nosuch-v2", "--frac", "1", "--model", "lamo-full"], "--env 'nosuch-v2'"),
    (["--grid", "table3", "--shard", "4/4"], "--shard '4/4'"),
    (["--grid", "table3", "--shard", "x"], "--shard 'x'"),
    (["--grid", "table3", "--jobs", "0"], "--jobs 0"),
    (["--grid", "table3", "--gpus", "0,,1"], "--gpus '0,,1'"),
    (["--grid", "table3", "--name", "a/b"], "--name 'a/b'"),
    (["--env", "hopper-medium-v2"], "give --grid"),
    (["--grid", "table3", "--frac", "0.3"], "no cell of --grid table3"),
    (["--env", "hopper-medium-v2", "--frac", "1", "--", "--seed", "5"], "--seed after --"),
    (["--grid", "table3", "--", "--lr", "1e-4", "3e-4", "--steps", "9"],
     "--lr 1e-4 3e-4 after --: one value"),
    # a flag after -- that a cell sets itself: Fig. 4's linear embeddings would be LaMo's MLP
    (["--grid", "fig4", "--env", "walker2d-medium-v2", "--seed", "0", "--dry-run", "--",
      "--embed", "mlp"], "--embed after --: the run walker2d-medium-v2_f"),
    (["--grid", "fig4", "--model", "lamo-linear", "--", "--embed=mlp"], "--embed after --: "),
    (["--grid", "table1", "--env", "kitchen-complete-v2", "--", "--pretrained", "gpt2"],
     "--pretrained after --: the run kitchen-complete-v2_f0.3_lamo+pretrained=gpt2-medium "
     "(--model lamo) sets --pretrained itself"),
    # lamo.py flags in full only: its argparse would take these for --seed, --device, --model
    (["--env", "hopper-medium-v2", "--frac", "1", "--", "--se", "5"],
     "--se after --: not a lamo.py flag (give flags in full); did you mean --seed"),
    (["--grid", "table3", "--", "--dev", "cpu"], "--dev after --: not a lamo.py flag"),
    (["--grid", "table3", "--", "--steps", "9", "--mod=lamo"], "--mod after --: not a lamo.py"),
    (["--grid", "table3", "--", "--stepz", "9"], "--stepz after --: not a lamo.py flag (give "
     "flags in full); did you mean --steps"),
    # every value given selects something of the grid: none is dropped quietly
    (["--grid", "table3", "--env", "hopper-medium-v2", "hoper-medium-v2", "--frac", "0.1", "0.3",
      "--model", "lamo", "lamo-full"], "no cell of --grid table3 has --env hoper-medium-v2 (did "
     "you mean hopper-medium-v2"),
    (["--grid", "table3", "--frac", "0.1", "0.3"], "no cell of --grid table3 has --frac 0.3 (its "
     "ratios: 0.005, 0.01, 0.1, 1)"),
    (["--grid", "table3", "--model", "lamo", "lamo-full"], "no cell of --grid table3 has --model "
     "lamo-full (its variants: lamo, dt)"),
    (["--grid", "paper", "--env", "hopper-medium-v2", "--frac", "0.1", "0.02"],
     "no cell of --grid paper has --frac 0.02"),
])
def test_bad_input_is_a_one_line_error(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "run_all", lambda *a: pytest.fail("the sweep started its runs"))
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "sweeps").exists()


def test_flags_after_dashes_are_lamo_flags_that_no_cell_sets(tmp_path, monkeypatch, capsys):
    """lamo.flag_names is what lamo.py's parser defines (its --help lists each option at
    the start of a line), so a flag in full passes and an abbreviation does not; flags the cells
    leave alone go to every run."""
    with pytest.raises(SystemExit):
        lamo.parse_args(["--help"])
    options = re.findall(r"^  (--[\w-]+)(?:, (--[\w-]+))?", capsys.readouterr().out, re.M)
    assert lamo.flag_names() == {flag for pair in options for flag in pair if flag}
    assert {"--no-compile", "--eval-only", "--seed", "--device"} <= lamo.flag_names()
    monkeypatch.chdir(tmp_path)
    argv = ["--grid", "fig4", "--env", "walker2d-medium-v2", "--frac", "0.01", "--seed", "0",
            "--dry-run", "--", "--steps=9", "--no-compile"]
    assert sweep.main(argv) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if "python lamo.py" in line]
    assert len(commands) == 3 and all(c.endswith(" --steps=9 --no-compile") for c in commands)
    assert sum("--embed linear --steps=9" in c for c in commands) == 1


def test_a_grids_values_must_each_select_a_cell():
    entries = grids.grid_entries("table3", ["hopper-medium-v2"], [0.1, 1], ["dt"])["table3"]
    assert [(e.cell.task, e.cell.frac, e.variant) for e in entries] == [
        ("hopper-medium-v2", 1.0, "dt"), ("hopper-medium-v2", 0.1, "dt")]
    # each value is the grid's, but no cell has both: Kitchen Complete has no 1% ratio
    with pytest.raises(grids.SweepError, match=r"^no cell of --grid table1 has --env kitchen-"
                       r"complete-v2 \(not with the other .*; nor --frac 0.01 \(not with"):
        grids.grid_entries("table1", ["kitchen-complete-v2"], [0.01], None)


def test_without_a_grid_the_paper_value_is_that_of_the_same_run(tmp_path):
    """A cell without --grid is compared with the paper's table line whose run has its model and
    flags: GPT-2 medium on Kitchen Complete 30% is Table 1's LaMo, GPT-2 small (lamo.py's
    default) there is no line of the paper, and a figure's ≈ values are never taken."""
    lines = {"lamo-gpt2-medium": (45.9, 2.9, "Table 1"), "lamo": (None, None, None),
             "dt": (31.5, 4.5, "Table 1"), "lamo-nopt": (42.4, 4.7, "Table 15")}
    entries = grids.grid_entries(None, ["kitchen-complete-v2"], [0.3], list(lines))[None]
    rows = results.table_rows(None, entries, [0], tmp_path)
    assert {r["variant"]: (r["paper_mean"], r["paper_std"], r["paper_table"]) for r in rows} \
        == lines
    entries = grids.grid_entries(None, ["hopper-medium-v2"], [0.01], ["lamo", "lamo-full"])[None]
    rows = results.table_rows(None, entries, [0], tmp_path)
    assert [(r["paper_mean"], r["paper_table"]) for r in rows] == [(52.0, "Table 3"),
                                                                   (None, None)]   # Fig. 5: ≈ 45


def test_flags_after_dashes_take_the_paper_value_away(tmp_path, monkeypatch, capsys):
    """Runs given flags after -- (sweep.json) that change what they train were trained with other
    settings than the paper's: their flags column says which, and the paper's column is —, with a
    note. Flags of budget, device or evaluation (--steps, --compile), or a setting given its
    own value, keep the paper's value (the rule of a run's summary.json)."""
    made_up_runs(tmp_path / "sweeps" / "paper", "table3", skip=["_f1_"])
    monkeypatch.chdir(tmp_path)
    saved = tmp_path / "sweeps/paper/sweep.json"
    saved.write_text(json.dumps({"lamo_flags": ["--steps", "9", "--lora-rank", "4"]}))
    assert sweep.main(["--grid", "table3", "--env", "hopper-medium-v2", "--aggregate"]) == 0
    md = capsys.readouterr().out
    flags = "--steps 9 --lora-rank 4"
    assert "| hopper-medium-v2 | 0.1 | DT | " in md and f" | — | 1 | 3/3 | {flags} |" in md
    assert f"| hopper-medium-v2 | 1 | LaMo | — | — | — | 0/3 | {flags} |" in md
    assert "(Table 3)" not in md and "trained with other settings than the paper's" in md
    rows = read_csv(tmp_path / "sweeps/paper/results_table3.csv")
    assert {(r["flags"], r["paper_mean"], r["paper_table"]) for r in rows} == {(flags, "", "")}
    # budget and device, or a value that is the cell's own (λ 0 is MuJoCo's default): the
    # paper's run still
    for kept in (["--steps", "9", "--compile"], ["--lm-coef", "0"]):
        saved.write_text(json.dumps({"lamo_flags": kept}))
        assert sweep.main(["--grid", "table3", "--env", "hopper-medium-v2", "--aggregate"]) == 0
        md = capsys.readouterr().out
        assert "57.3 ± 3.8 (Table 3)" in md and "other settings" not in md


# ----------------------------------------------------------------------------- runs, faked
def fake_lamo(tmp_path: Path, monkeypatch, body: str):
    """The sweep starts this script instead of lamo.py: `body`, with `seed` and `out` (a Path)
    read from a new run's arguments and os, sys, signal, time, fcntl and Path imported. It runs
    in a blink, so the sweep's own handling of its runs is tested without training."""
    script = tmp_path / "fake_lamo.py"
    script.write_text("import fcntl, os, signal, sys, time\nfrom pathlib import Path\n"
                      "argv = sys.argv[1:]\nseed = int(argv[argv.index('--seed') + 1])\n"
                      "out = Path(argv[argv.index('--out') + 1])\n" + textwrap.dedent(body))
    monkeypatch.setattr(sweep, "LAMO", script)
    monkeypatch.chdir(tmp_path)


FAKE = ["--env", "hopper-medium-v2", "--frac", "0.1", "--model", "dt", "--shard", "0/1"]


def test_a_run_interrupted_from_outside_is_not_done(tmp_path, monkeypatch, capsys):
    """Someone's kill -INT to one run (it checkpoints and exits 130) while the sweep runs on: the
    run resumes next time, but the sweep is not complete, and says so."""
    fake_lamo(tmp_path, monkeypatch, "sys.exit(130 if seed == 1 else 0)")
    assert sweep.main([*FAKE, "--seed", "0", "1", "--name", "I"]) == 1
    out = capsys.readouterr().out
    assert "INTERRUPTED hopper-medium-v2_f0.1_dt_s1 (" in out
    assert out.endswith("\n1 runs were interrupted from outside the sweep; run the same command "
                        "again to resume them\n")
    run = grids.Run(grids.Cell("hopper-medium-v2", 0.1, "dt"), 0)
    for code in (130, -signal.SIGINT):      # lamo.py's exit after a Ctrl-C; an uncaught one
        assert sweep.outcome_of(run, code, tmp_path, stopped=True) == "interrupted"
        assert sweep.outcome_of(run, code, tmp_path, stopped=False) == "INTERRUPTED"
    assert sweep.outcome_of(run, 0, tmp_path, stopped=False) == "FAILED"     # exit 0, no summary
    (tmp_path / run.name).mkdir()
    (tmp_path / run.name / "summary.json").write_text("{}")
    assert sweep.outcome_of(run, 1, tmp_path, stopped=False) == "done"   # a pack-mate failed


def test_a_stopped_sweep_reports_the_failures_before_it(tmp_path, monkeypatch, capsys):
    """Seed 0 fails; seed 1 Ctrl-Cs the sweep (its parent, this process) and exits 130 when the
    sweep passes it on: exit status 130, after seed 0's failure and the end of its log."""
    fake_lamo(tmp_path, monkeypatch, """\
        if seed == 0:
            sys.exit("error: --steps 0: must be >= 1")
        signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(30)
        """)
    assert sweep.main([*FAKE, "--seed", "0", "1", "--name", "S"]) == 130
    out = capsys.readouterr().out
    report = out.split("FAILED hopper-medium-v2_f0.1_dt_s0 (exit status 1); the end of ", 1)[1]
    assert report.index("error: --steps 0: must be >= 1") < report.index("stopped; run the same")
    assert "interrupted hopper-medium-v2_f0.1_dt_s1" in out


def test_a_run_another_sweep_holds_is_left_to_it(tmp_path, monkeypatch, capsys):
    """Seed 0 is loading in another sweep (a folder, no checkpoint yet; it holds the lock): this
    sweep leaves it alone, runs seed 1 holding its lock, and exits 1 saying what it left. Once the
    other sweep is gone, seed 0 starts over; a run the other sweep finished meanwhile is done."""
    fake_lamo(tmp_path, monkeypatch, """\
        fd = os.open(out.parent / "locks" / f"{out.name}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (out.parent / f"{out.name}.held").write_text("")     # locked while it runs
        fds = "/proc/self/fd"                       # Linux's; elsewhere the check is skipped
        if not os.path.isdir(fds) or any(
                os.path.realpath(f"{fds}/{f}") == os.path.realpath(out.parent / "locks" /
                                                                   f"{out.name}.lock")
                for f in os.listdir(fds) if int(f) != fd):
            (out.parent / f"{out.name}.inherited").write_text("")   # it outlives the sweep
        if seed == 0:        # meanwhile another sweep finishes seed 1
            (out.parent / out.name.replace("_s0", "_s1") / "summary.json").write_text("{}")
        out.mkdir()
        (out / "summary.json").write_text("{}")
        """)
    folder = tmp_path / "sweeps" / "L"
    runs = grids.make_runs([grids.Cell("hopper-medium-v2", 0.1, "dt")], [0, 1])
    (folder / runs[0].name).mkdir(parents=True)
    (folder / runs[0].name / "config.json").write_text("{}")
    other = sweep.lock_run(folder, runs[0])
    assert other is not None and sweep.lock_run(folder, runs[0]) is None
    try:
        assert sweep.main([*FAKE, "--seed", "0", "1", "--name", "L"]) == 1
    finally:
        os.close(other)
    out = capsys.readouterr().out
    assert f"busy        {runs[0].name} (another sweep is running it)" in out
    assert out.endswith("\n1 runs were left to another sweep that is running them; run the same "
                        "command again after it ends\n")
    assert [p.name for p in (folder / runs[0].name).iterdir()] == ["config.json"]   # untouched
    assert (folder / f"{runs[1].name}.held").exists()
    assert sorted(p.name for p in folder.glob("*.held")) == [f"{runs[1].name}.held"]
    assert (folder / f"{runs[1].name}.inherited").exists()
    (folder / runs[1].name / "summary.json").unlink()       # seed 1 to do again, as a restart
    assert sweep.main([*FAKE, "--seed", "0", "1", "--name", "L"]) == 0
    out = capsys.readouterr().out
    assert f"done        {runs[0].name} (" in out
    assert f"done        {runs[1].name} (by another sweep)" in out
    assert [p.name for p in (folder / runs[0].name).iterdir()] == ["summary.json"]  # started over
    for run in runs:                                        # every lock given back
        fd = sweep.lock_run(folder, run)
        assert fd is not None
        os.close(fd)
    other = sweep.lock_run(folder, runs[1])        # a pack with a run held: none of it locked
    assert sweep.lock_job(folder, tuple(runs)) is None
    os.close(other)
    locks = sweep.lock_job(folder, tuple(runs))                  # and all of it once it is free
    assert locks is not None and list(locks) == runs
    for fd in locks.values():
        os.close(fd)


def test_a_filesystem_without_flock_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    fake_lamo(tmp_path, monkeypatch, "sys.exit('a run was started')")

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(sweep.fcntl, "flock", no_flock)
    assert sweep.main([*FAKE, "--seed", "0", "--name", "N"]) == 2
    err = capsys.readouterr().err.splitlines()          # after the progress bar's first line
    assert err[-1].startswith("error: cannot lock sweeps/N/locks/hopper-medium-v2_f0.1_dt_s0.lock "
                              "(No locks available): the sweep locks each run with flock")
    assert not (tmp_path / "sweeps/N/logs").exists()       # no run was started


# ----------------------------------------------------------------------------- the paper's grids
# Each grid's runs (cells x variants x 3 seeds); paper: all grids, a run two of them share once.
GRID_RUNS = {"table1": 54, "table2": 36, "table3": 72, "table8": 18, "table9": 18, "table10": 12,
             "table11": 18, "table15": 81, "table16": 108, "fig4": 72, "fig5": 96, "fig6": 27,
             "fig10": 18, "paper": 381}


def dry_run(argv: list[str], monkeypatch, capsys) -> list[list[str]]:
    """The lamo.py arguments of every run `sweep.py ARGV --dry-run` lists."""
    assert sweep.main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line.split("python lamo.py ", 1)[1].split() for line in lines
            if "python lamo.py" in line]


def outs(commands: list[list[str]]) -> set[str]:
    return {c[c.index("--out") + 1] for c in commands}


@pytest.mark.parametrize("grid", GRID_RUNS)
def test_each_grid_dry_run_lists_its_runs(grid, tmp_path, monkeypatch, capsys):
    """Table 10 and Table 11 list their runs without tasks.py's entries for their tasks: the plain
    LaMo and DT variants need no task defaults."""
    monkeypatch.chdir(tmp_path)
    commands = dry_run(["--grid", grid], monkeypatch, capsys)
    assert len(commands) == len(outs(commands)) == GRID_RUNS[grid]
    assert all(out.startswith("sweeps/paper/") for out in outs(commands))   # one shared folder
    assert not (tmp_path / "sweeps").exists()


def test_paper_grid_trains_a_run_two_grids_share_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grids = {g: outs(dry_run(["--grid", g], monkeypatch, capsys)) for g in GRID_RUNS}
    paper = grids.pop("paper")
    assert paper == set.union(*grids.values())                 # each run of every grid, once
    assert sum(map(len, grids.values())) > len(paper)          # ... and some are shared
    # Table 16's LaMo and DT are Table 3's runs; its third column is LaMo --pretrained none
    assert {o for o in grids["table16"] if "+pretrained=none" not in o} == grids["table3"]
    # Fig. 10's GPT-2 medium on Complete 30% is Table 1's LaMo; its GPT-2 small on Complete 50%
    # is Table 1's LaMo too (--pretrained gpt2 is the default, so no flag and the same folder)
    prefix = "sweeps/paper/kitchen-complete-v2_f"
    assert f"{prefix}0.3_lamo+pretrained=gpt2-medium_s0" in grids["fig10"] & grids["table1"]
    assert f"{prefix}0.5_lamo_s0" in grids["fig10"] & grids["table1"]
    assert f"{prefix}0.3_lamo_s0" in grids["fig10"] - grids["table1"]        # a run of its own
    # Fig. 6's λ 0.1 on Kitchen is the default, so Table 1's run; λ 0 is one flag more
    fig6 = dry_run(["--grid", "fig6", "--seed", "0"], monkeypatch, capsys)
    assert {o for o in outs(fig6) if "lm-coef" not in o} <= grids["table1"]
    assert [c[c.index("--out") + 2:] for c in fig6 if "--lm-coef" in c] == [
        ["--lm-coef", "0"], ["--lm-coef", "0"], ["--lm-coef", "0", "--pretrained", "gpt2-medium"]]


def test_a_setting_equal_to_the_tasks_default_gives_no_flag():
    cell = grids.make_cell
    assert cell("kitchen-partial-v2", 0.1, "lamo-lm", in_grid=True).flags == ()       # λ 0.1
    assert cell("hopper-medium-v2", 0.1, "lamo-nolm", in_grid=True).flags == ()       # λ 0
    assert cell("hopper-medium-v2", 0.1, "lamo-linear", in_grid=False).flags == ()    # linear
    assert cell("walker2d-medium-v2", 0.1, "lamo-linear", in_grid=False).flags == (
        "--embed", "linear")
    assert cell("kitchen-partial-v2", 0.1, "lamo-nolm", in_grid=True).flags == ("--lm-coef", "0")
    # the cell's GPT-2 medium stays under an ablation of something else, not under its own size
    assert cell("kitchen-complete-v2", 0.3, "lamo-full", in_grid=True).flags == (
        "--finetune", "full", "--pretrained", "gpt2-medium")
    assert cell("kitchen-complete-v2", 0.3, "lamo-nopt", in_grid=True).flags == (
        "--pretrained", "none")
    assert cell("kitchen-complete-v2", 0.3, "lamo", in_grid=False).flags == ()   # not a grid
    assert cell("kitchen-complete-v2", 0.3, "lamo-gpt2", in_grid=True).name == \
        "kitchen-complete-v2_f0.3_lamo"
    assert cell("ant-medium-v2", 0.1, "dt", in_grid=True).flags == ()   # no task entry needed


def made_up_runs(folder: Path, grid: str, skip=()) -> dict:
    """A summary.json for every run of the grid but those whose name contains a string of skip:
    seed s of a line scores 10 + the line's index + s. -> {(task, ratio, variant): [scores]}."""
    scores = {}
    for i, entry in enumerate(grids.grid_entries(grid, None, None, None)[grid]):
        for seed in grids.SEEDS:
            run = grids.Run(entry.cell, seed)
            if any(s in run.name for s in skip):
                continue
            (folder / run.name).mkdir(parents=True, exist_ok=True)
            (folder / run.name / "summary.json").write_text(json.dumps(summary(t1=10 + i + seed)))
            scores.setdefault((entry.cell.task, entry.cell.frac, entry.variant), []).append(
                10 + i + seed)
    return scores


def test_figure_and_table_grids_aggregate_beside_the_paper(tmp_path, monkeypatch, capsys):
    """fig5 and table16 on made-up summaries: each line is ours beside the paper's value, a
    figure's marked ≈ and a table's exact (Table 16's w/o pre-training without ±), each grid in
    its own results_<grid>.* of the shared folder."""
    folder = tmp_path / "sweeps" / "paper"
    fig5 = made_up_runs(folder, "fig5", skip=["pong-medium_f0.1_lamo+finetune=frozen"])
    table16 = made_up_runs(folder, "table16", skip=["walker2d-medium-v2_f1_dt_s2"])
    monkeypatch.chdir(tmp_path)
    for grid in ("fig5", "table16", "table3"):
        assert sweep.main(["--grid", grid, "--aggregate"]) == 0
    capsys.readouterr()

    md = (folder / "results_fig5.md").read_text()
    full = fig5["hopper-medium-v2", 0.01, "lamo-full"]
    assert (f"| hopper-medium-v2 | 0.01 | LaMo, full fine-tuning | {np.mean(full):.1f} ± "
            f"{np.std(full):.1f} | ≈ 45 (Fig. 5) | 1 | 3/3 | --finetune full |") in md
    assert "| pong-medium | 0.1 | LaMo, frozen (no LoRA) | — | ≈ 105 (Fig. 5) | — | 0/3 |" \
        in md
    assert "≈ read from the paper's figure (Fig. 5)" in md
    assert "| breakout-medium | 0.1 | LaMo | " in md and "≈ 185 (Fig. 5)" in md
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert not any("(Table" in line or "136.9" in line for line in lines)   # no table value
    assert "| task | ratio | LaMo | LaMo, full fine-tuning | LaMo, frozen (no LoRA) | DT |" in md
    rows = read_csv(folder / "results_fig5.csv")
    assert len(rows) == 32 and {(r["paper_approx"], r["paper_std"]) for r in rows} == {("1", "")}

    md = (folder / "results_table16.md").read_text()
    lamo = table16["hopper-medium-v2", 0.005, "lamo"]
    assert (f"| hopper-medium-v2 | 0.005 | LaMo | {np.mean(lamo):.1f} ± {np.std(lamo):.1f} "
            "| 57.0 ± 7.1 (Table 16) | 1 | 3/3 | defaults |") in md
    nopt = table16["hopper-medium-v2", 0.005, "lamo-nopt"]
    assert (f"| hopper-medium-v2 | 0.005 | LaMo w/o pre-training | {np.mean(nopt):.1f} ± "
            f"{np.std(nopt):.1f} | 43.5 (Table 16) | 1 | 3/3 | --pretrained none |") in md
    assert "| task | ratio | LaMo | LaMo w/o pre-training | DT |" in md      # side by side
    assert "| walker2d-medium-v2 | 1 | DT | " in md and " | 2/3 | defaults |" in md
    assert "≈" not in md
    rows = {(r["task"], r["ratio"], r["variant"]): r for r in
            read_csv(folder / "results_table16.csv")}
    assert rows["hopper-medium-v2", "0.005", "lamo-nopt"]["paper_std"] == ""
    assert rows["hopper-medium-v2", "0.005", "lamo-nopt"]["paper_approx"] == "0"
    # Table 16's LaMo and DT lines are Table 3's runs: the same numbers, from the same folders
    table3 = {(r["task"], r["ratio"], r["variant"]): r for r in
              read_csv(folder / "results_table3.csv")}
    assert table3 and all(rows[k]["mean"] == r["mean"] and rows[k]["run"] == r["run"]
                          for k, r in table3.items())
    for grid in ("fig5", "table16", "table3"):
        assert (folder / f"results_{grid}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (folder / "results.md").exists()        # a grid writes its own results files only


# ----------------------------------------------------------------------------- packs
def test_a_packed_sweep_trains_its_runs_as_one_pack(work):
    """--pack 4: the tiny grid's four runs (two ratios x two seeds) in one lamo.py process, one
    log; every run folder complete; the table as from four processes (the numbers differ a
    little: a pack's dropout masks are its own)."""
    p = sweep_py(*GRID, "--name", "P", "--pack", "4", *tiny(work / "tiny.hdf5"), cwd=work)
    assert p.returncode == 0, p.stdout + p.stderr
    folder = work / "sweeps" / "P"
    assert "4 runs to do as 1 jobs (--pack 4)" in p.stdout
    assert sorted(x.name for x in (folder / "logs").iterdir()) == [
        "pack_hopper-medium-v2_f0.5_dt_s0+3.log"]
    log = (folder / "logs" / "pack_hopper-medium-v2_f0.5_dt_s0+3.log").read_text()
    assert "pack     4 runs in lockstep" in log
    assert len(list(folder.glob("*/summary.json"))) == 4
    rows = read_csv(folder / "results.csv")
    assert [(r["ratio"], r["model"], r["seeds"]) for r in rows] == [("0.5", "dt", "2"),
                                                                    ("1.0", "dt", "2")]


def test_packs_group_compatible_runs_in_the_same_state(tmp_path, monkeypatch, capsys):
    """make_jobs: same task, variant and state (Atari's too, its token-counted lr per run); a
    checkpointed run packs only with runs checkpointed at the same step."""
    monkeypatch.chdir(tmp_path)
    assert sweep.main(["--grid", "table3", "--pack", "12", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "72 runs to do as 6 jobs (--pack 12)" in out
    assert out.count("pack of 12") == 6
    cells = [grids.Cell("hopper-medium-v2", f, "lamo") for f in (0.1, 1.0)]
    runs = grids.make_runs(cells, [0, 1, 2])
    folder = tmp_path / "s"
    for run, step in zip(runs, (500, 500, 700)):        # three checkpointed, three new
        (folder / run.name).mkdir(parents=True)
        torch.save({"step": step}, folder / run.name / "ckpt.pt")
    jobs = sweep.make_jobs(runs, folder, 4, [])
    assert [[r.name for r in job] for job in jobs] == [
        [r.name for r in runs[:2]], [runs[2].name], [r.name for r in runs[3:]]]
    args = sweep.pack_args(jobs[0], folder, [], None, cuda=True)
    assert args == ["--resume", *(str(folder / r.name) for r in runs[:2]), "--device", "cuda"]
    args = sweep.pack_args(jobs[2], folder, ["--steps", "9"], "proj")
    assert args == ["--env", "hopper-medium-v2", "--frac", "1.0", "0.1", "1.0", "--seed", "1", "2",
                    "2", "--model", "lamo", "--out", *(str(folder / r.name) for r in runs[3:]),
                    "--steps", "9", "--wandb", "proj",
                    "--wandb-group", *(r.cell.name for r in runs[3:])]
    assert len(sweep.make_jobs(runs[3:], folder, 4, ["--compile"])) == 1
    others = [grids.Cell("hopper-medium-v2", 0.1, "dt"), grids.Cell("walker2d-medium-v2", 0.1,
              "lamo"), grids.Cell("hopper-medium-v2", 0.1, "lamo", ("--embed", "mlp"))]
    mixed = grids.make_runs([cells[0], *others], [0, 1])
    assert [{r.cell for r in job} for job in sweep.make_jobs(mixed, tmp_path / "new", 4, [])] \
        == [{cell} for cell in [cells[0], *others]]
    atari = grids.make_runs([grids.Cell("breakout-medium", 0.1, "lamo")], [0, 1])
    assert [len(job) for job in sweep.make_jobs(atari, folder, 4, [])] == [2]
