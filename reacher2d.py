"""Reacher2d, the paper's sparse-reward arm task: the env and its data generator.

The official code (srzer/LaMo-2023 at 3e4fcc8) ships the env for old gym + mujoco-py
(`experiment-d4rl/decision_transformer/envs/reacher_2d.py`), its MJCF (copied byte for byte into
`assets/reacher_2d.xml`), and the PPO that made the data (`data/data_generation_PPO/`), but not the
data itself. This file holds
  1. `Reacher2dEnv`, a Gymnasium 1.x MujocoEnv port, the task's env factory and its loader;
  2. the official data-generation PPO, trained to a "medium" policy, then recorded in the official
     pickle layout:  python reacher2d.py collect --policy ppo-medium --out reacher2d-medium-v2.pkl
Imports run one way: data <- reacher2d <- tasks.
"""
from __future__ import annotations

import argparse
import copy
import pickle
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mujoco
import numpy as np
import torch
import torch.nn as nn
from gymnasium.envs.mujoco import MujocoEnv
from gymnasium.spaces import Box
from gymnasium.wrappers import TimeLimit
from tqdm import tqdm

import data
from data import LamoError

XML = Path(__file__).parent / "assets" / "reacher_2d.xml"   # the official file, byte for byte
EPISODE_LEN = 100          # experiment.py's max_ep_len for reacher2d; test.py records 100 steps too
# official README
DRIVE = "https://drive.google.com/drive/folders/1c3htmB0bCixakM12EmDG4Qr3nMihrj6t"
OFFICIAL_FILES = "reacher2d-medium-v2.pkl or reacher2d-medium-{ratio}-d1-v2.pkl"


# ----------------------------------------------------------------------------- 1. the env
class Reacher2dEnv(MujocoEnv):
    """A 2-joint planar arm in zero gravity; reward 1 at every step its fingertip is within L1
    distance 0.1 of the target, else 0. Never terminates: the caller cuts episodes at 100 steps.
    Observation (12,): sin q (2), cos q (2), dt * qvel (2), fingertip xy, target xy,
    fingertip - target.
    Port of the official reacher_2d.py: mujoco-py's body_xpos is `xpos`, sim.forward() is
    mj_forward, name2id is mj_name2id; reset(seed=...) seeds self.np_random; step returns 5
    values."""
    metadata = {"render_modes": ["human", "rgb_array", "depth_array", "rgbd_tuple"],
                "render_fps": 7}   # round(1 / dt) = round(1 / (15 * 0.01)); MujocoEnv checks it

    def __init__(self, render_mode: str | None = None):
        obs_space = Box(-np.inf, np.inf, shape=(12,), dtype=np.float64)
        super().__init__(str(XML), frame_skip=15, observation_space=obs_space,
                         render_mode=render_mode,
                         default_camera_config={"distance": 5.0})  # official viewer: 5 x extent
        self.fingertip = self.model.site("fingertip").id
        self.target = self.model.body("target").id

    def _tip_and_target(self) -> tuple[np.ndarray, np.ndarray]:
        # As in the official code, positions are the ones mj_step computed before its last
        # integration, one 0.01 s substep behind qpos; reset's mj_forward makes them current.
        return (self.data.site_xpos[self.fingertip][:2].copy(),
                self.data.xpos[self.target][:2].copy())

    def _get_obs(self) -> np.ndarray:
        theta = self.data.qpos.ravel()
        tip, tar = self._tip_and_target()
        return np.concatenate([np.sin(theta), np.cos(theta), self.dt * self.data.qvel.ravel(),
                               tip, tar, tip - tar])                                   # (12,)

    def step(self, action):
        action = np.clip(action, -1.0, 1.0)
        self.do_simulation(action, self.frame_skip)
        tip, tar = self._tip_and_target()
        dist = np.abs(tip - tar).sum()              # L1, not Euclidean, as the official code
        reward = 1.0 if dist < 0.1 else 0.0         # official: the dense -0.1 * dist commented out
        if self.render_mode == "human":
            self.render()
        return self._get_obs(), reward, False, False, {"reward_bonus": reward, "dist": dist}

    def reset_model(self) -> np.ndarray:
        # absolute, not + init
        qpos = self.np_random.uniform(low=-2.0, high=2.0, size=self.model.nq)
        qvel = np.zeros(self.model.nv)
        while True:          # a goal in the annulus 0.5 <= |g| <= 1.0, by rejection from a square
            self.goal = self.np_random.uniform(low=-1.5, high=1.5, size=2)
            if 0.5 <= np.linalg.norm(self.goal) <= 1.0:
                break
        self.set_state(qpos, qvel)
        self.model.body_pos[self.target][:2] = self.goal   # the goal lives in the model, as there
        mujoco.mj_forward(self.model, self.data)
        return self._get_obs()


def make_env(task, max_steps: int):
    """The task table's env factory: Reacher2d cut at max_steps (the official loop cuts at 100)."""
    return TimeLimit(Reacher2dEnv(), max_episode_steps=max_steps)


def default_data() -> Path:
    """Where `collect` writes by default and the loader looks without --data (so sweeps find it)."""
    return data.cache_dir() / "reacher2d" / "reacher2d-medium-v2.pkl"


def load(task, path: str = "") -> tuple[list[dict], list[Path]]:
    """The task table's loader: the official pickle (a list of dicts, rewards and terminals
    (100, 1)) or a D4RL-layout hdf5: --data, else default_data(). No one publishes a URL to
    fetch."""
    if path and not Path(path).exists():
        raise LamoError(f"--data {path}: no such file")
    if not path and not default_data().exists():
        raise LamoError(f"{task.name}: no data at {default_data()} and the authors publish no "
                        f"download URL: get {OFFICIAL_FILES} from their Drive folder {DRIVE} "
                        f"and pass --data FILE, or make the data locally with: "
                        f"python reacher2d.py collect")
    path = path or default_data()
    return data.load_trajectories(path, task.obs_shape[0], task.act_dim), [Path(path)]


# ----------------------------------------------------------------------------- 2. the official PPO
@dataclass
class PPOConfig:
    """data/data_generation_PPO/{train.py, PPO.py, test.py}; every field is a flag of `collect`."""
    seed: int = 0                   # train.py: random_seed = 0, which means "not seeded"; we seed
    train_steps: int = 3_000_000    # train.py: max_training_timesteps
    update_every: int = 4000        # train.py: 4 x max_ep_len, computed while max_ep_len was 1000
    epochs: int = 80                # K_epochs, full-batch Adam steps per update
    clip: float = 0.2
    gamma: float = 0.99
    lr_actor: float = 3e-4
    lr_critic: float = 1e-3
    std_init: float = 0.6           # action std, minus std_decay every std_decay_every steps ...
    std_decay: float = 0.05
    std_decay_every: int = 250_000
    std_min: float = 0.1            # ... down to this
    # "Medium" (our choice; the official code keeps no record of which checkpoint it used):
    # train.py overwrites its checkpoint every 1e5 steps, so we test the policy there and stop at
    # the first checkpoint whose mean return over eval_episodes reaches target_return. The default
    # is what this recipe reaches: on seed 0 its test return stays between 0.1 and 2.5 from 100k
    # to 3M steps (about 5 x a random policy's; the > 20 filter then makes the data). A random
    # policy (uniform actions) returns 0.41 +- 0.06 and 0.43 +- 0.05 (standard error; two draws
    # of the actions) over 2,000 episodes (reset seeds 0-1999), 0.35% of them above 20 (README);
    # REFERENCE.md's about 0.8 and 1% were not reproduced (MuJoCo 3 here, mujoco-py 2.1 there?).
    check_every: int = 100_000
    eval_episodes: int = 40
    target_return: float = 2.0
    collect_std: float = 0.1        # test.py samples with action_std = 0.1, whatever the checkpoint
    min_return: float = 20.0        # test.py keeps an episode if its return is > 20 ...
    episodes: int = 49              # ... until it has 49 (`ep` counts from 1 to 50): 4,900 steps


class ActorCritic(nn.Module):
    """PPO.py's ActorCritic: 64-64 tanh MLPs; tanh on the actor's mean; a fixed, decayed std."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.actor = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                   nn.Linear(64, act_dim), nn.Tanh())
        self.critic = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                    nn.Linear(64, 1))

    def dist(self, obs: torch.Tensor, std: float) -> torch.distributions.Distribution:
        # PPO.py builds MultivariateNormal(mean, diag(std^2)): the same log-prob and entropy as
        # independent Normals summed over the action dims, which are cheaper to build.
        mean = self.actor(obs)
        return torch.distributions.Independent(torch.distributions.Normal(mean, std), 1)


def run_episodes(envs, act, seeds=None) -> dict[str, np.ndarray]:
    """All envs in lockstep for EPISODE_LEN steps; act(obs (E, 12)) -> actions (E, 2).
    -> time-major arrays: obs, next_obs (T, E, 12), actions (T, E, 2), rewards (T, E)."""
    seeds = [None] * len(envs) if seeds is None else [int(s) for s in seeds]   # None: continue
    obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)])
    out = {"obs": [], "next_obs": [], "actions": [], "rewards": []}
    for _ in range(EPISODE_LEN):
        a = act(obs)                                                         # (E, 2), unclipped
        steps = [env.step(ai) for env, ai in zip(envs, a)]
        nxt = np.stack([s[0] for s in steps])
        for k, v in zip(out, (obs, nxt, a, [s[1] for s in steps])):
            out[k].append(v)
        obs = nxt
    return {k: np.asarray(v) for k, v in out.items()}


def sampler(policy: ActorCritic, std: float, gen: torch.Generator, keep: dict | None = None):
    """act(obs) for run_episodes: a sample from the policy (PPO.py's select_action); with `keep`,
    also records log-probs and values, as the rollout buffer does."""
    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(obs, dtype=torch.float32)
        mean = policy.actor(x)
        a = mean + std * torch.randn(mean.shape, generator=gen)
        if keep is not None:
            keep.setdefault("logp", []).append(policy.dist(x, std).log_prob(a))
            keep.setdefault("value", []).append(policy.critic(x)[:, 0])
        return a.numpy()
    return act


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """PPO.py's Monte Carlo returns over the buffer (N,), in its order, episode after episode.
    Official quirk, kept: train.py stores is_terminal = done, and the env never sets done (the loop
    cuts episodes at 100), so an episode's return runs on into the next episode of the buffer."""
    out, g = np.empty(len(rewards)), 0.0
    for i in range(len(rewards) - 1, -1, -1):
        g = rewards[i] + gamma * g
        out[i] = g
    return out


def ppo_update(policy, old, opt, batch: dict, std: float, cfg: PPOConfig):
    """PPO.py's update: normalised returns, advantages against the acting critic's values,
    `epochs` full-batch steps on the clipped objective + 0.5 MSE - 0.01 entropy."""
    # The buffer's order is episode-major (one episode's 100 steps, then the next one's):
    # time-major (T, E, ...) -> (E * T, ...) = (N, ...)
    em = lambda x: torch.as_tensor(np.swapaxes(np.asarray(x, dtype=np.float32), 0, 1).reshape(
        -1, *np.shape(x)[2:]))
    returns = torch.as_tensor(discounted_returns(np.swapaxes(batch["rewards"], 0, 1).reshape(-1),
                                                 cfg.gamma), dtype=torch.float32)         # (N,)
    returns = (returns - returns.mean()) / (returns.std() + 1e-7)
    states, actions = em(batch["obs"]), em(batch["actions"])                       # (N, 12), (N, 2)
    old_logp, old_value = em(torch.stack(batch["logp"])), em(torch.stack(batch["value"]))  # (N,)
    adv = returns - old_value
    for _ in range(cfg.epochs):
        dist = policy.dist(states, std)
        ratio = torch.exp(dist.log_prob(actions) - old_logp)
        surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * adv)
        value = policy.critic(states)[:, 0]
        loss = -surr + 0.5 * nn.functional.mse_loss(value, returns) - 0.01 * dist.entropy()
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    old.load_state_dict(policy.state_dict())


def action_std(step: int, cfg: PPOConfig) -> float:
    """train.py's schedule: std_init, minus std_decay at every multiple of std_decay_every, floored.
    Deviation: train.py changes it at that exact step, mid-batch; we change it between updates,
    for the first batch that starts past the multiple (at most update_every steps later)."""
    return max(cfg.std_min, round(cfg.std_init - cfg.std_decay * (step // cfg.std_decay_every), 4))


def mean_return(policy, cfg: PPOConfig, envs, gen) -> float:
    """The "medium" test: eval_episodes episodes sampled as test.py records them (std collect_std),
    from the same seeded starts at every check, so checks compare policies, not luck."""
    seeds = 1_000_000 + np.arange(len(envs))
    episodes = run_episodes(envs, sampler(policy, cfg.collect_std, gen), seeds)
    return float(episodes["rewards"].sum(0).mean())


def train_medium(cfg: PPOConfig) -> tuple[ActorCritic, dict]:
    """train.py, batched: update_every / 100 envs run one episode each in lockstep with the acting
    policy, then one PPO update (the official loop also updates every 4,000 steps = 40 whole
    episodes). Stops at the first check whose mean return reaches cfg.target_return."""
    if cfg.update_every % EPISODE_LEN or cfg.check_every % cfg.update_every:
        raise LamoError(f"--update-every {cfg.update_every} must be a multiple of {EPISODE_LEN} "
                        f"and --check-every {cfg.check_every} a multiple of it")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    policy = ActorCritic(12, 2)
    old = copy.deepcopy(policy)                # PPO.py's policy_old: acts; copied after each update
    opt = torch.optim.Adam([{"params": policy.actor.parameters(), "lr": cfg.lr_actor},
                            {"params": policy.critic.parameters(), "lr": cfg.lr_critic}])
    n_envs = cfg.update_every // EPISODE_LEN
    envs = [Reacher2dEnv() for _ in range(n_envs)]
    eval_envs = [Reacher2dEnv() for _ in range(cfg.eval_episodes)]
    for i, env in enumerate(envs):             # seeded once; later resets continue each stream
        env.reset(seed=cfg.seed * 100_000 + i)
    step, history = 0, []
    bar = data.progress(total=cfg.train_steps, desc="PPO on Reacher2d", unit="step",
                        unit_scale=True)
    while step < cfg.train_steps:
        std, keep = action_std(step, cfg), {}
        batch = run_episodes(envs, sampler(old, std, gen, keep))
        batch.update(keep)
        ppo_update(policy, old, opt, batch, std, cfg)
        train_return = batch["rewards"].sum(0).mean()
        step += cfg.update_every
        bar.update(cfg.update_every)
        if step % cfg.check_every == 0:
            ret = mean_return(old, cfg, eval_envs, gen)
            history.append({"step": step, "std": std, "train_return": float(train_return),
                            "eval_return": ret})
            bar.set_postfix(std=std, train=f"{train_return:.1f}", eval=f"{ret:.1f}")
            tqdm.write(f"step {step}: std {std:g}, mean return {train_return:.1f} (training), "
                       f"{ret:.1f} (std {cfg.collect_std:g}, the medium test)")
            if ret >= cfg.target_return:
                bar.close()
                return old, {"steps": step, "eval_return": ret, "history": history}
    bar.close()
    best = max(history, key=lambda h: h["eval_return"], default={"eval_return": np.nan, "step": 0})
    raise LamoError(f"PPO did not reach --target-return {cfg.target_return:g} in {cfg.train_steps} "
                    f"steps "
                    f"(best {best['eval_return']:.1f} at step {best['step']}); "
                    f"lower --target-return or raise --train-steps")


# ---------------------------------------------------------------------------- 3. recording the data
def record(act, cfg: PPOConfig, batch_envs: int = 40,
           max_tries: int = 200) -> tuple[list[dict], int]:
    """test.py: 100-step episodes from `act`, kept if their return is > min_return, until there are
    cfg.episodes. -> (episodes in the official layout, episodes tried)."""
    envs = [Reacher2dEnv() for _ in range(batch_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=cfg.seed * 100_000 + 50_000 + i)     # a stream apart from training's
    kept, tried = [], 0
    bar = data.progress(total=cfg.episodes, desc=f"recording episodes > {cfg.min_return:g}",
                        unit="ep")
    while len(kept) < cfg.episodes:
        if tried >= max_tries * cfg.episodes:
            raise LamoError(f"only {len(kept)} of {tried} episodes had a return > "
                            f"{cfg.min_return:g}; "
                            f"lower --min-return or train further (--target-return)")
        b = run_episodes(envs, act)
        for e, ret in enumerate(b["rewards"].sum(0)):
            if len(kept) == cfg.episodes:
                break
            tried += 1
            if ret <= cfg.min_return:
                continue
            # test.py's dict: float64 states, float32 actions, (100, 1) rewards/terminals
            kept.append({
                "observations": b["obs"][:, e].astype(np.float64),             # (100, 12)
                "next_observations": b["next_obs"][:, e].astype(np.float64),   # (100, 12)
                "actions": b["actions"][:, e].astype(np.float32),              # (100, 2), unclipped
                "rewards": b["rewards"][:, e, None].astype(np.float64),        # (100, 1)
                "terminals": np.zeros((EPISODE_LEN, 1), dtype=bool)})          # (100, 1), all False
            bar.update(1)
    bar.close()
    return kept, tried


def collect(policy: str, out: Path, cfg: PPOConfig) -> dict:
    """Train (ppo-medium) or not (random), record, write the official pickle. -> a summary."""
    out = Path(out)
    if out.suffix not in (".pkl", ".pickle"):
        raise LamoError(f"--out {out}: write the official layout to a .pkl file")
    if out.exists():
        raise LamoError(f"--out {out} exists; remove it or choose another --out")
    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    info = {}
    if policy == "ppo-medium":
        trained, info = train_medium(cfg)
        act = sampler(trained, cfg.collect_std, gen)
    else:
        rng = np.random.default_rng(cfg.seed)
        act = lambda obs: rng.uniform(-1, 1, size=(len(obs), 2)).astype(np.float32)
    episodes, tried = record(act, cfg, batch_envs=min(40, cfg.episodes))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        pickle.dump(episodes, f)
    returns = np.array([e["rewards"].sum() for e in episodes])
    summary = {"out": str(out), "policy": policy, "episodes": len(episodes),
               "steps": int(sum(len(e["rewards"]) for e in episodes)), "tried": tried,
               "return_mean": float(returns.mean()), "return_min": float(returns.min()),
               "return_max": float(returns.max()), "ppo_steps": info.get("steps", 0),
               "ppo_eval_return": info.get("eval_return"), "seconds": round(time.time() - t0, 1),
               "config": asdict(cfg), "history": info.get("history", [])}
    print(f"wrote {out}: {summary['episodes']} episodes ({summary['steps']} steps) kept of {tried} "
          f"tried; return mean {returns.mean():.1f} (normalised score {returns.mean():.1f}), "
          f"min {returns.min():g}, max {returns.max():g}; {summary['seconds']:.0f} s")
    return summary


# What `collect --policy random` reads of PPOConfig: the rest trains and samples the PPO.
RANDOM_POLICY_FLAGS = {"seed", "episodes", "min_return"}


def main(argv=None):
    p = argparse.ArgumentParser(prog="reacher2d.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="make Reacher2d data in the official pickle layout")
    c.add_argument("--policy", choices=("ppo-medium", "random"), default="ppo-medium",
                   help="ppo-medium: the official PPO, trained until --target-return; "
                        "random: uniform")
    c.add_argument("--out", default=str(default_data()),
                   help="a .pkl file, in the official layout (default: where lamo.py looks)")
    for f in fields(PPOConfig):
        kind = float if f.type == "float" else int
        c.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                       help=f"default {f.default}")
    a = p.parse_args(argv)
    given = {f.name for f in fields(PPOConfig) if getattr(a, f.name) is not None}
    idle = sorted(given - RANDOM_POLICY_FLAGS) if a.policy == "random" else []
    if idle:
        p.error(f"--{idle[0].replace('_', '-')} has no effect with --policy random (it takes "
                f"{', '.join('--' + k.replace('_', '-') for k in sorted(RANDOM_POLICY_FLAGS))})")
    cfg = PPOConfig(**{f.name: getattr(a, f.name) for f in fields(PPOConfig) if f.name in given})
    try:
        collect(a.policy, Path(a.out), cfg)
    except LamoError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
