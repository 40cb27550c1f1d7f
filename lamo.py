"""lamo: LaMo (Shi et al., ICLR 2024, "Unleashing the Power of Pre-trained Language Models for
Offline Reinforcement Learning") from scratch, in plain PyTorch, in one file read top to bottom.

LaMo is a Decision Transformer whose body is OpenAI's GPT-2, with four changes:
  (1) the body starts from GPT-2's pre-trained weights,
  (2) those weights stay frozen; hand-written LoRA adapters on attention's q, k, v train instead,
  (3) MLP embeddings and an MLP action head replace DT's linear projections,
  (4) a language-modelling loss on WikiText-103 is added to the action loss with weight lambda.

    python lamo.py --env hopper-medium-v2 --frac 0.1      # train on a seeded 10% of the trajectories

Sections: 1 config and CLI, 2 GPT-2 and LoRA, 3 Decision Transformer and loss, 4 batched evaluation,
5 training, checkpoints and the summary, 6 entry point. "Official code" below means srzer/LaMo-2023.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, get_type_hints

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import (LMBatcher, LamoError, TrajectoryBatcher, dataset_path, describe, env_spec, lm_tokens,
                  load_trajectories, make_env, normalized_score, subset_indices)
from gpt2_loader import SIZES, load_gpt2


# ============================================================================ 1. config and CLI
def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    env: str = opt("hopper-medium-v2", "D4RL dataset: {hopper,walker2d,halfcheetah}-{medium,medium-replay,medium-expert,expert}-v2")
    data: str = opt("", "local D4RL hdf5 or DT-layout pickle instead of downloading the env's file")
    frac: float = opt(1.0, "train on this fraction of whole trajectories (paper App. C)")
    frac_seed: int = opt(0, "seed of the --frac subset; fixed across --seed, as the paper used one subset per ratio")
    # model (None = from the --model preset, then the env)
    model: str = opt("lamo", "preset: lamo | dt (DT baseline: 3 layers, 1 head, d=128, linear, full training)")
    pretrained: Optional[str] = opt(None, "gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH | none (random init)")
    finetune: Optional[str] = opt(None, "lora | full | frozen: what of the GPT-2 body trains")
    lora_rank: int = opt(16, "LoRA rank r (paper: 16 for MuJoCo)")
    lora_alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha / r")
    embed: Optional[str] = opt(None, "mlp | linear embeddings and action head (linear adds tanh); default per env")
    n_layer: Optional[int] = opt(None, "layers, only with --pretrained none")
    n_head: Optional[int] = opt(None, "heads, only with --pretrained none")
    n_embd: Optional[int] = opt(None, "width, only with --pretrained none")
    dropout: float = opt(0.1, "dropout of GPT-2 (embeddings, attention, residual) and of the LoRA input")
    # loss
    lm_coef: Optional[float] = opt(None, "lambda, weight of the language-model loss; 0 skips the LM batch")
    lm_corpus: str = opt("", "UTF-8 text file for the LM loss instead of WikiText-103")
    lm_batch: int = opt(2, "LM sequences per step")
    lm_seq_len: int = opt(1024, "tokens per LM sequence")
    # optimisation
    steps: int = opt(100_000, "gradient steps")
    batch_size: int = opt(64, "trajectory windows per step")
    context_len: int = opt(20, "K, timesteps per window")
    lr: Optional[float] = opt(None, "AdamW learning rate")
    weight_decay: Optional[float] = opt(None, "AdamW weight decay")
    warmup: Optional[int] = opt(None, "linear warm-up steps, then constant")
    grad_clip: float = opt(0.25, "global gradient-norm clip")
    seed: int = opt(0, "training seed (init, batches, dropout)")
    # evaluation
    eval_every: int = opt(2500, "evaluate (and checkpoint) every this many steps")
    eval_episodes: int = opt(20, "episodes per target")
    targets: str = opt("", "comma-separated target returns; default: the paper's for the env")
    eval_seed: int = opt(10_000, "episode i of every evaluation resets its env with seed eval_seed + i")
    # run
    log_every: int = opt(100, "log losses every this many steps")
    device: str = opt("auto", "auto (cuda > mps > cpu) | cuda | mps | cpu")
    compile: bool = opt(False, "torch.compile the training forward")
    out: str = opt("", "run folder; default runs/<env>-f<frac>-s<seed>-<time>")
    resume: str = opt("", "continue the run in this folder from its ckpt.pt")
    eval_only: str = opt("", "evaluate this ckpt.pt and exit")


PRESETS = {  # LaMo: paper App. B and the official scripts; DT: the paper's baseline (kzl DT's settings)
    "lamo": dict(pretrained="gpt2", finetune="lora", lm_coef=0.1, lr=1e-4, weight_decay=1e-5, warmup=2500),
    "dt": dict(pretrained="none", finetune="full", lm_coef=0.0, lr=1e-4, weight_decay=1e-4, warmup=10_000,
               embed="linear", n_layer=3, n_head=1, n_embd=128),
}
EMBED_BY_ENV = {"hopper": "linear", "walker2d": "mlp", "halfcheetah": "mlp"}   # the official run_*.sh scripts
CHOICES = {"model": PRESETS, "finetune": ("lora", "full", "frozen"), "embed": ("mlp", "linear")}
RESUME_OVERRIDES = {"steps", "eval_every", "log_every", "device", "compile"}
EVAL_OVERRIDES = {"eval_episodes", "targets", "eval_seed", "device"}


def parse_args(argv=None) -> tuple[Config, dict]:
    """The CLI is generated from Config: --field-name per field. Returns the config and the flags given."""
    p = argparse.ArgumentParser(prog="lamo.py", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)
    hints = get_type_hints(Config)
    for f in fields(Config):
        t = hints[f.name]
        t = next(a for a in t.__args__ if a is not type(None)) if getattr(t, "__args__", None) else t
        help = f"{f.metadata['help']} (default: {f.default})"
        if t is bool:
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=t, help=help, metavar=t.__name__.upper())
    given = vars(p.parse_args(argv))   # unknown flags are an argparse error
    return Config(**given), given


def resolve(cfg: Config, given=()) -> Config:
    """Fill every None from the --model preset, then the env; check the choices, and refuse flags
    (among `given`) that would do nothing in this configuration."""
    for k, allowed in CHOICES.items():
        v = getattr(cfg, k)
        if v is not None and v not in allowed:
            raise LamoError(f"--{k.replace('_', '-')} {v!r}: choose one of {', '.join(allowed)}")
    spec = env_spec(cfg.env)
    preset = {**PRESETS[cfg.model], "embed": PRESETS[cfg.model].get("embed", EMBED_BY_ENV[cfg.env.split("-")[0]])}
    for k, v in preset.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    shape = dict(zip(("n_layer", "n_head", "n_embd"), SIZES["gpt2"]))
    for k in shape:
        if cfg.pretrained != "none" and getattr(cfg, k) is not None:
            raise LamoError(f"--{k.replace('_', '-')} only applies with --pretrained none; a pretrained model fixes its shape")
        if cfg.pretrained == "none" and getattr(cfg, k) is None:
            setattr(cfg, k, shape[k])   # "LaMo w/o pre-training": GPT-2 small's shape, random weights
    if cfg.model == "dt" and cfg.lm_coef:
        raise LamoError("--model dt has no language head (vocab 1, as in kzl DT); use --model lamo for --lm-coef")
    if cfg.finetune == "lora" and cfg.lora_rank < 1:
        raise LamoError(f"--lora-rank {cfg.lora_rank}: must be >= 1 with --finetune lora")
    idle = [k for k in ("lora_rank", "lora_alpha") if k in given and cfg.finetune != "lora"]
    idle += [k for k in ("lm_corpus", "lm_batch", "lm_seq_len") if k in given and not cfg.lm_coef]
    if idle:
        raise LamoError(f"--{idle[0].replace('_', '-')} has no effect with --finetune {cfg.finetune}, "
                        f"--lm-coef {cfg.lm_coef}; drop it or turn that part on")
    for k in ("steps", "batch_size", "context_len", "eval_every", "eval_episodes", "log_every", "lm_batch",
              "lm_seq_len", "warmup"):
        if getattr(cfg, k) < 1:
            raise LamoError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if cfg.lm_coef < 0:
        raise LamoError(f"--lm-coef must be >= 0, got {cfg.lm_coef}")
    cfg.targets = cfg.targets or ",".join(str(int(t)) for t in spec.targets)
    parse_targets(cfg.targets)
    return cfg


def parse_targets(targets: str) -> list[float]:
    """--targets "3600,1800" -> [3600.0, 1800.0]; checked here for a new run and again for --eval-only."""
    try:
        return [float(t) for t in targets.split(",")]
    except ValueError:
        raise LamoError(f"--targets {targets!r}: expected comma-separated returns, e.g. 3600,1800") from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":               # TF32 for the fp32 matmuls that autocast leaves alone
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32; matmuls run in bf16); a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ============================================================================ 2. GPT-2 and LoRA
@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.1
    lora_rank: int = 0          # 0 = no adapters
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1


class LoRAQKV(nn.Module):
    """GPT-2's c_attn (x -> [q | k | v], as nn.Linear d -> 3d) plus, when r > 0, an independent
    rank-r update per projection: q += (alpha/r) B_q A_q dropout(x), same for k and v. Same function
    as loralib's MergedLinear(enable_lora=[True, True, True]) (Hu et al. 2021); written by hand."""

    def __init__(self, d: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3 * d, d))                  # frozen, from GPT-2
        self.bias = nn.Parameter(torch.zeros(3 * d))
        self.r, self.scale, self.merged_from = r, alpha / max(r, 1), None
        if r:
            self.lora_A = nn.Parameter(torch.empty(3, r, d))                # (q|k|v, r, in)
            self.lora_B = nn.Parameter(torch.zeros(3, d, r))                # zero: the adapted model starts as GPT-2
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))                 # per projection, fan_in = d, as loralib
            self.lora_dropout = nn.Dropout(dropout)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A).flatten(0, 1)       # (3, d, d) -> (3d, d)

    def forward(self, x):                                                   # (B, T, d)
        y = F.linear(x, self.weight, self.bias)                             # (B, T, 3d)
        if self.r and self.merged_from is None:
            u = F.linear(self.lora_dropout(x), self.lora_A.flatten(0, 1))    # (B, T, 3r)
            y = y + self.scale * F.linear(u, torch.block_diag(*self.lora_B))   # (B, T, 3d)
        return y

    @torch.no_grad()
    def merge(self):
        """Fold the update into the weight for inference: one matmul instead of three."""
        if self.r and self.merged_from is None:
            self.merged_from = self.weight.detach().clone()
            self.weight += self.delta()

    @torch.no_grad()
    def unmerge(self):
        """Put the frozen weight back bit for bit (a copy, not W + d - d), so training after an
        evaluation is exactly training without one: that keeps --resume bit-for-bit."""
        if self.merged_from is not None:
            self.weight.copy_(self.merged_from)
            self.merged_from = None


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head, self.p = c.n_head, c.dropout
        self.c_attn = LoRAQKV(c.n_embd, c.lora_rank, c.lora_alpha, c.lora_dropout)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x, mask=None):                                        # (B, T, d), (B, 1, T, T) bool
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)                            # 3 x (B, T, d)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        # is_causal cannot be combined with attn_mask: a padded batch passes one full (causal & padding) mask.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.p if self.training else 0.0)  # (B, nh, T, hd)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, d)))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(c.n_embd, 4 * c.n_embd), nn.Linear(4 * c.n_embd, c.n_embd)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x):                                                   # (B, T, d)
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))   # GPT-2's GELU is the tanh one


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd, c.layer_norm_epsilon), nn.LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.attn, self.mlp = CausalSelfAttention(c), MLP(c)

    def forward(self, x, mask=None):                                        # pre-LN residual block
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, c.layer_norm_epsilon)
        for n, p in self.named_parameters():    # GPT-2's init (as in HF): N(0, 0.02), c_proj scaled by depth
            if "lora_" not in n and p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / (math.sqrt(2 * c.n_layer) if n.endswith("c_proj.weight") else 1))
            elif n.endswith("bias"):
                nn.init.zeros_(p)

    def body(self, x, mask=None):
        """The transformer on input embeddings x (B, T, d), adding no position embedding: the Decision
        Transformer path, whose timestep embedding replaces wpe. -> hidden states (B, T, d) after ln_f."""
        x = self.drop(x)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)

    def forward(self, idx):                                                 # (B, T) token ids
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.body(self.wte(idx) + self.wpe(pos))                        # (B, T, d)
        return F.linear(h, self.wte.weight)                                 # (B, T, V): head tied to wte

    @classmethod
    def from_pretrained(cls, name_or_path: str, lora_rank: int = 0, lora_alpha: float = 32.0,
                        dropout: float = 0.1) -> "GPT2":
        """gpt2 | gpt2-medium | gpt2-large | gpt2-xl (downloaded once), a model.safetensors file, or a
        folder holding one. The loader transposes GPT-2's Conv1D weights and checks every shape."""
        config, state = load_gpt2(name_or_path)
        model = cls(GPTConfig(**config, dropout=dropout, lora_rank=lora_rank, lora_alpha=lora_alpha,
                              lora_dropout=dropout))
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("lora_" in k for k in missing), (missing, unexpected)
        return model

    def merge(self):
        for m in self.modules():
            if isinstance(m, LoRAQKV):
                m.merge()

    def unmerge(self):
        for m in self.modules():
            if isinstance(m, LoRAQKV):
                m.unmerge()


LORA_TRAINABLE = (r"lora_[AB]$", r"c_attn\.bias$")   # loralib's mark_only_lora_as_trainable(bias='lora_only')


def mark_trainable(model: nn.Module, patterns=LORA_TRAINABLE, verbose=True) -> tuple[int, int]:
    """requires_grad on the parameters whose name matches one of `patterns` (regexes), off elsewhere.
    -> (trainable, total) parameter counts."""
    for n, p in model.named_parameters():
        p.requires_grad_(any(re.search(pat, n) for pat in patterns))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"trainable parameters: {n_train:,} / {n_total:,} ({100 * n_train / n_total:.2f}%)")
    return n_train, n_total


# ============================================================================ 3. Decision Transformer and loss
class MLPEmbed(nn.Module):
    """LaMo's embedding: fc2(GELU(fc1 x)) + fc1 x (official code's ResidualBlock)."""

    def __init__(self, n_in: int, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.gelu(h)) + h


class DecisionTransformer(nn.Module):
    """Tokens (R_t, s_t, a_t) per timestep through a GPT-2 body; a_t is predicted from the s_t token
    (Chen et al. 2021)."""

    def __init__(self, gpt: GPT2, obs_dim: int, act_dim: int, max_ep_len: int, embed: str):
        super().__init__()
        d = gpt.config.n_embd
        make = (lambda n: MLPEmbed(n, d)) if embed == "mlp" else (lambda n: nn.Linear(n, d))
        self.gpt = gpt
        self.embed_timestep = nn.Embedding(max_ep_len, d)
        self.embed_return, self.embed_state, self.embed_action = make(1), make(obs_dim), make(act_dim)
        self.embed_ln = nn.LayerNorm(d)
        if embed == "mlp":   # LaMo's MLPBlock head; no tanh, as in the official code
            self.predict_action = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, act_dim))
        else:                # DT's head
            self.predict_action = nn.Sequential(nn.Linear(d, act_dim), nn.Tanh())

    def forward(self, states, actions, rtg, timesteps, mask=None):  # (B,K,obs) (B,K,act) (B,K,1) (B,K) (B,K)
        B, K, _ = states.shape
        tok = torch.stack([self.embed_return(rtg), self.embed_state(states), self.embed_action(actions)], 2)  # (B, K, 3, d)
        # LaMo's order: LayerNorm the stacked tokens, then add the timestep embedding (kzl DT adds before LN).
        x = self.embed_ln(tok.flatten(1, 2))                                         # (B, 3K, d): R1 s1 a1 R2 ...
        x = x + self.embed_timestep(timesteps).repeat_interleave(3, dim=1)          # (B, 3K, d)
        attn = None
        if mask is not None:
            keys = mask.bool().repeat_interleave(3, dim=1)                           # (B, 3K)
            causal = torch.ones(3 * K, 3 * K, dtype=torch.bool, device=x.device).tril()
            # Each token may also see itself, so a left-padded row is never fully masked: a fully
            # masked softmax row is NaN, and NaN leaks into real rows through 0 * NaN in backward.
            # Real rows see only real keys, so padding cannot change them.
            attn = ((causal & keys[:, None, :]) | torch.eye(3 * K, dtype=torch.bool, device=x.device))[:, None]
        h = self.gpt.body(x, attn).view(B, K, 3, -1)                                 # (B, K, 3, d)
        return self.predict_action(h[:, :, 1])                                       # (B, K, act) from s_t


def action_loss(pred, target, mask):                                  # (B, K, act), (B, K, act), (B, K)
    """MSE over the real (unpadded) steps, as DT and LaMo."""
    se = (pred.float() - target).pow(2).mean(-1)                     # (B, K)
    return (se * mask).sum() / mask.sum()


def lm_loss(gpt: GPT2, block):                                        # (B, T+1) token ids
    """Next-token cross-entropy through the same GPT-2, with wpe: a real GPT-2 forward.
    Deviation: the official code runs its LM batch without wpe too; GPT-2 was trained with it."""
    logits = gpt(block[:, :-1])                                      # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), block[:, 1:].flatten())


def build_model(cfg: Config, spec) -> DecisionTransformer:
    lora = cfg.lora_rank if cfg.finetune == "lora" else 0
    if cfg.pretrained == "none":
        gpt = GPT2(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                             vocab_size=1 if cfg.model == "dt" else 50257, lora_rank=lora,
                             lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout))
    else:
        gpt = GPT2.from_pretrained(cfg.pretrained, lora_rank=lora, lora_alpha=cfg.lora_alpha, dropout=cfg.dropout)
    if cfg.lm_coef and gpt.config.vocab_size != 50257:
        raise LamoError(f"--lm-coef needs GPT-2's 50257-token vocabulary; {cfg.pretrained} has {gpt.config.vocab_size}")
    if cfg.lm_coef and cfg.lm_seq_len > gpt.config.n_positions:
        raise LamoError(f"--lm-seq-len {cfg.lm_seq_len} exceeds the model's {gpt.config.n_positions} positions")
    model = DecisionTransformer(gpt, spec.obs_dim, spec.act_dim, spec.max_ep_len, cfg.embed)
    # What trains: embeddings and heads always; of the GPT-2 body, LoRA + c_attn bias (lora; the official
    # code's mark_only_lora_as_trainable(bias='lora_only') + --adapt_embed), everything (full; wte and
    # wpe get gradients only from the LM loss), or nothing (frozen).
    heads = (r"^embed_", r"^predict_")
    mark_trainable(model, {"lora": LORA_TRAINABLE + heads, "full": (r"",), "frozen": heads}[cfg.finetune])
    return model


# ============================================================================ 4. batched evaluation
@torch.inference_mode()
def rollout(model, spec, episodes, state_mean, state_std, K: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Run every (target, seed) episode at once: one model forward per env step for all live
    episodes. All episodes start together, so at step t they share one K-step window of a
    pre-allocated context buffer: no history is re-concatenated. The buffer starts with K-1 masked
    padding slots, as the official code left-pads the first K-1 steps, so every forward has the same
    shape (B, K): a row's result then does not depend on how many episodes share the batch (tiny
    matmuls take other kernels and round differently), and batched returns equal one-at-a-time ones.
    Deviation: the official code evaluates one episode at a time. -> (returns, lengths) per episode."""
    N, T, P = len(episodes), spec.max_ep_len, K - 1
    envs = [make_env(spec.gym_id, T) for _ in range(N)]
    S = torch.zeros(N, P + T, spec.obs_dim, device=device)               # normalised states
    A = torch.zeros(N, P + T, spec.act_dim, device=device)               # actions; step t's slot is 0 until taken
    R = torch.zeros(N, P + T, 1, device=device)                          # returns-to-go / scale
    ts = torch.cat([torch.zeros(P, dtype=torch.long), torch.arange(T)]).to(device)   # (P + T,)
    real = torch.arange(P + T, device=device) >= P                       # (P + T,) False on the padding
    obs = np.stack([env.reset(seed=seed)[0] for env, (_, seed) in zip(envs, episodes)])
    S[:, P] = torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32, device=device)
    R[:, P, 0] = torch.tensor([tgt / spec.rtg_scale for tgt, _ in episodes], device=device)
    returns, lengths = np.zeros(N), np.zeros(N, dtype=int)
    live = np.arange(N)
    for t in range(T):
        w, idx, n = slice(t, t + K), torch.as_tensor(live, device=device), len(live)   # window ends at step t
        mask = real[w].expand(n, -1).float() if t < P else None         # (n, K); no mask once the window is full
        with autocast(device):
            a = model(S[idx, w], A[idx, w], R[idx, w], ts[w].expand(n, -1), mask)[:, -1].float()  # (n, act)
        A[idx, P + t] = a
        steps = [envs[i].step(act) for i, act in zip(live, a.cpu().numpy())]   # one host sync per env step
        r = np.array([s[1] for s in steps])
        returns[live] += r
        lengths[live] += 1
        going = np.array([not (s[2] or s[3]) for s in steps])
        live, r = live[going], r[going]
        if len(live) == 0 or t + 1 == T:
            break
        obs = np.stack([s[0] for s, g in zip(steps, going) if g])
        idx = torch.as_tensor(live, device=device)
        S[idx, P + t + 1] = torch.as_tensor((obs - state_mean) / state_std, dtype=torch.float32, device=device)
        R[idx, P + t + 1] = R[idx, P + t] - torch.as_tensor(r[:, None] / spec.rtg_scale, dtype=torch.float32, device=device)
    for env in envs:
        env.close()
    return returns, lengths


def evaluate(model, cfg: Config, spec, state_mean, state_std, device) -> dict:
    """All targets x episodes in one batched rollout, LoRA merged. -> {target: score statistics}."""
    targets = parse_targets(cfg.targets)
    episodes = [(tgt, cfg.eval_seed + i) for tgt in targets for i in range(cfg.eval_episodes)]
    model.eval()
    model.gpt.merge()
    try:
        returns, _ = rollout(model, spec, episodes, state_mean, state_std, cfg.context_len, device)
    finally:
        model.gpt.unmerge()
        model.train()
    out = {}
    for j, tgt in enumerate(targets):
        r = returns[j * cfg.eval_episodes:(j + 1) * cfg.eval_episodes]
        s = normalized_score(cfg.env, r)
        out[f"{tgt:g}"] = {"return_mean": r.mean(), "return_std": r.std(), "score_mean": s.mean(), "score_std": s.std()}
    return {k: {m: float(v) for m, v in d.items()} for k, d in out.items()}


# ============================================================================ 5. training
def save_atomic(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)              # a crash mid-write leaves the previous checkpoint intact


def checkpoint(model, opt, step, batcher, lm, cfg, last_eval) -> dict:
    return {"step": step, "config": asdict(cfg), "last_eval": last_eval,
            "trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "state_mean": batcher.state_mean, "state_std": batcher.state_std, "optimizer": opt.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "batches": batcher.rng.bit_generator.state,
                    "lm": lm.rng.bit_generator.state if lm else None,
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}


def load_trainable(model, ckpt):
    missing = set(n for n, p in model.named_parameters() if p.requires_grad) - set(ckpt["trainable"])
    if missing:
        raise LamoError(f"checkpoint lacks trainable parameter(s) {', '.join(sorted(missing)[:3])}")
    model.load_state_dict(ckpt["trainable"], strict=False)


def restore(run_dir: Path, model, opt, batcher, lm, subset, device) -> tuple[int, list]:
    """Load ckpt.pt into a freshly built model, optimizer and samplers (RNG states included), and cut
    metrics.jsonl back to the checkpoint's step. -> (step, evaluation history)."""
    ckpt = torch.load(run_dir / "ckpt.pt", map_location=device, weights_only=False)
    if json.loads((run_dir / "subset.json").read_text())["indices"] != subset.tolist():
        raise LamoError(f"the dataset changed since {run_dir} started: its --frac subset differs")
    load_trainable(model, ckpt)
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    batcher.rng.bit_generator.state = ckpt["rng"]["batches"]
    if lm:
        lm.rng.bit_generator.state = ckpt["rng"]["lm"]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] <= ckpt["step"]]          # drop what came after the checkpoint
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"resuming {run_dir} at step {ckpt['step']}")
    return ckpt["step"], [r for r in rows if "eval" in r]


def summarize(history: list[dict], steps: int) -> dict:
    """Per target: final, best and the paper's metric, the mean over evaluations in the last 20% of
    training (the last 8 of 40 in the paper's protocol); headline = the best target's last-20% mean."""
    out = {}
    for tgt in history[-1]["eval"]:
        scores = [(h["step"], h["eval"][tgt]["score_mean"]) for h in history]
        last = [s for step, s in scores if step > 0.8 * steps] or [scores[-1][1]]
        out[tgt] = {"final": scores[-1][1], "best": max(s for _, s in scores), "last20": float(np.mean(last)),
                    "n_last20": len(last)}
    best = max(out, key=lambda t: out[t]["last20"])
    return {"targets": out, "headline": out[best]["last20"], "headline_target": best}


def print_eval(ev: dict, header: str):
    print(f"{header}\n  {'target':>8} {'return':>18} {'normalised score':>18}")
    for tgt, e in ev.items():
        print(f"  {tgt:>8} {e['return_mean']:>9.1f} ± {e['return_std']:<6.1f} {e['score_mean']:>9.1f} ± {e['score_std']:<6.1f}")


def plot_curve(history, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no learning-curve PNG")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for tgt in history[-1]["eval"]:
        ax.plot([h["step"] for h in history], [h["eval"][tgt]["score_mean"] for h in history], "o-", label=f"target {tgt}")
    ax.set(xlabel="gradient step", ylabel="D4RL normalised score", title=path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_step(fwd, model, opt, params, batch, lm_block, cfg: Config, device) -> torch.Tensor:
    """One gradient step on L = L_action + lambda * L_LM. -> (action loss, LM loss, grad norm,
    non-finite flag) as one device tensor: no .item() here, so the GPU never waits for the host."""
    with autocast(device):
        pred = fwd(batch.states, batch.actions, batch.rtg, batch.timesteps, batch.mask)
        loss_a = action_loss(pred, batch.actions, batch.mask)
        loss_lm = lm_loss(model.gpt, lm_block) if lm_block is not None else torch.zeros((), device=device)
    loss = loss_a + cfg.lm_coef * loss_lm
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return torch.stack([loss_a.detach(), loss_lm.detach(), gnorm, (~torch.isfinite(loss)).float()])


def make_optimizer(model, cfg: Config, device):
    params = [p for p in model.parameters() if p.requires_grad]
    # One lr for every trainable parameter: the official code's separate LM lr never takes effect.
    return params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-6,
                                     fused=device.type == "cuda")   # fused: one kernel for the whole update


def train(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    device = pick_device(cfg.device)
    spec = env_spec(cfg.env)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, spec).to(device)      # before the data: a bad --pretrained fails in seconds
    trajs = load_trajectories(dataset_path(cfg.env, cfg.data), spec)
    subset = subset_indices(len(trajs), cfg.frac, cfg.frac_seed)
    trajs = [trajs[i] for i in subset]
    batcher = TrajectoryBatcher(trajs, cfg.context_len, spec.max_ep_len, spec.rtg_scale, cfg.seed, device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lm = (LMBatcher(lm_tokens(cfg.lm_corpus), cfg.lm_batch, cfg.lm_seq_len, cfg.seed + 1, device)
          if cfg.lm_coef > 0 else None)   # lambda = 0: no corpus, no LM forward (the official code runs it anyway)
    params, opt = make_optimizer(model, cfg, device)
    # The run folder appears only now, so a run that fails while loading leaves nothing behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    step, history = 0, []
    if resume:
        step, history = restore(run_dir, model, opt, batcher, lm, subset, device)
    else:
        (run_dir / "subset.json").write_text(json.dumps({"frac": cfg.frac, "frac_seed": cfg.frac_seed,
                                           "n_trajectories": int(len(subset)), "indices": subset.tolist()}))
    print(f"data     {cfg.data or cfg.env}: subset frac={cfg.frac} (seed {cfg.frac_seed}): {describe(trajs)}\n"
          f"model    {cfg.model} | pretrained {cfg.pretrained} | finetune {cfg.finetune} | embed {cfg.embed} | "
          f"layers {model.gpt.config.n_layer}, d {model.gpt.config.n_embd} | lambda {cfg.lm_coef}\n"
          f"params   {n_train:,} trainable of {sum(p.numel() for p in model.parameters()):,}\n"
          f"device   {device} | run folder {run_dir}")
    # --compile: the training forward as fused kernels; the first steps pay the compilation. With
    # dropout, compiled runs draw other random masks than eager ones, so the two are not bit-identical.
    fwd = torch.compile(model) if cfg.compile else model
    metrics = open(run_dir / "metrics.jsonl", "a")
    sums = torch.zeros(4, device=device)     # action loss, LM loss, grad norm, non-finite count: summed on device
    t_log, last_eval = time.time(), (history[-1]["eval"] if history else None)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()

    def check_finite():
        if sums[3].item() > 0:
            raise LamoError(f"loss became NaN/inf before step {step}; stopped. The last good checkpoint "
                            f"{run_dir / 'ckpt.pt'} is intact: resume it with a lower --lr, or check the data")

    # Ctrl-C: the first one finishes the current step, saves a checkpoint and exits (an interrupt inside
    # opt.step() would leave half-updated weights); a second one aborts at once.
    stop = []

    def on_sigint(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(1)
        tqdm.write("Ctrl-C: saving a checkpoint after this step (again to abort without saving)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        while step < cfg.steps:
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)   # linear warm-up, then constant (LambdaLR in the official code)
            for g in opt.param_groups:
                g["lr"] = lr
            sums += train_step(fwd, model, opt, params, batcher.sample(cfg.batch_size),
                               lm.sample() if lm else None, cfg, device)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                check_finite()
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                la, llm, gn, _ = (sums / n).tolist()
                sps, t_log = n / (time.time() - t_log), time.time()
                metrics.write(json.dumps({"step": step, "action_loss": la, "lm_loss": llm, "lr": lr,
                                          "grad_norm": gn, "steps_per_s": sps}) + "\n")
                sums.zero_()
                bar.set_postfix_str(f"loss {la:.4f} lm {llm:.3f} lr {lr:.1e}" +
                                    (f" score {max(e['score_mean'] for e in last_eval.values()):.1f}" if last_eval else ""))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                check_finite()
                last_eval = evaluate(model, cfg, spec, batcher.state_mean, batcher.state_std, device)
                history.append({"step": step, "eval": last_eval})
                metrics.write(json.dumps(history[-1]) + "\n")
                metrics.flush()
                save_atomic(checkpoint(model, opt, step, batcher, lm, cfg, last_eval), run_dir / "ckpt.pt")
                bar.set_postfix_str(f"score {max(e['score_mean'] for e in last_eval.values()):.1f}")
            bar.update(1)
            if stop:
                bar.close()
                check_finite()
                save_atomic(checkpoint(model, opt, step, batcher, lm, cfg, last_eval), run_dir / "ckpt.pt")
                print(f"interrupted at step {step}; checkpoint saved. Continue with: python lamo.py --resume {run_dir}")
                raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous)
        metrics.close()
    bar.close()
    summary = summarize(history, cfg.steps)
    (run_dir / "summary.json").write_text(json.dumps({"step": step, "env": cfg.env, "frac": cfg.frac,
                                                      "seed": cfg.seed, **summary}, indent=2))
    print_eval(last_eval, f"\nfinal evaluation at step {step} ({cfg.eval_episodes} episodes per target):")
    print(f"\n  {'target':>8} {'final':>8} {'best':>8} {'last 20%':>9}   normalised score, mean over episodes")
    for tgt, s in summary["targets"].items():
        print(f"  {tgt:>8} {s['final']:>8.1f} {s['best']:>8.1f} {s['last20']:>9.1f}   ({s['n_last20']} evaluations in the last 20%)")
    print(f"headline (paper's metric: best target's last-20% mean): {summary['headline']:.1f} "
          f"at target {summary['headline_target']}\nrun folder: {run_dir}")
    plot_curve(history, run_dir / "curve.png")
    return summary


def eval_only(cfg: Config, ckpt_path: Path) -> dict:
    device = pick_device(cfg.device)
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
    spec = env_spec(cfg.env)
    model = build_model(cfg, spec).to(device)
    load_trainable(model, ckpt)
    ev = evaluate(model, cfg, spec, ckpt["state_mean"], ckpt["state_std"], device)
    print_eval(ev, f"evaluation of {ckpt_path} (step {ckpt['step']}, {cfg.eval_episodes} episodes per target):")
    if ckpt["last_eval"] is not None:
        same = ev == ckpt["last_eval"]
        print("identical to the evaluation stored in the checkpoint" if same else
              "differs from the evaluation stored in the checkpoint (other episodes, targets or device?)")
    return ev


# ============================================================================ 6. entry point
def main(argv=None):
    cfg, given = parse_args(argv)
    try:
        if cfg.resume or cfg.eval_only:
            src = Path(cfg.resume or cfg.eval_only)
            allowed = RESUME_OVERRIDES if cfg.resume else EVAL_OVERRIDES
            if cfg.resume:
                saved = json.loads((src / "config.json").read_text()) if (src / "ckpt.pt").exists() else None
                if saved is None:
                    raise LamoError(f"--resume {src}: no ckpt.pt there")
            else:
                if not src.is_file():
                    raise LamoError(f"--eval-only {src}: no such checkpoint file")
                saved = torch.load(src, map_location="cpu", weights_only=False)["config"]
            bad = [k for k in given if k not in allowed | {"resume", "eval_only"} and given[k] != saved.get(k)]
            if bad:
                raise LamoError(f"cannot change --{bad[0].replace('_', '-')} here (the run used {saved[bad[0]]!r}); "
                                f"allowed: {', '.join('--' + k.replace('_', '-') for k in sorted(allowed))}")
            cfg = Config(**{**saved, **{k: v for k, v in given.items() if k in allowed}, "resume": "", "eval_only": ""})
            if given.get("eval_only"):
                return eval_only(cfg, src)
            run_dir = src
        else:
            cfg = resolve(cfg, given)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.out or f"runs/{cfg.env}-f{cfg.frac:g}-s{cfg.seed}-{stamp}")
            if run_dir.exists() and any(run_dir.iterdir()):
                raise LamoError(f"run folder {run_dir} exists and is not empty; continue it with --resume {run_dir} "
                                f"or choose another --out")
        print(textwrap.fill("  ".join(f"{k}={v}" for k, v in asdict(cfg).items()), width=110,
                            initial_indent="config   ", subsequent_indent=" " * 9))
        return train(cfg, run_dir, resume=bool(given.get("resume")))
    except LamoError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
