"""Device, precision and checkpoints across devices (issue 15), tested on the CPU: each test drives
the mechanism a GPU run goes through, with torch.cuda's functions stubbed where a GPU would answer.
The same paths on a real GPU are in test_cuda.py (`pytest -m cuda`)."""
import json

import numpy as np
import pytest
import torch

import atari
import data
import lamo
import measure
import runs
import sweep
import tasks


def tiny_run(folder, tiny_hdf5, **override) -> runs.Run:
    """A DT-preset run on the tiny Hopper dataset, built by lamo.start_run as a real run is."""
    config = dict(model="dt", env="hopper-medium-v2", data=str(tiny_hdf5), steps=2, eval_every=2,
                  eval_episodes=1, batch_size=4, context_len=5, device="cpu")
    run = lamo.start_run(lamo.resolve(lamo.Config(**{**config, **override})), folder, resume=False)
    (folder / "metrics.jsonl").touch()                    # what train() opens; restore() reads
    return run


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as two GPUs of compute capability `capability[0]`, recording RNG calls."""
    calls, capability = [], [(9, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": calls.append(("get", torch.device(device)))
                        or torch.arange(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": calls.append(("set", state,
                                                                   torch.device(device))))
    return calls, capability


def test_checkpoint_keeps_only_the_runs_gpu_rng_as_a_cpu_byte_tensor(fake_gpu, tiny_hdf5, tmp_path):
    """Defects 1 and 2: restore loaded the checkpoint onto the GPU (CUDA RNG states then raise
    'RNG state must be a torch.ByteTensor'), and saved every visible GPU's state (IndexError when
    resumed with fewer GPUs). Now: the run's own GPU only, set back as a CPU uint8 tensor."""
    calls, _ = fake_gpu
    run = tiny_run(tmp_path / "r", tiny_hdf5)
    run.device = torch.device("cuda", 1)          # the model stays on the CPU; only RNG is asked
    runs.save_checkpoint(run, run.loss_sums)
    runs.restore(run)
    (get, got_device), (sett, state, set_device) = calls
    assert (get, got_device, sett, set_device) == ("get", run.device, "set", run.device)
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    assert torch.equal(state, torch.arange(16, dtype=torch.uint8))
    # A checkpoint of an older lamo holds every GPU's state: only the run's own is used.
    ckpt = torch.load(run.folder / "ckpt.pt", weights_only=False)
    ckpt["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    torch.save(ckpt, run.folder / "ckpt.pt")
    calls.clear()
    runs.restore(run)
    assert torch.equal(calls[0][1], torch.ones(16, dtype=torch.uint8))      # cuda:1's
    run.device = torch.device("cuda", 0)
    calls.clear()
    runs.restore(run)
    assert torch.equal(calls[0][1], torch.zeros(16, dtype=torch.uint8))     # cuda:0's


def test_resume_keeps_the_live_optimizer_implementation(tiny_hdf5, tmp_path):
    """Defect 3: Optimizer.load_state_dict copied the saved 'fused' flag over the live one, so a
    CPU checkpoint turned a fused CUDA AdamW into a non-fused one. (Fused AdamW runs on the CPU
    too, which is what this test uses.)"""
    run = tiny_run(tmp_path / "r", tiny_hdf5)
    assert run.optimizer.param_groups[0]["fused"] in (None, False)
    lamo.train_step(run.model, run.model, run.optimizer, run.params, run.batcher.sample(4), None,
                    run.cfg, False)
    runs.save_checkpoint(run, run.loss_sums)
    saved = {k: v.clone() for k, v in run.optimizer.state[run.params[0]].items()}
    run.optimizer = torch.optim.AdamW(run.params, lr=run.cfg.lr, fused=True)
    runs.restore(run)
    assert run.optimizer.param_groups[0]["fused"] is True
    for k, v in run.optimizer.state[run.params[0]].items():     # the state itself did load
        assert torch.equal(v, saved[k]), k


def test_precision_is_resolved_once_and_saved(fake_gpu, tiny_hdf5, tmp_path, monkeypatch):
    """Defects 4 and 6: config.json saved 'auto', so a CPU run resumed on a GPU switched to bf16
    half-way; and auto chose bf16 on GPUs that only emulate it."""
    _, capability = fake_gpu
    cuda = torch.device("cuda")
    assert lamo.resolve_precision("auto", cuda) == "bf16"                  # H100 (9.0)
    capability[0] = (8, 0)
    assert lamo.resolve_precision("auto", cuda) == "bf16"                  # A100
    capability[0] = (7, 0)
    assert lamo.resolve_precision("auto", cuda) == "fp32"                  # V100: emulated bf16
    assert lamo.resolve_precision("bf16", cuda) == "bf16"                  # asked for: as asked
    assert lamo.resolve_precision("auto", torch.device("cpu")) == "fp32"
    run = tiny_run(tmp_path / "r", tiny_hdf5)
    assert json.loads((run.folder / "config.json").read_text())["precision"] == "fp32"
    runs.save_checkpoint(run, run.loss_sums)
    # A run folder from an older lamo, with 'auto' saved: refused, saying what to do.
    cfg = json.loads((run.folder / "config.json").read_text())
    (run.folder / "config.json").write_text(json.dumps({**cfg, "precision": "auto"}))
    with pytest.raises(SystemExit, match="says precision 'auto'.*set it to"):
        lamo.main(["--resume", str(run.folder)])


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_no_tf32_on_any_cuda_device(fake_gpu, name):
    """Defect 5: TF32 went on globally for the exact string 'cuda' (so --precision fp32 was not
    fp32) and stayed off for 'cuda:1'. Now fp32 is IEEE fp32 on every device."""
    # Set and put back by hand: these are properties of torch's backend modules, which pytest's
    # monkeypatch (9.2) records as absent and then fails to delete.
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        assert lamo.pick_device(name) == torch.device(name)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_device_errors_are_one_line(monkeypatch):
    with pytest.raises(data.LamoError, match="--device cuda: torch .* sees no CUDA GPU"):
        lamo.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(data.LamoError, match="--device cuda:1: only 1 CUDA GPU"):
        lamo.pick_device("cuda:1")


def test_sweep_gpus_map_through_the_parents_visible_devices(monkeypatch, tmp_path, capsys):
    """Defect 7: --gpus handed out physical GPU numbers whatever CUDA_VISIBLE_DEVICES said, a bad
    index left a run with no GPU (and device auto then trained on the CPU), and runs were not
    told to use CUDA."""
    monkeypatch.chdir(tmp_path)
    grid = ["--env", "hopper-medium-v2", "--frac", "0.1", "--seed", "0", "--model", "dt",
            "--name", "g"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sweep.main([*grid, "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert (err.count("\n") == 1 and "--gpus 0: not a CUDA GPU" in err and
            "device_count() is 0" in err)
    assert not (tmp_path / "sweeps").exists()                      # before any run started
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")               # e.g. Slurm's allocation
    assert sweep.visible_gpus(["1", "0"]) == ["7", "5"]
    assert [sweep.child_env(slot, 2, ["7", "5"])["CUDA_VISIBLE_DEVICES"]
            for slot in (0, 1)] == ["7", "5"]
    with pytest.raises(sweep.SweepError, match="--gpus 2: .*indices 0..1"):
        sweep.visible_gpus(["2"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sweep.visible_gpus(["1"]) == ["1"]
    assert sweep.main([*grid, "--gpus", "1", "--dry-run"]) == 0
    assert "--device cuda" in capsys.readouterr().out
    assert sweep.main([*grid, "--gpus", "1", "--", "--device", "cpu"]) == 2
    assert "drop the --device" in capsys.readouterr().err


def write_replay(folder, actions):
    """Four DQN-Replay .npy arrays, episodes of 10 steps, with the given actions."""
    n = len(actions)
    folder.mkdir()
    arrays = {"observation": np.zeros((n, 84, 84), np.uint8),
              "action": np.asarray(actions, np.int32),
              "reward": np.ones(n, np.float32),
              "terminal": (np.arange(n) % 10 == 9).astype(np.uint8)}
    for k, v in arrays.items():
        np.save(folder / atari.replay_file(k, "npy"), v)
    return folder


def test_atari_actions_checked_at_load_and_tokens_counted_on_the_host(tmp_path):
    """Defects 8 and 9: an action beyond the game's set was a CUDA device-side assert, and the
    token-counted lr schedule read the batch's actions back from the GPU every step."""
    breakout = tasks.get_task("breakout-medium")                     # 4 actions
    bad = write_replay(tmp_path / "bad", [0, 1, 2, 3, 17] * 4)
    with pytest.raises(data.LamoError, match=r"action_ckpt.10.npy: actions range over 0..17, but "
                                             r".* has 4 \(0..3\)"):
        atari.load_atari(breakout, str(bad))
    actions = [0, 1, 2, 3, 0, 0, 1, 0, 2, 0] * 2                     # 9 non-zero
    replay, _ = atari.load_atari(breakout, str(write_replay(tmp_path / "ok", actions)))
    batcher = atari.FrameStackBatcher(replay, [0, 1], K=10, max_timestep=100, rtg_scale=1, seed=0)
    batch = batcher.window(np.array([0, 1]), np.array([0, 0]))       # both whole episodes
    assert batch.action_tokens == 2 * 5 and isinstance(batch.action_tokens, int)
    run = type("R", (), {"action_tokens": 3, "schedule_tokens": 4.0})()
    lamo.count_tokens(run, batch.action_tokens)
    assert (run.action_tokens, run.schedule_tokens) == (13, 17.0)


def test_measure_names_the_device_it_measures(monkeypatch):
    """Defect 10: bench.py synchronised, read and reset peak memory on the current GPU, not on
    --device's."""
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: seen.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: seen.append(("max", device)) or 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: seen.append(("reset", device)))
    gpu1 = torch.device("cuda", 1)
    measure.sync(gpu1)
    assert measure.peak_gb(gpu1) == 1.0
    assert seen == [("sync", gpu1), ("max", gpu1), ("reset", gpu1)]
    assert measure.peak_gb(torch.device("cpu")) is None


def test_measure_says_how_long_a_step_keeps_the_device_busy():
    """measure.device_busy on the CPU: the time inside operators, each instant counted once though
    a matmul holds an mm (the union of the profiler's intervals, not their sum): on one thread
    that is the sum of the operators' self times, and no more than the wall time around it; its
    top operator by self time is the mm."""
    import time
    torch.manual_seed(0)
    x = torch.randn(600, 600)
    step = lambda: (x @ x).relu()                   # aten::matmul > aten::mm, then aten::relu
    t0 = time.perf_counter()
    busy = measure.device_busy(step, torch.device("cpu"), n=3)
    wall_ms = (time.perf_counter() - t0) * 1e3 / 3
    assert 0 < busy["ms"] <= wall_ms
    assert len(busy["top"]) < 8                                   # every operator is in the top
    assert busy["ms"] == pytest.approx(sum(ms for _, ms in busy["top"]), rel=1e-6)
    assert busy["top"][0][0] == "aten::mm" and busy["top"][0][1] <= busy["ms"]
    failed = measure.busy_or_error(lambda: 1 / 0, torch.device("cpu"))
    assert failed == {"error": "ZeroDivisionError: division by zero"}
    assert measure.busy_or_error(lambda: None, torch.device("cpu")) == {      # not a busy 0 ms
        "error": "RuntimeError: the profiler saw no cpu activity in 3 steps"}


def test_measure_counts_the_bytes_a_compiled_step_moves():
    """measure.traffic_gib: a compiled elementwise step over n fp32 numbers is one fused kernel
    that reads them once and writes its result once, 2 n x 4 bytes, none of them a matmul's; a
    matmul's bytes are counted apart too; counted though the step was
    compiled (and cached) before (dynamo reset, the compile caches bypassed: else 0 and an
    error); a step that compiles nothing is an error, not 0."""
    x = torch.randn(1 << 20)
    step = torch.compile(lambda x: (x * 2 + 1).relu())
    step(x)                                            # compiled and cached, uncounted
    assert measure.traffic_gib(lambda: step(x)) == (2 * x.numel() * 4 / 2**30, 0.0)
    # A matmul is an extern kernel (the BLAS's): its inputs and output, counted apart; its relu
    # reads and writes the output again.
    a, w = torch.randn(256, 128), torch.randn(128, 64)
    mm = (256 * 128 + 128 * 64 + 256 * 64) * 4 / 2**30
    assert measure.traffic_gib(torch.compile(lambda: (a @ w).relu())) == (
        mm + 2 * 256 * 64 * 4 / 2**30, mm)
    with pytest.raises(RuntimeError, match="compiled nothing"):
        measure.traffic_gib(lambda: x * 2)


def test_the_gpu_checks_report_computes_its_rows(tmp_path):
    """gpu_report.py on a check's files made here: each rate beside one eager run alone, an
    error row, "n/a" for what a step cut short never measured, and Table 3's GPU-hours worked
    out by hand (36 LaMo + 36 DT runs of 100k steps, 72 x 40 evaluations)."""
    import gpu_report
    report, work = tmp_path / "r", tmp_path / "w"
    (work / "slice").mkdir(parents=True)
    report.mkdir()
    (report / "bench.json").write_text(json.dumps({
        "precision": "bf16", "train_steps_per_s": 10.0, "train_peak_gpu_gb": 1.5,
        "train_steps_per_s_dt": 20.0, "pack_lamo_4": 25.0, "pack_lamo_4_peak_gpu_gb": 6.0,
        "pack_dt_4": 80.0, "pack_eval_16_episodes": 1280, "pack_eval_16_s": 9.0,
        "train_steps_per_s_with_lm": 5.0, "pack_lamo+lm_4": 12.0, "compile": False,
        "busy_pack_lamo_4": {"ms": 40.0, "top": []},
        "pack_eval_16_env_steps_per_s": 1000.0}))
    (report / "compare.json").write_text(json.dumps({
        "compiled_lamo_1": 15.0, "cudagraphs_lamo_16_error": "boom: no graph", "device": "x",
        "compiled_lamo_16": 200.0, "busy_compiled_lamo_16": {"ms": 48.0, "top": [
            ["void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>",
             10.0], ["sm90_gemm", 9.0]]},
        "busy_cudagraphs_lamo_16": {"error": "RuntimeError: CUPTI | x"}}))
    (report / "log.txt").write_text(
        "=== versions: torch 9, CUDA 13\n=== tests: python3 -m pytest -m cuda\n"
        "fp32: action loss 0.1\nnoise\n11 passed in 84s\n\n=== tests: exit 0 after 90 s\n"
        "=== bench: python3 bench.py\nfp32: not a test's\n=== bench: exit 124 after 175 s\n"
        "=== compare: skipped, 4 s left before the 570-s deadline\n")
    (report / "gpu.csv").write_text("name, memory.total [MiB]\nNVIDIA X, 81559 MiB\n")
    rows = [{"step": s, "steps_per_s": 5.0 if s == 100 else 9.0} for s in range(100, 401, 100)]
    rows += [{"step": 200, "eval_s": 10.0, "eval": {"100": {"length_mean": 500}}}]
    (work / "slice" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (work / "slice" / "config.json").write_text(json.dumps({"eval_episodes": 20,
                                                             "targets": "1,2,3,4"}))
    text = gpu_report.report(report, work)
    table = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines()
             if line.startswith("| ") and " | " in line}
    assert text.startswith("# lamo GPU check: NVIDIA X\n\ntorch 9, CUDA 13, command")
    assert table["bench"] == ["124", "175 |"] and "CUDA tests: 11 passed in 84s" in text
    assert table["compare"] == ["skipped, 4 s left before the 570-s deadline", " |"]
    assert "    fp32: action loss 0.1" in text and "noise" not in text and "not a test" not in text
    assert table["run-steps/s, a pack of 4 lamo runs (x one run alone)"] == ["25 (2.5x)", "6.00 |"]
    assert table["run-steps/s, a pack of 4 dt runs (x one run alone)"][0] == "80 (4.0x)"
    assert table["run-steps/s, a pack of 4 lamo+lm runs (x one run alone)"][0] == "12 (2.4x)"
    assert table["LaMo with --compile: steps/s of one run alone (x one eager run alone)"][0] \
        == "15 (1.5x)"
    assert table["LaMo with --compile --compile-mode reduce-overhead (CUDA graphs): run-steps/s, "
                 "a pack of 16 (x one eager run alone)"][0] == "boom: no graph"
    assert table["evaluation env-steps/s, a pack of 16 LaMo runs, 1280 episodes in one "
                 "rollout"][0] == "1000"
    assert table["batch sampling ms, loop / vectorised"][0] == "n/a / n/a"
    # the slice: steps 200 and 300 (100 is warm-up, 300's interval holds the evaluation at 200)
    assert table["hopper slice: training steps/s (median of 100-step intervals)"][0] == "9"
    # one at a time: 36e5 (1/10 + 1/20) s = 150 h; 72 x 40 x 10 s = 8 h. Packs of 4: 36e5 (1/25
    # + 1/80) s = 52.5 h; 72 x 40 evaluations x 80 episodes x 500 steps / 1000 per s = 32 h
    assert table["Table 3 projected, one run at a time: training + evaluation, GPU-hours"][0] \
        == "150.0 + 8.0"
    assert table["Table 3 projected, packs of 4 LaMo / 4 DT runs: training + evaluation, "
                 "GPU-hours"][0] == "52.5 + 32.0"
    # what bounds a step: 16 runs at 200 run-steps/s are 80 ms a step, 48 of them busy, 3 a run
    assert table["LaMo, --compile: a pack of 16"] == [
        "80.00", "48.00 (60%)", "3.00", "vectorized_elementwise_kernel<4, CUDAFunctor_add> 10.00; "
        "sm90_gemm 9.00 |"]
    assert table["LaMo, CUDA graphs: a pack of 16"][:2] == ["n/a", "RuntimeError: CUPTI / x"]
    assert table["LaMo, eager: a pack of 4"][:3] == ["160.00", "40.00 (25%)", "10.00"]
    # QUICK=1's bench (no evaluation or sampling asked for), cut short mid-write in compare.json,
    # without the slice: those rows left out, Table 3's training alone; no CUDA needed here
    bench = json.loads((report / "bench.json").read_text())
    (report / "bench.json").write_text(json.dumps({**bench, "sections": ["train", "packs"]}))
    (report / "compare.json").write_text('{"compiled_lamo_1": 1')
    gpu_report.main([str(report)])
    text = (report / "report.md").read_text()
    assert "evaluation env-steps/s, None" not in text and "batch sampling" not in text
    assert "compiled" not in text
    assert ("| Table 3 projected, packs of 4 LaMo / 4 DT runs: training (no slice: no "
            "evaluation), GPU-hours | 52.5 |") in text


def test_the_gpu_check_keeps_its_report_under_a_deadline(tmp_path):
    """gpu_check.sh under QUICK=1's deadline, on stand-ins for python3 and nvidia-smi (a CUDA
    machine's answers; each step's command logged, not run): a step with too little time left
    is skipped, not started, report.md is written after each step from REPORT_DIR alone, and
    the exit status says a step did not run."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text(f"""#!/bin/bash
case "$*" in
  *torch.cuda.is_available*) echo "torch 9, CUDA 13";;
  *"import gymnasium"*) ;;
  *"-m pytest"*) echo "fp32: action loss 1 vs 1"; sleep 3; echo "13 passed in 3s";;
  *gpu_report.py*) exec {sys.executable} "$@";;
  *) echo "ran $*";;
esac
""")
    (shim / "nvidia-smi").write_text('#!/bin/bash\necho "name, memory.total"\n'
                                     'echo "NVIDIA Stand-in, 80 GiB"\n')
    for f in shim.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "QUICK": "1",
           "STEPS": "tests bench compare", "DEADLINE": "47"}    # 3 s of tests: 19 s left
    out = subprocess.run(["bash", str(Path(__file__).parent / "gpu_check.sh"),
                          str(tmp_path / "r")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 1                                  # bench and compare never ran
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.startswith("# lamo GPU check: NVIDIA Stand-in\n\ntorch 9, CUDA 13, command")
    assert "| tests | 0 |" in report and "CUDA tests: 13 passed in 3s" in report
    for step in ("bench", "compare"):
        assert f"| {step} | skipped, " in report and "ran bench.py" not in out.stdout


def test_the_gpu_check_stops_in_one_line_without_cuda(tmp_path):
    """gpu_check.sh on a machine without CUDA: exit 1 and one line that says so, nothing run."""
    import subprocess
    from pathlib import Path
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    out = subprocess.run(["bash", str(Path(__file__).parent / "gpu_check.sh"), str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "gpu_check.sh: no CUDA GPU visible to torch here; run it on a GPU machine"]
    assert not (tmp_path / "r").exists()
