"""lamo: LaMo (Shi et al., ICLR 2024, "Unleashing the Power of Pre-trained Language Models for
Offline Reinforcement Learning") from scratch, in plain PyTorch, in one file read top to bottom.

LaMo is a Decision Transformer whose body is OpenAI's GPT-2, with four changes:
  (1) the body starts from GPT-2's pre-trained weights,
  (2) those weights stay frozen; hand-written LoRA adapters on attention's q, k, v train instead,
  (3) MLP embeddings and an MLP action head replace DT's linear projections,
  (4) a language-modelling loss on WikiText-103 is added to the action loss with weight lambda.

    python lamo.py --env hopper-medium-v2 --frac 0.1  # train on a seeded 10% of the trajectories

Sections: 1 config, 2 GPT-2 and LoRA, 3 Decision Transformer and loss, 4 batched evaluation,
5 training, 6 command line. Per-task values live in tasks.py, the run folder's plumbing (metrics,
checkpoints, summary, curve) in runs.py. "Official code" below means srzer/LaMo-2023.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import re
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, get_type_hints

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pack
from data import LamoError, LMBatcher, dataset_sha256, lm_tokens, progress, trajectory_batcher
from gpt2_loader import N_POSITIONS, SIZES, VOCAB_SIZE, load_gpt2
from runs import (STOPPED, MetricsLog, Run, ctrl_c_saves_checkpoint, finish, load_trainable,
                  print_eval, restore, save_checkpoint)
from tasks import PAPER, PAPER_SETTINGS, Recipe, Task, get_task
from workers import Envs, default_workers


# ============================================================================ 1. config
def flag(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every knob of a run; each field is a --flag. None = from the --model preset (PRESETS below),
    then from the task's recipe in tasks.py."""
    # data
    env: str = flag("hopper-medium-v2", "task, e.g. hopper-medium-v2, kitchen-complete-v2 "
                                        "(tasks.py lists them)")
    data: str = flag("", "local dataset instead of the download: a D4RL hdf5/DT pickle, "
                         "a Minari id or folder, a folder of DQN-Replay .gz files (Atari)")
    frac: float = flag(1.0, "train on this fraction of whole trajectories (paper App. C)")
    frac_seed: int = flag(0, "seed of the --frac subset; fixed across --seed, as the paper used "
                             "one subset per ratio")
    skip_best_trajectory: bool = flag(False, "never draw the subset's highest-return trajectory, "
                                             "as the official experiment.py does (a bug)")
    # model
    model: str = flag("lamo", "preset: lamo | dt (DT baseline: 3 layers, 1 head, d=128, ReLU, "
                              "linear, full training)")
    pretrained: Optional[str] = flag(None, "gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH | "
                                           "none (random init)")
    finetune: Optional[str] = flag(None, "lora | full | frozen: what of the GPT-2 body trains")
    lora_rank: Optional[int] = flag(None, "LoRA rank r (paper: 16 for MuJoCo and Kitchen)")
    lora_alpha: Optional[float] = flag(None, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: Optional[float] = flag(None, "dropout on the LoRA input")
    lora_bias: Optional[bool] = flag(None, "train c_attn's bias along with LoRA "
                                           "(loralib's bias='lora_only')")
    lora_fused: Optional[bool] = flag(None, "one LoRA pair over the fused q|k|v (PEFT on c_attn: "
                                            "official Atari) instead of a pair each (loralib)")
    embed: Optional[str] = flag(None, "mlp | linear embeddings and action head (linear adds tanh)")
    activation: Optional[str] = flag(None, "gelu_tanh (GPT-2's) | relu (kzl DT's) in the MLP "
                                           "blocks")
    n_layer: Optional[int] = flag(None, "layers, only with --pretrained none")
    n_head: Optional[int] = flag(None, "heads, only with --pretrained none")
    n_embd: Optional[int] = flag(None, "width, only with --pretrained none")
    dropout: Optional[float] = flag(None, "dropout of GPT-2's embeddings, attention and residual "
                                          "branches (the task's: 0.1; official Atari 0)")
    # loss
    lm_coef: Optional[float] = flag(None, "lambda, weight of the language-model loss; 0 skips the "
                                          "LM batch")
    lm_corpus: str = flag("", "UTF-8 text file for the LM loss instead of WikiText-103")
    lm_batch: int = flag(2, "LM sequences per step")
    lm_seq_len: int = flag(N_POSITIONS, "tokens per LM sequence")
    # optimisation
    steps: Optional[int] = flag(None, "gradient steps")
    batch_size: Optional[int] = flag(None, "trajectory windows per step")
    context_len: Optional[int] = flag(None, "K, timesteps per window")
    lr: Optional[float] = flag(None, "AdamW learning rate")
    weight_decay: Optional[float] = flag(None, "AdamW weight decay")
    adam_eps: Optional[float] = flag(None, "AdamW eps (official: 1e-6 for a pre-trained body, "
                                           "else 1e-8)")
    warmup: Optional[int] = flag(None, "linear warm-up steps, then constant")
    warmup_tokens: Optional[float] = flag(None, "> 0: warm up over this many action tokens instead "
                                                "(official Atari)")
    final_tokens: Optional[float] = flag(None, "with --warmup-tokens: cosine decay to 10%% at this "
                                               "many tokens")
    grad_clip: Optional[float] = flag(None, "global gradient-norm clip")
    seed: int = flag(0, "training seed (init, batches, dropout); several: one pack (pack.py)")
    # evaluation
    eval_every: Optional[int] = flag(None, "evaluate (and checkpoint) every this many steps")
    eval_episodes: Optional[int] = flag(None, "episodes per target")
    targets: str = flag("", "comma-separated target returns; default: the paper's for the task")
    eval_seed: int = flag(10_000, "episode i of every evaluation resets its env with "
                                  "seed eval_seed + i")
    eval_max_steps: Optional[int] = flag(None, "cut evaluation episodes at this many steps; "
                                               "default: the task's")
    eval_workers: int = flag(0, "processes stepping the evaluation envs; 0: one per 10 "
                                "episodes, at most one per core (workers.py)")
    # run
    log_every: int = flag(100, "log losses every this many steps")
    device: str = flag("auto", "auto (cuda > mps > cpu) | cuda | mps | cpu")
    precision: str = flag("auto", "auto (bf16 on CUDA GPUs of compute capability 8.0 and up, else "
                                  "fp32) | bf16 | fp32: the transformer body's matmuls")
    compile: bool = flag(False, "torch.compile the training forward")
    compile_mode: str = flag("default", "torch.compile's mode with --compile: default | "
                                        "reduce-overhead (CUDA graphs: one launch for the "
                                        "forward's kernels) | max-autotune")
    out: str = flag("", "run folder; default runs/<env>-f<frac>-<model>-s<seed>-<time>")
    resume: str = flag("", "continue the run in this folder from its ckpt.pt")
    eval_only: str = flag("", "evaluate this ckpt.pt and exit")
    wandb: str = flag("", "log config and metrics to this Weights & Biases project")
    wandb_group: str = flag("", "W&B group of this run (sweep.py passes the table cell)")


# The two models of the paper. What differs by task (lr, embedding, lambda, ...) is in tasks.py.
PRESETS = {
    "lamo": dict(pretrained="gpt2", finetune="lora", activation="gelu_tanh"),
    # kzl DT, as the official code builds its baseline: GPT-2 blocks with --activation_function relu
    # (experiment.py's default), 3 layers, 1 head, d=128, every weight trained.
    "dt": dict(pretrained="none", finetune="full", activation="relu", n_layer=3, n_head=1,
               n_embd=128),
}
CHOICES = {"model": PRESETS, "finetune": ("lora", "full", "frozen"), "embed": ("mlp", "linear"),
           "activation": ("gelu_tanh", "relu"), "precision": ("auto", "bf16", "fp32"),
           "compile_mode": ("default", "reduce-overhead", "max-autotune")}


# ============================================================================ 2. GPT-2 and LoRA
ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),   # GPT-2's GELU is the tanh approximation
    "relu": F.relu,
}


@dataclass
class GPTConfig:
    n_layer: int = SIZES["gpt2"][0]
    n_head: int = SIZES["gpt2"][1]
    n_embd: int = SIZES["gpt2"][2]
    vocab_size: int = VOCAB_SIZE
    n_positions: int = N_POSITIONS
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_tanh"
    dropout: float = 0.1
    lora_rank: int = 0          # 0 = no adapters
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_fused: bool = False    # one adapter over [q | k | v] (PEFT) instead of one each (loralib)


class LoRAQKV(nn.Module):
    """GPT-2's c_attn (x -> [q | k | v], as nn.Linear d -> 3d) plus, when r > 0, a rank-r update
    (Hu et al. 2021), written by hand. By default one per projection: q += (alpha/r) B_q A_q
    dropout(x), same for k and v, as loralib's MergedLinear(enable_lora=[True, True, True]) in the
    official D4RL code. fused: one over the whole output, [q | k | v] += (alpha/r) B A dropout(x)
    with B (3d, r), as PEFT's LoraConfig(target_modules=["c_attn"]) in the official Atari code
    (a third of the A weights, and the three projections share A's r directions)."""

    def __init__(self, d: int, r: int, alpha: float, dropout: float, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3 * d, d))                  # frozen, from GPT-2
        self.bias = nn.Parameter(torch.zeros(3 * d))
        self.r = r
        self.scale = alpha / max(r, 1)
        self.merged_from = None
        if r:
            n = 1 if fused else 3                # adapters: one over q|k|v, or one each
            self.lora_A = nn.Parameter(torch.empty(n, r, d))                # (n, r, in)
            # zero: the adapted model starts as GPT-2
            self.lora_B = nn.Parameter(torch.zeros(n, 3 * d // n, r))       # (n, 3d / n, r)
            for a in self.lora_A:
                # per adapter, fan_in = d, as loralib and PEFT
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_dropout = nn.Dropout(dropout)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A).flatten(0, 1)   # (n, 3d/n, d) -> (3d, d)

    def forward(self, x):                                                   # (B, T, d)
        y = F.linear(x, self.weight, self.bias)                             # (B, T, 3d)
        if self.r and self.merged_from is None:
            u = F.linear(self.lora_dropout(x), self.lora_A.flatten(0, 1))    # (B, T, n r)
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
        evaluation is exactly training without one: that keeps --resume bit-for-bit on CPU."""
        if self.merged_from is not None:
            self.weight.copy_(self.merged_from)
            self.merged_from = None


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.p = c.dropout
        self.c_attn = LoRAQKV(c.n_embd, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_fused)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x, mask=None):                                  # (B, T, d), (B, 1, T, T) bool
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)                            # 3 x (B, T, d)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)
                   for t in (q, k, v))                                      # (B, nh, T, hd)
        # is_causal cannot be combined with attn_mask: a padded batch passes one full
        # (causal & padding) mask.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,         # (B, nh, T, hd)
                                           is_causal=mask is None,
                                           dropout_p=self.p if self.training else 0.0)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, d)))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd)
        self.act = ACTIVATIONS[c.activation]
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x):                                                   # (B, T, d)
        return self.drop(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.ln_2 = nn.LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.attn = CausalSelfAttention(c)
        self.mlp = MLP(c)

    def forward(self, x, mask=None):                                        # pre-LN residual block
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, c.layer_norm_epsilon)
        # GPT-2's init (as in HF): N(0, 0.02), c_proj scaled by depth
        for n, p in self.named_parameters():
            if "lora_" not in n and p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / (math.sqrt(2 * c.n_layer)
                                                if n.endswith("c_proj.weight") else 1))
            elif n.endswith("bias"):
                nn.init.zeros_(p)

    def body(self, x, mask=None):
        """The transformer on input embeddings x (B, T, d), adding no position embedding (the caller
        does, if it wants one). -> hidden states (B, T, d) after ln_f."""
        x = self.drop(x)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)

    def forward(self, idx):                                                 # (B, T) token ids
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.body(self.wte(idx) + self.wpe(pos))                        # (B, T, d)
        return F.linear(h, self.wte.weight)                            # (B, T, V): head tied to wte

    @classmethod
    def from_pretrained(cls, name_or_path: str, **config) -> "GPT2":
        """gpt2 | gpt2-medium | gpt2-large | gpt2-xl (downloaded once), a model.safetensors file,
        or a folder holding one; `config`: GPTConfig fields beyond the shape (dropout, LoRA, ...).
        The loader transposes GPT-2's Conv1D weights and checks every shape."""
        shape, state = load_gpt2(name_or_path)
        model = cls(GPTConfig(**shape, **config))
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


# loralib's mark_only_lora_as_trainable(bias='lora_only')
LORA_TRAINABLE = (r"lora_[AB]$", r"c_attn\.bias$")


def mark_trainable(model: nn.Module, patterns=LORA_TRAINABLE, verbose=True) -> tuple[int, int]:
    """requires_grad on the parameters whose name matches one of `patterns` (regexes), off
    elsewhere. -> (trainable, total) parameter counts."""
    for n, p in model.named_parameters():
        p.requires_grad_(any(re.search(pat, n) for pat in patterns))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"trainable parameters: {n_train:,} / {n_total:,} ({100 * n_train / n_total:.2f}%)")
    return n_train, n_total


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights stay fp32; matmuls run in bf16) for precision 'bf16', else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ================================================================= 3. Decision Transformer and loss
class Residual(nn.Module):
    """LaMo's MLP embedding: h = first(x); fc2(GELU(h)) + h. The official code's ResidualBlock
    (first = Linear) and ResidualEmbedBlock (first = Embedding, for discrete actions)."""

    def __init__(self, first: nn.Module, d: int):
        super().__init__()
        self.fc1 = first
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.gelu(h)) + h


class NatureCNN(nn.Module):
    """The Nature-DQN encoder (Mnih et al. 2015) of the official Atari code: frames / 255, three
    convolutions with ReLU, then a Linear to d."""

    def __init__(self, frames: int, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(frames, 32, 8, stride=4), nn.ReLU(),
                                 nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                                 nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(64 * 7 * 7, d))

    def forward(self, x):                                            # (N, frames, 84, 84) in 0..255
        return self.net(x / 255.0)                                          # (N, d)


def make_embedding(kind: str, source: str, n_in: int, d: int) -> nn.Module:
    """The one table of embedding kinds. kind: linear (DT) | mlp (LaMo); source: vector (n_in
    floats), discrete (one of n_in actions) or pixels (n_in stacked 84x84 frames)."""
    # official Atari: the CNN ends in a Linear to d; mlp adds a residual block
    if source == "pixels":
        cnn = NatureCNN(n_in, d)
        return cnn if kind == "linear" else nn.Sequential(cnn, Residual(nn.Linear(d, d), d))
    first = nn.Embedding(n_in, d) if source == "discrete" else nn.Linear(n_in, d)
    return first if kind == "linear" else Residual(first, d)


def make_action_head(kind: str, d: int, n_out: int, discrete: bool, tanh_logits: bool) -> nn.Module:
    # Deviation kept from the official Atari LaMo: tanh bounds the logits
    if discrete and tanh_logits:
        return nn.Sequential(nn.Linear(d, n_out), nn.Tanh())
    if discrete:                   # kzl DT's Atari head
        return nn.Linear(d, n_out, bias=False)
    if kind == "mlp":              # LaMo's MLPBlock; no tanh, as in the official code
        return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, n_out))
    return nn.Sequential(nn.Linear(d, n_out), nn.Tanh())                   # DT's head


class DecisionTransformer(nn.Module):
    """Tokens (R_t, s_t, a_t) per timestep through a GPT-2 body; a_t is predicted from the s_t token
    (Chen et al. 2021). How the tokens are built follows the official code of the task's domain."""

    def __init__(self, gpt: GPT2, task: Task, embed: str, tanh_logits: bool,
                 precision: str = "fp32"):
        super().__init__()
        d = gpt.config.n_embd
        pixels = len(task.obs_shape) == 3
        self.gpt = gpt
        self.embed_timestep = nn.Embedding(task.max_timestep, d)
        self.embed_return = make_embedding(embed, "vector", 1, d)
        self.embed_state = make_embedding(embed, "pixels" if pixels else "vector",
                                          task.obs_shape[0], d)
        self.embed_action = make_embedding(embed, "discrete" if task.discrete else "vector",
                                           task.act_dim, d)
        self.embed_ln = nn.LayerNorm(d)
        self.predict_action = make_action_head(embed, d, task.act_dim, task.discrete, tanh_logits)
        self.add_wpe = task.wpe
        self.timestep_before_ln = task.timestep_before_ln
        self.pad_right = task.pad_right
        self.precision = precision

    def embed(self, states, actions, rtg, timesteps):         # (B,K,*obs) (B,K[,act]) (B,K,1) (B,K)
        """The token sequence, always in fp32: under bf16, return-to-go / 1000 in [2, 4) has a
        step of 1/64 (16 units of return), so the embedding layers never see rounded inputs."""
        B, K = timesteps.shape
        time = self.embed_timestep(timesteps)                     # (B, K, d)
        tokens = [self.embed_return(rtg),                         # (B, K, d) each
                  self.embed_state(states.flatten(0, 1)).view(B, K, -1),
                  self.embed_action(actions)]
        # official Atari (and kzl DT): time added to each token before LN
        if self.timestep_before_ln:
            tokens = [t + time for t in tokens]
        x = self.embed_ln(torch.stack(tokens, 2).flatten(1, 2))   # (B, 3K, d): R1 s1 a1 R2 ...
        if not self.timestep_before_ln:   # official MuJoCo/Kitchen LaMo: LayerNorm first, then time
            x = x + time.repeat_interleave(3, dim=1)
        if self.add_wpe:   # official Atari runs HF's GPT2Model on inputs_embeds, which adds wpe
            x = x + self.gpt.wpe(torch.arange(3 * K, device=x.device))
        return x

    def forward(self, states, actions, rtg, timesteps, mask=None):
        # mask (B, K): 1 real, 0 padding
        B, K = timesteps.shape
        x = self.embed(states, actions, rtg, timesteps)                       # (B, 3K, d)
        attn = None
        if mask is not None and not self.pad_right:   # right padding: causality already hides it
            keys = mask.bool().repeat_interleave(3, dim=1)                    # (B, 3K)
            causal = torch.ones(3 * K, 3 * K, dtype=torch.bool, device=x.device).tril()
            # Each token may also see itself, so a left-padded row is never fully masked: a fully
            # masked softmax row is NaN, and NaN leaks into real rows through 0 * NaN in backward.
            # Real rows see only real keys, so padding cannot change them.
            attn = ((causal & keys[:, None, :]) |
                    torch.eye(3 * K, dtype=torch.bool, device=x.device))[:, None]
        with autocast(x.device, self.precision):
            h = self.gpt.body(x, attn)                                        # (B, 3K, d)
        h = h.float().view(B, K, 3, -1)                                       # (B, K, 3, d)
        return self.predict_action(h[:, :, 1])                                # (B, K, act) from s_t


def action_loss(pred, target, mask, discrete: bool = False):          # (B,K,act) (B,K[,act]) (B,K)
    """Over the real (unpadded) steps: MSE for continuous actions (DT, LaMo), cross-entropy over
    the logits for discrete ones (official Atari)."""
    if discrete:
        per_step = F.cross_entropy(pred.flatten(0, 1), target.flatten(),
                                   reduction="none").view(mask.shape)
    else:
        per_step = (pred - target).pow(2).mean(-1)                   # (B, K)
    return (per_step * mask).sum() / mask.sum()


def lm_loss(gpt: GPT2, block, precision: str = "fp32"):              # (B, T+1) token ids
    """Next-token cross-entropy through the same GPT-2, with wpe: a real GPT-2 forward.
    Deviation: the official code runs its LM batch without wpe too; GPT-2 was trained with it."""
    with autocast(block.device, precision):
        logits = gpt(block[:, :-1])                                  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), block[:, 1:].flatten())


def build_model(cfg: Config, task: Task, precision: str = "fp32") -> DecisionTransformer:
    body = dict(dropout=cfg.dropout, activation=cfg.activation, lora_alpha=cfg.lora_alpha,
                lora_rank=cfg.lora_rank if cfg.finetune == "lora" else 0,
                lora_dropout=cfg.lora_dropout, lora_fused=cfg.lora_fused)
    if cfg.pretrained == "none":
        gpt = GPT2(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                             vocab_size=1 if cfg.model == "dt" else VOCAB_SIZE, **body))
    else:
        gpt = GPT2.from_pretrained(cfg.pretrained, **body)
    if cfg.lm_coef and gpt.config.vocab_size != VOCAB_SIZE:
        raise LamoError(f"--lm-coef needs GPT-2's {VOCAB_SIZE}-token vocabulary; "
                        f"{cfg.pretrained} has {gpt.config.vocab_size}")
    if cfg.lm_coef and cfg.lm_seq_len > gpt.config.n_positions:
        raise LamoError(f"--lm-seq-len {cfg.lm_seq_len} exceeds the model's "
                        f"{gpt.config.n_positions} positions")
    if task.wpe and 3 * cfg.context_len > gpt.config.n_positions:
        raise LamoError(f"--context-len {cfg.context_len}: 3K tokens exceed the model's "
                        f"{gpt.config.n_positions} positions")
    model = DecisionTransformer(gpt, task, cfg.embed, tanh_logits=cfg.model == "lamo",
                                precision=precision)
    # What trains: embeddings and heads always; of the GPT-2 body, LoRA (+ c_attn bias with
    # --lora-bias: the official MuJoCo code's mark_only_lora_as_trainable(bias='lora_only'); its
    # Atari code's PEFT freezes it), everything (full; wte and wpe get gradients only from the LM
    # loss), or nothing (frozen).
    heads = (r"^embed_", r"^predict_")
    lora = LORA_TRAINABLE if cfg.lora_bias else LORA_TRAINABLE[:1]
    mark_trainable(model, {"lora": lora + heads, "full": (r"",), "frozen": heads}[cfg.finetune])
    return model


# ============================================================================ 4. batched evaluation
@torch.inference_mode()
def rollout(model, task: Task, episodes, state_mean, state_std, K: int, device,
            max_steps: int | None = None, envs: Envs | None = None,
            runs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run every (target, seed) episode at once: one model forward per env step for all live
    episodes, over a rolling K-step window per episode (a finished episode's row is dropped).
    Left-padded tasks (DT's MuJoCo convention) start with K-1 masked padding slots, as the official
    code left-pads the first K-1 steps, so every forward has the same shape (B, K): a row's result
    then does not depend on how many episodes share the batch, and batched returns equal
    one-at-a-time ones (bit for bit on CPU; on CUDA within rounding, as cuBLAS picks its kernels
    by batch size). Right-padded tasks (official Atari, with wpe) fill the window from slot 0 and
    read the newest slot, so positions match training. Continuous actions are clipped to the action
    space before env.step, as D4RL's NormalizedBoxEnv does; discrete ones are the argmax.
    envs: where the envs step (workers.Envs; default: here, one after another). A pack's evaluation
    passes runs, each episode's run, and Pack.policy as model: each row through its own run's
    weights; state_mean/state_std may then be one row per episode.
    Deviation: the official code evaluates one episode at a time. -> (returns, lengths) per
    episode."""
    N, T = len(episodes), max_steps or task.episode_len
    own_envs = envs is None
    envs = envs or Envs(task)
    obs = envs.reset(T, [seed for _, seed in episodes])
    if state_mean is not None:                                              # one row per episode
        state_mean = np.broadcast_to(state_mean, (N, *task.obs_shape))
        state_std = np.broadcast_to(state_std, (N, *task.obs_shape))
    S = torch.zeros(N, K, *task.obs_shape, device=device)                   # states
    A = torch.zeros(N, K, *(() if task.discrete else (task.act_dim,)), device=device,
                    dtype=torch.long if task.discrete else torch.float32)   # actions; 0 until taken
    R = torch.zeros(N, K, 1, device=device)                                 # returns-to-go / scale
    TS = torch.zeros(N, K, dtype=torch.long, device=device)                 # timesteps
    rtg = torch.tensor([tgt / task.rtg_scale for tgt, _ in episodes], device=device)   # (N,)
    space = envs.action_space
    returns, lengths = np.zeros(N), np.zeros(N, dtype=int)
    live = np.arange(N)                                                     # episode of each row
    try:
        for t in range(T):
            slot = t if task.pad_right and t < K else K - 1
            if t >= (K if task.pad_right else 1):          # window full: drop the oldest step
                for buf in (S, A, R, TS):
                    buf[:, :-1] = buf[:, 1:].clone()
                A[:, -1] = 0
            if state_mean is not None:
                obs = (obs - state_mean[live]) / state_std[live]
            S[:, slot] = torch.as_tensor(obs, dtype=torch.float32, device=device)
            R[:, slot, 0] = rtg
            TS[:, slot] = min(t, task.max_timestep - 1)
            mask = None
            if not task.pad_right and t < K - 1:           # left padding still in the window
                mask = (torch.arange(K, device=device) >= K - 1 - t).float().expand(len(live), -1)
            window = (S, A, R, TS, mask)
            out = (model(*window) if runs is None else model(*window, runs[live]))[:, slot]
            action = out.argmax(-1) if task.discrete else out                   # (n, act)
            A[:, slot] = action
            action = action.cpu().numpy()                      # one host sync per env step
            if not task.discrete:
                action = np.clip(action, space.low, space.high)
            obs, r, done = envs.step(live, action)
            returns[live] += r
            lengths[live] += 1
            rtg = rtg - torch.as_tensor(r / task.rtg_scale, dtype=torch.float32, device=device)
            going = ~done
            live = live[going]
            if len(live) == 0 or t + 1 == T:
                break
            if not going.all():                                             # drop finished rows
                keep = torch.as_tensor(going, device=device)
                S, A, R, TS, rtg = S[keep], A[keep], R[keep], TS[keep], rtg[keep]
                obs = obs[going]
    finally:
        if own_envs:
            envs.close()
    return returns, lengths


def evaluate(model, cfg: Config, task: Task, state_mean, state_std, device,
             envs: Envs | None = None) -> dict:
    """All targets x episodes in one batched rollout, LoRA merged. -> {target: return and score
    statistics over the episodes}."""
    targets, episodes = eval_episodes(cfg)
    model.eval()
    model.gpt.merge()
    try:
        returns, lengths = rollout(model, task, episodes, state_mean, state_std, cfg.context_len,
                                   device, cfg.eval_max_steps, envs)
    finally:
        model.gpt.unmerge()
        model.train()
    return eval_stats(returns, lengths, targets, task)


def eval_episodes(cfg: Config) -> tuple[list[float], list[tuple[float, int]]]:
    """-> the targets, and the (target, env seed) of each episode: --eval-episodes per target."""
    targets = parse_targets(cfg.targets)
    return targets, [(tgt, cfg.eval_seed + i) for tgt in targets for i in range(cfg.eval_episodes)]


def eval_stats(returns, lengths, targets, task: Task) -> dict:
    """Episodes ordered target by target (eval_episodes) -> {target: statistics}."""
    out = {}
    for tgt, r, n in zip(targets, np.split(returns, len(targets)), np.split(lengths, len(targets))):
        s = task.score(r)
        out[f"{tgt:g}"] = {"return_mean": r.mean(), "return_std": r.std(), "score_mean": s.mean(),
                           "score_std": s.std(), "length_mean": n.mean()}
    return {k: {m: float(v) for m, v in d.items()} for k, d in out.items()}


def eval_envs(cfg: Config, task: Task, runs: int = 1) -> Envs:
    """The evaluation's env pool, kept for the whole run: --eval-workers, or one worker per 10
    episodes (fewer and the pipes cost more than the stepping saves) up to the cores available."""
    episodes = runs * len(parse_targets(cfg.targets)) * cfg.eval_episodes
    return Envs(task, cfg.eval_workers or max(1, min(default_workers(), episodes // 10)))


# ============================================================================ 5. training
def make_optimizer(model, cfg: Config, device):
    params = [p for p in model.parameters() if p.requires_grad]
    # One lr for every trainable parameter: the official code's separate LM lr never takes effect.
    # fused: one kernel for the whole update
    return params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     eps=cfg.adam_eps, fused=device.type == "cuda")


def learning_rate(cfg: Config, step: int, tokens: float) -> float:
    """Linear warm-up over cfg.warmup steps, then constant (LambdaLR in the official MuJoCo code);
    or, with warmup_tokens, the official Atari CustomLRScheduler (after kzl DT's Atari code):
    linear warm-up over that many tokens, then cosine, never below 10%, past final_tokens too."""
    if not cfg.warmup_tokens:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if tokens < cfg.warmup_tokens:
        return cfg.lr * tokens / cfg.warmup_tokens
    progress = (tokens - cfg.warmup_tokens) / max(1.0, cfg.final_tokens - cfg.warmup_tokens)
    return cfg.lr * max(0.1, 0.5 * (1.0 + math.cos(math.pi * progress)))


def count_tokens(run, action_tokens: int):
    """The official Atari token count, done as its code does it: core.py adds (actions > 0).sum()
    to a running total each step and passes that total to scheduler.step(tokens), which adds it to
    its own count again, so the schedule sees the running sum of running totals (quadratic in the
    step; REFERENCE.md reads it as linear, never leaving warm-up; the code wins). Deviation: our
    padded steps hold action 0 and do not count (the official ones repeat the dataset's last
    action). The batch counts its tokens on the host (Batch.action_tokens): no wait on the GPU."""
    run.action_tokens += action_tokens
    run.schedule_tokens += run.action_tokens


def train_step(fwd, model, optimizer, params, batch, lm_block, cfg: Config,
               discrete: bool) -> torch.Tensor:
    """One gradient step on L = L_action + lambda * L_LM. -> (action loss, LM loss, grad norm,
    non-finite flag) as one device tensor: no .item() here, so the GPU never waits for the host."""
    if cfg.compile:                 # a new step for CUDA graphs (reduce-overhead); else a no-op
        torch.compiler.cudagraph_mark_step_begin()
    pred = fwd(batch.states, batch.actions, batch.rtg, batch.timesteps, batch.mask)
    loss_action = action_loss(pred, batch.actions, batch.mask, discrete)
    loss_lm = (lm_loss(model.gpt, lm_block, model.precision) if lm_block is not None
               else torch.zeros((), device=loss_action.device))
    loss = loss_action + cfg.lm_coef * loss_lm
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    # A finite loss with an inf gradient makes the clip 0 * inf: NaN weights, flagged here too.
    return torch.stack([loss_action.detach(), loss_lm.detach(), grad_norm,
                        (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()])


def start_run(cfg: Config, folder: Path, resume: bool) -> Run:
    if cfg.wandb and importlib.util.find_spec("wandb") is None:   # before minutes of loading
        raise LamoError("--wandb needs the wandb package: pip install wandb")
    device = pick_device(cfg.device)
    if resume and cfg.precision == "auto":
        raise LamoError(f"{folder / 'config.json'} says precision 'auto' (an older lamo saved it "
                        f"unresolved): set it to what the run trained with (bf16 if on a GPU, else "
                        f"fp32) and resume again")
    # Resolved once and saved in config.json: a run's arithmetic never changes on --resume.
    cfg.precision = resolve_precision(cfg.precision, device)
    task = get_task(cfg.env)
    torch.manual_seed(cfg.seed)
    # The model before the data: a bad --pretrained fails in seconds.
    model = build_model(cfg, task, cfg.precision).to(device)
    trajectories, files = task.load(cfg.data)
    subset = task.subset(trajectories, cfg.frac, cfg.frac_seed)
    batcher = task.batcher(trajectories, subset, cfg.context_len, task.max_timestep, task.rtg_scale,
                           cfg.seed, device,
                           **({"skip_best": True} if cfg.skip_best_trajectory else {}))
    # lambda = 0: no corpus, no LM forward (the official code runs it anyway).
    lm = (LMBatcher(lm_tokens(cfg.lm_corpus), cfg.lm_batch, cfg.lm_seq_len, cfg.seed + 1, device)
          if cfg.lm_coef > 0 else None)
    params, optimizer = make_optimizer(model, cfg, device)
    run = Run(cfg, task, folder, device, model, params, optimizer, batcher, lm, subset,
              {str(f): dataset_sha256(f) for f in files})
    # The run folder appears only now, so a run that fails while loading leaves nothing behind.
    folder.mkdir(parents=True, exist_ok=True)
    if resume:
        restore(run)
        if cfg.steps < run.step or (cfg.steps == run.step and not run.history):
            raise LamoError(f"--resume {folder}: the run is at step {run.step}"
                            f"{'' if run.history else ' without an evaluation yet'}; give "
                            f"--steps {'above' if not run.history else 'at least'} {run.step}")
        (folder / STOPPED).unlink(missing_ok=True)       # a run stopped by NaN/inf: retried
    else:
        (folder / "subset.json").write_text(json.dumps({"frac": cfg.frac,
                                                        "frac_seed": cfg.frac_seed,
                                                        "n_trajectories": int(len(subset)),
                                                        "indices": subset.tolist()}))
    # After restore: a resume that fails leaves the config it had.
    (folder / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    n_train = sum(p.numel() for p in params)
    body = model.gpt.config
    print(f"data     {cfg.data or task.source}: subset frac={cfg.frac} (seed {cfg.frac_seed}): "
          f"{batcher.describe()}\n"
          f"model    {cfg.model} | pretrained {cfg.pretrained} | finetune {cfg.finetune} | "
          f"embed {cfg.embed} | "
          f"layers {body.n_layer}, d {body.n_embd}, {cfg.activation} | lambda {cfg.lm_coef}\n"
          f"params   {n_train:,} trainable of {sum(p.numel() for p in model.parameters()):,}\n"
          f"device   {device} ({device_name(device)}) | precision {cfg.precision}\n"
          f"folder   {folder}")
    return run


def train(cfg: Config, folder: Path, resume: bool = False) -> dict:
    run = start_run(cfg, folder, resume)
    model, discrete = run.model, run.task.discrete
    # --compile: the training forward as fused kernels; the first steps pay the compilation.
    # With dropout, compiled runs draw other random masks than eager ones, so the two are not
    # bit-identical.
    fwd = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    log = MetricsLog(run)
    # action loss, LM loss, grad norm, non-finite, summed since the last log row: on device
    sums = run.loss_sums.to(run.device)
    # A bar on a terminal; in a log file a plain line every --log-every steps or LOG_SECONDS.
    bar = progress(total=cfg.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
                   miniters=cfg.log_every)
    model.train()
    envs = eval_envs(cfg, run.task)
    with ctrl_c_saves_checkpoint() as stop, contextlib.closing(log), envs:
        while run.step < cfg.steps:
            lr = learning_rate(cfg, run.step, run.schedule_tokens)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            batch = run.batcher.sample(cfg.batch_size)
            sums += train_step(fwd, model, run.optimizer, run.params, batch,
                               run.lm.sample() if run.lm else None, cfg, discrete)
            if cfg.warmup_tokens:
                count_tokens(run, batch.action_tokens)
            run.step += 1
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                log.losses(sums, lr)
                sums.zero_()
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                log.check_finite(sums)
                t0 = time.perf_counter()
                evaluation = evaluate(model, cfg, run.task, run.batcher.state_mean,
                                      run.batcher.state_std, run.device, envs)
                run.history.append({"step": run.step, "eval": evaluation,
                                    "eval_s": round(time.perf_counter() - t0, 3)})
                log.evaluation(run.history[-1])
                save_checkpoint(run, sums)
            bar.update(1)
            bar.set_postfix_str(log.status, refresh=False)
            if stop:
                bar.close()
                log.check_finite(sums)
                save_checkpoint(run, sums)
                print(f"interrupted at step {run.step}; checkpoint saved. "
                      f"Continue with: python lamo.py --resume {folder}")
                raise SystemExit(130)
    bar.close()
    return finish(run, paper_reference(cfg))


def eval_only(cfg: Config, ckpt_path: Path) -> dict:
    device = pick_device(cfg.device)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    task = get_task(cfg.env)
    # Seeded as start_run seeds it: with --pretrained none, the frozen random tensors (a LoRA
    # body, a frozen one) are not in the checkpoint, and this rebuilds the ones the run trained on.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task, resolve_precision(cfg.precision, device)).to(device)
    load_trainable(model, ckpt)
    with eval_envs(cfg, task) as envs:
        ev = evaluate(model, cfg, task, ckpt["state_mean"], ckpt["state_std"], device, envs)
    print_eval(ev, f"evaluation of {ckpt_path} (step {ckpt['step']}, {cfg.eval_episodes} "
                   f"episodes per target):")
    if ckpt["last_eval"] is not None and ckpt.get("last_eval_step") not in (None, ckpt["step"]):
        print(f"(the checkpoint's last evaluation ran at step {ckpt['last_eval_step']}, before "
              f"these weights: nothing to compare with)")
    elif ckpt["last_eval"] is not None:
        same = ev == ckpt["last_eval"]
        print("identical to the evaluation stored in the checkpoint" if same else
              "differs from the evaluation stored in the checkpoint (other episodes, targets or "
              "device? or trained in a pack, whose batched forward rounds differently)")
    return ev


# ============================================================================ 6. command line
RESUME_OVERRIDES = {"steps", "eval_every", "log_every", "device", "compile", "compile_mode",
                    "wandb", "wandb_group",
                    "eval_workers"}
EVAL_OVERRIDES = {"eval_episodes", "targets", "eval_seed", "eval_max_steps", "device", "precision",
                  "eval_workers"}


def make_parser() -> argparse.ArgumentParser:
    """The CLI, generated from Config: --field-name per field (and --no-field-name for a bool)."""
    # allow_abbrev off: --se 5 is an error, not --seed 5 (sweep.py checks the flags it passes on
    # by their full names: flag_names).
    parser = argparse.ArgumentParser(prog="lamo.py", description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    hints = get_type_hints(Config)
    for f in fields(Config):
        t = hints[f.name]
        t = (next(a for a in t.__args__ if a is not type(None)) if getattr(t, "__args__", None)
             else t)
        help = f"{f.metadata['help']} (default: {f.default})"
        name = "--" + f.name.replace("_", "-")
        if t is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help)
        else:
            parser.add_argument(name, type=t, help=help, metavar=t.__name__.upper(),
                                nargs="+" if f.name in pack.PER_RUN else None)
    return parser


def flag_names() -> set[str]:
    """Every flag the CLI takes, in full (--help aside)."""
    return {s for a in make_parser()._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def parse_args(argv=None) -> tuple[Config, dict]:
    """The config of the command line, and the flags given."""
    given = vars(make_parser().parse_args(argv))   # unknown flags are an argparse error
    for k in pack.PER_RUN & given.keys():
        if len(given[k]) == 1:
            given[k] = given[k][0]           # several stay a list: one pack of runs (main)
    first = {k: v[0] if isinstance(v, list) else v for k, v in given.items()}
    return Config(**first), given


def resolve(cfg: Config, given=()) -> Config:
    """Fill every None from the --model preset, then the task's recipe; check the choices, and
    refuse flags (among `given`) that would do nothing in this configuration."""
    for k, allowed in CHOICES.items():
        v = getattr(cfg, k)
        if v is not None and v not in allowed:
            raise LamoError(f"--{k.replace('_', '-')} {v!r}: choose one of {', '.join(allowed)}")
    task = get_task(cfg.env)
    recipe: Recipe = getattr(task, cfg.model)
    for k, v in {**asdict(recipe), **PRESETS[cfg.model]}.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    shape = dict(zip(("n_layer", "n_head", "n_embd"), SIZES["gpt2"]))
    for k in shape:
        if cfg.pretrained != "none" and getattr(cfg, k) is not None:
            if k not in given:                            # the preset's shape (DT's 3 layers)
                raise LamoError(f"--model {cfg.model} is a model of its own shape, trained from "
                                f"scratch: it takes no --pretrained {cfg.pretrained}")
            raise LamoError(f"--{k.replace('_', '-')} only applies with --pretrained none; "
                            f"a pretrained model fixes its shape")
        if cfg.pretrained == "none" and getattr(cfg, k) is None:
            # "LaMo w/o pre-training": GPT-2 small's shape, random weights
            setattr(cfg, k, shape[k])
    if cfg.adam_eps is None:  # the official utils.get_optimizer: eps 1e-6 only with --pretrained_lm
        cfg.adam_eps = task.adam_eps_pretrained if cfg.pretrained != "none" else 1e-8
    if cfg.model == "dt" and cfg.lm_coef:
        raise LamoError("--model dt has no language head (vocab 1, as in kzl DT); "
                        "use --model lamo for --lm-coef")
    if cfg.finetune == "frozen" and cfg.lm_coef:
        # Nothing on the language path trains with a frozen body (wte, wpe, blocks, ln_f): the LM
        # batch would cost a forward and backward a step and change no weight.
        if "lm_coef" in given:
            raise LamoError(f"--lm-coef {cfg.lm_coef:g} has no effect with --finetune frozen "
                            f"(no weight on the language path trains); drop it, or fine-tune")
        cfg.lm_coef = 0.0                                 # the task's default lambda (Kitchen's)
    if cfg.warmup_tokens and not task.discrete:
        raise LamoError(f"--warmup-tokens counts action tokens, which only a discrete-action task "
                        f"(Atari) counts; {task.name} would train at lr 0. Use --warmup STEPS")
    if cfg.skip_best_trajectory and task.batcher is not trajectory_batcher:
        raise LamoError(f"--skip-best-trajectory reproduces experiment-d4rl's sampling; {task.name}"
                        f"'s official code samples otherwise. Drop it")
    if cfg.finetune == "lora" and cfg.lora_rank < 1:
        raise LamoError(f"--lora-rank {cfg.lora_rank}: must be >= 1 with --finetune lora")
    lora_flags = ("lora_rank", "lora_alpha", "lora_dropout", "lora_bias", "lora_fused")
    idle = [k for k in lora_flags if k in given and cfg.finetune != "lora"]
    idle += [k for k in ("lm_corpus", "lm_batch", "lm_seq_len") if k in given and not cfg.lm_coef]
    idle += [k for k in ("warmup",) if k in given and cfg.warmup_tokens]
    idle += [k for k in ("final_tokens",) if k in given and not cfg.warmup_tokens]
    if idle:
        raise LamoError(f"--{idle[0].replace('_', '-')} has no effect with "
                        f"--finetune {cfg.finetune}, "
                        f"--lm-coef {cfg.lm_coef}, --warmup-tokens {cfg.warmup_tokens:g}; "
                        f"drop it or turn that part on")
    if "compile_mode" in given and not cfg.compile:
        raise LamoError(f"--compile-mode {cfg.compile_mode} has no effect without --compile; "
                        f"add --compile")
    if cfg.eval_max_steps is None:
        cfg.eval_max_steps = task.episode_len
    for k in ("lm_batch", "lm_seq_len", "warmup"):
        if getattr(cfg, k) < 1:
            raise LamoError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if cfg.lm_coef < 0:
        raise LamoError(f"--lm-coef must be >= 0, got {cfg.lm_coef}")
    if not cfg.grad_clip > 0:          # clip_grad_norm_ would flip (< 0) or zero (0) every gradient
        raise LamoError(f"--grad-clip must be > 0, got {cfg.grad_clip:g}")
    cfg.targets = cfg.targets or ",".join(f"{t:g}" for t in task.targets)
    check_values(cfg)
    return cfg


def check_values(cfg: Config):
    """What --resume and --eval-only may change, checked for a new run and again for them (a bad
    value must not reach config.json): counts >= 1, --eval-workers >= 0, the targets, and
    --wandb-group only with --wandb."""
    for k in ("steps", "batch_size", "context_len", "eval_every", "eval_episodes", "log_every",
              "eval_max_steps"):
        if getattr(cfg, k) < 1:
            raise LamoError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if cfg.eval_workers < 0:
        raise LamoError(f"--eval-workers must be >= 0 (0: one per 10 episodes), got "
                        f"{cfg.eval_workers}")
    parse_targets(cfg.targets)
    if cfg.wandb_group and not cfg.wandb:
        raise LamoError("--wandb-group has no effect without --wandb PROJECT; add it")


# Config fields that say how long, where, and how a run is evaluated or logged, not what it trains:
# a run that differs from the paper's cell in these still trains the paper's method. And
# skip_best_trajectory: on, a run samples as the official code that gave the paper's numbers did.
NOT_THE_METHOD = {"seed", "frac_seed", "data", "lm_corpus", "steps", "eval_every", "eval_episodes",
                  "targets", "eval_seed", "eval_max_steps", "eval_workers", "log_every", "device",
                  "precision", "compile", "compile_mode", "out", "resume", "eval_only", "wandb",
                  "wandb_group", "skip_best_trajectory"}


def method_differences(a: Config, b: Config) -> list[str]:
    """The fields in which two resolved configs train differently (not NOT_THE_METHOD's)."""
    return [f.name for f in fields(Config)
            if f.name not in NOT_THE_METHOD and getattr(a, f.name) != getattr(b, f.name)]


def paper_reference(cfg: Config) -> tuple[tuple | None, str]:
    """The paper's (mean, std, table) for this run's (task, ratio, model), if the run trains what
    the paper's cell trained (the task's defaults, with PAPER_SETTINGS); else None and a note
    naming the first setting that differs (a --finetune full run is not Table 3's LaMo)."""
    task = get_task(cfg.env)
    paper = PAPER.get((task.name, cfg.frac, cfg.model))
    if paper is None:
        return None, ""
    settings = dict(PAPER_SETTINGS.get((task.name, cfg.frac), ())) if cfg.model == "lamo" else {}
    ref = resolve(Config(env=cfg.env, frac=cfg.frac, model=cfg.model, **settings))
    differ = method_differences(ref, cfg)
    if not differ:
        return paper, ""
    k = differ[0]
    return None, (f"the paper's {paper[2]} ({paper[0]}) trained --{k.replace('_', '-')} "
                  f"{getattr(ref, k)}, this run {getattr(cfg, k)}: not compared")


def parse_targets(targets: str) -> list[float]:
    """--targets "3600,1800" -> [3600.0, 1800.0]; checked here for a new run and again for
    --eval-only."""
    try:
        out = [float(t) for t in targets.split(",")]
    except ValueError:
        raise LamoError(f"--targets {targets!r}: expected comma-separated returns, "
                        f"e.g. 3600,1800") from None
    twice = [t for t in out if out.count(t) > 1]
    if twice:                       # the evaluation reports a target once: one group would vanish
        raise LamoError(f"--targets {targets!r}: {twice[0]:g} is there twice; for more episodes "
                        f"per target, use --eval-episodes")
    return out


def pick_device(name: str) -> torch.device:
    """--device -> torch.device; with resolve_precision below, the one place where device and
    arithmetic are decided (the model has no branch per device)."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LamoError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here; "
                        f"use --device cpu, or install a CUDA build of torch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LamoError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    # fp32 means IEEE fp32 on every device: --precision fp32 is the official arithmetic, and under
    # bf16 the embeddings, heads and losses (outside the autocast body) see unrounded inputs. So
    # no TF32, whose 10-bit mantissa would round them; PyTorch's default lets cuDNN's
    # convolutions (Atari's CNN) use it.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision auto -> bf16 where the device computes bf16 natively (CUDA compute capability
    8.0 and up: A100, H100, RTX 30xx on), else fp32. torch.cuda.is_bf16_supported() counts
    emulation too (T4, V100), where bf16 is slower than fp32 and attention has no fused kernel.
    A run saves the resolved value, so --resume on another device keeps its arithmetic."""
    if precision != "auto":
        return precision
    native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    return "bf16" if native else "fp32"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# Fields a run saved before they existed trained as these values say.
SAVED_BEFORE = {"lora_fused": False, "skip_best_trajectory": False}


def load_saved_config(given: dict) -> tuple[Config, Path]:
    """--resume RUN_DIR or --eval-only CKPT: the run's saved config, plus the flags allowed to
    change."""
    src = Path(given.get("resume") or given["eval_only"])
    allowed = RESUME_OVERRIDES if given.get("resume") else EVAL_OVERRIDES
    if given.get("resume"):
        if not (src / "ckpt.pt").exists():
            raise LamoError(f"--resume {src}: no ckpt.pt there")
        saved = json.loads((src / "config.json").read_text())
    else:
        if not src.is_file():
            raise LamoError(f"--eval-only {src}: no such checkpoint file")
        saved = torch.load(src, map_location="cpu", weights_only=False)["config"]
    bad = [k for k in given
           if k not in allowed | {"resume", "eval_only"} and given[k] != saved.get(k)]
    if bad:
        raise LamoError(f"cannot change --{bad[0].replace('_', '-')} here "
                        f"(the run used {saved.get(bad[0])!r}); "
                        f"allowed: "
                        f"{', '.join('--' + k.replace('_', '-') for k in sorted(allowed))}")
    known = {f.name for f in fields(Config)}
    saved = {**SAVED_BEFORE, **{k: v for k, v in saved.items() if k in known}}
    changed = {k: v for k, v in given.items() if k in allowed}
    cfg = Config(**{**saved, **changed, "resume": "", "eval_only": ""})
    check_values(cfg)
    return cfg, src


def pack_members(folders: list[Path], extend: bool) -> list[Path]:
    """--resume DIR... : run folders, or a pack's --out folder holding one run folder per run, of
    which those not finished yet (all of them with extend: a new --steps), less those that went
    NaN/inf: such a run is at an older step than the others, and would go NaN/inf again where
    it did; named on its own, it is retried."""
    members = []
    for folder in folders:
        inside = sorted(p.parent for p in folder.glob("*/config.json"))
        if (folder / "ckpt.pt").exists():
            members.append(folder)
        elif inside:
            for m in inside:
                if (m / STOPPED).exists():
                    print(f"left out {m}: it went NaN/inf ({STOPPED}); to retry it from its last "
                          f"good checkpoint: python lamo.py --resume {m}")
                elif extend or not (m / "summary.json").exists():
                    members.append(m)
        else:
            raise LamoError(f"--resume {folder}: no ckpt.pt there, and no run folders of a pack")
    return members


def pack_runs(cfg: Config, given: dict) -> list[tuple[Config, Path]]:
    """The runs a new command asks for: each per-run flag (pack.PER_RUN) takes one value for every
    run or one value per run, so `--seed 0 1 2` is three runs and `--frac 0.1 1 --seed 0 0` two
    (`--lr 1e-4 3e-4 --out o`: o/lr0.0001 and o/lr0.0003).
    With one --out and several runs, --out holds a folder per run, named by what differs."""
    lists = {k: given[k] for k in pack.PER_RUN if isinstance(given.get(k), list)}
    R = max(map(len, lists.values()), default=1)
    for k, v in lists.items():
        if len(v) != R:
            longest = max(lists, key=lambda k: len(lists[k]))
            raise LamoError(f"--{k.replace('_', '-')} has {len(v)} values and "
                            f"--{longest.replace('_', '-')} {R}: give a per-run flag one value "
                            f"for every run, or one per run")
    cfgs = [replace(cfg, **{k: v[r] for k, v in lists.items()}) for r in range(R)]
    for c in cfgs:             # every run's values checked before any run makes its folder
        if not (c.lr >= 0 and c.weight_decay >= 0):
            raise LamoError(f"--lr {c.lr:g} --weight-decay {c.weight_decay:g}: an lr and a "
                            f"weight decay must be >= 0")
        if not 0 < c.frac <= 1:
            raise LamoError(f"--frac must be in (0, 1], got {c.frac:g}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    short = {"frac": "f", "frac_seed": "fs", "lr": "lr", "weight_decay": "wd", "seed": "s"}
    differ = [k for k in short if k in lists]
    def name(c, keys):
        return "_".join(f"{short[k]}{getattr(c, k):g}" for k in keys)
    def default(c):                    # runs/ENV-fFRAC-MODEL-sSEED[-what else differs]-STAMP
        tail = "".join(f"-{name(c, [k])}" for k in differ if k not in ("frac", "seed"))
        return Path(f"runs/{c.env}-f{c.frac:g}-{c.model}-s{c.seed}{tail}-{stamp}")
    folders = [Path(c.out) if "out" in lists else
               Path(cfg.out) / name(c, differ or ["seed"]) if cfg.out and R > 1 else
               Path(cfg.out) if cfg.out else default(c)
               for c in cfgs]
    twice = [f for f in folders if folders.count(f) > 1]
    if twice:
        raise LamoError(f"two runs would share the run folder {twice[0]}: give each its own "
                        f"--out, or other --seed/--frac/--frac-seed/--lr/--weight-decay")
    for folder in folders:
        if folder.exists() and any(folder.iterdir()):
            raise LamoError(f"run folder {folder} exists and is not empty; continue it with "
                            f"--resume {folder} or choose another --out")
    return [(replace(c, out=str(f)), f) for c, f in zip(cfgs, folders)]


def start_runs(runs: list[tuple[Config, Path]], resume: bool) -> list[Run]:
    """start_run for each run of a pack; if one fails, the new run folders made before it go
    again, so that the corrected command finds none in its way."""
    started = []
    try:
        for c, folder in runs:
            started.append(start_run(c, folder, resume))
    except BaseException:
        if not resume:
            for run in started:
                shutil.rmtree(run.folder)
        raise
    return started


def main(argv=None):
    cfg, given = parse_args(argv)
    try:
        if cfg.eval_only:
            cfg, src = load_saved_config(given)
            return eval_only(cfg, src)
        resume = bool(given.get("resume"))
        if resume:
            several = [k for k, v in given.items() if isinstance(v, list) and k != "resume"]
            if several:
                raise LamoError(f"--{several[0].replace('_', '-')} takes one value with --resume: "
                                f"a resumed run keeps its own")
            folders = pack_members([Path(f) for f in pack.as_list(given["resume"])],
                                   extend="steps" in given)
            if not folders:
                raise LamoError(f"--resume {cfg.resume}: every run there has finished or went "
                                f"NaN/inf")
            runs = [(load_saved_config({**given, "resume": str(f)})[0], f) for f in folders]
        else:
            runs = pack_runs(resolve(cfg, given), given)
        print(textwrap.fill("  ".join(f"{k}={v}" for k, v in asdict(runs[0][0]).items()), width=110,
                            initial_indent="config   ", subsequent_indent=" " * 9))
        if len(runs) == 1:
            return train(*runs[0], resume)
        print(f"pack     {len(runs)} runs in lockstep: " + ", ".join(str(f) for _, f in runs))
        return pack.train(start_runs(runs, resume), sys.modules[__name__])
    except LamoError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
