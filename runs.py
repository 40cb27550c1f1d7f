"""The run folder of a lamo.py run: metrics.jsonl (and W&B), checkpoints and --resume, the summary
and the learning curve, Ctrl-C handling. Plumbing that lamo.py's training loop calls; the method
itself is in lamo.py. Imports run one way: data, tasks <- runs <- lamo."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from data import LamoError, LMBatcher
from tasks import PAPER, Task


@dataclass
class Run:
    """Everything a training run holds; checkpointed whole, so --resume continues bit for bit on
    CPU (on CUDA, nondeterministic kernels make it the same run within rounding)."""
    cfg: object                                   # lamo.Config
    task: Task
    folder: Path
    device: torch.device
    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    batcher: object
    lm: Optional[LMBatcher]
    subset: np.ndarray
    data_files: dict
    step: int = 0
    history: list = field(default_factory=list)   # every evaluation: {"step", "eval"}
    action_tokens: int = 0                         # the token-counted schedule's state (Atari)
    schedule_tokens: float = 0.0
    # action loss, LM loss, grad norm, non-finite flag, summed over the steps since the last log
    # row: checkpointed, so the first row after --resume is the uninterrupted run's
    loss_sums: torch.Tensor = field(default_factory=lambda: torch.zeros(4))
    loss_steps: int = 0                            # how many steps loss_sums holds


class MetricsLog:
    """metrics.jsonl (one JSON row per log step and per evaluation) and, with --wandb, W&B."""

    def __init__(self, run: Run):
        self.run = run
        self.file = open(run.folder / "metrics.jsonl", "a")
        self.since = run.step - run.loss_steps     # the step of the last loss row (or the start)
        self.t_last, self.t_step = time.time(), run.step          # for steps/s: this process's
        self.loss_status = self.score_status = ""
        self.wandb = None
        if run.cfg.wandb:
            import wandb
            # One W&B run per run folder, its id kept in the folder, so --resume continues the
            # same run.
            id_file = run.folder / "wandb_id"
            run_id = id_file.read_text() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id)
            # reinit="create_new" (wandb >= 0.19.10): the runs of a pack are W&B runs at once.
            self.wandb = wandb.init(project=run.cfg.wandb, group=run.cfg.wandb_group or None,
                                    id=run_id, name=run.folder.name, config=asdict(run.cfg),
                                    dir=str(run.folder), resume="allow", reinit="create_new")

    def write(self, row: dict):
        self.file.write(json.dumps(row) + "\n")
        if self.wandb:
            flat = {k: v for k, v in row.items() if k not in ("step", "eval")}
            for tgt, e in row.get("eval", {}).items():
                flat.update({f"eval/{tgt}/{k}": v for k, v in e.items()})
            self.wandb.log(flat, step=row["step"])

    def check_finite(self, sums):
        if sums[3].item() > 0:
            mark_stopped(self.run)
            raise LamoError(f"loss or gradient became NaN/inf before step {self.run.step}; "
                            f"stopped. "
                            f"{last_good(self.run)}: try a lower --lr, or check the data")

    def losses(self, sums, lr: float):
        """A row of the means of the steps summed in `sums` since the last row."""
        self.check_finite(sums)
        step = self.run.step
        n, self.since = step - self.since, step
        loss_action, loss_lm, grad_norm, _ = (sums / n).tolist()
        now = time.time()
        self.write({"step": step, "action_loss": loss_action, "lm_loss": loss_lm, "lr": lr,
                    "grad_norm": grad_norm,
                    "steps_per_s": (step - self.t_step) / (now - self.t_last)})
        self.t_last, self.t_step = now, step
        self.loss_status = f"loss {loss_action:.4f} lm {loss_lm:.3f} lr {lr:.1e}"

    def evaluation(self, row: dict):
        self.write(row)
        self.file.flush()
        self.score_status = f"score {max(e['score_mean'] for e in row['eval'].values()):.1f}"

    @property
    def status(self) -> str:
        """The progress bar's postfix: the latest losses and lr, and the latest best score."""
        return ", ".join(s for s in (self.loss_status, self.score_status) if s)

    def close(self):
        self.file.close()
        if self.wandb:
            self.wandb.finish()


STOPPED = "stopped.json"          # in the folder of a run that went NaN/inf


def mark_stopped(run: Run):
    """Leave stopped.json in the folder of a run that went NaN/inf before run.step. Its ckpt.pt
    is its last good one, at an older step than its pack-mates': `--resume` of a pack's folder
    leaves it out (lamo.pack_members), and `--resume` of its own folder retries it (start_run
    removes the mark)."""
    (run.folder / STOPPED).write_text(json.dumps({"stopped_before_step": run.step}) + "\n")


def last_good(run: Run) -> str:
    """What a run that went NaN/inf leaves: its last checkpoint, or none yet."""
    ckpt = run.folder / "ckpt.pt"
    return (f"The last good checkpoint {ckpt} is intact (--resume takes it)" if ckpt.exists()
            else "It saved no checkpoint before that")


def save_atomic(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)              # a crash mid-write leaves the previous checkpoint intact


def save_checkpoint(run: Run, loss_sums: torch.Tensor):
    """ckpt.pt: what --resume needs to go on bit for bit, loss_sums (the trainer's, since the last
    log row) included, and what --eval-only needs."""
    batcher = run.batcher
    trainable = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    save_atomic({"step": run.step, "config": asdict(run.cfg),
                 "tokens": (run.action_tokens, run.schedule_tokens),
                 "last_eval": run.history[-1]["eval"] if run.history else None,
                 "last_eval_step": run.history[-1]["step"] if run.history else None,
                 "loss_sums": loss_sums.detach().cpu(),
                 "data_sha256": sorted(run.data_files.values()),
                 "frozen_sums": frozen_sums(run.model),
                 "trainable": trainable,
                 "state_mean": batcher.state_mean, "state_std": batcher.state_std,
                 "optimizer": run.optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "batches": batcher.rng.bit_generator.state,
                         "lm": run.lm.rng.bit_generator.state if run.lm else None,
                         # the run's own GPU only: resumed under Slurm, it may be the only one seen
                         "cuda": torch.cuda.get_rng_state(run.device)
                                 if run.device.type == "cuda" else None}},
                run.folder / "ckpt.pt")


def frozen_sums(model) -> torch.Tensor:
    """A fingerprint of the weights a checkpoint does not hold, the frozen ones (rebuilt from the
    seed for --pretrained none, read again from the weights file otherwise): each one's sum in
    float64. (n_frozen,)"""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if not frozen:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([p.detach().sum(dtype=torch.float64) for p in frozen]).cpu()


def load_trainable(model, ckpt):
    """The checkpoint's trainable tensors into model, whose frozen ones must be those the run
    trained with: a random body from another torch version's initialisation, or another weights
    file, would otherwise be evaluated or trained on without a word."""
    missing = (set(n for n, p in model.named_parameters() if p.requires_grad) -
               set(ckpt["trainable"]))
    if missing:
        raise LamoError(f"checkpoint lacks trainable parameter(s) {', '.join(sorted(missing)[:3])}")
    saved, now = ckpt.get("frozen_sums"), frozen_sums(model)
    # rtol: another device sums in another order; another body differs in every sum
    if saved is not None and not (saved.shape == now.shape
                                  and torch.allclose(saved, now, rtol=1e-6, atol=1e-6)):
        raise LamoError("the frozen weights differ from those the checkpoint's run trained with "
                        "(--pretrained none rebuilt by another torch version, or another weights "
                        "file?); use the environment it trained in")
    model.load_state_dict(ckpt["trainable"], strict=False)


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict):
    """Optimizer.load_state_dict, keeping the live optimizer's implementation: it would copy the
    saved fused/foreach/capturable flags over the live ones (a CPU checkpoint would turn a fused
    CUDA AdamW into a slower one) and place AdamW's step counters by the saved flags."""
    for group, live in zip(saved["param_groups"], optimizer.param_groups):
        group.update({k: live[k] for k in ("fused", "foreach", "capturable", "differentiable")
                      if k in live})
    optimizer.load_state_dict(saved)


def restore(run: Run):
    """Load ckpt.pt into the freshly built run (RNG states included), and cut metrics.jsonl back to
    the checkpoint's step."""
    # To the CPU first: RNG states must stay CPU byte tensors; load_state_dict moves the rest.
    ckpt = torch.load(run.folder / "ckpt.pt", map_location="cpu", weights_only=False)
    if json.loads((run.folder / "subset.json").read_text())["indices"] != run.subset.tolist():
        raise LamoError(f"the dataset changed since {run.folder} started: "
                        f"its --frac subset differs")
    same = lambda a, b: (a is None) == (b is None) and (a is None or np.array_equal(a, b))
    if (ckpt.get("data_sha256", sorted(run.data_files.values())) != sorted(run.data_files.values())
            or not same(ckpt["state_mean"], run.batcher.state_mean)
            or not same(ckpt["state_std"], run.batcher.state_std)):
        raise LamoError(f"the dataset changed since {run.folder} started: its files' sha256 (or "
                        f"its state mean and std) differ from the checkpoint's. Resume with the "
                        f"data it trained on, or start a new run")
    load_trainable(run.model, ckpt)
    load_optimizer(run.optimizer, ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    cuda_rng = ckpt["rng"]["cuda"]
    if isinstance(cuda_rng, list):   # older checkpoints: every visible GPU's state
        index = run.device.index or 0
        cuda_rng = cuda_rng[index] if index < len(cuda_rng) else None
    if cuda_rng is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(cuda_rng, run.device)
    run.batcher.rng.bit_generator.state = ckpt["rng"]["batches"]
    if run.lm:
        run.lm.rng.bit_generator.state = ckpt["rng"]["lm"]
    metrics = run.folder / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:             # only a kill mid-write tears a line, the last
                raise LamoError(f"{metrics}: line {i + 1} is not JSON; repair or remove it "
                                f"and resume again") from None
            print(f"{metrics}: its last line was cut short (killed mid-write); dropped")
    rows = [r for r in rows if r["step"] <= ckpt["step"]]      # drop what came after the checkpoint
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.step = ckpt["step"]
    run.action_tokens, run.schedule_tokens = ckpt["tokens"]
    run.history = [r for r in rows if "eval" in r]
    if "loss_sums" in ckpt:        # older checkpoints: the first row after resume counts from it
        run.loss_sums = ckpt["loss_sums"]
        run.loss_steps = run.step - max((r["step"] for r in rows if "action_loss" in r),
                                        default=0)
    print(f"resuming {run.folder} at step {run.step}")


def summarize(history: list[dict], steps: int) -> dict:
    """Per target: final, best and the paper's metric, the mean over evaluations in the last 20% of
    training (the last 8 of 40 in the paper's protocol); headline = the best target's last-20% mean.
    Deviation: the paper picks the target per task over its 3 seeds; one run can only pick its own
    (sweep.py picks per table cell, as the paper does)."""
    out = {}
    for tgt in history[-1]["eval"]:
        late = ([h["eval"][tgt] for h in history if h["step"] > 0.8 * steps] or
                [history[-1]["eval"][tgt]])
        scores = [h["eval"][tgt]["score_mean"] for h in history]
        out[tgt] = {"final": scores[-1], "best": max(scores),
                    "last20": float(np.mean([e["score_mean"] for e in late])),
                    "last20_return": float(np.mean([e["return_mean"] for e in late])),
                    "n_last20": len(late)}
    best = max(out, key=lambda t: out[t]["last20"])
    return {"targets": out, "headline": out[best]["last20"], "headline_target": best}


def finish(run: Run, reference: tuple[tuple | None, str]) -> dict:
    """summary.json (self-describing), the printed table, curve.png. reference: the paper's
    (mean, std, table) for this run, or None and why not (lamo.paper_reference)."""
    cfg, task = run.cfg, run.task
    summary = summarize(run.history, cfg.steps)
    paper, why_not = reference
    (run.folder / "summary.json").write_text(json.dumps({
        "task": task.name, "env": cfg.env, "model": cfg.model, "frac": cfg.frac, "seed": cfg.seed,
        "step": run.step, "metric": f"{task.score_name} (x100; 'return' keys are raw returns)",
        "evaluation_env": task.gym_id, "data": run.data_files, **summary,
        "paper": dict(zip(("mean", "std", "table"), paper)) if paper else None}, indent=2))
    print_eval(run.history[-1]["eval"],
               f"\nfinal evaluation at step {run.step} ({cfg.eval_episodes} episodes per target):")
    print(f"\n  {'target':>8} {'final':>8} {'best':>8} {'last 20%':>9}   "
          f"{task.score_name}, mean over episodes")
    for tgt, s in summary["targets"].items():
        print(f"  {tgt:>8} {s['final']:>8.1f} {s['best']:>8.1f} {s['last20']:>9.1f}   "
              f"({s['n_last20']} evaluations in the last 20%)")
    spread = "" if paper is None or paper[1] is None else f" ± {paper[1]}"   # Table 9's DT: none
    in_paper = f"; the paper's {paper[2]}: {paper[0]}{spread}" if paper else ""
    in_paper += f"; {why_not}" if why_not else ""
    print(f"headline (paper's metric: best target's last-20% mean): {summary['headline']:.1f} "
          f"at target {summary['headline_target']}{in_paper}\nrun folder: {run.folder}")
    plot_curve(run, paper is not None, run.folder / "curve.png")
    return summary


def print_eval(ev: dict, header: str):
    print(f"{header}\n  {'target':>8} {'return':>18} {'normalised score':>18}")
    for tgt, e in ev.items():
        print(f"  {tgt:>8} {e['return_mean']:>9.1f} ± {e['return_std']:<6.1f} "
              f"{e['score_mean']:>9.1f} ± {e['score_std']:<6.1f}")


def plot_curve(run: Run, compared: bool, path: Path):
    """Score per target with a ±std band over episodes, the paper's LaMo and DT numbers for this
    cell as dashed and dotted lines (marked "other settings" unless the run trains the paper's:
    compared), and the training losses beside it."""
    import matplotlib                     # imported here: only a finished run pays for it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg, history = run.cfg, run.history
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.array([h["step"] for h in history])
    for tgt in history[-1]["eval"]:
        mean = np.array([h["eval"][tgt]["score_mean"] for h in history])
        std = np.array([h["eval"][tgt]["score_std"] for h in history])
        line, = left.plot(steps, mean, "o-", ms=3, label=f"target {tgt}")
        left.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for model, name, style in (("lamo", "LaMo", "--"), ("dt", "DT", ":")):
        cell = PAPER.get((run.task.name, cfg.frac, model))
        if cell:
            other = "" if compared else ", other settings"
            left.axhline(cell[0], color="k", ls=style, lw=1,
                         label=f"paper {name} ({cell[2]}{other}): {cell[0]}")
    left.set(xlabel="gradient step", ylabel=run.task.score_name,
             title="evaluation (±std over episodes)")
    left.legend(fontsize=7)
    rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "action_loss" in r]
    right.plot([r["step"] for r in rows], [r["action_loss"] for r in rows], label="action loss")
    if cfg.lm_coef:
        right.plot([r["step"] for r in rows], [r["lm_loss"] for r in rows], label="LM loss")
    right.set(xlabel="gradient step", ylabel="loss", yscale="log", title="training losses")
    right.legend(fontsize=7)
    body = "random init" if cfg.pretrained == "none" else cfg.pretrained
    fig.suptitle(f"{run.task.name}, {100 * cfg.frac:g}% of the trajectories, "
                 f"{'LaMo' if cfg.model == 'lamo' else 'DT'} ({body}), seed {cfg.seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def ctrl_c_saves_checkpoint():
    """Ctrl-C, or SIGTERM (a cluster preempting or requeueing the job): the first one lets the
    current step finish, then the loop saves a checkpoint and exits (an interrupt inside
    optimizer.step() would leave half-updated weights); a second Ctrl-C aborts at once. A SIGTERM
    never aborts: Slurm signals every process of a job, so a run under sweep.py gets Slurm's
    SIGTERM and the sweep's SIGINT for one stop. Yields a list that is non-empty once stopping."""
    stop = []

    def on_signal(signum, _frame):
        if signum == signal.SIGINT and signal.SIGINT in stop:
            raise KeyboardInterrupt
        if not stop:
            tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step "
                       f"(Ctrl-C again to abort without saving)")
        stop.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
