"""pack: several runs of one task trained as one model, in lockstep, in one process.

    python lamo.py --env hopper-medium-v2 --frac 0.1 --seed 0 1 2 --out hop   # hop/s0, s1, s2

The runs of one table cell differ only in their seeds (a pack also takes other --frac, --frac-seed,
--lr and --weight-decay), and for LaMo only in what trains (LoRA, the c_attn bias, embeddings and
heads: a few million parameters each); the frozen GPT-2 body is the same. A pack keeps every run a
run -- built by lamo.start_run exactly as it would be alone, with its own data subset and batcher,
batch RNG, gradient clip (its own norm), NaN check, run folder and checkpoint -- and shares only the
step: each parameter of the R models is stacked along a leading run axis (a frozen tensor equal in
every run is kept once), every run's module then holds views of those stacks, and torch.func.vmap
runs lamo's own single-run forward over the run axis through functional_call. So the frozen matmuls
see all R x B windows at once, and the model section of lamo.py stays the only model. One AdamW over
the stacked tensors is R AdamWs, as it is elementwise; RunAdamW gives each run its own lr and weight
decay (and so its own lr schedule: Atari's counts each run's tokens).

Each run's dropout masks are its own (RunDropout): drawn from a generator of the run's, reseeded
from its seed and step, never from the process's one generator. So a run's masks do not depend
on its pack-mates, two runs of one seed end bit-identical, and resume needs no saved state.
Deviation: they are not the masks the run draws alone (torch's dropout draws from the process's
generator), so a run in a pack equals the same run alone only without dropout (tested at
dropout 0). A pack is reproducible as a pack: its resume is bit-for-bit on CPU, like a run's.

lamo.py imports this file, so the method's functions (losses, schedule, evaluation) come in as the
argument `lamo`, the module itself: no import circle.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.nn.attention import sdpa_kernel
from torch.overrides import TorchFunctionMode

from data import Batch, LamoError, progress, to_device
from runs import (MetricsLog, Run, ctrl_c_saves_checkpoint, finish, last_good, mark_stopped,
                  save_checkpoint)

# What may differ between the runs of a pack; everything else is one config. On lamo.py's command
# line each takes several values (one per run), and --resume several run folders.
PER_RUN = {"seed", "frac", "frac_seed", "lr", "weight_decay", "out", "resume", "wandb_group"}

# None: a pack's attention is RunDropout's, written out. bench.py --pack-attention sets SDPA's
# kernels here instead, to time them under vmap (without dropout).
ATTENTION = None


def over_runs(fn, params, drops: list, *args, recompute: bool = False):
    """fn(params, *args) for each run, vmapped over the run axis (dim 0 of each), under RunDropout
    with the run's rows of the keep-masks `drops` (none without dropout); with `recompute`, its
    attention keeps only its inputs for the backward (Recomputed). Its attention is
    written out in plain ops (math_attention: softmax(q k^T) in fp32, what SDPA's math kernel
    computes, times v), not one of SDPA's kernels, none of which serves a pack on CUDA (torch
    2.11): under vmap the memory-efficient kernel fails in its backward ("LSE is not correctly
    aligned"), cuDNN's and flash give "No available kernel" (bench.py --pack-attention, on an
    H200), and the math kernel's bf16 backward fails ("expected input and grad types to match",
    a pack of 3 seeds on an H100; on the CPU it runs). The price: the (R B, heads, 3K, 3K)
    scores, masks and dropout are memory-bound work, most of an eager pack's step on the GPU
    (README, "Packs"), which --compile fuses. randomness="error": dropout's masks come in drawn
    (RunDropout), so a random draw inside would be a bug."""
    def one(params, drops, *args):
        with RunDropout(drops, recompute):
            return fn(params, *args)
    with sdpa_kernel(ATTENTION) if ATTENTION else contextlib.nullcontext():
        return vmap(one, randomness="error")(params, drops, *args)


class RunDropout(TorchFunctionMode):
    """Dropout in a pack's vmapped forward with each run's masks its own, drawn beforehand from the
    run's generator (Pack.drop_masks) and passed in through vmap like the batch. vmap's
    randomness="different" would draw all R runs' masks from the process's one generator, so a
    run's masks would hang on its place in the pack and on its pack-mates. This mode catches the
    model's two dropouts, F.dropout (embeddings, residual branches, LoRA's input) and the one
    inside F.scaled_dot_product_attention, and applies the next keep-mask of `masks` (one run's,
    in the order the forward drops). SDPA takes no mask for its dropout, so attention is written
    out here, with dropout or without (over_runs says why): softmax(q k^T / sqrt(d), causal or
    padding mask) in fp32, dropped, times v (math_attention). Each mask must have its dropout's
    shape, and the forward must use them all: else an error, not a silent broadcast.
    masks=None records each dropout's (shape, p) instead and drops nothing: how Pack.drop_masks
    learns the forward's. recompute: the attention through Recomputed, which keeps its inputs,
    not its (T, T) scores, for the backward (the LM batch's 1,024 tokens)."""

    def __init__(self, masks: list | None, recompute: bool = False):
        super().__init__()
        self.masks = masks
        self.recompute = recompute
        self.sites = []                                  # (shape, p) of each dropout met

    def keep(self, shape, p: float):                    # -> this dropout's keep-mask, or None
        self.sites.append((tuple(shape), p))
        if self.masks is None:
            return None
        if len(self.sites) > len(self.masks):
            raise RuntimeError("a pack's training forward dropped more often than it has masks "
                               "for: draw them with Pack.drop_masks")
        keep = self.masks[len(self.sites) - 1]
        if keep.shape != shape:
            raise RuntimeError(f"a pack's dropout of shape {tuple(shape)} got a mask of "
                               f"{tuple(keep.shape)}: the recorded dropouts are not this forward's")
        return keep

    def dropout(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        keep = self.keep(x.shape, p)
        return x if keep is None else kept(x, keep, p)

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                  scale=None, enable_gqa=False):                 # (B, nh, T, hd) x 3
        keep = self.keep((*q.shape[:-1], k.shape[-2]), dropout_p) if dropout_p else None
        if ATTENTION and not dropout_p:                   # bench.py --pack-attention's kernels
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                  is_causal=is_causal, scale=scale,
                                                  enable_gqa=enable_gqa)
        if enable_gqa or (attn_mask is not None and (is_causal or attn_mask.dtype != torch.bool)):
            raise NotImplementedError("pack.RunDropout's attention takes a causal or a bool mask, "
                                      "no grouped-query heads: what lamo.py's model passes")
        device = q.device.type
        if torch.is_autocast_enabled(device):        # what SDPA gets under autocast, fp32 or not
            q, k, v = (x.to(torch.get_autocast_dtype(device)) for x in (q, k, v))
        with torch.autocast(device, enabled=False):
            if self.recompute:
                return Recomputed.apply(q, k, v, attn_mask, is_causal, keep, dropout_p, scale)
            return math_attention(q, k, v, attn_mask, is_causal, keep, dropout_p, scale)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None and self.masks is not None and len(self.sites) != len(self.masks):
            raise RuntimeError(f"a pack's training forward dropped {len(self.sites)} times, "
                               f"and it has {len(self.masks)} masks")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return self.dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)


def math_attention(q, k, v, attn_mask, is_causal: bool, keep, p: float, scale
                   ) -> torch.Tensor:
    """softmax(q k^T scale, masked) v with dropout's keep-mask `keep` (None: no dropout). The
    scores, softmax and dropout in fp32 whatever the inputs, as SDPA's math kernel computes them
    (q and k each scaled by sqrt(scale); a fully masked (padding) row gets a finite min, not
    -inf); then the probabilities in v's dtype for P v, as flash attention (a run alone's kernel
    on a GPU) rounds them to bf16 for its second matmul. (Its backward, autograd's, also gets
    dP = dO v^T out of a bf16 matmul, where flash keeps dP in fp32.) In fp32 that is the math
    kernel bit for bit. In bf16 its output's and gradients' errors are within 1.5 x the math
    kernel's (test_pack.py), and a compiled pack moves 7% fewer bytes than with P v in fp32
    (bench.py --traffic: 13.26 against 14.29 GiB a run), which is what a big pack's step on a
    GPU is bound by, by that count (README, "Packs"). (B, nh, T, hd) x 3 -> (B, nh, T, hd) in
    v's dtype."""
    s = math.sqrt(1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    att = (q.float() * s) @ (k.float().transpose(-2, -1) * s)                 # (B, nh, T, T)
    if is_causal:
        attn_mask = torch.ones(att.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:                                    # bool, True = attend
        att = att.masked_fill(~attn_mask, torch.finfo(att.dtype).min)
    att = att.softmax(-1)
    if keep is not None:
        att = kept(att, keep, p)
    return att.to(v.dtype) @ v


class Recomputed(torch.autograd.Function):
    """math_attention() that keeps only its inputs for the backward and computes its (T, T) scores
    again there. Autograd would keep the softmax's fp32 output, its dropped copy and fp32 copies
    of q and k: for the LM batch's 1,024 tokens under bf16, 150 MiB a layer and run beside 24 MiB
    of keep-mask, where SDPA's fused kernel in a run alone keeps none of it. Same forward; its
    backward is math_attention's own (torch.func.vjp of the same ops), so the gradients are
    autograd's bit for bit (tested); the price is one more forward of the attention. A Function,
    not torch.utils.checkpoint, which fails under vmap: generate_vmap_rule runs this under it."""
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, keep, p, scale):
        return math_attention(q, k, v, attn_mask, is_causal, keep, p, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, ctx.is_causal, keep, ctx.p, ctx.scale = inputs
        ctx.save_for_backward(q, k, v, attn_mask, keep)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, attn_mask, keep = ctx.saved_tensors
        again = lambda q, k, v: math_attention(q, k, v, attn_mask, ctx.is_causal, keep, ctx.p,
                                               ctx.scale)
        with torch.autocast(q.device.type, enabled=False):       # as the forward ran
            _, vjp = torch.func.vjp(again, q, k, v)
            return *vjp(grad), None, None, None, None, None


def kept(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with a given keep-mask: x / (1 - p) where kept, else 0 (and 0 at p = 1, without
    the 0 * inf of 1 / (1 - p) in the backward)."""
    return torch.where(keep, x * (1 / (1 - p) if p < 1 else 0.0), 0.0)


def seed_of(seed: int, step: int) -> int:
    """A run's dropout seed at a step: its --seed and the step, hashed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


class RunAdamW(torch.optim.Optimizer):
    """AdamW over tensors stacked along a run axis, (R, ...), each run with its own lr and weight
    decay: a group's "lr" and "weight_decay" hold R numbers (pack.train sets the lrs each step
    from each run's schedule). It is torch's AdamW (torch/optim/adam.py, _single_tensor_adam with
    decoupled weight decay) op for op, as foreach ops over the group's tensors. Where torch
    multiplies by a number that here differs by run (1 - lr wd, and -lr / (1 - beta1^t) folded
    out of addcdiv), it multiplies by an (R, 1, ...) tensor of those numbers, each computed in
    float64 and rounded to fp32 as torch rounds its number: so on the CPU each run steps bit for
    bit as torch's AdamW steps it alone (tested). Its state is torch's (step, exp_avg,
    exp_avg_sq), so a run's rows of it are the run's own AdamW state; a tensor without a gradient
    is skipped, as torch skips it. A run alone on a GPU steps with torch's fused AdamW, which
    rounds otherwise (and runs as one kernel, where this is about 2 per tensor and 10 per group:
    well under a millisecond of launches beside a pack's step)."""

    def __init__(self, params, lr: list[float], weight_decay: list[float],
                 betas=(0.9, 0.999), eps: float = 1e-8):
        if len(lr) != len(weight_decay):
            raise ValueError(f"RunAdamW: {len(lr)} lrs and {len(weight_decay)} weight decays")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}
            states = [self.state[p] for p in params]
            torch._foreach_add_([s["step"] for s in states], 1)
            t = states[0]["step"].item()                 # a CPU tensor: no wait on the GPU
            if any(s["step"].item() != t for s in states):
                raise RuntimeError("RunAdamW steps a group's tensors together; they are at "
                                   "different steps")
            (beta1, beta2), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            if len(lr) != len(params[0]) or len(wd) != len(params[0]):
                raise ValueError(f"RunAdamW: {len(lr)} lrs and {len(wd)} weight decays for "
                                 f"{len(params[0])} runs")
            # torch's numbers, per run: 1 - lr wd and -step_size, in float64, then fp32
            per_run = np.array([[1 - a * b for a, b in zip(lr, wd)],
                                [-(a / (1 - beta1 ** t)) for a in lr]], dtype=np.float32)
            decay, neg_step_size = to_device(per_run, params[0].device)              # (R,) each
            by_run = lambda x: [x.view(-1, *[1] * (p.dim() - 1)) for p in params]
            grads = [p.grad for p in params]
            exp_avg = [s["exp_avg"] for s in states]
            exp_avg_sq = [s["exp_avg_sq"] for s in states]
            if any(wd):
                torch._foreach_mul_(params, by_run(decay))        # param.mul_(1 - lr wd)
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, (1 - beta2 ** t) ** 0.5)
            torch._foreach_add_(denom, group["eps"])
            # param.addcdiv_(exp_avg, denom, value=-step_size), which computes
            # param + (value * exp_avg) / denom
            update = torch._foreach_mul(exp_avg, by_run(neg_step_size))
            torch._foreach_div_(update, denom)
            torch._foreach_add_(params, update)


class Pack:
    """The stacked view of R runs: shared frozen tensors, stacked per-run tensors, one optimizer."""

    def __init__(self, runs: list[Run]):
        cfg, self.runs, self.R = runs[0].cfg, runs, len(runs)
        self.template = runs[0].model                    # its structure; its tensors are replaced
        named = [dict(run.model.named_parameters()) for run in runs]
        self.shared, self.stacked = {}, {}
        for name, p in named[0].items():
            copies = [n[name] for n in named]
            if not p.requires_grad and all(torch.equal(q, p) for q in copies[1:]):
                self.shared[name] = p.detach()          # the frozen pre-trained body: one copy
                views = [p.data] * self.R
            else:
                stack = torch.stack([q.detach() for q in copies])              # (R, *shape)
                self.stacked[name] = torch.nn.Parameter(stack, requires_grad=p.requires_grad)
                views = list(stack)
            for q, view in zip(copies, views):           # each run's module now reads the stack
                q.data = view
        self.trainable = [n for n, p in self.stacked.items() if p.requires_grad]
        self.device = runs[0].device
        self.generators = [torch.Generator(self.device) for _ in runs]   # each run's dropout's
        # vmap's rule for F.linear adds the bias after the matmul, where autocast does not cast
        # it: an fp32 bias turns the bf16 product fp32, so in a pack every branch of the body
        # and the MLP's 4d-wide hidden layer would be fp32 (twice the bytes, a cast before each
        # next matmul) where a run alone keeps them bf16. So under bf16 the body's linear
        # biases come in bf16 (a differentiable cast, once a step), as autocast casts them alone.
        body = [(name, m) for name, m in self.template.named_modules()
                if name.startswith("gpt.h.") and getattr(m, "bias", None) is not None]
        self.bf16_biases = ({f"{name}.bias" for name, m in body if m.weight.dim() == 2}
                            if self.template.precision == "bf16" else set())
        self.sites = {}                                  # drop_masks: input shapes -> dropouts
        # --compile: the training forward as compiled kernels (dynamo traces through vmap), as
        # lamo.train compiles a run's; the evaluation stays eager, as a run's does. On a GPU this
        # also fuses the written-out attention's elementwise work (over_runs).
        self.train_forward = (torch.compile(self.vmapped, mode=cfg.compile_mode) if cfg.compile
                              else self.vmapped)
        # Each run's lr and weight decay its own (RunAdamW); betas and eps those of lamo's AdamW.
        groups = [run.optimizer.param_groups[0] for run in runs]
        self.optimizer = RunAdamW([self.stacked[n] for n in self.trainable],
                                  lr=[g["lr"] for g in groups],
                                  weight_decay=[g["weight_decay"] for g in groups],
                                  betas=groups[0]["betas"], eps=groups[0]["eps"])
        self.load_optimizer_states()

    def forward(self, states, actions, rtg, timesteps, mask=None, params=None):  # (R, B, K, ...)
        """lamo's DecisionTransformer.forward, once per run, batched over the run axis; in
        training, with each run's own dropout masks. params: the stacked tensors to use (default:
        all runs'; step_memory passes the first few)."""
        params = params or self.stacked
        batch = (states, actions, rtg, timesteps) + (() if mask is None else (mask,))
        if not self.template.training:
            return self.vmapped(params, [], *batch)
        return self.train_forward(params, self.batch_masks(params, batch), *batch)

    def batch_masks(self, params, batch: tuple) -> list[torch.Tensor]:
        """drop_masks for the training forward on batch (R, B, K, ...)."""
        record = lambda: functional_call(self.template, self.first_run(params),
                                         tuple(x[0] for x in batch))
        return self.drop_masks(params, ("dt", *(x.shape[1:] for x in batch)), record)

    def vmapped(self, params, drops: list, *batch):
        """The forward proper (what --compile compiles): each run's tensors, its rows of the
        keep-masks `drops` (none without dropout) and its batch through lamo's model."""
        one = lambda params, *batch: functional_call(self.template, self.weights(params), batch)
        return over_runs(one, params, drops, *batch)

    def weights(self, params) -> dict:
        """Every tensor of one run's model (inside vmap: the shared ones and its own), the body's
        linear biases in bf16 under bf16 (self.bf16_biases)."""
        return {k: v.to(torch.bfloat16) if k in self.bf16_biases else v
                for k, v in {**self.shared, **params}.items()}

    def first_run(self, params) -> dict:
        """The first run's tensors, shared and its own: one run's model for functional_call."""
        return {**self.shared, **{k: v[0] for k, v in params.items()}}

    def drop_masks(self, params, key: tuple, record) -> list[torch.Tensor]:
        """The keep-masks of every dropout of one training forward, for the runs in params: each
        (runs, *shape) bool, row r drawn by run r's generator, in the order the forward drops.
        Where the forward drops, and in what shapes, is learnt once per input shape (key):
        record() runs one run's forward, without gradients, under a recording RunDropout."""
        if key not in self.sites:
            recorder = RunDropout(None)
            with torch.no_grad(), recorder:
                record()
            self.sites[key] = recorder.sites
        n = len(next(iter(params.values())))                      # R, or fewer (step_memory)
        sites = self.sites[key]
        masks = [None] * len(sites)
        # One draw a run for all the dropouts of one rate (not one a run and dropout: 49 sites
        # in GPT-2's forward), split into the dropouts' shapes.
        for p in sorted({p for _, p in sites}):
            mine = [i for i, (_, q) in enumerate(sites) if q == p]
            sizes = [math.prod(sites[i][0]) for i in mine]
            keep = torch.empty((n, sum(sizes)), dtype=torch.bool, device=self.device)
            for row, g in zip(keep, self.generators):
                row.bernoulli_(1 - p, generator=g)
            for i, part in zip(mine, keep.split(sizes, dim=1)):
                masks[i] = part.view(n, *sites[i][0])
        return masks

    def seed_dropout(self):
        """Reseed each run's dropout generator from its seed and the step it is at."""
        for g, run in zip(self.generators, self.runs):
            g.manual_seed(seed_of(run.cfg.seed, run.step))

    def policy(self, S, A, R, TS, mask, runs: np.ndarray):          # (n, K, ...), runs (n,)
        """The pack as lamo.rollout's model: row i through the weights of run runs[i]. Rows come
        grouped by run (ascending), a run's rows fewer as its episodes end; each run's rows go
        into a (R, m, ...) block padded to the longest (padding rows are computed and dropped).
        -> (n, K, act)."""
        counts = np.bincount(runs, minlength=self.R)
        m = int(counts.max())
        first = np.cumsum(counts) - counts                   # each run's first row
        slot = torch.as_tensor(runs * m + np.arange(len(runs)) - first[runs], device=S.device)

        def padded(x, fill=0):                                        # (n, ...) -> (R, m, ...)
            out = x.new_full((self.R * m, *x.shape[1:]), fill)
            out[slot] = x
            return out.view(self.R, m, *x.shape[1:])
        window = [padded(x) for x in (S, A, R, TS)] + ([] if mask is None else [padded(mask, 1)])
        return self.forward(*window).flatten(0, 1)[slot]

    def lm_losses(self, lm_loss, blocks, precision: str, params=None) -> torch.Tensor:
        """lamo's lm_loss through each run's GPT-2 (its LoRA, its c_attn bias).
        (R, B, T+1) token ids -> (R,)."""
        def through(weights, block):                   # lm_loss of GPT-2 with these tensors
            gpt = {k.removeprefix("gpt."): v for k, v in weights.items() if k.startswith("gpt.")}
            return lm_loss(lambda idx: functional_call(self.template.gpt, gpt, (idx,)), block,
                           precision)

        params = params or self.stacked
        record = lambda: through(self.first_run(params), blocks[0])
        drops = self.drop_masks(params, ("lm", blocks.shape[1:]), record)
        # The LM batch's attention recomputed in the backward: its 1,024 tokens' scores kept
        # would add 1.75 GiB a run to the 1.15 it keeps (bf16, bench.py --saved).
        return over_runs(lambda params, block: through(self.weights(params), block), params,
                         drops, blocks, recompute=True)

    def clip_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ per run: each run's gradients are scaled by its own
        global norm, never by a pack-mate's. -> the norms before clipping (R,)."""
        grads = [self.stacked[n].grad for n in self.trainable if self.stacked[n].grad is not None]
        norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()   # (R,)
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
        return norm

    def load_optimizer_states(self):
        """Stack the runs' AdamW states (from their checkpoints, on --resume) into the pack's."""
        per_run = [dict(zip(self.trainable_of(run), run.params)) for run in self.runs]
        for name in self.trainable:
            states = [run.optimizer.state.get(params[name])
                      for run, params in zip(self.runs, per_run)]
            if any(s is None for s in states):
                continue                                 # a new pack: no state yet
            self.optimizer.state[self.stacked[name]] = {
                # the step on the CPU, where RunAdamW keeps it (a fused AdamW's is on the GPU)
                k: torch.tensor(float(v)) if k == "step" else torch.stack([s[k] for s in states])
                for k, v in states[0].items()}

    def save_optimizer_states(self):
        """The pack's AdamW state, sliced back into each run's own optimizer for its checkpoint,
        so a pack's run folder is a single run's: --resume and --eval-only take it as it is."""
        for r, run in enumerate(self.runs):
            for name, param in zip(self.trainable_of(run), run.params):
                state = self.optimizer.state.get(self.stacked[name])
                if state:
                    run.optimizer.state[param] = {k: v.clone() if k == "step" else v[r].clone()
                                                  for k, v in state.items()}

    def trainable_of(self, run: Run) -> list[str]:
        """The names of run.params, in their order."""
        return [n for n, p in run.model.named_parameters() if p.requires_grad]


def stacked(batches: list[Batch]) -> Batch:
    """R runs' batches as one, each field (R, B, K, ...)."""
    return Batch(*(torch.stack(x) for x in list(zip(*batches))[:5]))


def losses(pack: Pack, batches: list[Batch], lm_blocks, lamo, discrete: bool, params=None):
    """Each run's action loss and LM loss. -> two (R,) tensors."""
    b = stacked(batches)                                                     # (R, B, K, ...)
    pred = pack.forward(b.states, b.actions, b.rtg, b.timesteps, b.mask, params)
    per_run_loss = vmap(functools.partial(lamo.action_loss, discrete=discrete))
    loss_action = per_run_loss(pred, b.actions, b.mask)                          # (R,)
    loss_lm = (pack.lm_losses(lamo.lm_loss, torch.stack(lm_blocks), pack.template.precision,
                              params)
               if lm_blocks is not None else torch.zeros_like(loss_action))
    return loss_action, loss_lm


def train_step(pack: Pack, batches: list[Batch], lm_blocks, alive, cfg, lamo, discrete: bool):
    """lamo.train_step for a pack: L_r = L_action,r + lambda L_LM,r for each run r, one backward
    of the sum (each run's parameters get only its own gradient), each run clipped by its own
    norm, one AdamW step. A run that has stopped (alive False) contributes nothing.
    -> (R, 4): action loss, LM loss, grad norm, non-finite flag; on the device, no sync."""
    if cfg.compile:                 # a new step for CUDA graphs (reduce-overhead); else a no-op
        torch.compiler.cudagraph_mark_step_begin()
    pack.seed_dropout()
    loss_action, loss_lm = losses(pack, batches, lm_blocks, lamo, discrete)
    loss = loss_action + cfg.lm_coef * loss_lm                                   # (R,)
    pack.optimizer.zero_grad(set_to_none=True)
    torch.where(alive, loss, 0.0).sum().backward()
    grad_norm = pack.clip_(cfg.grad_clip)
    pack.optimizer.step()
    # a finite loss with an inf gradient makes the clip 0 * inf: NaN weights, flagged too
    return torch.stack([loss_action.detach(), loss_lm.detach(), grad_norm,
                        (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()], 1)


# ----------------------------------------------------------------------------- does it fit?
def largest_pack(usable: float, allocated: float, R: int, run_bytes: float, adam_bytes: float,
                 step1: float, step2: float) -> int:
    """How many runs fit, from what a pack of R measured before its first step (all in bytes):
    usable, the GPU memory this process can have; allocated, what it holds now (the shared body
    once, R runs' parameters); run_bytes, one run's parameters; adam_bytes, one run's AdamW
    state, not allocated yet (two fp32 moments per trainable number); step1 and step2, the
    peak memory a forward and backward of one and of two runs added. Each run adds
    run_bytes + adam_bytes + (step2 - step1); the step's own overhead is step1 - (step2 - step1).
    -> the largest R' with allocated - R run_bytes + R' (run_bytes + adam_bytes) + step(R') <=
    usable."""
    per_run = run_bytes + adam_bytes + (step2 - step1)
    fixed = allocated - R * run_bytes + step1 - (step2 - step1)
    return max(0, int((usable - fixed) // per_run))


def step_memory(pack: Pack, batches, lm_blocks, cfg, lamo, discrete: bool, r: int) -> float:
    """Peak GPU bytes that a forward and backward of the pack's first r runs adds."""
    device = pack.runs[0].device
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    params = {k: v[:r].detach().requires_grad_(v.requires_grad) for k, v in pack.stacked.items()}
    loss_action, loss_lm = losses(pack, batches[:r], lm_blocks and lm_blocks[:r], lamo, discrete,
                                  params)
    (loss_action + cfg.lm_coef * loss_lm).sum().backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def out_of_memory(pack: Pack, batches, lm_blocks, cfg, lamo, discrete: bool) -> LamoError:
    """The one-line error for a pack whose first step ran out of GPU memory: how many runs the
    memory allows, measured on the pack's first one and two runs."""
    device, R = pack.runs[0].device, pack.R
    pack.optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    try:
        step1 = step_memory(pack, batches, lm_blocks, cfg, lamo, discrete, 1)
        step2 = step_memory(pack, batches, lm_blocks, cfg, lamo, discrete, min(2, R))
    except torch.OutOfMemoryError:
        return LamoError(f"a pack of {R} runs ran out of GPU memory at its first step, and so "
                         f"does one run alone: use a smaller model or --batch-size")
    finally:
        torch.cuda.empty_cache()
    if R == 1:
        step2 = 2 * step1                      # no second run to measure: assume it adds as much
    # get_per_process_memory_fraction takes no index-less torch.device("cuda") (torch 2.11)
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(device)
    # What this process may hold: the card's free memory and its own cache, under the cap of
    # torch.cuda.set_per_process_memory_fraction if one is set.
    usable = min(free + torch.cuda.memory_reserved(device),
                 torch.cuda.get_per_process_memory_fraction(index) * total)
    run_bytes = sum(v[0].numel() * v.element_size() for v in pack.stacked.values())
    adam_bytes = sum(8 * pack.stacked[n][0].numel() for n in pack.trainable)
    fits = largest_pack(usable, allocated, R, run_bytes, adam_bytes, step1, step2)
    return LamoError(f"a pack of {R} runs ran out of GPU memory at its first step; about {fits} "
                     f"fit in the {usable / 2**30:.1f} GiB this process may use (measured: "
                     f"{(run_bytes + adam_bytes + step2 - step1) / 2**20:.1f} MiB per run); "
                     f"give fewer --seed values, or sweep.py --pack {max(fits, 1)}")


def evaluate(pack: Pack, members: list[int], cfg, lamo, envs) -> list[dict]:
    """lamo.evaluate for the runs `members` of a pack: every run's episodes (runs x targets x
    episodes) in one batched rollout, each row through its own run's weights and normalised by
    its own run's state statistics. LoRA stays unmerged (the frozen body is one tensor for all
    runs; merging would need a copy per run). -> each member's evaluation."""
    task, device = pack.runs[0].task, pack.runs[0].device
    targets, episodes = lamo.eval_episodes(cfg)
    runs = np.repeat(members, len(episodes))                          # each episode's run
    stats = [pack.runs[r].batcher for r in members]
    mean = std = None
    if stats[0].state_mean is not None:
        mean = np.repeat(np.stack([b.state_mean for b in stats]), len(episodes), axis=0)
        std = np.repeat(np.stack([b.state_std for b in stats]), len(episodes), axis=0)
    pack.template.eval()
    try:
        returns, lengths = lamo.rollout(pack.policy, task, episodes * len(members), mean, std,
                                        cfg.context_len, device, cfg.eval_max_steps, envs, runs)
    finally:
        pack.template.train()
    return [lamo.eval_stats(r, n, targets, task)
            for r, n in zip(np.split(returns, len(members)), np.split(lengths, len(members)))]


def check_pack(runs: list[Run]):
    """One-line errors for runs that cannot step together."""
    first = {k: v for k, v in vars(runs[0].cfg).items() if k not in PER_RUN}
    for run in runs[1:]:
        other = {k: v for k, v in vars(run.cfg).items() if k not in PER_RUN}
        differ = [k for k in first if first[k] != other[k]]
        if differ:
            raise LamoError(f"the runs of a pack must share --{differ[0].replace('_', '-')}: "
                            f"{first[differ[0]]!r} vs {other[differ[0]]!r}")
    if len({run.step for run in runs}) > 1:
        raise LamoError("the runs of a pack resume at different steps ("
                        + ", ".join(f"{run.folder}: {run.step}" for run in runs)
                        + "); resume them one by one")


def train(runs: list[Run], lamo) -> list[dict]:
    """lamo.train for R runs in lockstep. -> the finished runs' summaries."""
    check_pack(runs)
    cfg, device, R = runs[0].cfg, runs[0].device, len(runs)
    discrete = runs[0].task.discrete
    pack = Pack(runs)
    logs = [MetricsLog(run) for run in runs]
    alive = torch.ones(R, dtype=torch.bool, device=device)
    stopped = set()                                   # runs that went non-finite
    # each run's losses summed since its last log row (resumed from its checkpoint)
    sums = torch.stack([run.loss_sums for run in runs]).to(device)
    step = first_step = runs[0].step
    bar = progress(total=cfg.steps, initial=step, desc=f"train pack of {R}", unit="step",
                   dynamic_ncols=True, miniters=cfg.log_every)
    pack.template.train()

    def check_finite():                              # a run that went NaN stops; the rest go on
        for r in range(R):
            if r not in stopped and sums[r, 3].item() > 0:
                print(f"run {runs[r].folder}: loss or gradient became NaN/inf before step "
                      f"{step}; stopped. "
                      f"{last_good(runs[r])}; the other runs of the pack go on")
                stopped.add(r)
                alive[r] = False
                mark_stopped(runs[r])
        if len(stopped) == R:
            raise LamoError("every run of the pack went NaN/inf; none goes on")

    def save(members):                # the pack's AdamW state is sliced once for them all
        pack.save_optimizer_states()
        for r in members:
            save_checkpoint(runs[r], sums[r])

    with ctrl_c_saves_checkpoint() as stop, contextlib.ExitStack() as closing:
        for log in logs:
            closing.callback(log.close)
        envs = closing.enter_context(lamo.eval_envs(cfg, runs[0].task, R))
        while step < cfg.steps:
            # each run's lr from its own schedule: its --lr, and on Atari its own token count
            lrs = [lamo.learning_rate(run.cfg, step, run.schedule_tokens) for run in runs]
            for group in pack.optimizer.param_groups:
                group["lr"] = lrs
            batches = [run.batcher.sample(cfg.batch_size) for run in runs]
            lm_blocks = [run.lm.sample() for run in runs] if runs[0].lm else None
            try:
                sums += train_step(pack, batches, lm_blocks, alive, cfg, lamo, discrete)
                too_big = False
            except torch.OutOfMemoryError:
                if step > first_step:              # not the first step: no estimate to give
                    raise
                too_big = True                     # measured below, once the step's memory is free
            if too_big:
                raise out_of_memory(pack, batches, lm_blocks, cfg, lamo, discrete)
            step += 1
            for run, batch in zip(runs, batches):
                run.step = step
                if cfg.warmup_tokens:
                    lamo.count_tokens(run, batch.action_tokens)
            if step % cfg.log_every == 0 or step == cfg.steps:
                check_finite()
                for r, log in enumerate(logs):
                    if r not in stopped:
                        log.losses(sums[r], lrs[r])
                sums.zero_()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                check_finite()
                members = [r for r in range(R) if r not in stopped]
                t0 = time.perf_counter()
                evaluations = evaluate(pack, members, cfg, lamo, envs)
                seconds = round(time.perf_counter() - t0, 3)          # the whole pack's rollout
                for r, evaluation in zip(members, evaluations):
                    runs[r].history.append({"step": step, "eval": evaluation, "eval_s": seconds})
                    logs[r].evaluation(runs[r].history[-1])
                save(members)
            bar.update(1)
            bar.set_postfix_str(logs[0].status, refresh=False)
            if stop:
                bar.close()
                check_finite()
                save(sorted(set(range(R)) - stopped))
                # The run folders themselves: with sweep.py's --out per run, their parent holds
                # other runs too. A run stopped by NaN/inf is at an older step: not with them.
                print(f"interrupted at step {step}; checkpoints saved. Continue with: "
                      f"python lamo.py --resume " + " ".join(str(run.folder) for r, run
                                                             in enumerate(runs)
                                                             if r not in stopped))
                raise SystemExit(130)
    bar.close()
    return [finish(run, lamo.paper_reference(run.cfg)) for r, run in enumerate(runs)
            if r not in stopped]
