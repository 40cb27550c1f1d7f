"""Atari for lamo: DQN-Replay files and trajectories, the frame-stacking sampler, the ALE envs.

Read top to bottom: (1) DQN-Replay data: the download, decompression and memmapped arrays of one
checkpoint, split into trajectories; (2) the length-weighted --frac rule and FrameStackBatcher, the
official AtariBuffer's sampler; (3) the loader, --frac rule and env the task table (tasks.py) names
for an Atari task; (4) the ALE envs and `python atari.py collect`, which writes small datasets in
DQN-Replay's layout. Everything here changes with the Atari domain; data.py holds what all domains
share (the downloader, progress bars, Batch) and never imports this file.
Imports run one way: data <- atari <- tasks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data import Batch, LamoError, cache_dir, download, progress, to_device


# ----------------------------------------------------------------------------- DQN-Replay data
# The official Atari code (experiment-atari/buffer.py) trains on d4rl-atari's `{game}-medium-v0`:
# run 1 of the DQN Replay Dataset (Agarwal et al., 2020), checkpoint 10, 1,000,000 transitions in
# four gzipped `np.save` arrays. d4rl-atari fetches them with gsutil (d4rl_atari/offline_env.py);
# this is the same bucket over HTTPS, `$` written %24. Dopamine, which recorded them, stores
# observation (N, 84, 84) uint8 single frames, action int32, reward float32 clipped to [-1, 1] by
# its runner, terminal uint8.
ATARI_URL = ("https://storage.googleapis.com/atari-replay-datasets/dqn/{game}/1/replay_logs/"
             "%24store%24_{field}_ckpt.10.gz")
ATARI_FIELDS = ("observation", "action", "reward", "terminal")
# ours -> the name DQN-Replay's bucket folder and ALE's id use, as d4rl-atari's capitalize_game_name
# makes both (d4rl_atari/envs.py): freeway -> dqn/Freeway/ and FreewayNoFrameskip-v4
ATARI_GAMES = {"breakout": "Breakout", "qbert": "Qbert", "pong": "Pong",
               "freeway": "Freeway", "asterix": "Asterix"}


def atari_game(game: str) -> str:
    """The capitalised name DQN-Replay and ALE give one of our games: breakout -> Breakout."""
    if game not in ATARI_GAMES:
        raise LamoError(f"unknown Atari game {game!r}; known: {', '.join(ATARI_GAMES)}")
    return ATARI_GAMES[game]


def replay_file(field: str, ext: str = "gz") -> str:
    """DQN-Replay's name for one array of checkpoint 10: $store$_observation_ckpt.10.gz."""
    return f"$store$_{field}_ckpt.10.{ext}"


def atari_dataset(game: str, data: str = "") -> Path:
    """A folder holding the game's four arrays as uncompressed `$store$_{field}_ckpt.10.npy`
    files, for np.load(mmap_mode="r"). `data`: a folder with the four `.gz` files (or their
    `.npy`); empty = download them into cache_dir()/atari/{Game}/. Each .gz is decompressed once,
    next to itself; a later call finds the .npy files and neither downloads nor decompresses."""
    name = atari_game(game)
    folder = Path(data) if data else cache_dir() / "atari" / name
    if data and not folder.is_dir():
        raise LamoError(f"--data {data}: no such folder (expected one holding the four "
                        f"{replay_file('{observation,action,reward,terminal}')} files)")
    for field in ATARI_FIELDS:
        npy, gz = folder / replay_file(field, "npy"), folder / replay_file(field)
        if npy.exists():
            continue
        url = ATARI_URL.format(game=name, field=field)
        if data and not gz.exists():
            raise LamoError(f"--data {data}: has neither {gz.name} nor {npy.name}; "
                            f"DQN-Replay's file is {url}")
        if not data:
            download(url, gz, local_hint="pass a folder holding the four "
                                         "$store$_*_ckpt.10.gz files with --data DIR")
        gunzip(gz, npy)
    return folder


def gunzip(src: Path, dest: Path) -> Path:
    """Decompress `src` into `dest` in 4 MiB pieces (the observation array is 7 GB unpacked and is
    never held in memory), via `dest.part`: a file under `dest` is always whole, and an interrupted
    run starts again. A truncated or corrupt .gz is a one-line LamoError."""
    import gzip
    import zlib
    part = dest.with_name(dest.name + ".part")
    try:
        with open(src, "rb") as raw, gzip.GzipFile(fileobj=raw) as z, open(part, "wb") as out, \
                progress(total=src.stat().st_size, unit="B", unit_scale=True,
                     desc=f"decompressing {src.name}") as bar:
            while chunk := z.read(1 << 22):
                out.write(chunk)
                bar.update(raw.tell() - bar.n)                 # compressed bytes read so far
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:      # BadGzipFile first: it is an OSError
        part.unlink(missing_ok=True)
        raise LamoError(f"{src} is truncated or corrupt ({e}); "
                        f"delete it and download it again") from None
    except OSError as e:                                       # disk full, no write permission, ...
        part.unlink(missing_ok=True)
        raise LamoError(f"cannot decompress {src} into {part}: {e.strerror or e}") from None
    part.rename(dest)
    return dest


class AtariReplay:
    """One DQN-Replay checkpoint split into trajectories. The frames stay on disk (a read-only
    memmap, read only where a batch needs them); actions, rewards and the trajectory table live in
    memory. Dopamine saved its circular replay buffer as it was, so one stretch may straddle its
    write cursor; like d4rl-atari and the official buffer we read the arrays as one stream."""

    def __init__(self, frames: np.ndarray, actions, rewards, terminals, name: str = "replay"):
        n = len(frames)
        if frames.dtype != np.uint8 or frames.shape[1:] != (84, 84):
            raise LamoError(f"{name}: observations are {frames.dtype} {frames.shape}, "
                            f"expected uint8 (N, 84, 84)")
        for k, v in (("action", actions), ("reward", rewards), ("terminal", terminals)):
            if np.shape(v) != (n,):
                raise LamoError(f"{name}: '{k}' has shape {np.shape(v)}, expected ({n},) "
                                f"like the observations")
        # Split after every terminal step; the unterminated tail is dropped, as for D4RL.
        # Deviation: the official buffer forces the last step terminal, keeping that partial one.
        ends = np.flatnonzero(np.asarray(terminals).astype(bool))
        if not len(ends):
            raise LamoError(f"{name}: no terminal step, so no complete trajectory")
        if tail := n - (ends[-1] + 1):
            print(f"{name}: dropped an unterminated tail of {tail} steps (a partial episode)")
        used = ends[-1] + 1
        self.name = name
        self.frames = frames                                          # (N, 84, 84) uint8
        self.actions = np.asarray(actions[:used], dtype=np.int64)     # (n,)
        self.rewards = np.asarray(rewards[:used], dtype=np.float32)   # (n,)
        self.starts = np.concatenate([[0], ends[:-1] + 1])            # (T,) first row of each
        self.lengths = ends + 1 - self.starts                         # (T,)
        self.returns = np.add.reduceat(self.rewards.astype(np.float64), self.starts)   # (T,)

    @classmethod
    def load(cls, folder) -> "AtariReplay":
        """The four `.npy` files atari_dataset() leaves in `folder`; the frames as a memmap."""
        folder, arrays = Path(folder), {}
        for field in ATARI_FIELDS:
            path = folder / replay_file(field, "npy")
            if not path.exists():
                raise LamoError(f"{path}: no such file; atari_dataset() writes it from the .gz")
            try:
                arrays[field] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise LamoError(f"{path}: not a readable .npy array ({e}); delete it and its .gz, "
                                f"and download again") from None
        return cls(arrays["observation"], arrays["action"], arrays["reward"], arrays["terminal"],
                   name=folder.name)

    def __len__(self) -> int:
        return len(self.starts)

    def describe(self, subset=None) -> str:
        """One line: trajectories, steps, length and return statistics (of `subset` if given)."""
        idx = np.arange(len(self)) if subset is None else np.asarray(subset)
        r, n = self.returns[idx], self.lengths[idx]
        return (f"{len(idx)} trajectories, {n.sum()} steps (length mean {n.mean():.0f}), "
                f"return mean {r.mean():.1f} min {r.min():.1f} max {r.max():.1f}")


# ----------------------------------------------------------------------------- --frac and batches
def length_weighted_subset(lengths, frac: float, seed: int) -> np.ndarray:
    """The official Atari buffer's --frac rule (AtariBuffer.ratio_dataset): floor(frac * n)
    trajectories (at least 1), without replacement, with probability proportional to length, from
    np.random.default_rng(seed); sorted indices. Deviation: the official code draws them from the
    rng it then samples batches with (the run's seed); here the subset has its own seed."""
    if not 0 < frac <= 1:
        raise LamoError(f"--frac must be in (0, 1], got {frac}")
    lengths = np.asarray(lengths)
    k = max(1, int(np.floor(frac * len(lengths) + 1e-9)))     # + 1e-9 as in subset_indices
    p = lengths / lengths.sum()
    return np.sort(np.random.default_rng(seed).choice(len(lengths), size=k, replace=False, p=p))


class FrameStackBatcher:
    """Decision Transformer batches for Atari, after the official AtariBuffer.sample: a trajectory
    chosen with p ∝ length, a K-step window from offset floor(u * (len - K)) (0 when len <= K),
    right-padded with mask 0 where it runs past the trajectory's end. A step's state is the `stack`
    frames ending at it, zero frames before the episode's start. Padded steps hold states 0,
    action 0, rtg 0, timestep 0 (Deviation: the official ones hold whatever follows in the arrays;
    all are masked). One gather per field, no per-sample loop, and only the frames of the chosen
    windows are read from disk. Kept from the official rule: floor(u * (len - K)) <= len - K - 1,
    so a window never reaches the last step of a trajectory longer than K."""

    def __init__(self, replay: AtariReplay, subset, K: int, max_timestep: int, rtg_scale: float,
                 seed: int, device="cpu", stack: int = 4):
        subset = np.asarray(subset)
        self.replay, self.K, self.stack, self.max_timestep = replay, K, stack, max_timestep
        self.device = torch.device(device)
        self.starts, self.lengths = replay.starts[subset], replay.lengths[subset]     # (T',)
        self.p = self.lengths / self.lengths.sum()
        # Returns-to-go, gamma 1, as the official buffer computes them (a difference of cumsums):
        # the rewards *after* the step, / scale. Kept for fidelity, though it is one reward short of
        # DT's convention and of the official evaluation, which conditions on target minus the
        # return so far (the step's own reward included).
        csum = np.concatenate([[0.0], np.cumsum(replay.rewards, dtype=np.float64)])     # (n+1,)
        end = np.repeat(replay.starts + replay.lengths, replay.lengths)     # (n,) its traj's end
        rtg = ((csum[end] - csum[1:]) / rtg_scale).astype(np.float32)                   # (n,)
        self.pad_row = len(rtg)                              # one extra row holding the pad values
        self.rtg = np.append(rtg, np.float32(0))[:, None]                               # (n+1, 1)
        self.actions = np.append(replay.actions, 0)                                 # (n+1,) int64
        self.state_mean = self.state_std = None      # pixels are not normalised; the model / 255
        self.rng = np.random.default_rng(seed)
        self.summary = replay.describe(subset)

    def describe(self) -> str:
        return self.summary

    def sample(self, B: int) -> Batch:
        # The official draws in its order: rng.choice(n, B, p=p_sample), then a uniform per sample.
        traj = self.rng.choice(len(self.lengths), size=B, replace=True, p=self.p)
        u = self.rng.random(B)
        start = np.floor(u * (self.lengths[traj] - self.K)).astype(np.int64).clip(min=0)
        return self.window(traj, start)

    def window(self, traj, start) -> Batch:
        """The batch for explicit (trajectory, start) pairs; `traj` indexes the subset."""
        K, S = self.K, self.stack
        traj, start = np.asarray(traj), np.asarray(start)
        pos = start[:, None] + np.arange(K)                          # (B, K) step in trajectory
        valid = pos < self.lengths[traj][:, None]                    # (B, K) False: right padding
        first = self.starts[traj][:, None]                           # (B, 1) its first row
        idx = np.where(valid, first + pos, self.pad_row)             # (B, K)
        fpos = pos[:, :, None] + np.arange(1 - S, 1)                 # (B, K, S) stacked frames
        fvalid = valid[:, :, None] & (fpos >= 0)                     # 0 before the episode start
        rows, inverse = np.unique((first[:, :, None] + fpos)[fvalid], return_inverse=True)
        frames = np.concatenate([np.zeros((1, 84, 84), np.uint8),   # (1 + M, 84, 84), 0 = zeros
                                 self.replay.frames[rows]])          # the only read from disk
        local = np.zeros(fvalid.shape, np.int64)                     # (B, K, S) row in `frames`
        local[fvalid] = inverse.reshape(-1) + 1
        # Deviation: timesteps clipped at max_timestep - 1 (the official code does not clip, and
        # would index past its timestep embedding on a longer episode).
        timesteps = np.where(valid, np.minimum(pos, self.max_timestep - 1), 0)   # (B, K)
        to = lambda a: to_device(a, self.device)
        actions = self.actions[idx]                                  # (B, K)
        # Only the distinct frames and an index go to the device, uint8 (the model's CNN divides
        # by 255 there): at B=128, K=30 at most 4,224 frames (28 MiB) instead of the 15,360 of the
        # stacked batch (103 MiB). The stacking is one gather on the device.
        return Batch(to(frames)[to(local)],                          # (B, K, S, 84, 84) uint8
                     to(actions), to(self.rtg[idx]),                 # (B, K), (B, K, 1)
                     to(timesteps), to(valid.astype(np.float32)),    # (B, K), (B, K)
                     action_tokens=int((actions > 0).sum()))


# -------------------------------------------------------------------------- named by the task table
# The Atari task's loader, --frac rule and env (tasks.atari_task).
def load_atari(task, path: str = "") -> tuple[AtariReplay, list[Path]]:
    folder = atari_dataset(task.source, path)
    gz = [folder / replay_file(f) for f in ATARI_FIELDS]
    read = (gz if all(f.exists() for f in gz)
            else [folder / replay_file(f, "npy") for f in ATARI_FIELDS])
    replay = AtariReplay.load(folder)
    # Checked here: on CUDA an out-of-range action is a device-side assert in the embedding that
    # poisons the process, with no word about the data.
    lo, hi = int(replay.actions.min()), int(replay.actions.max())
    if lo < 0 or hi >= task.act_dim:
        raise LamoError(f"{read[ATARI_FIELDS.index('action')]}: actions range over {lo}..{hi}, but "
                        f"{task.gym_id} has {task.act_dim} (0..{task.act_dim - 1}); data recorded "
                        f"with ALE's full 18-action set? Record it with the game's minimal set")
    return replay, read


def atari_subset(replay: AtariReplay, frac: float, seed: int) -> np.ndarray:
    return length_weighted_subset(replay.lengths, frac, seed)


def make_atari_task_env(task, max_steps: int):
    return make_atari_env(task.source, max_steps)


# ------------------------------------------------------------------- envs, python atari.py collect
def atari_env(gym_id: str, **make_kwargs):
    """An ALE env preprocessed as d4rl-atari's AtariEnv does it (d4rl_atari/envs.py): Gymnasium's
    AtariPreprocessing with frame skip 4, up to 30 no-ops at reset, 84x84 grayscale frames (the
    max over the last two), no terminal on life loss. -> observations (84, 84) uint8."""
    try:
        import cv2  # noqa: F401  (AtariPreprocessing resizes frames with OpenCV)
    except ImportError:
        raise LamoError("Atari frames are resized with OpenCV: "
                        "pip install opencv-python-headless") from None
    try:
        import ale_py
    except ImportError:
        raise LamoError("Atari envs need the Arcade Learning Environment: "
                        "pip install ale-py") from None
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing
    gym.register_envs(ale_py)
    try:
        env = gym.make(gym_id, **make_kwargs)
    except gym.error.Error as e:
        raise LamoError(f"cannot make Atari env {gym_id!r}: {e}") from None
    return AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True,
                              terminal_on_life_loss=False)


def make_atari_env(game: str, max_steps: int):
    """The env d4rl-atari evaluates in, for one of our games: `{Game}NoFrameskip-v4` (no sticky
    actions), AtariPreprocessing, the last 4 frames stacked -> observations (4, 84, 84) uint8, and
    a time limit of `max_steps` agent steps (ale-py also ends v4 episodes at 108,000 frames). At
    reset the stack repeats the first frame, as gym 0.26's FrameStack did in the official
    evaluation (the official training windows start with zero frames instead)."""
    from gymnasium.wrappers import FrameStackObservation, TimeLimit
    env = atari_env(f"{atari_game(game)}NoFrameskip-v4")
    return TimeLimit(FrameStackObservation(env, 4), max_steps)


def save_npy_gz(path: Path, array: np.ndarray):
    """np.save into a gzip file, as DQN-Replay's files are, via a .part renamed when complete."""
    import gzip
    part = path.with_name(path.name + ".part")
    with gzip.open(part, "wb", compresslevel=6) as f:
        np.save(f, array, allow_pickle=False)
    part.rename(path)


def collect_atari(env_id: str, policy: str, episodes: int, out: Path, seed: int = 0,
                  max_steps: int = 1000):
    """Roll out episodes in an ALE env (say ALE/Breakout-v5) and write them into the folder `out`
    in DQN-Replay's layout: the four gzipped np.save arrays $store$_{field}_ckpt.10.gz, with
    observation (n, 84, 84) uint8 single frames (AtariPreprocessing's output, not stacked), action
    int32, reward float32 clipped to [-1, 1] as Dopamine stored it, terminal uint8. Row i holds the
    frame the agent saw, its action, the reward and whether the episode ended after it; an episode
    cut by `max_steps` is marked terminal on its last step too, so each episode is a trajectory.
    The env keeps its own settings (v5: sticky actions, as Dopamine recorded DQN-Replay); only its
    frame skip moves into AtariPreprocessing."""
    if not env_id.startswith("ALE/"):
        raise LamoError(f"--env {env_id} is not an ALE env (ALE/Breakout-v5, ...); D4RL-layout "
                        f"files are written by python data.py collect --env {env_id} --out FILE")
    if policy != "random":
        raise LamoError(f"--policy {policy} is for MuJoCo envs; use --policy random with {env_id}")
    from gymnasium.wrappers import TimeLimit
    env = TimeLimit(atari_env(env_id, frameskip=1), max_steps)
    env.action_space.seed(seed)
    cols = {f: [] for f in ATARI_FIELDS}
    for ep in progress(range(episodes), desc=f"collect {env_id}"):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            a = env.action_space.sample()
            nxt, r, term, trunc, _ = env.step(a)
            done = term or trunc
            for f, v in zip(ATARI_FIELDS, (obs, a, np.clip(r, -1, 1), done)):
                cols[f].append(v)
            obs = nxt
    env.close()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f, dtype in zip(ATARI_FIELDS, (np.uint8, np.int32, np.float32, np.uint8)):
        (out / replay_file(f, "npy")).unlink(missing_ok=True)    # a stale decompressed copy
        save_npy_gz(out / replay_file(f), np.asarray(cols[f], dtype=dtype))
    r = np.asarray(cols["reward"])
    print(f"wrote {out}: {episodes} episodes, {len(r)} steps, "
          f"mean clipped return {r.sum() / episodes:.1f}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="atari.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect",
                       help="write a small dataset in DQN-Replay's layout from an ALE env")
    c.add_argument("--env", default="ALE/Breakout-v5", help="an ALE env id, e.g. ALE/Freeway-v5")
    c.add_argument("--policy", choices=("random",), default="random", help="uniform random actions")
    c.add_argument("--episodes", type=int, default=10)
    c.add_argument("--max-steps", type=int, default=1000, help="episode time limit, in agent steps")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="a folder, for the four $store$_*_ckpt.10.gz")
    a = p.parse_args(argv)
    try:
        collect_atari(a.env, a.policy, a.episodes, Path(a.out), a.seed, a.max_steps)
    except LamoError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
