"""Packs of runs (pack.py): R runs of one task in lockstep in one process, each still a run."""
import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

import lamo
import pack
import runs
import workers
from conftest import action_losses, adamw_side_by_side, timeless_metrics

NO_DROPOUT = ["--dropout", "0", "--lora-dropout", "0"]


def dt_args(tiny_hdf5, steps=50):
    return ["--model", "dt", "--data", str(tiny_hdf5), "--steps", str(steps), "--eval-every", "25",
            "--eval-episodes", "1", "--eval-max-steps", "20", "--targets", "100",
            "--log-every", "1", "--batch-size", "16", "--context-len", "5"]


def lamo_args(tiny_hdf5, hf_tiny, steps=50):
    """LaMo on the tiny pre-trained GPT-2: LoRA over a frozen body that the pack shares."""
    return ["--data", str(tiny_hdf5), "--pretrained", str(hf_tiny[1]), "--steps", str(steps),
            "--eval-every", "25", "--eval-episodes", "1", "--eval-max-steps", "20",
            "--targets", "100", "--log-every", "1", "--batch-size", "16", "--context-len", "5"]


def rel(a, b):
    return max(abs(x / y - 1) for x, y in zip(a, b))


def test_a_pack_of_one_equals_the_run_alone(tiny_hdf5, hf_tiny, tmp_path):
    args = [*lamo_args(tiny_hdf5, hf_tiny), *NO_DROPOUT, "--lm-coef", "0"]
    lamo.main([*args, "--out", str(tmp_path / "alone")])
    cfg = lamo.resolve(lamo.parse_args([*args, "--out", str(tmp_path / "p")])[0])
    pack.train([lamo.start_run(cfg, tmp_path / "p", resume=False)], lamo)
    alone, packed = action_losses(tmp_path / "alone"), action_losses(tmp_path / "p")
    assert len(alone) == len(packed) == 50
    assert rel(packed, alone) < 1e-6


def test_a_pack_of_three_equals_each_run_alone(tiny_hdf5, tmp_path):
    """`--seed 0 1 2 --out DIR`: three run folders, each a full run folder, each run's losses
    those of the same seed trained alone (DT preset: every weight per run)."""
    args = [*dt_args(tiny_hdf5), "--dropout", "0"]
    lamo.main([*args, "--seed", "0", "1", "2", "--out", str(tmp_path / "pk")])
    for seed in (0, 1, 2):
        folder = tmp_path / "pk" / f"s{seed}"
        assert {"config.json", "subset.json", "metrics.jsonl", "ckpt.pt", "summary.json",
                "curve.png"} <= {p.name for p in folder.iterdir()}
        lamo.main([*args, "--seed", str(seed), "--out", str(tmp_path / f"alone{seed}")])
        assert rel(action_losses(folder), action_losses(tmp_path / f"alone{seed}")) < 1e-5
        ckpt = torch.load(folder / "ckpt.pt", weights_only=False)
        assert ckpt["config"]["seed"] == seed and ckpt["step"] == 50
        assert json.loads((folder / "summary.json").read_text())["seed"] == seed
        # the run's own AdamW state in its checkpoint: the moments its run alone has
        alone = torch.load(tmp_path / f"alone{seed}" / "ckpt.pt", weights_only=False)
        for i, state in alone["optimizer"]["state"].items():
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ckpt["optimizer"]["state"][i][moment], state[moment],
                                           rtol=1e-3, atol=1e-7)
    assert action_losses(tmp_path / "pk" / "s0") != action_losses(tmp_path / "pk" / "s1")
    # A run of a pack is a run: --eval-only reproduces its stored evaluation, up to the rounding
    # of the pack's batched forward (its actions: the test below).
    ev = lamo.main(["--eval-only", str(tmp_path / "pk" / "s1" / "ckpt.pt")])
    stored = torch.load(tmp_path / "pk" / "s1" / "ckpt.pt", weights_only=False)["last_eval"]
    assert ev.keys() == stored.keys()
    for target in ev:
        assert ev[target] == pytest.approx(stored[target], rel=1e-6)


REAL_STEP = workers.Block.step


def recorded_actions(monkeypatch) -> dict:
    """Every action the evaluation's envs receive, per episode: {episode: [action, ...]}."""
    seen = {}
    real = REAL_STEP

    def step(block, rows, actions):
        for row, a in zip(rows, actions):
            seen.setdefault(int(row), []).append(a.copy())
        return real(block, rows, actions)
    monkeypatch.setattr(workers.Block, "step", step)
    return seen


@pytest.mark.parametrize("preset", ["dt", "lamo"])
def test_a_packs_evaluation_takes_each_runs_actions(preset, tiny_hdf5, hf_tiny, tmp_path,
                                                    monkeypatch):
    """Four runs (other seeds and data ratios) trained as a pack, then evaluated in one batched
    rollout of all their episodes: over 100 env steps, the actions each run's episodes take equal
    (within 1e-5) those of the same run's model evaluated alone (LoRA merged there, not here)."""
    args = dt_args(tiny_hdf5, 10) if preset == "dt" else lamo_args(tiny_hdf5, hf_tiny, 10)
    cfg = lamo.resolve(lamo.parse_args([*args, "--eval-episodes", "2", "--eval-max-steps", "100",
                                        "--eval-every", "100"])[0])
    members = [lamo.start_run(lamo.replace(cfg, seed=s, frac=f), tmp_path / f"r{s}", False)
               for s, f in ((0, 1.0), (1, 1.0), (2, 0.5), (3, 0.5))]
    pack.train(members, lamo)
    p = pack.Pack(members)                  # the trained runs, stacked again for their evaluation
    packed = recorded_actions(monkeypatch)
    together = pack.evaluate(p, [0, 1, 2, 3], cfg, lamo, workers.Envs(members[0].task))
    compared = 0
    for r, run in enumerate(members):
        alone = recorded_actions(monkeypatch)
        ev = lamo.evaluate(run.model, cfg, run.task, run.batcher.state_mean, run.batcher.state_std,
                           run.device)
        assert ev.keys() == together[r].keys()
        for e in range(2):
            mine, theirs = alone[e], packed[2 * r + e]
            assert len(mine) == len(theirs)          # episodes end where the run's alone do
            assert max(abs(a - b).max() for a, b in zip(mine, theirs)) < 1e-5
            compared += len(mine)
    assert len(packed) == 8 and packed[0][5].tolist() != packed[2][5].tolist()
    assert compared > 80                 # hopper episodes of an untrained policy end early


@pytest.mark.parametrize("preset", ["dt", "lamo"])
def test_runs_of_one_seed_end_bit_identical_with_dropout(preset, tiny_hdf5, hf_tiny, tiny_txt,
                                                         tmp_path):
    """Dropout on (LaMo also with the LM loss, whose forward drops too): in a pack of seeds 0, 1,
    0, 0 the three runs of seed 0 end bit-identical, wherever they sit in the pack, and seed 1
    differs; in a pack with seed 2, seed 0 trains as before. Each run's masks come from its own
    generator (pack.RunDropout)."""
    args = (dt_args(tiny_hdf5, 20) if preset == "dt" else
            [*lamo_args(tiny_hdf5, hf_tiny, 20), "--lm-coef", "0.1", "--lm-corpus",
             str(tiny_txt), "--lm-seq-len", "16"])
    members = []
    for i, seed in enumerate([0, 1, 0, 0]):
        cfg = lamo.resolve(lamo.parse_args([*args, "--seed", str(seed)])[0])
        members.append(lamo.start_run(cfg, tmp_path / f"r{i}", resume=False))
    assert members[0].cfg.dropout > 0
    pack.train(members, lamo)
    final = [torch.load(tmp_path / f"r{i}" / "ckpt.pt", weights_only=False)["trainable"]
             for i in range(4)]
    for i in (2, 3):
        assert all(torch.equal(final[0][k], final[i][k]) for k in final[0])
        assert timeless_metrics(tmp_path / "r0") == timeless_metrics(tmp_path / f"r{i}")
    assert any(not torch.equal(final[0][k], final[1][k]) for k in final[0])
    # Nor do its pack-mates matter: seed 0 second to seed 2 trains as it did beside seed 1 (on
    # this CPU bit for bit; rounding may differ where the kernels differ with R).
    members = [lamo.start_run(lamo.resolve(lamo.parse_args([*args, "--seed", str(seed)])[0]),
                              tmp_path / f"other{seed}", resume=False) for seed in (2, 0)]
    pack.train(members, lamo)
    assert rel(action_losses(tmp_path / "other0"), action_losses(tmp_path / "r0")) < 1e-6


def test_each_runs_masks_come_from_its_own_generator(tiny_hdf5, tmp_path):
    """Pack.drop_masks: row r of every keep-mask is what run r's generator, seeded from its seed
    and step, draws; equal seeds draw equal rows, other seeds other rows, and 1 - p is kept."""
    members = []
    for i, seed in enumerate([3, 4, 3]):
        cfg = lamo.resolve(lamo.parse_args([*dt_args(tiny_hdf5, 2), "--seed", str(seed),
                                            "--dropout", "0.2"])[0])
        members.append(lamo.start_run(cfg, tmp_path / f"r{i}", resume=False))
    p = pack.Pack(members)
    for run in members:
        run.step = 7
    p.seed_dropout()
    b = members[0].batcher.sample(16)
    batch = tuple(x.expand(3, *x.shape) for x in (b.states, b.actions, b.rtg, b.timesteps,
                                                   b.mask))
    masks = p.batch_masks(p.stacked, batch)
    # the DT preset drops its embeddings, then in each layer attention, its branch and the MLP's
    assert [m.shape[1:] for m in masks][:2] == [(16, 15, 128), (16, 1, 15, 15)]
    g = torch.Generator().manual_seed(pack.seed_of(3, 7))     # one draw for all, then split
    drawn = torch.empty(sum(m[0].numel() for m in masks), dtype=torch.bool).bernoulli_(0.8,
                                                                                       generator=g)
    for m, want in zip(masks, drawn.split([m[0].numel() for m in masks])):
        assert torch.equal(m[0].flatten(), want) and torch.equal(m[2].flatten(), want)
        assert not torch.equal(m[0], m[1])
    kept = torch.cat([m.flatten() for m in masks]).float().mean().item()
    assert kept == pytest.approx(0.8, abs=0.01)                  # 1 - p kept


def test_a_packs_dropout_applies_the_masks_it_is_given():
    """pack.RunDropout's attention with dropout, every element kept and p -> 0, equals
    F.scaled_dot_product_attention: causal, and with a padding mask (rows with a key to see);
    a padding row with none stays finite. With dropout, attention and F.dropout apply the given
    keep-mask."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)                      # (B, nh, T, hd)
    keep = [torch.ones(2, 4, 6, 6, dtype=torch.bool)]
    with pack.RunDropout(keep):
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=1e-12)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with sdpa_kernel([SDPBackend.MATH]):                  # fp32: the math kernel, bit for bit
        assert torch.equal(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    valid = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6]).bool()            # left padding
    attend = torch.ones(6, 6).bool().tril() & valid[:, None, None, :]     # (B, 1, T, T)
    with pack.RunDropout(keep):
        padded = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=1e-12)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    rows = attend.any(-1).squeeze(1)                                      # (B, T)
    torch.testing.assert_close(padded.transpose(1, 2)[rows], want.transpose(1, 2)[rows])
    assert torch.isfinite(padded).all() and not rows.all()
    # bf16 (the body's c_attn gives bf16 under autocast): scores and softmax in fp32, as SDPA's
    # math kernel computes them, not in bf16 matmuls that would round the scores; then P in
    # bf16 for P v, as flash attention rounds it. Bit for bit that recipe; not the math kernel,
    # which keeps P v in fp32; and its error, and its gradients' (against float64 over the same
    # bf16 inputs), within 1.5 x the math kernel's, which rounds only its output (1.39 x and
    # 1.42 x seen).
    qh, kh, vh = (x.bfloat16() for x in torch.randn(3, 8, 4, 60, 64).unbind(0))
    keep60 = [torch.ones(8, 4, 60, 60, dtype=torch.bool)]
    causal60 = torch.ones(60, 60).bool().tril()

    def ours(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16), pack.RunDropout(keep60):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=1e-12)

    def math_kernel(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def exact(q, k, v):
        return ((q @ k.transpose(-2, -1)) / 8).masked_fill(~causal60, float("-inf")).softmax(
            -1) @ v

    half = ours(qh, kh, vh)
    s = 64 ** -0.25
    probs = ((qh.float() * s) @ (kh.float().transpose(-2, -1) * s)).masked_fill(
        ~causal60, torch.finfo(torch.float32).min).softmax(-1)
    assert half.dtype == torch.bfloat16 and torch.equal(half, probs.bfloat16() @ vh)
    assert torch.equal(math_kernel(qh, kh, vh), (probs @ vh.float()).bfloat16())
    assert not torch.equal(half, math_kernel(qh, kh, vh))
    grad_out = torch.randn(8, 4, 60, 64).bfloat16()

    def outputs(attention, dtype=torch.bfloat16):       # its output and q's, k's, v's gradients
        x = [t.to(dtype).requires_grad_() for t in (qh, kh, vh)]
        out = attention(*x)
        return [out.detach(), *torch.autograd.grad(out, x, grad_out.to(dtype))]
    want = outputs(exact, torch.float64)
    rel_error = lambda got: [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]
    for ours_error, kernel_error in zip(rel_error(outputs(ours)), rel_error(outputs(math_kernel))):
        assert ours_error < 1.5 * kernel_error
    assert torch.equal(ours(qh.float(), kh.float(), vh.float()), half)     # fp32 in: cast
    with pack.RunDropout(keep), pytest.raises(NotImplementedError, match="bool mask"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(6, 6), dropout_p=0.1)
    # with dropout: the mask it is given, by the textbook; and F.dropout's, times 1 / (1 - p)
    keep = torch.rand(2, 4, 6, 6) > 0.3
    with pack.RunDropout([keep]):
        dropped = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.3)
    att = (q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(~torch.ones(6, 6).bool().tril(),
                                                           float("-inf")).softmax(-1)
    torch.testing.assert_close(dropped, (att * keep / 0.7) @ v)
    x, keep = torch.randn(4, 5), torch.rand(4, 5) > 0.3
    with pack.RunDropout([keep]):
        assert torch.equal(F.dropout(x, 0.3, training=True),
                           torch.where(keep, x * (1 / 0.7), 0.0))      # as torch scales
    x.requires_grad_()
    with pack.RunDropout([torch.zeros(4, 5, dtype=torch.bool)]):   # p = 1: zeros, and no NaN
        F.dropout(x, 1.0, training=True).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with pytest.raises(RuntimeError, match="dropped 1 times, and it has 2 masks"):
        with pack.RunDropout([keep, keep]):                # recorded dropouts this forward lacks
            F.dropout(x, 0.3, training=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lm_batchs_attention_keeps_its_inputs_and_recomputes_the_rest(dtype):
    """pack.Recomputed (a pack's LM forward): under vmap over 3 runs, with each run's keep-mask,
    a padding mask and a scale other than 1 / sqrt(hd), the output and the gradients of q, k and
    v are math_attention's through autograd bit for bit, fp32 and bf16 in; for the backward it
    keeps its inputs (q, k, v, the masks), where autograd keeps the fp32 scores, their dropped
    copy and fp32 q, k, v too."""
    from torch.func import vmap
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 16, 8).to(dtype).requires_grad_() for _ in range(3))
    keep = torch.rand(3, 2, 4, 16, 16) > 0.1
    attend = torch.ones(16, 16).bool().tril() & (torch.arange(16) > 2)        # left padding
    kept_bytes = {}
    grads = {}
    for name, fn in (("autograd", pack.math_attention), ("recomputed", pack.Recomputed.apply)):
        saved = {}
        def hold(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(hold, lambda t: t):
            out = vmap(lambda q, k, v, keep: fn(q, k, v, attend, False, keep, 0.1, 0.3))(
                q, k, v, keep)
        kept_bytes[name] = sum(saved.values())
        grads[name] = (out, *torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    assert out.dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(grads["autograd"], grads["recomputed"]))
    inputs = sum(x.untyped_storage().nbytes() for x in (q, k, v, keep, attend))
    assert kept_bytes["recomputed"] == inputs < kept_bytes["autograd"]


def test_a_bf16_pack_keeps_the_body_in_bf16(tiny_hdf5, hf_tiny, tmp_path):
    """Under bf16 a pack's attention and MLP layers give bf16, as a run's alone do: vmap's
    F.linear adds the bias after autocast's matmul, and an fp32 bias would make them fp32 (twice
    the bytes on a GPU). And the pack of one still trains as the run alone, within bf16's
    rounding."""
    args = [*lamo_args(tiny_hdf5, hf_tiny, 10), *NO_DROPOUT, "--precision", "bf16"]
    cfg = lamo.resolve(lamo.parse_args(args)[0])
    pack.train([lamo.start_run(cfg, tmp_path / "p", resume=False)], lamo)
    lamo.main([*args, "--out", str(tmp_path / "alone")])
    assert rel(action_losses(tmp_path / "p"), action_losses(tmp_path / "alone")) < 1e-4  # 4.3e-6
    run = lamo.start_run(cfg, tmp_path / "q", resume=False)
    dtypes = {}
    for name in ("gpt.h.0.attn.c_attn", "gpt.h.0.attn", "gpt.h.0.mlp.c_fc", "gpt.h.1.mlp"):
        run.model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: dtypes.setdefault(name, []).append(out.dtype))
    b = run.batcher.sample(4)
    run.model.train()
    run.model(b.states, b.actions, b.rtg, b.timesteps, b.mask)
    pack.Pack([run]).forward(*(x[None] for x in (b.states, b.actions, b.rtg, b.timesteps,
                                                  b.mask)))
    assert len(dtypes) == 4                       # alone, the pack (and its recording pass)
    assert all(dtype == torch.bfloat16 for seen in dtypes.values() for dtype in seen)


def test_a_packs_attention_is_written_out_without_dropout_too(tiny_hdf5, tmp_path):
    """No SDPA kernel runs in a pack, dropout or not, training or evaluating: on CUDA the math
    kernel's bf16 backward fails under vmap (seen on an H100) and the fused ones fail too, so
    pack.RunDropout writes attention out (a pack of 3 seeds, bf16, dropout 0, as the failing
    test_cuda.py test). A mode outside RunDropout sees each SDPA call it passes on; the math
    kernel itself would reach a dispatch mode as plain ops, unseen."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.sdpa = self.softmax = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.sdpa += func is F.scaled_dot_product_attention
            self.softmax += func is torch.Tensor.softmax
            return func(*args, **(kwargs or {}))
    args = [*dt_args(tiny_hdf5, 2), *NO_DROPOUT, "--precision", "bf16"]
    cfg = lamo.resolve(lamo.parse_args(args)[0])
    members = [lamo.start_run(lamo.replace(cfg, seed=s), tmp_path / f"s{s}", False)
               for s in range(3)]
    p = pack.Pack(members)
    batches = [run.batcher.sample(cfg.batch_size) for run in members]
    with Calls() as training:
        pack.train_step(p, batches, None, torch.ones(3, dtype=torch.bool), cfg, lamo, False)
    p.template.eval()
    with Calls() as evaluating:
        p.forward(*(torch.stack([getattr(b, k) for b in batches])
                    for k in ("states", "actions", "rtg", "timesteps")))
    for calls in (training, evaluating):            # each of the 3 layers' attention, written out
        assert calls.sdpa == 0 and calls.softmax >= cfg.n_layer


def test_each_run_is_clipped_by_its_own_norm(tiny_hdf5, tmp_path):
    cfg = lamo.resolve(lamo.parse_args(dt_args(tiny_hdf5))[0])
    p = pack.Pack([lamo.start_run(lamo.replace(cfg, seed=s), tmp_path / f"s{s}", resume=False)
                   for s in (0, 1)])
    for name in p.trainable:
        grad = torch.ones_like(p.stacked[name])
        grad[1] *= 1e-6                                   # run 1: a norm far below the clip
        p.stacked[name].grad = grad
    before = {n: p.stacked[n].grad.clone() for n in p.trainable}
    norms = p.clip_(max_norm=1.0)
    total = sum(p.stacked[n][0].numel() for n in p.trainable) ** 0.5
    assert norms.tolist() == pytest.approx([total, total * 1e-6], rel=1e-5)
    clipped = torch.cat([p.stacked[n].grad[0].flatten() for n in p.trainable]).double().norm()
    assert clipped.item() == pytest.approx(1.0, rel=1e-4)                   # run 0: clipped to 1
    for n in p.trainable:                                                    # run 1: untouched
        assert torch.equal(p.stacked[n].grad[1], before[n][1])


def test_a_run_gone_nan_stops_and_the_others_finish(tiny_hdf5, tmp_path, monkeypatch, capsys):
    real_start = lamo.start_run

    def poisoned(cfg, folder, resume):
        run = real_start(cfg, folder, resume)
        if cfg.seed == 1:                               # run 1's batches turn NaN after step 30
            sample, n = run.batcher.sample, []

            def sample_nan(B):
                n.append(1)
                b = sample(B)
                return b._replace(states=b.states * float("nan")) if len(n) > 30 else b
            run.batcher.sample = sample_nan
        return run

    monkeypatch.setattr(lamo, "start_run", poisoned)
    lamo.main([*dt_args(tiny_hdf5), "--seed", "0", "1", "2", "--out", str(tmp_path / "pk")])
    out = capsys.readouterr().out
    assert "pk/s1: loss or gradient became NaN/inf before step 31; stopped" in out
    assert not (tmp_path / "pk" / "s1" / "summary.json").exists()
    assert torch.load(tmp_path / "pk" / "s1" / "ckpt.pt", weights_only=False)["step"] == 25
    for seed in (0, 2):
        assert json.loads((tmp_path / "pk" / f"s{seed}" / "summary.json").read_text())["step"] == 50
        # still stepping on its own gradient after run 1 stopped (alive masks run 1's loss only)
        norms = [r["grad_norm"] for r in timeless_metrics(tmp_path / "pk" / f"s{seed}")
                 if "grad_norm" in r]
        assert len(norms) == 50 and min(norms) > 0
    # marked stopped: --resume of the pack's folder leaves it out (here: nothing left to continue)
    assert json.loads((tmp_path / "pk" / "s1" / "stopped.json").read_text()) == {
        "stopped_before_step": 31}
    with pytest.raises(SystemExit, match="every run there has finished or went NaN/inf"):
        lamo.main(["--resume", str(tmp_path / "pk")])
    assert f"left out {tmp_path / 'pk' / 's1'}: it went NaN/inf" in capsys.readouterr().out


def test_an_interrupted_pack_keeps_a_stopped_runs_last_good_checkpoint(tiny_hdf5, tmp_path,
                                                                        monkeypatch, capsys):
    """Run 1 goes NaN at step 4 and stops; Ctrl-C at step 6 saves run 0 only, so run 1's
    checkpoint stays its last good one (step 2, finite), which --resume would load."""
    real_start = lamo.start_run

    def poisoned(cfg, folder, resume):
        run = real_start(cfg, folder, resume)
        sample, n = run.batcher.sample, []

        def sample_(B):
            n.append(1)
            if cfg.seed == 0 and len(n) == 6:
                os.kill(os.getpid(), signal.SIGINT)
            b = sample(B)
            return b._replace(states=b.states * float("nan")) if cfg.seed == 1 and len(n) > 3 else b
        run.batcher.sample = sample_
        return run
    monkeypatch.setattr(lamo, "start_run", poisoned)
    with pytest.raises(SystemExit):
        lamo.main([*dt_args(tiny_hdf5, 20), "--eval-every", "2", "--seed", "0", "1",
                   "--out", str(tmp_path / "pk")])
    s0, s1 = (torch.load(tmp_path / "pk" / s / "ckpt.pt", weights_only=False) for s in ("s0", "s1"))
    assert s0["step"] == 6 and s1["step"] == 2
    # what to resume: the run that goes on, not the stopped one (at another step: refused)
    assert f"--resume {tmp_path / 'pk' / 's0'}\n" in capsys.readouterr().out
    assert all(torch.isfinite(v).all() for v in s1["trainable"].values())


def nan_gradient(pred, *a, **kw):
    """A finite loss, pred.sum(), whose gradient is NaN: sqrt's at 0 is inf, times abs's 0 (plain
    ops, which vmap takes; a tensor hook it does not)."""
    return pred.sum() + (pred - pred.detach()).abs().sqrt().sum()


@pytest.mark.parametrize("loss", [lambda pred, *a, **kw: pred.sum() * float("nan"), nan_gradient],
                         ids=["nan-loss", "nan-gradient"])
def test_a_pack_whose_runs_all_go_nan_stops(loss, tiny_hdf5, tmp_path, monkeypatch, capsys):
    """Every run non-finite at its first step, in its loss or in its gradient (which the clip
    turns into NaN weights): each says it has no checkpoint yet, and the pack stops with one line
    (not an evaluation of no runs)."""
    monkeypatch.setattr(lamo, "action_loss", loss)
    with pytest.raises(SystemExit, match="every run of the pack went NaN/inf"):
        lamo.main([*dt_args(tiny_hdf5), "--seed", "0", "1", "--out", str(tmp_path / "pk")])
    out = capsys.readouterr().out
    assert out.count("before step 1; stopped. It saved no checkpoint before that") == 2


def test_an_interrupted_pack_resumes_bit_for_bit(tiny_hdf5, hf_tiny, tmp_path, monkeypatch,
                                                 capsys):
    """With dropout on: Ctrl-C at step 7 saves every run; `--resume DIR` continues the pack to
    the metrics of an uninterrupted pack, bit for bit (CPU), the row at step 10 (steps 6-10, two
    of them before the Ctrl-C) included; a finished pack is not trained again."""
    args = [*lamo_args(tiny_hdf5, hf_tiny, steps=30), "--seed", "0", "1", "--log-every", "5"]
    lamo.main([*args, "--out", str(tmp_path / "whole")])
    real, calls = lamo.action_loss, []

    def interrupt_at_7(*a, **kw):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(lamo, "action_loss", interrupt_at_7)
    with pytest.raises(SystemExit) as stopped:
        lamo.main([*args, "--out", str(tmp_path / "cut")])
    assert stopped.value.code == 130
    cut = [str(tmp_path / "cut" / f"s{seed}") for seed in (0, 1)]
    assert f"Continue with: python lamo.py --resume {cut[0]} {cut[1]}\n" in capsys.readouterr().out
    monkeypatch.setattr(lamo, "action_loss", real)
    for seed in (0, 1):
        ckpt = torch.load(tmp_path / "cut" / f"s{seed}" / "ckpt.pt", weights_only=False)
        assert ckpt["step"] == 7
    lamo.main(["--resume", str(tmp_path / "cut")])
    for seed in (0, 1):
        assert (timeless_metrics(tmp_path / "cut" / f"s{seed}")
                == timeless_metrics(tmp_path / "whole" / f"s{seed}"))
    with pytest.raises(SystemExit, match="every run there has finished"):
        lamo.main(["--resume", str(tmp_path / "cut")])


def test_runs_of_other_data_ratios_share_a_pack(tiny_hdf5, tmp_path):
    """What sweep.py's grids group: runs that differ in --frac (their own subset and batcher).
    A per-run flag takes one value for every run or one per run; --out one folder per run, or
    one folder that holds a folder per run named by what differs."""
    args = dt_args(tiny_hdf5, 4)
    lamo.main([*args, "--frac", "0.5", "1", "--seed", "3", "3", "--out", str(tmp_path / "a"),
               str(tmp_path / "b")])
    subsets = [json.loads((tmp_path / f / "subset.json").read_text()) for f in "ab"]
    assert [s["n_trajectories"] for s in subsets] == [5, 10]
    assert action_losses(tmp_path / "a") != action_losses(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (saved["frac"], saved["seed"], saved["out"]) == (1.0, 3, str(tmp_path / "b"))
    lamo.main([*args, "--frac", "0.5", "1", "--out", str(tmp_path / "pk")])
    assert sorted(p.name for p in (tmp_path / "pk").iterdir()) == ["f0.5", "f1"]
    with pytest.raises(SystemExit, match="--frac has 2 values and --seed 3: give a per-run flag"):
        lamo.main([*args, "--frac", "0.5", "1", "--seed", "0", "1", "2",
                   "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="two runs would share the run folder"):
        lamo.main([*args, "--seed", "1", "1", "--out", str(tmp_path / "d")])
    # --resume takes the run folders of a pack, here with more steps: both go on, as one pack.
    lamo.main(["--resume", str(tmp_path / "a"), str(tmp_path / "b"), "--steps", "6"])
    assert [len(action_losses(tmp_path / f)) for f in "ab"] == [6, 6]


def test_runs_of_other_learning_rates_and_weight_decays_share_a_pack(tiny_hdf5, tmp_path):
    """--lr and --weight-decay per run (RunAdamW): each run's losses and lr those of the run
    alone; --out holds a folder per run named by what differs."""
    args = [*dt_args(tiny_hdf5, 20), "--dropout", "0", "--warmup", "10"]
    lamo.main([*args, "--lr", "1e-3", "3e-4", "--weight-decay", "0", "0.1",
               "--out", str(tmp_path / "pk")])
    assert sorted(p.name for p in (tmp_path / "pk").iterdir()) == ["lr0.0003_wd0.1", "lr0.001_wd0"]
    for lr, wd in (("1e-3", "0"), ("3e-4", "0.1")):
        folder = tmp_path / "pk" / f"lr{float(lr):g}_wd{float(wd):g}"
        lamo.main([*args, "--lr", lr, "--weight-decay", wd, "--out", str(tmp_path / lr)])
        alone, packed = timeless_metrics(tmp_path / lr), timeless_metrics(folder)
        lrs = [r["lr"] for r in packed if "lr" in r]
        assert lrs == [r["lr"] for r in alone if "lr" in r] and len(lrs) == 20
        assert lrs[-1] == float(lr) > lrs[0]                    # past the 10 steps of warm-up
        assert rel(action_losses(folder), action_losses(tmp_path / lr)) < 1e-5
        saved = json.loads((folder / "config.json").read_text())
        assert (saved["lr"], saved["weight_decay"]) == (float(lr), float(wd))
    assert (action_losses(tmp_path / "pk" / "lr0.001_wd0")
            != action_losses(tmp_path / "pk" / "lr0.0003_wd0.1"))
    with pytest.raises(SystemExit, match="--lr -0.001 --weight-decay 0.0001: an lr and a "
                                         "weight decay must be >= 0"):
        lamo.main([*args, "--lr", "1e-3", "-0.001", "--out", str(tmp_path / "bad")])


def test_run_adamw_steps_each_run_as_torchs_adamw_alone():
    """RunAdamW over (R, ...) stacks with an lr and a weight decay per run, against R of torch's
    AdamWs, one per run (the CPU's single-tensor AdamW): bit for bit over 30 steps of gradients
    of 1e-2 to 1e2, a tensor without a gradient skipped (no state, no decay), as torch skips it."""
    shapes = [(5, 7), (7,), (2, 3, 4), (1, 4)]
    start, stacks, packed, alone, torchs = adamw_side_by_side(
        "cpu", [1e-3, 3e-4, 1e-4], [0.01, 0.0, 0.1], shapes, 30)
    for r in range(3):
        for i in range(3):
            assert torch.equal(stacks[i][r], alone[r][i]), (r, i)
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(packed.state[stacks[i]][k][r], torchs[r].state[alone[r][i]][k])
            assert packed.state[stacks[i]]["step"].item() == 30
    assert torch.equal(stacks[3], start[3]) and stacks[3] not in packed.state


def test_a_packs_evaluation_of_some_of_its_runs_takes_their_weights(tiny_hdf5, tmp_path):
    """evaluate(pack, [0, 2]), as after run 1 has stopped: runs 0 and 2 each evaluate as alone
    (to the rounding of the batched forward), not runs 0 and 1."""
    cfg = lamo.resolve(lamo.parse_args(dt_args(tiny_hdf5, 2))[0])
    members = [lamo.start_run(replace(cfg, seed=s), tmp_path / f"s{s}", False) for s in range(3)]
    alone = [lamo.evaluate(run.model, cfg, run.task, run.batcher.state_mean,
                           run.batcher.state_std, run.device) for run in members]
    assert alone[1] != alone[2]
    together = pack.evaluate(pack.Pack(members), [0, 2], cfg, lamo, workers.Envs(members[0].task))
    for got, want in zip(together, (alone[0], alone[2])):
        assert got.keys() == want.keys()
        for target in want:
            assert got[target] == pytest.approx(want[target], rel=1e-6)


def test_a_pack_with_the_lm_loss_equals_each_run_alone(tiny_hdf5, hf_tiny, tiny_txt, tmp_path):
    """lambda L_LM per run, on each run's own LM batches: action loss, LM loss and gradient norm
    (which moves where warm-up's tiny lr keeps the losses still) those of each run alone."""
    args = [*lamo_args(tiny_hdf5, hf_tiny, 6), *NO_DROPOUT, "--lm-coef", "0.1",
            "--lm-corpus", str(tiny_txt), "--lm-seq-len", "16"]
    lamo.main([*args, "--seed", "0", "1", "--out", str(tmp_path / "pk")])
    for seed in (0, 1):
        lamo.main([*args, "--seed", str(seed), "--out", str(tmp_path / f"alone{seed}")])
        packed = timeless_metrics(tmp_path / "pk" / f"s{seed}")
        alone = timeless_metrics(tmp_path / f"alone{seed}")
        for key in ("action_loss", "lm_loss", "grad_norm"):
            want, got = ([r[key] for r in rows if key in r] for rows in (alone, packed))
            assert len(want) == len(got) == 6 and rel(got, want) < 1e-5, key


def test_frozen_tensors_that_differ_between_runs_stay_each_runs(tiny_hdf5, tmp_path):
    """--pretrained none: each seed has its own random frozen body, which a pack must stack, not
    share. Each run's output through the pack equals its model's before packing (packing
    rebinds the runs' modules to the pack's tensors)."""
    cfg = lamo.resolve(lamo.parse_args([*dt_args(tiny_hdf5, 2), "--model", "lamo",
                                        "--pretrained", "none", "--n-layer", "1",
                                        "--n-head", "2", "--n-embd", "16", *NO_DROPOUT])[0])
    members = [lamo.start_run(replace(cfg, seed=s), tmp_path / f"s{s}", False) for s in range(2)]
    b = members[0].batcher.sample(4)
    batch = (b.states, b.actions, b.rtg, b.timesteps, b.mask)
    with torch.no_grad():
        want = [run.model.eval()(*batch) for run in members]
    assert not torch.equal(want[0], want[1])
    p = pack.Pack(members)
    p.template.eval()
    with torch.no_grad():
        got = p.forward(*(x.expand(2, *x.shape) for x in batch))
    for r in range(2):
        torch.testing.assert_close(got[r], want[r], rtol=1e-5, atol=1e-6)


def test_a_runs_masks_change_with_the_step(tiny_hdf5, tmp_path):
    """A run's dropout seed is its seed and its step, hashed (pinned here: resume relies on
    it): at another step, other masks."""
    assert pack.seed_of(3, 7) == int(np.random.SeedSequence([3, 7]).generate_state(1)[0])
    cfg = lamo.resolve(lamo.parse_args([*dt_args(tiny_hdf5, 2), "--dropout", "0.2"])[0])
    run = lamo.start_run(cfg, tmp_path / "r", resume=False)
    p = pack.Pack([run])
    b = run.batcher.sample(16)
    batch = tuple(x[None] for x in (b.states, b.actions, b.rtg, b.timesteps, b.mask))
    masks = []
    for step in (7, 8):
        run.step = step
        p.seed_dropout()
        masks.append(torch.cat([m.flatten() for m in p.batch_masks(p.stacked, batch)]))
    assert not torch.equal(masks[0], masks[1])


# raised inside torch's compiler
@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")
def test_a_compiled_pack_compiles_and_matches_the_eager_pack(tiny_hdf5, tmp_path):
    """--compile with a pack, dropout on: dynamo captures the vmapped training forward as one
    graph, without a break, and the runs' losses are the eager pack's, as both apply the masks
    drawn from the runs' generators. (Before those, vmap drew the masks, and the compiled pack's
    losses were NaN from its first step on the CPU.)"""
    from torch._dynamo.utils import counters
    args = [*dt_args(tiny_hdf5, 4), "--n-layer", "1", "--n-embd", "32", "--seed", "0", "1"]
    torch._dynamo.reset()
    counters.clear()
    lamo.main([*args, "--compile", "--out", str(tmp_path / "c")])
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    lamo.main([*args, "--out", str(tmp_path / "e")])
    for seed in ("s0", "s1"):
        compiled, eager = action_losses(tmp_path / "c" / seed), action_losses(tmp_path / "e" / seed)
        assert len(compiled) == 4 and rel(compiled, eager) < 1e-5


def test_what_a_pack_refuses(tiny_hdf5, tmp_path):
    """Every run is checked, not the first two: a third run's other --grad-clip, or its other
    step (resumed), is refused."""
    cfg = lamo.resolve(lamo.parse_args(dt_args(tiny_hdf5, 2))[0])
    three = [lamo.start_run(replace(cfg, seed=s), tmp_path / f"s{s}", False) for s in range(3)]
    odd = lamo.start_run(replace(cfg, grad_clip=0.5), tmp_path / "odd", False)
    with pytest.raises(runs.LamoError, match="must share --grad-clip: 0.25 vs 0.5"):
        pack.check_pack([*three[:2], odd])
    for steps in ((0, 0, 5), (0, 3, 5)):
        for run, step in zip(three, steps):
            run.step = step
        with pytest.raises(runs.LamoError, match="resume at different steps"):
            pack.check_pack(three)


def test_eval_workers_return_what_one_process_returns(tiny_hdf5, tmp_path):
    """--eval-workers 2 (two processes, each stepping a block of the episodes) gives returns
    and lengths equal to the envs stepped here, bit for bit; a worker's error reaches the parent."""
    cfg = lamo.resolve(lamo.parse_args(dt_args(tiny_hdf5, 2))[0])
    run = lamo.start_run(cfg, tmp_path / "r", False)
    episodes = [(100, 7), (3600, 8), (100, 9), (1800, 10), (100, 11)]
    results = []
    with workers.Envs(run.task, 1) as here, workers.Envs(run.task, 2) as two:
        for envs in (here, two):
            results.append(lamo.rollout(run.model.eval(), run.task, episodes,
                                        run.batcher.state_mean, run.batcher.state_std, 5,
                                        run.device, 60, envs))
        (returns1, lengths1), (returns2, lengths2) = results
        assert returns1.tolist() == returns2.tolist() and lengths1.tolist() == lengths2.tolist()
        assert len(set(lengths1.tolist())) > 1       # episodes ended at other steps: rows dropped
        # One episode over two workers (the second holds none), rewards as the env gives them
        # (float64: a float32 cast would round Hopper's)
        obs = [e.reset(10, [7]) for e in (here, two)]
        steps = [e.step(np.array([0]), np.full((1, 3), 0.3)) for e in (here, two)]
        assert np.array_equal(obs[0], obs[1]) and all(
            np.array_equal(a, b) for a, b in zip(steps[0], steps[1]))
        env = run.task.make_env(10)
        env.reset(seed=7)
        assert steps[1][1][0] == env.step(np.full(3, 0.3))[1] != np.float32(steps[1][1][0])
        env.close()
        envs = two
        envs.reset(10, [0, 1, 2])
        with pytest.raises(workers.WorkerError, match="an evaluation worker failed"):
            envs.step(np.array([0, 1, 2]), np.zeros((3, 5)))      # Hopper takes 3 numbers


def test_default_workers_follow_omp_num_threads(monkeypatch):
    """--eval-workers 0: as many workers as OMP_NUM_THREADS says (sweep.py sets each run's
    share), else the cores this process may use."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert workers.default_workers() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "x")
    assert workers.default_workers() == len(os.sched_getaffinity(0))


def test_how_many_runs_fit_by_hand():
    """16 GiB usable; now 6 GiB held: a 2 GiB body and a pack of 4 runs' parameters (1 GiB
    each). A run's AdamW state is 0.5 GiB, and one run's step adds 1.5 GiB, two runs' 2.5 GiB:
    1 GiB per run, 0.5 GiB of overhead. R runs need 2 + 0.5 + 2.5 R GiB: 5 fit (15 GiB), 6 not."""
    G = 2 ** 30
    assert pack.largest_pack(16 * G, 6 * G, 4, 1 * G, 0.5 * G, 1.5 * G, 2.5 * G) == 5
    assert pack.largest_pack(15 * G, 6 * G, 4, 1 * G, 0.5 * G, 1.5 * G, 2.5 * G) == 5
    assert pack.largest_pack(15 * G - 1, 6 * G, 4, 1 * G, 0.5 * G, 1.5 * G, 2.5 * G) == 4
    assert pack.largest_pack(2 * G, 6 * G, 4, 1 * G, 0.5 * G, 1.5 * G, 2.5 * G) == 0


def test_a_packs_memory_estimate_takes_its_measurements(tiny_hdf5, tmp_path, monkeypatch):
    """pack.out_of_memory's arithmetic (the GPU's figures stubbed): usable is the free memory
    plus this process's cache, under the fraction cap; a run costs one run's rows of the stacks
    and 8 bytes of AdamW state per trainable number; a pack of one assumes a second run's step
    adds as much as the first's. Those reach largest_pack and the message."""
    MiB, seen, real = 2 ** 20, [], pack.largest_pack
    gpu = {"empty_cache": None, "current_device": 0, "memory_reserved": 100 * MiB,
           "memory_allocated": 900 * MiB, "get_per_process_memory_fraction": 0.5}
    for name, value in gpu.items():
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value: v)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (1000 * MiB, 4000 * MiB))
    monkeypatch.setattr(pack, "step_memory", lambda *a: {1: 30 * MiB, 2: 50 * MiB}[a[-1]])
    monkeypatch.setattr(pack, "largest_pack", lambda *a: seen.append(a) or real(*a))
    cfg = lamo.resolve(lamo.parse_args(dt_args(tiny_hdf5, 2))[0])
    members = [lamo.start_run(replace(cfg, seed=s), tmp_path / f"s{s}", False) for s in range(2)]
    numbers = sum(p.numel() for p in members[0].model.parameters())     # DT: all trainable
    for R, step2 in ((2, 50), (1, 60)):
        message = str(pack.out_of_memory(pack.Pack(members[:R]), None, None, cfg, lamo, False))
        assert seen[-1] == (1100 * MiB, 900 * MiB, R, 4 * numbers, 8 * numbers, 30 * MiB,
                            step2 * MiB)
        per_run = (12 * numbers + (step2 - 30) * MiB) / MiB
        assert f"about {real(*seen[-1])} fit in the 1.1 GiB" in message
        assert f"(measured: {per_run:.1f} MiB per run)" in message


def test_a_pack_out_of_memory_is_one_line(tiny_hdf5, tmp_path, monkeypatch):
    """Out of memory at the first step: the one-line error of out_of_memory, no traceback; at a
    later step (memory grew in the run), the error itself."""
    steps = []

    def step(*a):
        steps.append(1)
        if len(steps) == 1 or len(steps) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(2, 4)
    monkeypatch.setattr(pack, "train_step", step)
    monkeypatch.setattr(pack, "out_of_memory", lambda p, *a: runs.LamoError(f"{p.R} runs: 1 fits"))
    args = [*dt_args(tiny_hdf5, 5), "--seed", "0", "1"]
    with pytest.raises(SystemExit, match="^error: 2 runs: 1 fits$"):
        lamo.main([*args, "--out", str(tmp_path / "a")])
    with pytest.raises(torch.OutOfMemoryError):
        lamo.main([*args, "--out", str(tmp_path / "b")])           # its third step
    # A resumed pack's first step is a first step too (it has no estimate of its own yet).
    monkeypatch.undo()
    lamo.main([*dt_args(tiny_hdf5, 2), "--seed", "0", "1", "--out", str(tmp_path / "c")])
    monkeypatch.setattr(pack, "train_step", step)
    monkeypatch.setattr(pack, "out_of_memory", lambda p, *a: runs.LamoError(f"{p.R} runs: 1 fits"))
    steps.clear()
    with pytest.raises(SystemExit, match="^error: 2 runs: 1 fits$"):
        lamo.main(["--resume", str(tmp_path / "c"), "--steps", "4"])


def test_resume_takes_no_per_run_values(tmp_path):
    with pytest.raises(SystemExit, match="^error: --seed takes one value with --resume"):
        lamo.main(["--resume", str(tmp_path), "--seed", "0", "1"])


def tiny_bench(tiny_hdf5, **cfg):
    """bench.py's functions on a tiny DT-preset model and a batcher of tiny_hdf5.
    -> (config, batcher)"""
    import data
    config = lamo.resolve(lamo.Config(model="dt", n_layer=1, n_embd=32, n_head=1, batch_size=4,
                                      context_len=5, **cfg))
    batcher = data.TrajectoryBatcher(data.load_trajectories(tiny_hdf5, 11, 3), 5, 1000, 1000.0,
                                     seed=0, device=torch.device("cpu"))
    return config, batcher


def test_bench_times_packs_of_lamo_with_its_lm_batch(tiny_hdf5, monkeypatch):
    """bench.py's packs: LaMo, DT and LaMo with the LM batch ("lamo+lm", Kitchen's lambda) at
    each size, every run of the last computing its own LM loss on the tiny GPT-2, its attention
    (and only the LM batch's) through pack.Recomputed."""
    import bench
    from dataclasses import replace
    dt, batcher = tiny_bench(tiny_hdf5)
    cfg = lamo.resolve(lamo.Config(pretrained="none", embed="mlp", n_layer=1, n_head=2,
                                   n_embd=16, batch_size=4, context_len=5, lm_seq_len=8))
    out, saved = {}, []                 # the rows at each save: a time limit keeps those before
    bench.bench_packs(cfg, dt, torch.device("cpu"), batcher, [1, 2], 1, 0, out,
                      lambda: saved.append({k for k in out if not k.endswith("_gb")}))
    assert {f"pack_{m}_{R}" for m in ("lamo", "dt", "lamo+lm") for R in (1, 2)} <= set(out)
    assert [len(rows) for rows in saved] == [1, 2, 3, 4, 5, 6]                 # one row at a time
    calls, recomputed = [], pack.Recomputed

    class Counted(recomputed):
        @staticmethod
        def forward(*args):
            calls.append(args[0].shape[-2])                          # T: the LM batch's 8
            return recomputed.forward(*args)
    monkeypatch.setattr(pack, "Recomputed", Counted)
    _, step = bench.pack_step(replace(cfg, lm_coef=0.1), torch.device("cpu"), batcher, 2)
    stats = step()                                  # (runs, 4): action, LM loss, norm, NaN flag
    assert stats.shape == (2, 4) and (stats[:, 1] > 5).all()          # ~ln(50257) = 10.8
    assert calls == [8]           # the LM forward's one layer (the record pass keeps nothing)
    assert (bench.pack_step(cfg, torch.device("cpu"), batcher, 2)[1]()[:, 1] == 0).all()


def test_bench_counts_what_a_packs_run_keeps_for_its_backward(tiny_hdf5, monkeypatch):
    """bench.py --saved on the tiny GPT-2: each run of a pack keeps some GiB for its action
    forward and for its LM batch, and more for the LM batch with its attention's scores kept
    (pack.Recomputed swapped for plain math_attention) than recomputed."""
    import bench
    _, batcher = tiny_bench(tiny_hdf5)
    cfg = lamo.resolve(lamo.Config(pretrained="none", embed="mlp", n_layer=1, n_head=2,
                                   n_embd=16, batch_size=4, context_len=5, lm_seq_len=64))
    recomputed = bench.bench_saved(cfg, torch.device("cpu"), batcher)
    assert recomputed["saved_pack_action_gib_per_run"] > 0
    monkeypatch.setattr(pack, "Recomputed",
                        type("Kept", (), {"apply": staticmethod(pack.math_attention)}))
    kept = bench.bench_saved(cfg, torch.device("cpu"), batcher)
    assert kept["saved_pack_action_gib_per_run"] == recomputed["saved_pack_action_gib_per_run"]
    assert 0 < recomputed["saved_pack_lm_gib_per_run"] < kept["saved_pack_lm_gib_per_run"]


def test_bench_reports_an_attention_kernel_that_fails_in_a_pack(tiny_hdf5):
    """bench.py --pack-attention: a kernel vmap cannot use is an error row, not a crash, and
    pack.ATTENTION (None: the pack's own attention) is restored after each kernel."""
    import bench
    cfg, batcher = tiny_bench(tiny_hdf5)
    before = pack.ATTENTION
    out = bench.bench_pack_attention(cfg, "dt", torch.device("cpu"), batcher, 2, 1, 0,
                                     ["math", "efficient"])
    assert out["packattn_math_dt_2"] > 0
    assert "packattn_efficient_dt_2" not in out and out["packattn_efficient_dt_2_error"]
    assert pack.ATTENTION is before


def test_bench_times_training_processes_side_by_side():
    """bench.py --processes: N single-run processes start, wait for each other, and each reports
    its steps over the window; their rates are summed (no speed asserted)."""
    import bench
    out = bench.bench_processes("dt", torch.device("cpu"), [1, 2], 0.5)
    assert set(out) == {"procs_dt_1", "procs_dt_2"} and min(out.values()) > 0


def test_bench_times_a_packs_evaluation(tiny_hdf5):
    """bench.py --pack-eval: every run's episodes (runs x targets x episodes) in one rollout."""
    import bench
    cfg, batcher = tiny_bench(tiny_hdf5, eval_workers=1, eval_episodes=2)
    out = bench.bench_pack_eval(cfg, torch.device("cpu"), batcher, 2, 30)
    assert out["pack_eval_2_episodes"] == 2 * 4 * 2
    assert out["pack_eval_2_s"] > 0 and out["pack_eval_2_env_steps_per_s"] > 0


def test_bench_times_no_step_gone_nan():
    """measure.timed refuses a speed for a training step whose statistics ended non-finite."""
    import measure
    cpu = torch.device("cpu")
    assert measure.timed(lambda: torch.ones(2, 4), 2, cpu) > 0
    with pytest.raises(RuntimeError, match="not finite"):
        measure.timed(lambda: torch.tensor([[float("nan"), 0.0, 1.0, 1.0]]), 2, cpu)


def test_bench_compiled_rows_compile_with_their_modes(tiny_hdf5, monkeypatch):
    """bench.py --compiled: the run and the pack compile with torch.compile's default mode, the
    CUDA-graph row with reduce-overhead (torch.compile stubbed: which modes reach it)."""
    import bench
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: modes.append(mode) or fn)
    cfg, batcher = tiny_bench(tiny_hdf5)
    out, saved = {}, []
    bench.bench_compiled(cfg, torch.device("cpu"), batcher, 2, 1, out,
                         lambda: saved.append(sorted(out)))
    assert {"compiled_lamo_1", "compiled_lamo_2", "cudagraphs_lamo_1", "cudagraphs_lamo_2"} \
        <= set(out)
    assert "compiled_lamo_1" in saved[0] and "compiled_lamo_2" not in saved[0]   # kept one by one
    assert modes == ["default", "default", "reduce-overhead", "reduce-overhead"]
    assert list(out)[-2:] == ["cudagraphs_lamo_1", "cudagraphs_lamo_1_peak_gpu_gb"]
    # what bounds each row's step: the profiler's busy time, and its top operators, for each
    for row in ("compiled_lamo_1", "compiled_lamo_2", "cudagraphs_lamo_1", "cudagraphs_lamo_2"):
        busy = out[f"busy_{row}"]
        assert busy["ms"] > 0 and busy["top"][0][1] > 0, (row, busy)


def test_bench_profiles_a_big_pack_by_shape_as_a_pack_of_four(tiny_hdf5):
    """bench.py --profile: each section's top operators, and by input shape, the pack's from a
    pack of 4 (record_shapes holds memory: a pack of 16 ran an H100 out)."""
    import bench
    cfg, batcher = tiny_bench(tiny_hdf5)
    tables = "".join(bench.profile_tables(cfg, torch.device("cpu"), batcher, 2, pack_runs=5,
                                          top=3))
    titles = [line for line in tables.splitlines() if line.startswith("## ")]
    assert [t.split(" (top")[0] for t in titles[-2:]] == [
        "## one training step of a pack of 5 runs, B=64 K=20 each, top",
        "## one training step of a pack of 4 runs, B=64 K=20 each, by shape"]
    assert len(titles) == 6 and "Input Shapes" in tables
