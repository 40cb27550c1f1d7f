"""The GPU paths, on a real CUDA GPU: `pytest -m cuda` (gpu_check.sh runs them). Deselected by
default (pytest.ini), so `pytest -q` on any machine runs the CPU suite only. On CUDA nothing here is
bit-for-bit (attention and cuDNN backward kernels are nondeterministic, cuBLAS picks kernels by
batch size): each comparison has a tolerance, and the CPU is the reference."""
import json

import numpy as np
import pytest
import torch

import atari
import data
import lamo
import pack
import sweep
import tasks
from conftest import action_losses, adamw_side_by_side, read_metrics

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
HOPPER = tasks.get_task("hopper-medium-v2")
# LaMo's code path (GPT-2 body with LoRA, MLP embeddings) on a small random GPT-2; dropout off, so
# a CPU step and a GPU step compute the same function.
SMALL = ["--pretrained", "none", "--n-layer", "2", "--n-head", "4", "--n-embd", "64",
         "--dropout", "0", "--lora-dropout", "0", "--batch-size", "8", "--context-len", "5"]


def small_cfg(precision: str, **kw) -> lamo.Config:
    args, _ = lamo.parse_args([*SMALL, "--precision", precision])
    for k, v in kw.items():
        setattr(args, k, v)
    return lamo.resolve(args)


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_training_step_on_cuda_matches_cpu(tiny_hdf5, precision, rtol):
    """One LaMo step on the same batch, the CPU in fp32 as the reference: action loss and gradient
    norm within rtol; each trainable tensor's (clipped) gradient within rtol in norm for fp32, 5 x
    rtol for bf16, whose 8-bit mantissa rounds every matmul of the body. (Not the updated weights:
    Adam's first step is lr x sign(gradient), which flips for gradients near zero.)"""
    trajs = data.load_trajectories(tiny_hdf5, 11, 3)
    results = []
    for device, prec in ((torch.device("cpu"), "fp32"), (CUDA, precision)):
        cfg = small_cfg(prec)
        torch.manual_seed(0)
        model = lamo.build_model(cfg, HOPPER, prec).to(device)
        params, opt = lamo.make_optimizer(model, cfg, device)
        assert opt.param_groups[0]["fused"] == (device.type == "cuda")
        batcher = data.TrajectoryBatcher(trajs, 5, 1000, 1000.0, seed=0, device=device)
        stats = lamo.train_step(model, model, opt, params, batcher.sample(8), None, cfg, False)
        results.append((stats.cpu(), [p.grad.cpu() for p in params]))
    (cpu_stats, cpu_grads), (gpu_stats, gpu_grads) = results
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-12))
    worst = max(rel(g, c) for g, c in zip(gpu_grads, cpu_grads))
    print(f"{precision}: action loss {gpu_stats[0]:.6f} vs CPU {cpu_stats[0]:.6f}, grad norm "
          f"{gpu_stats[2]:.6f} vs {cpu_stats[2]:.6f}, worst gradient tensor off by {worst:.2e}")
    torch.testing.assert_close(gpu_stats[[0, 2]], cpu_stats[[0, 2]], rtol=rtol, atol=0)
    assert worst < (rtol if precision == "fp32" else 5 * rtol)


def test_batchers_on_cuda_equal_cpu(tiny_hdf5, tmp_path):
    """The pinned, non-blocking copies and the on-device frame stacking give the CPU's batches."""
    trajs = data.load_trajectories(tiny_hdf5, 11, 3)
    cpu, gpu = (data.TrajectoryBatcher(trajs, 5, 1000, 1000.0, seed=3, device=d)
                for d in ("cpu", CUDA))
    a, b = cpu.sample(16), gpu.sample(16)
    assert a.action_tokens == b.action_tokens
    for x, y in zip(a[:5], b[:5]):
        assert y.device.type == "cuda" and torch.equal(x, y.cpu())
    rng = np.random.default_rng(0)
    n = 300
    terminal = (np.arange(n) % 50 == 49).astype(np.uint8)
    replay = atari.AtariReplay(rng.integers(0, 256, (n, 84, 84), dtype=np.uint8),
                               rng.integers(0, 4, n),
                               rng.integers(0, 2, n).astype(np.float32), terminal)
    cpu, gpu = (atari.FrameStackBatcher(replay, np.arange(len(replay)), 10, 100, 1.0, seed=1,
                                        device=d)
                for d in ("cpu", CUDA))
    a, b = cpu.sample(8), gpu.sample(8)
    assert a.action_tokens == b.action_tokens
    for x, y in zip(a[:5], b[:5]):
        assert y.device.type == "cuda" and torch.equal(x, y.cpu())


def never_waits(step):
    """step() once (lazy initialisation), then three times under torch.cuda's sync debug mode,
    which raises at the first synchronising call."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_training_step_and_sampling_never_wait_for_the_gpu(tiny_hdf5):
    """The hot path queues its work and returns: no host sync in sampling (pinned, non-blocking
    copies) or in a training step (losses, grad norm and the NaN flag stay on the device)."""
    trajs = data.load_trajectories(tiny_hdf5, 11, 3)
    cfg = small_cfg("bf16")
    model = lamo.build_model(cfg, HOPPER, "bf16").to(CUDA)
    params, opt = lamo.make_optimizer(model, cfg, CUDA)
    batcher = data.TrajectoryBatcher(trajs, 5, 1000, 1000.0, seed=0, device=CUDA)
    step = lambda: lamo.train_step(model, model, opt, params, batcher.sample(8), None, cfg, False)
    never_waits(step)


def test_a_packs_training_step_never_waits_for_the_gpu(tiny_hdf5, tmp_path):
    """A pack's hot path queues its work too: its runs' batches, their own dropout masks (each
    run's generator), the vmapped forward and backward, each run's clip and the one AdamW step,
    with no host sync. bf16 and dropout on, what a LaMo pack trains with."""
    args = run_args(tiny_hdf5, tmp_path / "x", "--dropout", "0.1", "--lora-dropout", "0.1")
    cfg = lamo.resolve(lamo.parse_args(args)[0])
    members = [lamo.start_run(lamo.replace(cfg, seed=s), tmp_path / f"s{s}", False)
               for s in range(3)]
    p = pack.Pack(members)
    alive = torch.ones(3, dtype=torch.bool, device=CUDA)
    step = lambda: pack.train_step(p, [run.batcher.sample(cfg.batch_size) for run in members],
                                   None, alive, cfg, lamo, False)
    never_waits(step)                   # its first step records where the forward drops


def run_args(tiny_hdf5, out, *extra):
    return ["--env", "hopper-medium-v2", "--data", str(tiny_hdf5), *SMALL, "--device", "cuda",
            "--eval-every", "4", "--eval-episodes", "2", "--eval-max-steps", "50",
            "--log-every", "2", "--out", str(out), *extra]


def test_resume_and_eval_only_on_cuda(tiny_hdf5, tiny_txt, tmp_path):
    """A bf16 CUDA run with the LM loss, resumed (every CUDA --resume crashed before), to its
    final step; then --eval-only of its checkpoint on CUDA, twice. Its returns are near the
    evaluation stored in the checkpoint, not equal: the first GPU check found 25.2 against
    24.7 (one target, 2 episodes of a random hopper, which amplifies any rounding); on the CPU
    they are equal (test_lamo.py)."""
    out = tmp_path / "run"
    lm = ["--lm-coef", "0.1", "--lm-corpus", str(tiny_txt), "--lm-seq-len", "32"]
    lamo.main(run_args(tiny_hdf5, out, *lm, "--steps", "4"))
    saved = json.loads((out / "config.json").read_text())
    assert saved["precision"] == lamo.resolve_precision("auto", CUDA)     # resolved, not 'auto'
    lamo.main(["--resume", str(out), "--steps", "8"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 8
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "eval" in r] == [4, 8]
    assert all(np.isfinite(r["action_loss"]) and r["lm_loss"] > 0
               for r in rows if "action_loss" in r)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["rng"]["cuda"].dtype == torch.uint8
    ev, again = (lamo.main(["--eval-only", str(out / "ckpt.pt"), "--device", "cuda"]) for _ in "12")
    for tgt, e in ev.items():
        stored = ckpt["last_eval"][tgt]["return_mean"]
        print(f"target {tgt}: stored {stored:.6f}, --eval-only {e['return_mean']:.6f} then "
              f"{again[tgt]['return_mean']:.6f}")
        assert e["return_mean"] == pytest.approx(stored, rel=0.1)


def test_batched_evaluation_on_cuda_equals_one_at_a_time():
    """Within a tolerance on CUDA (bit for bit on the CPU, test_lamo.py): batch size changes the
    cuBLAS kernels."""
    cfg = small_cfg("fp32")
    torch.manual_seed(0)
    model = lamo.build_model(cfg, HOPPER, "fp32").to(CUDA).eval()
    episodes = [(3600.0, 10_000 + i) for i in range(4)]
    zeros, ones = np.zeros(11), np.ones(11)
    batched, lengths = lamo.rollout(model, HOPPER, episodes, zeros, ones, 5, CUDA, 30)
    alone = [lamo.rollout(model, HOPPER, [e], zeros, ones, 5, CUDA, 30) for e in episodes]
    assert lengths.tolist() == [int(n[0]) for _, n in alone]
    np.testing.assert_allclose(batched, [r[0] for r, _ in alone], rtol=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_on_cuda_matches_eager(tiny_hdf5, tmp_path):
    """--compile, and --compile-mode reduce-overhead (the forward as CUDA graphs, replayed each
    step), give eager's losses (dropout off) over 6 steps."""
    losses = []
    for name, extra in (("eager", ()), ("compiled", ("--compile",)),
                        ("graphs", ("--compile", "--compile-mode", "reduce-overhead"))):
        out = tmp_path / name
        lamo.main(run_args(tiny_hdf5, out, "--steps", "6", "--precision", "fp32", *extra))
        losses.append(action_losses(out))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-3)


def test_sweep_gpus_runs_on_cuda(tiny_hdf5, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = sweep.main(["--env", "hopper-medium-v2", "--frac", "1", "--seed", "0", "--model", "dt",
                       "--name", "g", "--gpus", "0", "--", "--data", str(tiny_hdf5), "--steps", "4",
                       "--eval-every", "4", "--eval-episodes", "1", "--eval-max-steps", "20"])
    run = tmp_path / "sweeps" / "g" / "hopper-medium-v2_f1_dt_s0"
    log = (tmp_path / "sweeps" / "g" / "logs" / f"{run.name}.log").read_text()
    assert code == 0, log[-2000:]
    assert json.loads((run / "config.json").read_text())["device"] == "cuda"
    assert "device   cuda (" in log and (run / "summary.json").exists()


def test_a_pack_on_cuda_matches_its_runs_alone(tiny_hdf5, tmp_path):
    """pack.py on the GPU: two seeds in one pack against each seed alone, fp32, dropout off."""
    common = ["--steps", "10", "--precision", "fp32", "--log-every", "1"]
    lamo.main(run_args(tiny_hdf5, tmp_path / "pk", *common, "--seed", "0", "1"))
    for seed in (0, 1):
        lamo.main(run_args(tiny_hdf5, tmp_path / f"alone{seed}", *common, "--seed", str(seed)))
        np.testing.assert_allclose(action_losses(tmp_path / "pk" / f"s{seed}"),
                                   action_losses(tmp_path / f"alone{seed}"), rtol=1e-4)


def test_run_adamw_on_cuda_steps_as_torchs_fused_adamw():
    """pack.RunAdamW on the GPU (its per-run numbers through pinned memory, its steps on the CPU)
    against torch's fused AdamW, one per run, as a run alone steps: an lr and a weight decay per
    run, 20 steps, within fp32 rounding (the fused kernel orders its arithmetic otherwise); a
    tensor without a gradient untouched; and no host sync in its step."""
    start, stacks, packed, alone, _ = adamw_side_by_side(
        CUDA, [1e-3, 3e-4], [0.01, 0.1], [(64, 32), (32,), (1, 8)], 20, fused=True)
    for r in range(2):
        for i in range(2):
            torch.testing.assert_close(stacks[i][r], alone[r][i], rtol=1e-5, atol=1e-6)
    assert torch.equal(stacks[2], start[2])
    never_waits(packed.step)


def test_a_packs_memory_estimate_on_cuda(tiny_hdf5, tmp_path):
    """pack.out_of_memory's measurement on a real GPU, called on a pack of 3 that fits: each run
    costs more than nothing, and more than 3 runs fit (the estimate is not below a pack that
    ran). (The error path itself: test_pack.py, on the CPU.)"""
    args = run_args(tiny_hdf5, tmp_path / "x", "--steps", "2", "--batch-size", "256")
    cfg = lamo.resolve(lamo.parse_args(args)[0])
    members = [lamo.start_run(lamo.replace(cfg, seed=s), tmp_path / f"s{s}", False)
               for s in range(3)]
    p = pack.Pack(members)
    batches = [run.batcher.sample(cfg.batch_size) for run in members]
    pack.train_step(p, batches, None, torch.ones(3, dtype=torch.bool, device=CUDA), cfg, lamo,
                    False)
    message = str(pack.out_of_memory(p, batches, None, cfg, lamo, False))
    fits = int(message.split("about ")[1].split()[0])
    per_run = float(message.split("measured: ")[1].split()[0])
    assert fits > 3 and per_run > 0, message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_pack_with_dropout_on_cuda(tiny_hdf5, tmp_path):
    """Dropout on, bf16 (what a LaMo pack trains with): each run's keep-masks drawn on the GPU by
    its own generator (pack.drop_masks), so seeds 0, 1, 0 leave runs 0 and 2 equal within
    rounding and run 1 not; and the compiled pack, one graph, gives the eager pack's losses, as
    must CUDA graphs of it (--compile-mode reduce-overhead: 3.5x for a run alone on an H100; for
    a pack, new here, not yet run on a GPU)."""
    common = ["--steps", "6", "--log-every", "1", "--dropout", "0.1", "--lora-dropout", "0.1"]
    members = []
    for i, seed in enumerate((0, 1, 0)):
        cfg = lamo.resolve(lamo.parse_args(run_args(tiny_hdf5, tmp_path / f"r{i}", *common,
                                                    "--seed", str(seed)))[0])
        members.append(lamo.start_run(cfg, tmp_path / f"r{i}", False))
    pack.train(members, lamo)
    np.testing.assert_allclose(action_losses(tmp_path / "r2"), action_losses(tmp_path / "r0"),
                               rtol=1e-5)
    assert action_losses(tmp_path / "r1") != action_losses(tmp_path / "r0")
    for name, extra in (("eager", ()), ("compiled", ("--compile",)),
                        ("graphs", ("--compile", "--compile-mode", "reduce-overhead"))):
        lamo.main(run_args(tiny_hdf5, tmp_path / name, *common, "--seed", "0", "1", *extra))
    for seed in ("s0", "s1"):
        for name in ("compiled", "graphs"):
            np.testing.assert_allclose(action_losses(tmp_path / name / seed),
                                       action_losses(tmp_path / "eager" / seed), rtol=2e-2)
