"""Packs of runs (pack.py): R runs of one task in lockstep in one process, each still a run."""
import json
import os
import signal

import pytest
import torch

import lamo
import pack
import runs

NO_DROPOUT = ["--dropout", "0", "--lora-dropout", "0"]


def losses(folder):
    return [json.loads(line)["action_loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
            if "action_loss" in line]


def metrics(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("steps_per_s", "eval_s")} for r in rows]


def dt_args(tiny_hdf5, steps=50):
    return ["--model", "dt", "--data", str(tiny_hdf5), "--steps", str(steps), "--eval-every", "25",
            "--eval-episodes", "1", "--eval-max-steps", "20", "--targets", "100", "--log-every", "1",
            "--batch-size", "16", "--context-len", "5"]


def lamo_args(tiny_hdf5, hf_tiny, steps=50):
    """LaMo on the tiny pre-trained GPT-2: LoRA over a frozen body that the pack shares."""
    return ["--data", str(tiny_hdf5), "--pretrained", str(hf_tiny[1]), "--steps", str(steps),
            "--eval-every", "25", "--eval-episodes", "1", "--eval-max-steps", "20", "--targets", "100",
            "--log-every", "1", "--batch-size", "16", "--context-len", "5"]


def rel(a, b):
    return max(abs(x / y - 1) for x, y in zip(a, b))


def test_a_pack_of_one_equals_the_run_alone(tiny_hdf5, hf_tiny, tmp_path):
    args = [*lamo_args(tiny_hdf5, hf_tiny), *NO_DROPOUT, "--lm-coef", "0"]
    lamo.main([*args, "--out", str(tmp_path / "alone")])
    cfg = lamo.resolve(lamo.parse_args([*args, "--out", str(tmp_path / "p")])[0])
    pack.train([lamo.start_run(cfg, tmp_path / "p", resume=False)], lamo)
    alone, packed = losses(tmp_path / "alone"), losses(tmp_path / "p")
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
        assert rel(losses(folder), losses(tmp_path / f"alone{seed}")) < 1e-5
        ckpt = torch.load(folder / "ckpt.pt", weights_only=False)
        assert ckpt["config"]["seed"] == seed and ckpt["step"] == 50
        assert ckpt["optimizer"]["state"], "the run's own AdamW state is in its checkpoint"
    assert losses(tmp_path / "pk" / "s0") != losses(tmp_path / "pk" / "s1")
    # A run of a pack is a run: --eval-only reproduces its stored evaluation.
    ev = lamo.main(["--eval-only", str(tmp_path / "pk" / "s1" / "ckpt.pt")])
    assert ev == torch.load(tmp_path / "pk" / "s1" / "ckpt.pt", weights_only=False)["last_eval"]


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
    assert "pk/s1: loss became NaN/inf before step 31; stopped" in capsys.readouterr().out
    assert not (tmp_path / "pk" / "s1" / "summary.json").exists()
    assert torch.load(tmp_path / "pk" / "s1" / "ckpt.pt", weights_only=False)["step"] == 25
    for seed in (0, 2):
        assert json.loads((tmp_path / "pk" / f"s{seed}" / "summary.json").read_text())["step"] == 50


def test_an_interrupted_pack_resumes_bit_for_bit(tiny_hdf5, hf_tiny, tmp_path, monkeypatch):
    """With dropout on: Ctrl-C at step 7 saves every run; `--resume DIR` continues the pack to
    the metrics of an uninterrupted pack, bit for bit (CPU); a finished pack is not trained again."""
    args = [*lamo_args(tiny_hdf5, hf_tiny, steps=30), "--seed", "0", "1"]
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
    monkeypatch.setattr(lamo, "action_loss", real)
    for seed in (0, 1):
        assert torch.load(tmp_path / "cut" / f"s{seed}" / "ckpt.pt", weights_only=False)["step"] == 7
    lamo.main(["--resume", str(tmp_path / "cut")])
    for seed in (0, 1):
        assert metrics(tmp_path / "cut" / f"s{seed}") == metrics(tmp_path / "whole" / f"s{seed}")
    with pytest.raises(SystemExit, match="every run of this pack has finished"):
        lamo.main(["--resume", str(tmp_path / "cut")])


def test_runs_of_other_data_ratios_share_a_pack(tiny_hdf5, tmp_path):
    """What sweep.py's grids group: runs that differ in --frac (their own subset and batcher)."""
    cfg = lamo.resolve(lamo.parse_args(dt_args(tiny_hdf5, 4))[0])
    members = [lamo.start_run(lamo.replace(cfg, frac=frac, seed=seed), tmp_path / f"f{frac}", False)
               for frac, seed in ((0.5, 0), (1.0, 0))]
    pack.train(members, lamo)
    subsets = [json.loads((tmp_path / f"f{f}" / "subset.json").read_text()) for f in (0.5, 1.0)]
    assert [s["n_trajectories"] for s in subsets] == [5, 10]
    assert losses(tmp_path / "f0.5") != losses(tmp_path / "f1.0")


def test_what_a_pack_refuses(tiny_hdf5, tmp_path):
    with pytest.raises(SystemExit, match="--compile does not apply to a pack"):
        lamo.main([*dt_args(tiny_hdf5, 2), "--seed", "0", "1", "--compile", "--out", str(tmp_path / "c")])
    run0 = lamo.start_run(lamo.resolve(lamo.parse_args(dt_args(tiny_hdf5, 2))[0]), tmp_path / "a", False)
    cfg1 = lamo.resolve(lamo.parse_args([*dt_args(tiny_hdf5, 2), "--lr", "1e-3"])[0])
    run1 = lamo.start_run(cfg1, tmp_path / "b", False)
    with pytest.raises(runs.LamoError, match="must share --lr"):
        pack.check_pack([run0, run1])
