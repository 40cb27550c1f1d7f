"""The task table: everything that varies by task lives here, in one frozen dataclass per task.

A task names its data (where it comes from and which loader reads it), its evaluation env, its
shapes and episode length, its return-to-go scale, targets and score, the structural choices of the
official code for its domain, and the paper's default hyper-parameters for LaMo and for the DT
baseline. lamo.py holds no per-task branch: it reads these fields. Adding a task is one entry in
TASKS (plus a loader in data.py, or in its domain's file like atari.py, if its file format is
new); README walks through the Kitchen entry.

"Official code" is srzer/LaMo-2023; a value's source is in the comment beside it.
Imports run one way: data <- reacher2d, atari <- tasks <- runs <- lamo <- bench, grids <-
results <- sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

import atari
import data
import reacher2d
from data import LamoError


@dataclass(frozen=True)
class Recipe:
    """A model's default hyper-parameters on one task; every field is also a lamo.py flag."""
    embed: str = "mlp"             # mlp | linear embeddings and action head
    lm_coef: float = 0.0           # lambda, weight of the language loss
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup: int = 2500             # linear warm-up steps, then constant
    context_len: int = 20          # K
    batch_size: int = 64
    steps: int = 100_000
    eval_every: int = 2500
    eval_episodes: int = 20        # per target
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_bias: bool = True         # train c_attn's bias with LoRA (loralib's bias='lora_only')
    lora_fused: bool = False       # one LoRA pair over q|k|v (PEFT's on c_attn), not one each
    dropout: float = 0.1           # GPT-2's embeddings, attention and residual branches
    grad_clip: float = 0.25
    warmup_tokens: float = 0.0     # > 0: the official Atari schedule, counted in action tokens
    final_tokens: float = 0.0      # (warm-up, then cosine down to 10% at final_tokens)


@dataclass(frozen=True)
class Task:
    name: str
    source: str                          # a URL, a Minari dataset id, or a DQN-Replay game
    loader: Callable[..., Any]           # (task, --data) -> (trajectories, files read)
    env: Callable[..., Any]              # (task, max_steps) -> Gymnasium env, obs already obs_shape
    obs_shape: tuple[int, ...]
    act_dim: int                         # action dimensions, or the number of discrete actions
    discrete: bool
    episode_len: int                     # evaluation episodes are cut here
    max_timestep: int                    # size of the timestep embedding
    rtg_scale: float                     # returns-to-go are divided by this
    targets: tuple[float, ...]           # evaluation returns-to-go
    ref_min: float                       # score = 100 (R - ref_min) / (ref_max - ref_min)
    ref_max: float
    score_name: str
    lamo: Recipe
    dt: Recipe                           # the DT baseline (--model dt)
    subset: Callable[..., np.ndarray] = data.uniform_subset   # the --frac rule
    batcher: Callable[..., Any] = data.trajectory_batcher
    gym_id: str = ""                     # the evaluation env's Gymnasium id
    # extra arguments of the evaluation env, as (key, value) pairs
    env_kwargs: tuple = ()
    # How the official code of this domain builds the token sequence:
    wpe: bool = False                    # add GPT-2's position embedding on the RL path
    # add the timestep embedding before embed_ln (after it: False)
    timestep_before_ln: bool = False
    pad_right: bool = False              # windows shorter than K: padded on the right (else left)
    adam_eps_pretrained: float = 1e-6    # AdamW eps for a pre-trained body; random bodies get 1e-8

    def score(self, returns) -> np.ndarray:
        return 100.0 * (np.asarray(returns) - self.ref_min) / (self.ref_max - self.ref_min)

    def load(self, path: str = ""):
        return self.loader(self, path)

    def make_env(self, max_steps: int | None = None):
        return self.env(self, max_steps or self.episode_len)


# ----------------------------------------------------------------------------- MuJoCo (D4RL)
# The official run.sh (walker2d, halfcheetah) and run_hopper.sh (hopper): lr 1e-4, wd 1e-5,
# warm-up 2500, K 20, batch 64 (experiment.py's default), 40 x 2500 steps, 20 episodes per target,
# dropout 0.1. Neither passes --co_training, so lambda = 0; run_cotrain.sh is the one with
# lambda = 0.1.
MUJOCO_LAMO = Recipe()
# kzl DT's experiment.py defaults, which the official code keeps for its DT baseline: lr 1e-4,
# wd 1e-4, warm-up 10k, linear embeddings with a tanh action head.
MUJOCO_DT = replace(MUJOCO_LAMO, embed="linear", weight_decay=1e-4, warmup=10_000)
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{file}.hdf5"
MUJOCO = {  # gym id, obs, act, D4RL ref min / max (random / expert return), targets (experiment.py)
    "hopper": ("Hopper-v4", 11, 3, -20.272305, 3234.3, (3600, 2600, 2200, 1800)),
    "walker2d": ("Walker2d-v4", 17, 6, 1.629008, 4592.3, (5000, 4000, 3000, 2500)),
    "halfcheetah": ("HalfCheetah-v4", 17, 6, -280.178953, 12135.0, (12000, 8000, 6000, 4500)),
}
EMBED = {"hopper": "linear"}   # run_hopper.sh drops --mlp_embedding; run.sh keeps it for the others


def mujoco_task(env: str, dataset: str) -> Task:
    gym_id, obs, act, lo, hi, targets = MUJOCO[env]
    return Task(
        name=f"{env}-{dataset}-v2",
        source=D4RL_URL.format(file=f"{env}_{dataset.replace('-', '_')}-v2"),
        loader=data.load_d4rl, env=data.make_mujoco_env, gym_id=gym_id,
        obs_shape=(obs,), act_dim=act, discrete=False, episode_len=1000, max_timestep=1000,
        rtg_scale=1000.0, targets=targets, ref_min=lo, ref_max=hi,
        score_name="D4RL normalised score",
        lamo=replace(MUJOCO_LAMO, embed=EMBED.get(env, "mlp")), dt=MUJOCO_DT)


# ----------------------------------------------------------------------------- Ant (D4RL)
# ant-medium-v2 is in the paper's App. Table 11 only; the official code has no Ant branch
# (experiment.py at 3e4fcc8 knows hopper, halfcheetah, walker2d, reacher2d, kitchen), so:
# - recipe: run.sh's, as for walker2d and halfcheetah (MLP embeddings, lr 1e-4, wd 1e-5, K 20, ...);
# - return scale 1000 and 1000-step episodes, as for every D4RL MuJoCo task in experiment.py;
# - targets (4000, 3000): our choice, not verified against the paper: the first just above D4RL's
#   expert score, as experiment.py's first target is for hopper (3600 > 3234.3) and walker2d
#   (5000 > 4592.3), the second a quarter lower;
# - ref min / max: D4RL's ANT_RANDOM_SCORE -325.6 and ANT_EXPERT_SCORE 3879.7
#   (Farama-Foundation/D4RL, d4rl/gym_mujoco/__init__.py).
# Observation: D4RL's ant files hold 111 columns, gym's Ant-v2 observation: qpos[2:] and qvel (27)
# then 84 clipped contact forces. Recorded with mujoco-py on MuJoCo 2, which stopped computing
# cfrc_ext (openai/gym#1541, #2593), the 84 are zeros in every step (Farama-Foundation/D4RL#143:
# "no observation with non-zero component between indexes 27 to 110 in ant-medium-v2"), and the
# returns have no contact cost. Gymnasium's Ant-v4 here (mujoco 3.x) does fill them: with
# use_contact_forces=True it returns 111 columns, 24 of them non-zero in 200 random steps, and adds
# a contact cost to the reward. So we evaluate in Ant-v4 with use_contact_forces=False (27 columns,
# reward without contact cost, as D4RL's data was recorded) and the loader keeps the first 27 of
# D4RL's columns after checking the other 84 are zero (data.load_d4rl_ant). Deviation: the paper's
# policy saw 111 inputs, 84 always zero; with our normalisation ((0 - 0) / std) those carry
# nothing, so dropping them removes no information.
ANT = Task(
    name="ant-medium-v2", source=D4RL_URL.format(file="ant_medium-v2"),
    loader=data.load_d4rl_ant, env=data.make_mujoco_env, gym_id="Ant-v4",
    env_kwargs=(("use_contact_forces", False),),
    obs_shape=(data.ANT_STATE,), act_dim=8, discrete=False, episode_len=1000, max_timestep=1000,
    rtg_scale=1000.0, targets=(4000, 3000), ref_min=-325.6, ref_max=3879.7,
    score_name="D4RL normalised score", lamo=MUJOCO_LAMO, dt=MUJOCO_DT)


# ------------------------------------------------------------------------- Franka Kitchen (Minari)
# The paper's D4RL kitchen-*-v0 needs mujoco-py; Minari's D4RL/kitchen/*-v2 holds the same
# demonstrations re-recorded in Gymnasium-Robotics' FrankaKitchen-v1. Values: the official
# experiment.py's kitchen branch (targets 5..1, where the paper's Table 6 lists 4 and 5: the code
# wins; rtg scale 1, timestep embedding of 1000) and
# run_cotrain.sh (lambda 0.1; the paper's Fig. 6: Kitchen without the LM loss is worse), MLP
# embeddings, lr 1e-4, wd 1e-5, K 20, batch 64, 100k steps, an evaluation every 2500 with 20
# episodes.
KITCHEN_LAMO = replace(MUJOCO_LAMO, lm_coef=0.1)
KITCHEN_DT = MUJOCO_DT
KITCHEN_TASKS = {  # Minari dataset -> the four subtasks its demonstrations complete
    "complete": ("microwave", "kettle", "light switch", "slide cabinet"),
    "partial": ("microwave", "kettle", "light switch", "slide cabinet"),
    "mixed": ("microwave", "kettle", "bottom burner", "light switch"),
}


def kitchen_task(dataset: str) -> Task:
    return Task(
        name=f"kitchen-{dataset}-v2", source=f"D4RL/kitchen/{dataset}-v2",
        loader=data.load_minari, env=data.make_kitchen_env, gym_id="FrankaKitchen-v1",
        env_kwargs=(("tasks_to_complete", KITCHEN_TASKS[dataset]),),
        obs_shape=(59,), act_dim=9, discrete=False, episode_len=280, max_timestep=1000,
        rtg_scale=1.0, targets=(5, 4, 3, 2, 1),
        ref_min=0.0, ref_max=4.0,   # D4RL: 0 random, 4 subtasks
        score_name="D4RL normalised score", lamo=KITCHEN_LAMO, dt=KITCHEN_DT)


# ----------------------------------------------------------------------------- Atari (DQN-Replay)
# The official experiment-atari: run.sh (Breakout 10%: lr 1e-3, wd 0.01, batch 128, K 30, MLP
# embedding, LoRA r 32, lambda 0), cfgs/config.yaml (100k steps, an evaluation every 200 steps
# with 5 episodes per target, warm-up over 375e6 tokens then cosine to 260e9) and
# cfgs/env/breakout.yaml (targets 90, 120; max_timestep 4096). PEFT's LoraConfig(r=32,
# lora_alpha=32, target_modules=["c_attn"]) puts one rank-32 adapter on the fused q|k|v (A 32 x 768
# shared by q, k and v; B 2304 x 32: lora_fused) with dropout 0 and the c_attn bias frozen; core.py
# clips gradients at 1.0 and builds AdamW with its default eps 1e-8 for every model.
# No dropout at all: config.yaml's drop_p 0.1 is never read by model.py, GPT2LMHeadModel.
# from_pretrained returns GPT-2 in eval mode, and core.py never calls model.train() (its eval only
# calls model.eval()). The DT below inherits dropout 0: the official DT's dropout is on only until
# the first evaluation (step 200) turns it off for good.
ATARI_LAMO = Recipe(embed="mlp", lm_coef=0.0, lr=1e-3, weight_decay=0.01, context_len=30,
                    batch_size=128, eval_every=200, eval_episodes=5, lora_rank=32,
                    lora_alpha=32.0, lora_dropout=0.0, lora_bias=False, lora_fused=True,
                    dropout=0.0, grad_clip=1.0, warmup_tokens=375e6, final_tokens=260e9)
# Only breakout.yaml ships; for Qbert and Pong the targets are the paper's Table 6 and lr / wd the
# config.yaml defaults (3e-4, 0.1: Pong's Table 6 values; Qbert's are not in the official code).
# Freeway and Asterix (the paper's App. Table 10, 10% data) have no yaml and no Table 6 row that we
# could read: lr / wd are the config.yaml defaults, as for Qbert; the targets are our choice (not
# verified against the paper): the game's human score in get_hns.py, rounded to a round number
# (Freeway 30 for 29.6, Asterix 8500 for 8503.3), as Qbert's 14000 sits near its 13455.
# Action counts: ALE's minimal sets, as DQN-Replay recorded them and d4rl-atari's env plays them
# (ale-py 0.12: Freeway NOOP, UP, DOWN; Asterix NOOP and the 8 directions).
# game: actions (ALE's minimal set, as in DQN-Replay), targets, lr, wd, random / human score
# (get_hns.py)
ATARI = {
    "breakout": (4, (90, 120), 1e-3, 0.01, 1.7, 31.8),
    "qbert": (6, (14000,), 3e-4, 0.1, 163.9, 13455.0),
    "pong": (6, (10, 20), 3e-4, 0.1, -20.7, 9.3),
    "freeway": (3, (30,), 3e-4, 0.1, 0.0, 29.6),
    "asterix": (9, (8500,), 3e-4, 0.1, 210.0, 8503.3),
}


# Deviation: the official Atari DT is model.py with pretrained_lm "none": GPT2Config(n_layer=3,
# n_head=1, n_embed=128), whose misspelt n_embed leaves d at 768, GPT-2's gelu_new blocks and the
# same Linear + Tanh head as LaMo. Ours is the dt preset (d 128, ReLU, kzl's bias-free Linear) with
# linear embeddings (config.yaml's mlp_embedding 0; no DT script ships), and dropout 0 where the
# official DT's is 0.1 for its first 200 steps. README, "Where we depart".
def atari_task(game: str) -> Task:
    n_actions, targets, lr, wd, random_score, human_score = ATARI[game]
    lamo = replace(ATARI_LAMO, lr=lr, weight_decay=wd)
    return Task(
        name=f"{game}-medium", source=game, loader=atari.load_atari,
        env=atari.make_atari_task_env, gym_id=f"{atari.atari_game(game)}NoFrameskip-v4",
        obs_shape=(4, 84, 84), act_dim=n_actions, discrete=True, episode_len=4096,
        max_timestep=4096, rtg_scale=1.0, targets=targets,
        ref_min=random_score, ref_max=human_score,
        score_name="human-normalised score", lamo=lamo, dt=replace(lamo, embed="linear"),
        subset=atari.atari_subset, batcher=atari.FrameStackBatcher,
        # official Atari: HF GPT2Model on inputs_embeds adds wpe; time added before embed_ln;
        # windows right-padded (causality hides the padding, so no attention mask); AdamW's default
        # eps.
        wpe=True, timestep_before_ln=True, pad_right=True, adam_eps_pretrained=1e-8)


# --------------------------------------------------------------------- Reacher2d (the official env)
# The official experiment.py's reacher2d branch: max_ep_len 100 (also the timestep table), targets
# 76, 40, return scale 10; its env's get_normalized_score is return / 100 (0 random, 100 expert).
# run.sh: K 5 for reacher2d (20 otherwise), lr 1e-4, wd 1e-5, warm-up 2500, MLP embeddings, LoRA,
# 40 x 2500 = 100k steps (the paper's App. D says 37.5k; the code wins), 20 episodes per target.
# run.sh picks K by env, not by model, and no DT script ships: the DT baseline takes K 5 too.
REACHER_LAMO = replace(MUJOCO_LAMO, context_len=5)
REACHER_DT = replace(MUJOCO_DT, context_len=5)
REACHER = Task(
    name="reacher2d-medium",
    source="$LAMO_CACHE/reacher2d/reacher2d-medium-v2.pkl",  # no URL exists
    loader=reacher2d.load, env=reacher2d.make_env, gym_id="Reacher2dEnv (reacher2d.py)",
    obs_shape=(12,), act_dim=2, discrete=False, episode_len=100, max_timestep=100,
    rtg_scale=10.0, targets=(76, 40), ref_min=0.0, ref_max=100.0,
    score_name="normalised score (return / 100)", lamo=REACHER_LAMO, dt=REACHER_DT)

TASKS = {t.name: t for t in [mujoco_task(e, d) for e in MUJOCO
                             for d in ("medium", "medium-replay", "medium-expert", "expert")]
         + [ANT] + [kitchen_task(d) for d in KITCHEN_TASKS] + [REACHER]
         + [atari_task(g) for g in ATARI]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LamoError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------- the paper's numbers
# In paper.py (no project imports), re-exported here for runs.py, grids.py, results.py and the
# tests.
from paper import PAPER, PAPER_FIGURES, PAPER_SETTINGS, PAPER_TABLES  # noqa: E402, F401
