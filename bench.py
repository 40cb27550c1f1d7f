"""Speed of lamo's hot paths, all on one device, against the way the official code does them.

    python bench.py                 # CPU: a reduced run, under 3 minutes on 2 cores
    python bench.py --device cuda   # GPU: more steps, the LaMo model in the evaluation too

(a) training steps/s for LaMo on GPT-2 small (B=64, K=20), with and without the (2, 1024) LM batch;
(b) evaluation env-steps/s: the same episodes batched vs one at a time (the official code's way),
    with what bounds the gain: the model forward per episode at both batch sizes, and the same env
    steps taken with no model at all;
(c) batch sampling: our vectorised gather vs a per-sample loop in the style of kzl DT's get_batch;
(d) peak memory. Random weights and a synthetic dataset of hopper-medium's size: nothing downloaded.
Prints a table and writes it as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import gpu_report
import lamo
import pack
from measure import (first_line, free, measured, run_steps_per_s, saved_gib, sync, timed,
                     traffic_gib)
from data import TrajectoryBatcher, progress
from gpt2_loader import VOCAB_SIZE
from tasks import get_task
from workers import Envs, default_workers

HOPPER = get_task("hopper-medium-v2")
OBS_DIM = HOPPER.obs_shape[0]


def synthetic_hopper(n_traj=2186, n_steps=999_906, seed=0) -> list[dict]:
    """Random trajectories with hopper-medium-v2's count, total steps and dimensions."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n_steps), n_traj - 1, replace=False))
    lengths = np.diff(np.concatenate([[0], cuts, [n_steps]]))
    return [{"observations": rng.standard_normal((n, OBS_DIM), dtype=np.float32),
             "actions": rng.uniform(-1, 1, (n, HOPPER.act_dim)).astype(np.float32),
             "rewards": rng.uniform(0, 3, n).astype(np.float32), "terminals": np.zeros(n, bool)}
            for n in lengths]


def kzl_get_batch(trajs, B, K, max_ep_len, scale, mean, std, rng):
    """The official code's batch builder, condensed: one Python iteration per sample, each
    re-summing the returns-to-go over the rest of its trajectory and concatenating the padding."""
    lengths = np.array([len(t["rewards"]) for t in trajs])
    picks = rng.choice(len(trajs), size=B, p=lengths / lengths.sum())
    s, a, r, ts, m = [], [], [], [], []
    for i in picks:
        t = trajs[i]
        si = rng.integers(0, len(t["rewards"]))
        obs, act = t["observations"][si:si + K], t["actions"][si:si + K]
        n = len(obs)
        rtg = np.cumsum(t["rewards"][si:][::-1])[::-1][:n]
        s.append(np.concatenate([np.zeros((K - n, obs.shape[1])), (obs - mean) / std]))
        a.append(np.concatenate([np.full((K - n, act.shape[1]), -10.0), act]))
        r.append(np.concatenate([np.zeros(K - n), rtg / scale])[:, None])
        steps = np.minimum(np.arange(si, si + n), max_ep_len - 1)
        ts.append(np.concatenate([np.zeros(K - n), steps]))
        m.append(np.concatenate([np.zeros(K - n), np.ones(n)]))
    return [torch.tensor(np.stack(x), dtype=torch.float32) for x in (s, a, r, ts, m)]


def new_model(cfg, device):
    """A freshly built model for cfg at its default precision, with its AdamW. -> (model, params,
    optimizer)"""
    model = lamo.build_model(cfg, HOPPER, lamo.resolve_precision(cfg.precision, device)).to(device)
    return (model, *lamo.make_optimizer(model, cfg, device))


def bench_saved(cfg, device, batcher) -> dict:
    """What each run of a LaMo pack keeps for its backward, in GiB (saved_gib; a pack of 2 less a
    pack of 1): for the action forward (B=64, K=20) and for the (2, 1024) LM batch's, at bf16, a
    GPU's precision. Counted, not timed, so the same on any device: the pack's attention is
    written out (pack.RunDropout), not a device's SDPA kernel."""
    cfg = replace(cfg, lm_coef=0.1, precision="bf16")
    block = lm_block(cfg, device)

    def packed(R) -> tuple:
        p = pack_step(cfg, device, batcher, R)[0]
        p.template.train()
        held = [*p.stacked.values(), *p.shared.values(), *p.template.parameters()]
        x = pack.stacked([batcher.sample(cfg.batch_size) for _ in range(R)])   # (R, B, K, ...)
        p.seed_dropout()
        return (saved_gib(lambda: p.forward(x.states, x.actions, x.rtg, x.timesteps, x.mask),
                          held),
                saved_gib(lambda: p.lm_losses(lamo.lm_loss, torch.stack([block] * R),
                                              p.template.precision), held))
    one = packed(1)
    free(device)
    two = packed(2)
    return {"saved_pack_action_gib_per_run": two[0] - one[0],
            "saved_pack_lm_gib_per_run": two[1] - one[1]}


def bench_traffic(cfg, device, batcher, sizes=(2, 4)) -> dict:
    """GiB that a compiled LaMo training step's kernels read and write (measure.traffic_gib), at
    bf16, a GPU's precision: one run alone (B=64, K=20) and packs of `sizes` runs, whose slope is
    what each run of a pack adds (a pack of 1 is left out: vmap over one run fuses otherwise).
    A big pack's step on a GPU is bound by this traffic: over the card's bandwidth it is the
    floor of the step's time, and so a ceiling on run-steps/s (README, "Packs")."""
    cfg = replace(cfg, compile=True, precision="bf16")
    out = {}
    out["traffic_lamo_1_gib"], out["traffic_lamo_1_matmul_gib"] = traffic_gib(
        run_step(cfg, device, batcher))
    for R in sizes:
        free(device)
        out[f"traffic_pack_lamo_{R}_gib"], out[f"traffic_pack_lamo_{R}_matmul_gib"] = (
            traffic_gib(pack_step(cfg, device, batcher, R)[1]))
    first, last = min(sizes), max(sizes)
    for part in ("", "_matmul"):       # what each run adds: the slope from the first to the last
        gib = lambda R: out[f"traffic_pack_lamo_{R}{part}_gib"]
        out[f"traffic_pack_lamo{part}_gib_per_run"] = (gib(last) - gib(first)) / (last - first)
    return out


def lm_block(cfg, device) -> torch.Tensor:
    """A random LM batch of cfg's shape, (lm_batch, lm_seq_len + 1) token ids."""
    return torch.randint(0, VOCAB_SIZE, (cfg.lm_batch, cfg.lm_seq_len + 1), device=device)


def run_step(cfg, device, batcher):
    """A function that trains one freshly built run (seed 0) one step with lamo.train_step, its
    forward compiled with cfg.compile, with the LM batch when cfg.lm_coef: pack_step's twin for a
    run alone."""
    torch.manual_seed(0)
    model, params, opt = new_model(cfg, device)
    fwd = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    block = lm_block(cfg, device) if cfg.lm_coef else None
    return lambda: lamo.train_step(fwd, model, opt, params, batcher.sample(cfg.batch_size),
                                   block, cfg, False)


def train_steps_per_s(cfg, device, batcher, steps, warmup, busy: dict | None = None) -> float:
    """Steps/s of lamo.train_step on one freshly built model, freed on return (so the next variant
    is measured without this one's memory); with a dict `busy`, device_busy's figures into it."""
    return run_steps_per_s(run_step(cfg, device, batcher), 1, steps, device, warmup, busy)


def bench_train(cfg, dt_cfg, device, batcher, steps) -> dict:
    """Steps/s of lamo.train_step: LaMo (GPT-2 small shape, LoRA r=16, MLP embeddings) without and
    with the LM batch, and the DT preset, each with its peak GPU memory. A GPU gets warm-up steps
    (cuBLAS start-up, compilation); a CPU none: at ~15-50 s a step there, one more step each would
    push the whole benchmark past 3 minutes, and a CPU step has little to warm up."""
    warmup = (2 if cfg.compile else 1) if device.type == "cuda" else 0
    out = {"train_warmup_steps": warmup}
    if device.type == "cuda":           # what bounds LaMo's step (on a CPU: 3 more 20-s steps)
        out["busy_train_steps_per_s"] = {}
    for key, c in (("", cfg), ("_with_lm", replace(cfg, lm_coef=0.1)), ("_dt", dt_cfg)):
        out["train_steps_per_s" + key], out["train_peak_gpu_gb" + key] = measured(
            lambda: train_steps_per_s(c, device, batcher, steps, warmup,
                                      out.get("busy_train_steps_per_s" + key)), device)
    return out


def pack_run_steps_per_s(cfg, device, batcher, R, steps, warmup, busy: dict | None = None
                         ) -> float:
    """Run-steps/s of a pack of R runs (R x its steps/s), each on its own batch; with a dict
    `busy`, device_busy's figures for one step of the pack into it."""
    _, step = pack_step(cfg, device, batcher, R)
    return run_steps_per_s(step, R, steps, device, warmup, busy)


ATTENTION = {"math": "MATH", "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION"}


def bench_pack_attention(cfg, name, device, batcher, R, steps, warmup, kernels) -> dict:
    """Run-steps/s of one pack of R runs with its attention through each of SDPA's kernels (set
    in pack.ATTENTION; a pack's own is written out, pack.RunDropout), or the error a kernel gives
    under vmap. Without dropout: SDPA cannot take a run's own masks."""
    from torch.nn.attention import SDPBackend
    _, step = pack_step(replace(cfg, dropout=0.0, lora_dropout=0.0), device, batcher, R)
    out, default = {}, pack.ATTENTION
    for kernel in kernels:
        pack.ATTENTION = [getattr(SDPBackend, ATTENTION[kernel])]
        key = f"packattn_{kernel}_{name}_{R}"
        try:
            out[key] = R / timed(step, steps, device, warmup=warmup)
        except RuntimeError as e:
            out[key + "_error"] = first_line(e)
        finally:
            pack.ATTENTION = default
    return out


def pack_step(cfg, device, batcher, R):
    """A pack of R runs and a function that trains it one step, each run on its own batch. Every
    run starts from the same seed, so with --pretrained none the frozen body is one shared copy,
    as OpenAI's weights would be (timing only; real seeds differ). -> (pack, step)"""
    members = []
    for seed in range(R):
        torch.manual_seed(0)
        model, params, opt = new_model(cfg, device)
        members.append(pack.Run(replace(cfg, seed=seed), HOPPER, None, device, model, params, opt,
                                batcher, None, None, {}))
    p = pack.Pack(members)
    alive = torch.ones(R, dtype=torch.bool, device=device)
    lm_blocks = [lm_block(cfg, device)] * R if cfg.lm_coef else None   # lambda > 0: each run's
    step = lambda: pack.train_step(p, [batcher.sample(cfg.batch_size) for _ in range(R)],
                                   lm_blocks, alive, cfg, lamo, False)
    return p, step


def bench_packs(lamo_cfg, dt_cfg, device, batcher, sizes, steps, warmup, out: dict,
                save=lambda: None) -> dict:
    """Run-steps/s of packs of each size for LaMo (GPT-2 small's shape) and the DT preset, and
    of LaMo with the (2, 1024) LM batch (Kitchen's lambda = 0.1; "lamo+lm") up to 4 runs, into
    out (save() after each: a section cut short by its time limit keeps the rows before it);
    R = 1 is one run alone through the pack's path, and the single-run rows above are one run
    per process."""
    lm_sizes = [R for R in sizes if R <= 4]      # two points of its memory line, in seconds
    if device.type == "cuda":       # what bounds the biggest LaMo packs' steps (a CPU's: compute)
        out.update({f"busy_pack_{name}_{max(Rs)}": {} for name, Rs in (("lamo", sizes),
                                                                     ("lamo+lm", lm_sizes)) if Rs})
    with_lm = replace(lamo_cfg, lm_coef=0.1)
    for name, cfg, runs in (("lamo", lamo_cfg, sizes), ("dt", dt_cfg, sizes),
                            ("lamo+lm", with_lm, lm_sizes)):
        for R in runs:
            out[f"pack_{name}_{R}"], out[f"pack_{name}_{R}_peak_gpu_gb"] = measured(
                lambda: pack_run_steps_per_s(cfg, device, batcher, R, steps, warmup,
                                             out.get(f"busy_pack_{name}_{R}")), device)
            save()
    return out


def bench_compiled(cfg, device, batcher, R, steps, out: dict, save=lambda: None) -> dict:
    """--compile's gain: LaMo's steps/s alone and run-steps/s of a pack of R LaMo runs with the
    training forward compiled (two untimed warm-up steps pay the compilation), each with its peak
    GPU memory, into out (save() after each: a compilation cut short keeps the rows before it).
    Against the eager rows of the same bench, it says whether fusing the pack's written-out
    attention and cutting a run's kernel launches is worth the compile."""
    cfg = replace(cfg, compile=True)
    busy = lambda key: out.setdefault(f"busy_{key}", {})         # device_busy's, for each row
    out["compiled_lamo_1"], out["compiled_lamo_1_peak_gpu_gb"] = measured(
        lambda: train_steps_per_s(cfg, device, batcher, steps, 2, busy("compiled_lamo_1")),
        device)
    save()
    out[f"compiled_lamo_{R}"], out[f"compiled_lamo_{R}_peak_gpu_gb"] = measured(
        lambda: pack_run_steps_per_s(cfg, device, batcher, R, steps, 2,
                                     busy(f"compiled_lamo_{R}")), device)
    save()
    # --compile-mode reduce-overhead: the forward's kernels as one CUDA graph, the remedy for a
    # launch-bound step (a run alone: 3.5x eager on an H100); for a pack not yet run on a GPU, so
    # a failure is a row, not the end of the bench. The pack first, the new row: a step that its
    # time limit cuts short (gpu_check.sh) keeps the rows measured before.
    graphs = replace(cfg, compile_mode="reduce-overhead")
    for n, rate in ((R, lambda: pack_run_steps_per_s(graphs, device, batcher, R, steps, 3,
                                                     busy(f"cudagraphs_lamo_{R}"))),
                    (1, lambda: train_steps_per_s(graphs, device, batcher, steps, 3,
                                                  busy("cudagraphs_lamo_1")))):
        try:
            out[f"cudagraphs_lamo_{n}"], out[f"cudagraphs_lamo_{n}_peak_gpu_gb"] = measured(
                rate, device)
        except Exception as e:          # not only RuntimeError: CUDA graph trees also assert
            out[f"cudagraphs_lamo_{n}_error"] = first_line(e)
        save()
    return out


SECTIONS = ("train", "packs", "eval", "sampling")


def configs(compile: bool) -> dict:
    """The benchmark's two models at their default precision: LaMo on GPT-2 small's shape (random
    weights, LoRA, MLP embeddings) and the DT preset."""
    return {"lamo": lamo.resolve(lamo.Config(pretrained="none", embed="mlp", compile=compile)),
            "dt": lamo.resolve(lamo.Config(model="dt", compile=compile))}


def bench_processes(model: str, device, counts, window_s: float) -> dict:
    """Run-steps/s of N single-run processes training at once on one device, each with cores // N
    threads, the way `sweep.py --jobs N --gpus 0` shares a GPU: the baseline a pack must beat
    where one process leaves the GPU idle between kernel launches. Each process times its steps
    over the same window_s seconds, once all N have warmed up."""
    out = {}
    cores = len(os.sched_getaffinity(0))
    for n in counts:
        with tempfile.TemporaryDirectory() as barrier:
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
            code = (f"import bench; bench.process_worker({model!r}, {str(device)!r}, {barrier!r}, "
                    f"{n}, {window_s})")
            # Output to files, not pipes: polled, a pipe that fills would stall its process.
            logs = [Path(barrier, f"log_{i}.txt") for i in range(n)]
            procs = []
            for log in logs:
                with open(log, "w") as f:
                    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                                  cwd=Path(__file__).parent, stdout=f,
                                                  stderr=subprocess.STDOUT))
            while any(p.poll() is None for p in procs):
                if any(p.poll() for p in procs):             # one failed: the rest would wait
                    for p in procs:
                        p.kill()
                time.sleep(0.1)
            outs = [log.read_text() for log in logs]
        failed = [out for p, out in zip(procs, outs) if p.returncode]
        if failed:
            raise RuntimeError(f"bench: one of {n} training processes failed:\n{failed[0][-2000:]}")
        rates = [json.loads([line for line in out.splitlines() if line.startswith('{"steps"')][-1])
                 for out in outs]                  # stderr shares the file: find the JSON line
        out[f"procs_{model}_{n}"] = sum(r["steps"] / r["seconds"] for r in rates)
    return out


def process_worker(model: str, device: str, barrier: str, n: int, window_s: float):
    """One of bench_processes' processes: one run's training steps (two untimed), counted over
    window_s seconds from when all n processes are ready. Prints {"steps", "seconds"} as JSON."""
    device = lamo.pick_device(device)
    cfg = configs(False)[model]
    batcher = TrajectoryBatcher(synthetic_hopper(200, 100_000), 20, 1000, 1000.0, seed=0,
                                device=device)
    net, params, opt = new_model(cfg, device)
    step = lambda: lamo.train_step(net, net, opt, params, batcher.sample(cfg.batch_size), None,
                                   cfg, False)
    for _ in range(2):
        step()
    sync(device)
    Path(barrier, f"ready_{os.getpid()}").touch()
    deadline = time.time() + 600
    while len(list(Path(barrier).glob("ready_*"))) < n:
        if time.time() > deadline:
            sys.exit(f"bench: {n} processes were to start together; the others never got ready")
        time.sleep(0.01)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < window_s:
        step()
        steps += 1
    sync(device)
    print(json.dumps({"steps": steps, "seconds": time.perf_counter() - t0}))


def hopper_episodes(n: int) -> list[tuple[float, int]]:
    """n evaluation episodes (target, env seed), the targets taken in turn."""
    targets = [float(t) for t in HOPPER.targets]
    return [(targets[i % len(targets)], 10_000 + i) for i in range(n)]


def still_model(cfg, device):
    """A random model for evaluations whose action head is zeroed, so its hopper does nothing and
    lasts ~140 steps; LoRA merged, as lamo.evaluate does."""
    torch.manual_seed(0)
    model = new_model(cfg, device)[0].eval()
    with torch.no_grad():
        for p in model.predict_action[-2 if cfg.embed == "linear" else -1].parameters():
            p.zero_()
    model.gpt.merge()
    return model


def bench_pack_eval(cfg, device, batcher, R, max_steps) -> dict:
    """Env-steps/s of a pack's evaluation (pack.evaluate): R runs x the task's targets x
    episodes in one batched rollout, each row through its own run's weights, the envs in
    lamo.eval_envs's worker processes. Every run's action head is zeroed, as in still_model, so
    its hopper lasts ~140 steps. -> also the seconds it took, to set against R evaluations of one
    run at a time."""
    p, _ = pack_step(cfg, device, batcher, R)
    head = len(p.template.predict_action) + (-2 if cfg.embed == "linear" else -1)
    with torch.no_grad():
        for name, stack in p.stacked.items():
            if name.startswith(f"predict_action.{head}."):
                stack.zero_()
    run_cfg = replace(p.runs[0].cfg, eval_max_steps=max_steps)
    with lamo.eval_envs(run_cfg, HOPPER, R) as envs:
        pack.evaluate(p, [0], replace(run_cfg, eval_episodes=1), lamo, envs)    # untimed warm-up
        t0 = time.perf_counter()
        evals = pack.evaluate(p, list(range(R)), run_cfg, lamo, envs)
        seconds = time.perf_counter() - t0
    n_targets = len(lamo.parse_targets(run_cfg.targets))
    steps = sum(e["length_mean"] * run_cfg.eval_episodes for ev in evals for e in ev.values())
    return {f"pack_eval_{R}_episodes": R * n_targets * run_cfg.eval_episodes,
            f"pack_eval_{R}_s": seconds, f"pack_eval_{R}_env_steps_per_s": steps / seconds}


def bench_eval(cfg, device, n_episodes, max_steps, n_sequential) -> dict:
    """Env-steps/s of lamo.rollout for n_episodes at once vs the first n_sequential of them one at
    a time (a rate, so a subset measures it; on a GPU one at a time costs ~1 minute per 80 LaMo
    episodes). The action head is zeroed, so episodes last as long as a hopper that does nothing
    (~140 steps)."""
    model = still_model(cfg, device)
    episodes = hopper_episodes(n_episodes)
    zeros, ones = np.zeros(OBS_DIM), np.ones(OBS_DIM)
    run = lambda eps, envs=None, steps=max_steps: lamo.rollout(
        model, HOPPER, eps, zeros, ones, cfg.context_len, device, steps, envs)
    with Envs(HOPPER, 1) as envs:
        run(episodes, envs, 5)     # untimed: the envs made, the device's kernels for this batch
        t0 = time.perf_counter()
        returns, lengths = run(episodes, envs)
        t_batched = time.perf_counter() - t0
    n_seq = min(n_sequential, n_episodes)
    t0 = time.perf_counter()
    seq = [run([e])[0][0] for e in progress(episodes[:n_seq], desc="eval one at a time")]
    t_seq = time.perf_counter() - t0
    assert np.array_equal(returns[:n_seq], np.array(seq)), \
        "batched and one-at-a-time evaluation disagree"
    t_env, env_returns = time_env_alone(max_steps, episodes, lengths)
    assert np.allclose(env_returns, returns), "the env-alone run did not replay the same episodes"
    steps = int(lengths.sum())
    return {"eval_episodes": n_episodes, "eval_env_steps": steps,
            "eval_batched_env_steps_per_s": steps / t_batched,
            "eval_sequential_episodes": n_seq,
            "eval_sequential_env_steps_per_s": int(lengths[:n_seq].sum()) / t_seq,
            "eval_env_alone_env_steps_per_s": steps / t_env,
            "forward_ms_per_episode_batch_1": time_forward(model, 1, cfg.context_len, device) * 1e3,
            "forward_ms_per_episode_batched":
                time_forward(model, n_episodes, cfg.context_len, device) * 1e3}


def bench_eval_workers(cfg, device, n_episodes, max_steps, counts) -> dict:
    """Env-steps/s of the batched evaluation with its envs stepped by 1 and by N worker processes
    (--eval-workers); returns checked equal. A worker pool starts once per run, so its start-up
    is timed apart."""
    model = still_model(cfg, device)
    episodes = hopper_episodes(n_episodes)
    zeros, ones = np.zeros(OBS_DIM), np.ones(OBS_DIM)
    out, first = {}, None
    for n in counts:
        t0 = time.perf_counter()
        with Envs(HOPPER, n) as envs:
            envs.reset(max_steps, [seed for _, seed in episodes])   # the workers have started
            out[f"eval_workers_{n}_start_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            returns, lengths = lamo.rollout(model, HOPPER, episodes, zeros, ones, cfg.context_len,
                                            device, max_steps, envs)
            out[f"eval_workers_{n}_env_steps_per_s"] = lengths.sum() / (time.perf_counter() - t0)
        first = returns if first is None else first
        assert np.array_equal(first, returns), f"{n} workers: other returns than {counts[0]}"
    return out


@torch.inference_mode()
def time_forward(model, n, K, device) -> float:
    """Seconds per episode of one evaluation forward over n full K-step windows: what batching
    amortises."""
    s, a, r = torch.randn(n, K, OBS_DIM), torch.randn(n, K, HOPPER.act_dim), torch.randn(n, K, 1)
    args = [x.to(device) for x in (s, a, r, torch.arange(K).expand(n, -1))]
    reps = max(3, 200 // n)
    return timed(lambda: model(*args), reps, device) / n       # the model autocasts its body itself


def time_env_alone(max_steps, episodes, lengths) -> tuple[float, np.ndarray]:
    """Seconds to step the same episodes with the same (zero) actions and no model: the MuJoCo floor
    under any evaluation, and so the ceiling on what batching the model can gain. -> (s, returns)"""
    envs = [HOPPER.make_env(max_steps) for _ in episodes]
    zero, returns = np.zeros(HOPPER.act_dim, np.float32), np.zeros(len(episodes))
    t0 = time.perf_counter()
    for i, (env, (_, seed), n) in enumerate(zip(envs, episodes, lengths)):
        env.reset(seed=seed)
        for _ in range(n):
            returns[i] += env.step(zero)[1]
    return time.perf_counter() - t0, returns


def bench_atari_sampling(device, n_frames=40_000, B=128, K=30, reps=3) -> dict:
    """ms per Atari batch of the official run.sh's shape (B=128, K=30, 4 stacked frames): our
    FrameStackBatcher against AtariBuffer.sample's loop over samples and steps (experiment-atari/
    buffer.py), from the same seed, so over the same windows, checked equal on unpadded steps. A
    synthetic replay of DQN-Replay's frame shape and Breakout-like trajectory lengths, but 40k
    frames (280 MB) instead of 1M (7 GB), in memory; both read the same uint8 array (the official
    code holds
    every frame as float32 on the device, so its batch is float32; ours stays uint8, which the model
    divides by 255 on the device)."""
    from atari import AtariReplay, FrameStackBatcher
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n_frames, 84, 84), dtype=np.uint8)
    terminal = np.zeros(n_frames, np.uint8)
    terminal[np.minimum(np.cumsum(rng.integers(20, 2000, n_frames // 20)), n_frames) - 1] = 1
    replay = AtariReplay(frames, rng.integers(0, 4, n_frames), rng.integers(0, 2, n_frames),
                         terminal, "synthetic")
    batcher = FrameStackBatcher(replay, np.arange(len(replay)), K, 4096, 1.0, seed=0, device=device)
    obs = torch.from_numpy(frames).to(device)
    sp_all, len_all, S = replay.starts, replay.lengths, 4

    def official(rng):                      # AtariBuffer.sample's states, condensed
        traj = rng.choice(np.arange(len(len_all)), B, replace=True, p=len_all / len_all.sum())
        offset = np.floor(rng.random(B) * (len_all[traj] - K)).astype(np.int32).clip(min=0)
        states = []
        for traj_sp, sp, off in zip(sp_all[traj], sp_all[traj] + offset, offset):
            steps = []
            for i in range(K):
                if off < S and S - off - i - 1 >= 0:
                    pad = torch.zeros((S - off - i - 1, 84, 84), dtype=obs.dtype, device=device)
                    steps.append(torch.cat((pad, obs[traj_sp:sp + i + 1]), dim=0))
                else:
                    steps.append(obs[sp + i - S + 1:sp + i + 1])
            states.append(torch.stack(steps))
        return torch.stack(states).float()

    got, want = batcher.sample(B), official(np.random.default_rng(0))
    m = got.mask.bool()
    assert torch.equal(got.states[m].float(), want[m]), \
        "the Atari sampler and the official loop disagree"
    loop_rng = np.random.default_rng(0)
    return {"atari_sample_loop_ms": timed(lambda: official(loop_rng), reps, device) * 1e3,
            "atari_sample_vectorised_ms": timed(lambda: batcher.sample(B), reps, device) * 1e3}


def profile_tables(cfg, device, batcher, n_episodes, pack_runs=0, top=15):
    """torch.profiler's top `top` operators, by self time on the device (CUDA) or the CPU, of one
    LaMo training step (after a warm-up step), of one batched evaluation forward, and of one step
    of a pack of pack_runs LaMo runs (none if 0); each also by input shape, from a second profile
    with record_shapes, which holds memory: the peak RSS of a process that profiled one step of
    a pack of 8 DT-preset runs (B=64) on the CPU was 3.3 GB with it, 1.9 GB without it, and a
    pack of 16 LaMo runs (25 GB alone) ran an H100's 80 GB out. So the pack's by-shape table is
    of a pack of at most 4 runs. Yields each table as it is made."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    free(device)
    torch.manual_seed(0)
    model, params, opt = new_model(cfg, device)
    step = lambda: lamo.train_step(model, model, opt, params, batcher.sample(cfg.batch_size), None,
                                   cfg, False)
    K = cfg.context_len
    window = [x.to(device) for x in (torch.randn(n_episodes, K, OBS_DIM),
                                     torch.randn(n_episodes, K, HOPPER.act_dim),
                                     torch.randn(n_episodes, K, 1),
                                     torch.arange(K).expand(n_episodes, -1))]
    both = ("top", "by shape")
    packs = ({pack_runs: ("top",), 4: ("by shape",)} if pack_runs > 4
             else {pack_runs: both} if pack_runs else {})
    sections = [("one training step, B=64 K=20", step, True, both),    # (title, fn or a pack's
                (f"one evaluation forward, {n_episodes} episodes",       # runs, training?,
                 lambda: model(*window), False, both)]                   # its tables)
    sections += [(f"one training step of a pack of {R} runs, B=64 K=20 each", R, True, tables)
                 for R, tables in packs.items()]
    for name, fn, train, tables in sections:
        free(device)                    # a pack is built in its turn, the one before it freed
        if isinstance(fn, int):
            fn = pack_step(cfg, device, batcher, fn)[1]
        model.train(train)
        for table in tables:
            with torch.inference_mode(not train):
                fn()                                                     # warm-up
                sync(device)
                with profile(activities=activities, record_shapes=table == "by shape") as prof:
                    fn()
                    sync(device)
            # by shape: which tensors the top operators move, where copies and adds come from
            yield (f"## {name}, {table} (top {top} by {sort})\n\n"
                   + prof.key_averages(group_by_input_shape=table == "by shape").table(
                       sort_by=sort, row_limit=top) + "\n\n")
        del fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS,
                   help="what to measure (default: all four); --compiled and --processes add "
                        "theirs")
    p.add_argument("--train-steps", type=int, default=None,
                   help="timed steps per training variant (default: cpu 1, gpu 50 after warm-up)")
    p.add_argument("--eval-model", choices=("lamo", "dt"), default=None,
                   help="model in the evaluation benchmark (default: cpu dt, gpu lamo; GPT-2 small "
                        "is ~10 s per batched forward on 2 CPU cores)")
    p.add_argument("--eval-episodes", type=int, default=80)
    p.add_argument("--eval-sequential", type=int, default=None,
                   help="episodes timed one at a time (default: cpu all, gpu 16)")
    p.add_argument("--eval-max-steps", type=int, default=None,
                   help="time limit of the episodes (default: cpu 100, gpu 1000)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--profile", metavar="FILE", help="also write torch.profiler's top operators of "
                                                     "one training step and one evaluation forward")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                   help="also LaMo training steps/s at these batch sizes: how much of the GPU one "
                        "B=64 run leaves idle, the headroom a pack of runs would fill")
    p.add_argument("--packs", type=int, nargs="*", default=None,
                   help="pack sizes R for run-steps/s of packs (default: gpu 1 4 8 16, cpu none; "
                        "a LaMo step is ~20 s per run on 2 CPU cores)")
    p.add_argument("--pack-attention", nargs="*", default=[], choices=sorted(ATTENTION),
                   help="also the largest pack, without dropout, with its attention through "
                        "each of these SDPA kernels (a pack's own attention is written out: "
                        "pack.RunDropout)")
    p.add_argument("--compiled", type=int, metavar="R", default=0,
                   help="also LaMo alone and a pack of R LaMo runs with --compile (a GPU compiles "
                        "each in about a minute)")
    p.add_argument("--pack-eval", type=int, default=0, metavar="R",
                   help="also the evaluation of a pack of R LaMo runs, every run's episodes in "
                        "one rollout")
    p.add_argument("--processes", type=int, nargs="*", default=[], metavar="N",
                   help="also run-steps/s of N LaMo training processes at once on the device, "
                        "for each N (the baseline for packs)")
    p.add_argument("--eval-workers", type=int, nargs="*", default=None,
                   help="worker-process counts for the evaluation's envs (default: 1 and the "
                        "cores available, or 2)")
    p.add_argument("--saved", action="store_true",
                   help="also the GiB each run of a LaMo pack keeps for its backward, for the "
                        "action and the LM batch (counted, the same on any device)")
    p.add_argument("--traffic", action="store_true",
                   help="also the GiB that a compiled LaMo step's kernels move, alone and in "
                        "packs of 2 and 4 (inductor's count; about 4 minutes on 2 CPU cores)")
    p.add_argument("--out", default="bench.json")
    a = p.parse_args(argv)
    device = lamo.pick_device(a.device)
    gpu = device.type == "cuda"
    steps = a.train_steps or (50 if gpu else 1)
    max_steps = a.eval_max_steps or (1000 if gpu else 100)
    cfgs = configs(a.compile)
    lamo_cfg, dt_cfg = cfgs["lamo"], cfgs["dt"]
    eval_cfg = cfgs[a.eval_model or ("lamo" if gpu else "dt")]
    name = lamo.device_name(device) if gpu else platform.processor() or "cpu"
    print(f"device {name} ({device}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    trajs = synthetic_hopper()
    batcher = TrajectoryBatcher(trajs, 20, 1000, 1000.0, seed=0, device=device)
    res = {"device": name if gpu else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "train_steps_timed": steps, "compile": a.compile,
           "precision": lamo.resolve_precision(lamo_cfg.precision, device),
           "eval_model": "lamo" if eval_cfg is lamo_cfg else "dt", "eval_max_steps": max_steps,
           "sections": list(a.sections)}
    n_seq = a.eval_sequential or (16 if gpu else a.eval_episodes)
    warmup = (2 if a.compile else 1) if gpu else 0
    sizes = a.packs if a.packs is not None else ([1, 4, 8, 16] if gpu else [])
    rows = []                               # (label, value) of the printed table, as measured

    def save():                             # after each section: a run cut short keeps its figures
        tmp = a.out + ".part"               # and a stop mid-write never leaves half a file
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)

    gb = lambda k: f"{res[k]:.2f}" if res.get(k) is not None else "n/a"
    if "train" in a.sections:               # (a) training steps/s, each with its peak GPU memory
        res.update(bench_train(lamo_cfg, dt_cfg, device, batcher, steps))
        res["train_steps_per_s_by_batch"] = {
            B: train_steps_per_s(replace(lamo_cfg, batch_size=B), device, batcher, steps, warmup)
            for B in a.batch_sizes}
        save()
        cold = " (first step, no warm-up)" if warmup == 0 else ""
        rows += [(f"training steps/s, LaMo gpt2-small, B=64 K=20, lambda=0, "
                  f"{res['precision']}{cold}", f"{res['train_steps_per_s']:.3f}"),
                 ("  peak GPU memory GB", gb("train_peak_gpu_gb")),
                 ("training steps/s, same + (2, 1024) LM batch",
                  f"{res['train_steps_per_s_with_lm']:.3f}"),
                 ("  peak GPU memory GB", gb("train_peak_gpu_gb_with_lm")),
                 ("training steps/s, DT preset (3 layers, d=128), B=64 K=20",
                  f"{res['train_steps_per_s_dt']:.3f}"),
                 ("  peak GPU memory GB", gb("train_peak_gpu_gb_dt")),
                 *((f"training steps/s, LaMo, B={B} (x{B / 64:g} the tokens)", f"{v:.3f}")
                   for B, v in res["train_steps_per_s_by_batch"].items())]
    if "packs" in a.sections:               # run-steps/s of packs
        bench_packs(lamo_cfg, dt_cfg, device, batcher, sizes, steps, warmup, res, save)
        for key, cfg in cfgs.items():
            if a.pack_attention and sizes:
                res.update(measured(lambda: bench_pack_attention(
                    cfg, key, device, batcher, max(sizes), steps, warmup, a.pack_attention),
                    device)[0])
                save()
        rows += [(f"run-steps/s, pack of {R} {key} runs", f"{res[f'pack_{key}_{R}']:.3f}")
                 for key in ("lamo", "dt", "lamo+lm") for R in sizes if f"pack_{key}_{R}" in res]
        rows += [(f"run-steps/s, pack of {k.split('_')[3]} {k.split('_')[2]} runs, attention: "
                  f"{k.split('_')[1]}", f"{v:.3f}" if not k.endswith("_error") else "error")
                 for k, v in res.items() if k.startswith("packattn_")]
    if "eval" in a.sections:                # (b) evaluation
        evaluation, res["eval_peak_gpu_gb"] = measured(
            lambda: bench_eval(eval_cfg, device, a.eval_episodes, max_steps, n_seq), device)
        res.update(evaluation)
        save()
        counts = a.eval_workers or [1, max(2, default_workers())]
        res.update(bench_eval_workers(eval_cfg, device, a.eval_episodes, max_steps, counts))
        res["ratio_eval_batched_vs_sequential"] = (res["eval_batched_env_steps_per_s"]
                                                   / res["eval_sequential_env_steps_per_s"])
        res["ratio_eval_ceiling"] = (res["eval_env_alone_env_steps_per_s"]
                                     / res["eval_sequential_env_steps_per_s"])
        save()
        rows += [(f"eval env-steps/s, {a.eval_episodes} episodes batched ({res['eval_model']})",
                  f"{res['eval_batched_env_steps_per_s']:.0f}"),
                 (f"eval env-steps/s, the first {res['eval_sequential_episodes']} one at a time",
                  f"{res['eval_sequential_env_steps_per_s']:.0f}"),
                 ("  ratio batched / one at a time",
                  f"{res['ratio_eval_batched_vs_sequential']:.1f}x"),
                 ("  model forward ms per episode, batch of 1",
                  f"{res['forward_ms_per_episode_batch_1']:.2f}"),
                 (f"  model forward ms per episode, batch of {a.eval_episodes}",
                  f"{res['forward_ms_per_episode_batched']:.2f}"),
                 ("  peak GPU memory GB", gb("eval_peak_gpu_gb")),
                 *((f"eval env-steps/s, {a.eval_episodes} episodes batched, {n} worker process"
                    f"{'es' if n > 1 else ''} (pool start "
                    f"{res[f'eval_workers_{n}_start_s']:.1f} s)",
                    f"{res[f'eval_workers_{n}_env_steps_per_s']:.0f}") for n in counts),
                 ("eval env-steps/s, env stepping alone, no model (MuJoCo's floor)",
                  f"{res['eval_env_alone_env_steps_per_s']:.0f}"),
                 ("  ceiling on that ratio: one at a time / env alone",
                  f"{res['ratio_eval_ceiling']:.1f}x")]
    if "sampling" in a.sections:            # (c) sampling, B=64, K=20; Atari's B=128, K=30
        rng = np.random.default_rng(0)
        t_loop = timed(lambda: [x.to(device) for x in kzl_get_batch(
            trajs, 64, 20, 1000, 1000.0, batcher.state_mean, batcher.state_std, rng)], 20, device)
        t_vec = timed(lambda: batcher.sample(64), 200, device)
        res.update(sample_loop_ms=t_loop * 1e3, sample_vectorised_ms=t_vec * 1e3,
                   ratio_sampling_vectorised_vs_loop=t_loop / t_vec)
        res.update(bench_atari_sampling(device))
        save()
        rows += [("batch sampling ms, per-sample loop (kzl DT style)",
                  f"{res['sample_loop_ms']:.2f}"),
                 ("batch sampling ms, vectorised", f"{res['sample_vectorised_ms']:.3f}"),
                 ("  ratio loop / vectorised", f"{res['ratio_sampling_vectorised_vs_loop']:.0f}x"),
                 ("Atari batch sampling ms, B=128 K=30: official loop / vectorised",
                  f"{res['atari_sample_loop_ms']:.0f} / {res['atari_sample_vectorised_ms']:.0f}")]
    if a.saved:                             # what a run keeps for its backward, counted
        res.update(bench_saved(lamo_cfg, device, batcher))
        save()
        rows += [("GiB kept for the backward, each run of a LaMo pack: action / LM batch",
                  f"{res['saved_pack_action_gib_per_run']:.2f} / "
                  f"{res['saved_pack_lm_gib_per_run']:.2f}")]
    if a.traffic:                           # the bytes a compiled step moves, counted
        res.update(bench_traffic(lamo_cfg, device, batcher))
        save()
        rows += [("GiB a compiled LaMo step moves: alone / packs of 2 and 4",
                  f"{res['traffic_lamo_1_gib']:.1f} / {res['traffic_pack_lamo_2_gib']:.1f} / "
                  f"{res['traffic_pack_lamo_4_gib']:.1f}"),
                 ("  each run of a pack adds", f"{res['traffic_pack_lamo_gib_per_run']:.2f}"),
                 ("    of which matmuls (extern kernels; the rest is fused elementwise work)",
                  f"{res['traffic_pack_lamo_matmul_gib_per_run']:.2f}")]
    if a.compiled:                          # --compile: LaMo alone and a pack
        bench_compiled(lamo_cfg, device, batcher, a.compiled, steps, res, save)
        rows += [(f"LaMo, --compile: run-steps/s, pack of {a.compiled}",
                  f"{res[f'compiled_lamo_{a.compiled}']:.3f}"),
                 ("LaMo, --compile: steps/s alone", f"{res['compiled_lamo_1']:.3f}"),
                 ("LaMo, --compile --compile-mode reduce-overhead: steps/s alone",
                  f"{res['cudagraphs_lamo_1']:.3f}" if "cudagraphs_lamo_1" in res else "error"),
                 (f"LaMo, --compile --compile-mode reduce-overhead: run-steps/s, pack of "
                  f"{a.compiled}", f"{res[f'cudagraphs_lamo_{a.compiled}']:.3f}"
                  if f"cudagraphs_lamo_{a.compiled}" in res else "error")]
    if a.pack_eval:                         # a pack's evaluation: R runs' episodes at once
        res.update(measured(lambda: bench_pack_eval(lamo_cfg, device, batcher, a.pack_eval,
                                                    max_steps), device)[0])
        save()
        R = a.pack_eval
        rows += [(f"eval env-steps/s, a pack of {R} LaMo runs, {res[f'pack_eval_{R}_episodes']} "
                  f"episodes in one rollout ({res[f'pack_eval_{R}_s']:.1f} s)",
                  f"{res[f'pack_eval_{R}_env_steps_per_s']:.0f}")]
    if a.processes:                         # N training processes sharing the device
        res.update(bench_processes("lamo", device, a.processes, 10.0 if gpu else 2.0))
        save()
        rows += [(f"run-steps/s, {n} LaMo training processes at once",
                  f"{res[f'procs_lamo_{n}']:.3f}")
                 for n in a.processes]
    if gpu and "train" in a.sections:       # the first row again, after the profiles above:
        # torch.profiler can leave CUPTI hooked in, slowing the steps timed after it by 10-20%
        # (pytorch#144455); if it slowed this bench's later rows, the two figures part.
        res["train_steps_per_s_again"] = measured(lambda: train_steps_per_s(
            lamo_cfg, device, batcher, steps, warmup), device)[0]
        save()
        rows += [("training steps/s, LaMo, timed again after the profiles",
                  f"{res['train_steps_per_s_again']:.3f}")]
    # what bounds the profiled steps: the device's work, or the host's launching of it
    rows += [(f"{name}: wall / device-busy ms a step", f"{wall} / {busy}")
             for name, wall, busy, _, _ in gpu_report.busy_rows(res)]
    # (d) memory
    res["peak_host_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows.append(("peak host RSS GB", f"{res['peak_host_rss_gb']:.2f}"))
    w = max(len(k) for k, _ in rows) + 2
    rule = "-" * (w + 10)
    print(f"\n{rule}\n" + "\n".join(f"{k:<{w}}{v:>10}" for k, v in rows) + f"\n{rule}")
    save()
    print(f"written to {a.out}")
    if a.profile:
        with open(a.profile, "w") as f:           # table by table: a failure keeps those before
            for table in profile_tables(lamo_cfg, device, batcher, a.eval_episodes,
                                        max(sizes, default=0)):
                f.write(table)
                f.flush()
        print(f"profile written to {a.profile}")
    return res


if __name__ == "__main__":
    main()
