"""Tests of Atari (issue 11): DQN-Replay files, their download and decompression, trajectories,
the length-weighted --frac rule, the frame-stacking batcher, the evaluation env, `atari.py collect`,
the model's Atari pieces and the CLI end to end. All offline, on CPU: downloads go to the loopback
HTTP server of conftest.py over files that `collect` wrote here."""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import atari
import data
from conftest import RecordActions, read_metrics, reference_episode, timeless_metrics
from data import LamoError


# ----------------------------------------------------------------------------- fixtures
EPISODES, MAX_STEPS = 3, 200


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """`python atari.py collect` in ALE/Breakout-v5: 3 random episodes (seeded: two end by losing
    the game, at 146 and 129 steps, and one at the 200-step cap). The folder held a stale .npy."""
    out = tmp_path_factory.mktemp("collect") / "breakout"
    out.mkdir()
    (out / atari.replay_file("observation", "npy")).write_bytes(b"from an earlier collect")
    atari.main(["collect", "--env", "ALE/Breakout-v5", "--policy", "random",
               "--episodes", str(EPISODES), "--max-steps", str(MAX_STEPS), "--out", str(out)])
    return out


def read_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.load(f, allow_pickle=False)


def copy_gz(src: Path, dest: Path) -> Path:
    """The four .gz files of folder `src` in a new folder `dest` (tests decompress there)."""
    dest.mkdir()
    for f in atari.ATARI_FIELDS:
        (dest / atari.replay_file(f)).write_bytes((src / atari.replay_file(f)).read_bytes())
    return dest


def synthetic_replay(tmp_path, lengths, tail=0, seed=0) -> atari.AtariReplay:
    """Trajectories of the given lengths (+ an unterminated tail) with distinct random frames,
    written as .npy files and loaded through the memmap path, as atari_dataset() leaves them."""
    rng = np.random.default_rng(seed)
    n = sum(lengths) + tail
    terminal = np.zeros(n, np.uint8)
    terminal[np.cumsum(lengths) - 1] = 1
    arrays = {"observation": rng.integers(0, 256, (n, 84, 84), dtype=np.uint8),
              "action": rng.integers(0, 4, n, dtype=np.int32),
              "reward": rng.choice(np.array([-1, 0, 0, 1, 1], np.float32), n), "terminal": terminal}
    folder = tmp_path / "synthetic"
    folder.mkdir(exist_ok=True)
    for k, v in arrays.items():
        np.save(folder / atari.replay_file(k, "npy"), v)
    return atari.AtariReplay.load(folder)


# ----------------------------------------------------------------------------- files and downloads
def test_collect_writes_dqn_replay_layout(collected):
    names = sorted(p.name for p in collected.iterdir())           # the stale .npy is gone too
    fields = ("observation", "action", "reward", "terminal")
    assert names == sorted(f"$store$_{f}_ckpt.10.gz" for f in fields)
    obs, act, rew, term = (read_gz(collected / atari.replay_file(f)) for f in atari.ATARI_FIELDS)
    n = len(act)
    assert obs.shape == (n, 84, 84) and obs.dtype == np.uint8
    assert act.shape == rew.shape == term.shape == (n,)
    assert (act.dtype, rew.dtype, term.dtype) == (np.int32, np.float32, np.uint8)
    assert term.sum() == EPISODES and term[-1] == 1             # every episode ends in terminal
    lengths = np.diff(np.concatenate([[0], np.flatnonzero(term) + 1]))
    assert lengths.max() <= MAX_STEPS and (lengths == MAX_STEPS).any()   # the cap is terminal
    assert (lengths < MAX_STEPS).any()                                   # and so is game over
    assert act.max() < 4 and np.abs(rew).max() <= 1 and obs.std() > 0   # 4 actions; clipped
    # Replayed in the same env from episode e's reset seed (--seed 0 + e): row t is the frame seen
    # before action t, with the clipped reward and the end that followed it.
    env, t = atari.atari_env("ALE/Breakout-v5", frameskip=1), 0
    for e, n in enumerate(lengths):
        frame, _ = env.reset(seed=e)
        for i in range(n):
            assert np.array_equal(obs[t], frame), (e, i)
            frame, r, end, _, _ = env.step(act[t])
            assert (rew[t], term[t]) == (np.clip(r, -1, 1), end or i == MAX_STEPS - 1), (e, i)
            t += 1
    env.close()


def test_download_decompress_memmap_once(collected, server, monkeypatch, cache, tmp_path):
    for f in atari.ATARI_FIELDS:
        server.files[f"/dqn/Breakout/1/replay_logs/%24store%24_{f}_ckpt.10.gz"] = \
            (collected / atari.replay_file(f)).read_bytes()
    monkeypatch.setattr(atari, "ATARI_URL",
                        server.url + "/dqn/{game}/1/replay_logs/%24store%24_{field}_ckpt.10.gz")
    folder = atari.atari_dataset("breakout")
    assert folder == cache / "atari" / "Breakout" and len(server.requests) == 4
    assert not list(folder.glob("*.part"))
    replay = atari.AtariReplay.load(folder)
    assert isinstance(replay.frames, np.memmap)
    obs, act, rew, term = (read_gz(collected / atari.replay_file(f)) for f in atari.ATARI_FIELDS)
    assert np.array_equal(replay.frames, obs) and np.array_equal(replay.actions, act)
    assert np.array_equal(replay.rewards, rew) and len(replay) == EPISODES
    assert replay.lengths.sum() == len(act)
    assert np.array_equal(replay.starts[1:], np.flatnonzero(term)[:-1] + 1)
    assert f"{EPISODES} trajectories, {len(act)} steps" in replay.describe()
    # A second call: no request, no decompression.
    monkeypatch.setattr(atari, "gunzip", lambda *a: pytest.fail("decompressed again"))
    assert atari.atari_dataset("breakout") == folder and len(server.requests) == 4
    # A local folder of .gz files works the same way, without the network.
    monkeypatch.undo()
    local = copy_gz(collected, tmp_path / "local")
    assert atari.atari_dataset("breakout", str(local)) == local
    assert np.array_equal(atari.AtariReplay.load(local).frames, obs)
    assert len(server.requests) == 4


def test_truncated_or_corrupt_gz_and_unknown_game(collected, tmp_path):
    src = collected / atari.replay_file("observation")
    for name, blob in (("truncated", src.read_bytes()[:-5000]), ("garbage", b"not gzip" * 100)):
        folder = copy_gz(collected, tmp_path / name)
        (folder / src.name).write_bytes(blob)
        with pytest.raises(LamoError) as e:
            atari.atari_dataset("breakout", str(folder))
        msg = str(e.value)
        assert "\n" not in msg and str(folder / src.name) in msg
        assert "delete it and download it again" in msg
        assert not (folder / atari.replay_file("observation", "npy")).exists()     # no half file
        assert not list(folder.glob("*.part"))
    known = "known: breakout, qbert, pong, freeway, asterix"
    with pytest.raises(LamoError, match=f"^unknown Atari game 'space-invaders'; {known}$"):
        atari.atari_dataset("space-invaders")
    with pytest.raises(LamoError, match=r"unknown Atari game 'Breakout'"):
        atari.make_atari_env("Breakout", 10)


def test_trajectories_drop_the_unterminated_tail(tmp_path, capsys):
    replay = synthetic_replay(tmp_path, [5, 40, 2], tail=7)
    assert "dropped an unterminated tail of 7 steps" in capsys.readouterr().out
    assert replay.lengths.tolist() == [5, 40, 2] and replay.starts.tolist() == [0, 5, 45]
    assert len(replay.actions) == len(replay.rewards) == 47 and replay.actions.dtype == np.int64
    sums = [replay.rewards[s:s + n].sum() for s, n in zip(replay.starts, replay.lengths)]
    assert np.allclose(replay.returns, sums)


def test_loader_refuses_the_first_action_past_the_games_set(tmp_path):
    """Breakout plays 4 actions: data with actions 0..3 loads, one action 4 is refused."""
    import tasks
    breakout = tasks.get_task("breakout-medium")
    replay = synthetic_replay(tmp_path, [5, 40])
    folder = tmp_path / "synthetic"
    assert replay.actions.max() == 3 and len(atari.load_atari(breakout, str(folder))[0]) == 2
    np.save(folder / atari.replay_file("action", "npy"), np.where(replay.actions == 3, 4, 0))
    with pytest.raises(LamoError, match=r"actions range over 0..4, but .* has 4 \(0..3\)"):
        atari.load_atari(breakout, str(folder))


# ----------------------------------------------------------------------------- --frac
def test_length_weighted_subset():
    lengths = np.array([10] * 50 + [1000] * 50)
    a = atari.length_weighted_subset(lengths, 0.1, 0)
    assert np.array_equal(a, atari.length_weighted_subset(lengths, 0.1, 0))
    assert not np.array_equal(a, atari.length_weighted_subset(lengths, 0.1, 1))
    # The official ratio_dataset's draw: the same indices from the same seed.
    official = np.random.default_rng(0).choice(100, size=int(np.floor(100 * 0.1)),
                                               p=lengths / lengths.sum(), replace=False)
    assert np.array_equal(a, np.sort(official))
    # the Atari tasks' --frac rule: this one, on the replay's lengths, with --frac-seed as given
    from types import SimpleNamespace

    import tasks
    rule = tasks.get_task("breakout-medium").subset
    for seed in (0, 1):
        got = rule(SimpleNamespace(lengths=lengths), 0.1, seed)
        assert np.array_equal(got, atari.length_weighted_subset(lengths, 0.1, seed))
    # by hand, as in test_lamo
    for (n, f), k in {(2186, 0.1): 218, (1000, 0.3): 300, (10, 0.3): 3, (1191, 0.005): 5,
                      (7, 0.01): 1, (5, 1.0): 5, (100, 0.29): 29, (3, 0.5): 1}.items():
        idx = atari.length_weighted_subset(np.arange(1, n + 1), f, 3)
        assert len(idx) == k == len(set(idx.tolist())), (n, f)
        assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n
    # Length-weighted: over 200 seeds a long trajectory is kept far more often than a short one.
    counts = np.zeros(100)
    for seed in range(200):
        counts[atari.length_weighted_subset(lengths, 0.1, seed)] += 1
    assert counts[50:].mean() > 20 * counts[:50].mean()
    for f in (0, -0.1, 1.5):
        with pytest.raises(LamoError, match=f"--frac must be in \\(0, 1\\], got {f}"):
            atari.length_weighted_subset(lengths, f, 0)


# --------------------------------------------------------------------------- frame-stacking batcher
def reference_window(replay, subset, traj, start, K, max_timestep, rtg_scale, S=4):
    """One window, a step and a frame at a time: the official buffer's rule, slow and obvious."""
    s0, n = replay.starts[subset[traj]], replay.lengths[subset[traj]]
    states, actions = np.zeros((K, S, 84, 84), np.uint8), np.zeros(K, np.int64)
    rtg, ts, mask = np.zeros((K, 1), np.float32), np.zeros(K, np.int64), np.zeros(K, np.float32)
    for i in range(K):
        t = start + i
        if t >= n:                                    # right padding
            continue
        mask[i], actions[i], ts[i] = 1, replay.actions[s0 + t], min(t, max_timestep - 1)
        rtg[i, 0] = replay.rewards[s0 + t + 1:s0 + n].sum() / rtg_scale   # the rewards after step t
        for j in range(S):
            f = t - (S - 1) + j                       # frames t-3 .. t; zeros before the episode
            if f >= 0:
                states[i, j] = replay.frames[s0 + f]
    return states, actions, rtg, ts, mask


def check_against_reference(batch, replay, subset, pairs, K, max_timestep, rtg_scale):
    windows = [reference_window(replay, subset, i, s, K, max_timestep, rtg_scale) for i, s in pairs]
    want = [np.stack(x) for x in zip(*windows)]
    for got, w, name in zip(batch, want, data.Batch._fields):
        assert got.dtype == torch.from_numpy(w).dtype and tuple(got.shape) == w.shape, name
        if name == "rtg":
            assert np.allclose(got.numpy(), w, atol=1e-5), name
        else:
            assert np.array_equal(got.numpy(), w), name        # frames bit for bit


def test_frame_stacking_windows_match_reference(tmp_path):
    K, T = 30, 50
    replay = synthetic_replay(tmp_path, [3, 80, 25, 200, 31])
    subset = np.array([0, 1, 2, 3, 4])
    b = atari.FrameStackBatcher(replay, subset, K=K, max_timestep=T, rtg_scale=2.0, seed=0)
    assert b.state_mean is None and b.state_std is None and isinstance(b.rng, np.random.Generator)
    pairs = [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4),   # episode start: 3, 2, 1, 0 zero frames
             (0, 0), (2, 0), (4, 0),                   # right-padded short trajectories, 31 = K + 1
             (1, 40), (3, 170), (1, 60)]               # middle; timesteps clipped at T-1; padded
    batch = b.window(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    check_against_reference(batch, replay, subset, pairs, K, T, 2.0)
    assert batch.mask[5].sum() == 3 and batch.states[5, 3:].abs().sum() == 0
    assert batch.actions[5, 3:].sum() == 0
    assert batch.states[0, 0, :3].abs().sum() == 0 and batch.states[0, 0, 3].abs().sum() > 0
    assert batch.timesteps[9].max() == T - 1
    # Random draws on a subset, with the rng's state carried across calls.
    sub = np.array([1, 3, 4])
    b = atari.FrameStackBatcher(replay, sub, K=K, max_timestep=T, rtg_scale=1.0, seed=1)
    for _ in range(3):
        state = b.rng.bit_generator.state
        batch = b.sample(16)
        rng = np.random.default_rng()
        rng.bit_generator.state = state              # replay the draws to know the windows
        traj = rng.choice(3, size=16, p=b.p)
        start = np.floor(rng.random(16) * (b.lengths[traj] - K)).astype(np.int64).clip(min=0)
        check_against_reference(batch, replay, sub, list(zip(traj, start)), K, T, 1.0)


def official_sample(replay, K, rng, B, S=4):
    """AtariBuffer.sample (experiment-atari/buffer.py) on the same arrays, numpy for torch, with its
    rewards_to_go; its padded steps hold whatever follows, so only unpadded steps are compared.
    -> states, actions, rtg, timesteps, masks, and the rows of the arrays each step reads."""
    obs, rewards = replay.frames, replay.rewards
    terminals = np.zeros(len(rewards), bool)
    terminals[replay.starts + replay.lengths - 1] = True
    traj_sp, traj_ep = replay.starts, replay.starts + replay.lengths - 1
    traj_length = traj_ep - traj_sp + 1
    traj_returns = np.add.reduceat(rewards, traj_sp)
    traj_of_step = np.insert(np.cumsum(terminals), 0, 0)[:-1]
    rewards_to_go = np.cumsum(traj_returns)[traj_of_step] - np.cumsum(rewards)
    p_sample = traj_length / traj_length.sum()
    selected_traj = rng.choice(np.arange(len(traj_sp)), B, replace=True, p=p_sample)
    selected_traj_sp = traj_sp[selected_traj]
    selected_offset = np.floor(rng.random(B) * (traj_length[selected_traj] - K))
    selected_offset = selected_offset.astype(np.int32).clip(min=0)
    selected_sp = selected_traj_sp + selected_offset
    selected_ep = (selected_sp + K).clip(max=traj_ep[selected_traj])
    selected_index = selected_sp[:, None] + np.arange(K)
    selected_index = np.where(selected_index <= selected_ep[:, None], selected_index, -1)
    masks = selected_index >= 0
    timesteps = selected_offset[:, None] + np.arange(K)
    obs = np.concatenate([obs, np.zeros((K, 84, 84), np.uint8)]).astype(np.float32)  # end padding
    states_list = []
    for traj_sp, sp, offset in zip(selected_traj_sp, selected_sp, selected_offset):
        observation_list = []
        for i in range(K):
            if offset < S and S - offset - i - 1 >= 0:
                pad = np.zeros((S - offset - i - 1, 84, 84), np.float32)
                observation_list.append(np.concatenate([pad, obs[traj_sp:sp + i + 1]]))
            else:
                observation_list.append(obs[sp + i - S + 1:sp + i + 1])
        states_list.append(np.stack(observation_list))
    return (np.stack(states_list), replay.actions[selected_index],
            rewards_to_go[selected_index][..., None], timesteps, masks, selected_index)


def test_sample_equals_official_buffer_on_unpadded_steps(tmp_path):
    """Same seed, same draws: our batch equals AtariBuffer.sample's wherever the official one is
    defined."""
    replay = synthetic_replay(tmp_path, [3, 80, 25, 200, 31, 64])
    b = atari.FrameStackBatcher(replay, np.arange(6), K=30, max_timestep=4096, rtg_scale=1.0,
                                seed=7)
    rng = np.random.default_rng(7)
    for _ in range(2):
        ours = b.sample(32)
        states, actions, rtg, timesteps, m, rows = official_sample(replay, 30, rng, 32)
        assert np.array_equal(ours.mask.numpy().astype(bool), m)
        assert np.array_equal(ours.states.numpy()[m], states[m])
        assert np.array_equal(ours.actions.numpy()[m], actions[m])
        assert np.array_equal(ours.timesteps.numpy()[m], timesteps[m])
        assert np.allclose(ours.rtg.numpy()[m, 0], rtg[m, 0], atol=1e-5)


# ----------------------------------------------------------------------------- evaluation env
def test_eval_env_stacks_four_frames_and_steps():
    env = atari.make_atari_env("breakout", max_steps=6)
    assert env.unwrapped.spec.id == "BreakoutNoFrameskip-v4"
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0      # no sticky actions
    assert env.unwrapped._frameskip == 1                      # the skipping is AtariPreprocessing's
    obs, _ = env.reset(seed=0)
    frame = env.unwrapped.ale.getEpisodeFrameNumber()
    assert 1 <= frame <= 30                                        # 1 to 30 no-ops at reset
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8
    assert all(np.array_equal(obs[0], obs[j]) for j in range(4))     # reset repeats the first frame
    for t in range(6):
        obs, reward, term, trunc, _ = env.step(1)                  # FIRE, then FIRE again
        assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and not term
        assert env.unwrapped.ale.getEpisodeFrameNumber() == frame + 4 * (t + 1)   # frame skip 4
    assert trunc                                                   # the max_steps time limit
    env.close()


@pytest.mark.parametrize("module, package",
                         [("ale_py", "ale-py"), ("cv2", "opencv-python-headless")])
def test_missing_atari_packages_are_named(monkeypatch, module, package):
    monkeypatch.setitem(sys.modules, module, None)                 # `import module` now fails
    with pytest.raises(LamoError, match=f"pip install {package}$"):
        atari.make_atari_env("pong", 10)


# ---------------------------------------------------------------------- the CLI on Atari (issue 11)
def test_atari_end_to_end(collected, hf_tiny, tmp_path):
    """`python lamo.py --env breakout-medium --data <collected> --frac 0.5` with a tiny GPT-2, a few
    steps and 2 evaluation episodes per target, capped short: the official Atari recipe runs."""
    import lamo
    data_dir = copy_gz(collected, tmp_path / "data")
    out, half = tmp_path / "run", tmp_path / "half"
    common = ["--env", "breakout-medium", "--data", str(data_dir), "--frac", "0.5", "--pretrained",
              str(hf_tiny[1]), "--eval-every", "2", "--eval-episodes", "2", "--batch-size", "4",
              "--context-len", "6", "--eval-max-steps", "40", "--log-every", "1"]
    lamo.main([*common, "--steps", "4", "--out", str(out)])
    # 2 steps, then --resume to 4: the token-counted schedule continues exactly.
    lamo.main([*common, "--steps", "2", "--out", str(half)])
    lamo.main(["--resume", str(half), "--steps", "4"])
    assert timeless_metrics(half) == timeless_metrics(out)
    cfg = json.loads((out / "config.json").read_text())
    assert ((cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_bias"]) ==
            (32, 32.0, 0.0, False))
    assert ((cfg["grad_clip"], cfg["adam_eps"], cfg["lr"], cfg["weight_decay"]) ==
            (1.0, 1e-8, 1e-3, 0.01))
    subset = json.loads((out / "subset.json").read_text())
    assert subset["n_trajectories"] == 1                       # floor(0.5 * 3)
    summary = json.loads((out / "summary.json").read_text())
    assert (set(summary["targets"]) == {"90", "120"} and
            summary["metric"].startswith("human-normalised"))
    rows = read_metrics(out)
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[0] == 0 and 0 < lrs[1] < lrs[2] < lrs[3] < 1e-3   # token warm-up, from 0 at step 1
    ev = rows[-1]["eval"]["90"]
    assert ev["score_mean"] == pytest.approx(100 * (ev["return_mean"] - 1.7) / (31.8 - 1.7))


def test_an_atari_pack_steps_each_run_on_its_own_token_count(collected, hf_tiny, tmp_path):
    """`--seed 0 1` on Atari: one pack (pack.RunAdamW: an lr per run), each run's lr from the
    tokens of its own batches, as alone; its losses those of the run alone. The runs' token
    counts differ, so one lr for the pack would be wrong for one of them."""
    import lamo
    data_dir = copy_gz(collected, tmp_path / "data")
    common = ["--env", "breakout-medium", "--data", str(data_dir), "--frac", "0.5", "--pretrained",
              str(hf_tiny[1]), "--eval-every", "4", "--eval-episodes", "1", "--batch-size", "4",
              "--context-len", "6", "--eval-max-steps", "20", "--log-every", "1", "--steps", "4",
              "--dropout", "0", "--targets", "90"]
    lamo.main([*common, "--seed", "0", "1", "--out", str(tmp_path / "pk")])
    lrs = {}
    for seed in (0, 1):
        lamo.main([*common, "--seed", str(seed), "--out", str(tmp_path / f"alone{seed}")])
        packed = read_metrics(tmp_path / "pk" / f"s{seed}")
        alone = read_metrics(tmp_path / f"alone{seed}")
        lrs[seed] = [r["lr"] for r in packed if "lr" in r]
        assert lrs[seed] == [r["lr"] for r in alone if "lr" in r]
        for p, a in zip(packed, alone):
            if "action_loss" in p:
                assert p["action_loss"] == pytest.approx(a["action_loss"], rel=1e-5)
    assert lrs[0] != lrs[1]


# ----------------------------------------------------------------- Freeway and Asterix (issue 18)
@pytest.fixture(scope="module")
def new_games(tmp_path_factory):
    """`python atari.py collect` in ALE/Freeway-v5 and ALE/Asterix-v5: 2 random episodes each, cut
    at 30 steps. -> {game: folder of the four .gz files}."""
    folders = {}
    for game, ale in (("freeway", "Freeway"), ("asterix", "Asterix")):
        folders[game] = tmp_path_factory.mktemp(game) / ale
        atari.main(["collect", "--env", f"ALE/{ale}-v5", "--episodes", "2", "--max-steps", "30",
                    "--seed", "1", "--out", str(folders[game])])
    return folders


@pytest.mark.parametrize("game, ale, n_actions",
                         [("freeway", "Freeway", 3), ("asterix", "Asterix", 9)])
def test_new_games_load_through_dqn_replay_and_their_envs_step(new_games, server, monkeypatch,
                                                                cache, game, ale, n_actions):
    """Their files come from DQN-Replay's {Game} folder (the loopback server stands in for the
    bucket); their actions fit ALE's minimal set, which the task's env plays; the data's rewards
    are clipped to [-1, 1], the env's are the game's score (Asterix: 50 an item); human-normalised
    scores from get_hns.py (random / human: Freeway 0 / 29.6, Asterix 210 / 8503.3)."""
    import tasks
    task = tasks.get_task(f"{game}-medium")
    for f in atari.ATARI_FIELDS:
        server.files[f"/dqn/{ale}/1/replay_logs/%24store%24_{f}_ckpt.10.gz"] = \
            (new_games[game] / atari.replay_file(f)).read_bytes()
    monkeypatch.setattr(atari, "ATARI_URL",
                        server.url + "/dqn/{game}/1/replay_logs/%24store%24_{field}_ckpt.10.gz")
    replay, files = task.load()
    assert files[0].parent == cache / "atari" / ale and len(server.requests) == 4
    assert np.array_equal(replay.actions, read_gz(new_games[game] / atari.replay_file("action")))
    assert len(replay) == 2 and replay.actions.max() < n_actions
    assert np.abs(replay.rewards).max() <= 1                 # Asterix's 50s were recorded as 1
    env = task.make_env(12)
    assert env.unwrapped.spec.id == task.gym_id == f"{ale}NoFrameskip-v4"
    assert env.action_space.n == task.act_dim == n_actions
    obs, _ = env.reset(seed=0)
    rewards = []
    for t in range(12):
        obs, r, term, trunc, _ = env.step(t % n_actions)
        assert obs.shape == task.obs_shape and obs.dtype == np.uint8 and not term
        rewards.append(r)
    assert trunc and max(rewards) == {"freeway": 0, "asterix": 50}[game]     # not clipped
    env.close()
    random_score, human_score = {"freeway": (0.0, 29.6), "asterix": (210.0, 8503.3)}[game]
    assert np.allclose(task.score([random_score, human_score]), [0, 100], rtol=0, atol=1e-9)


def test_freeway_end_to_end(new_games, hf_tiny, tmp_path):
    """`python lamo.py --env freeway-medium --data <collected>` with a tiny GPT-2: a 3-action head,
    the config.yaml lr / wd, evaluation at target 30."""
    import lamo
    out = tmp_path / "run"
    lamo.main(["--env", "freeway-medium", "--data", str(new_games["freeway"]), "--pretrained",
               str(hf_tiny[1]), "--steps", "2", "--eval-every", "2", "--eval-episodes", "1",
               "--batch-size", "4", "--context-len", "6", "--eval-max-steps", "10",
               "--out", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["lr"], cfg["weight_decay"], cfg["lora_rank"]) == (3e-4, 0.1, 32)
    summary = json.loads((out / "summary.json").read_text())
    assert (set(summary["targets"]) == {"30"} and
            summary["evaluation_env"] == "FreewayNoFrameskip-v4")
    ev = read_metrics(out)[-1]["eval"]["30"]
    assert ev["score_mean"] == pytest.approx(100 * ev["return_mean"] / 29.6)


def test_each_collect_points_at_the_other(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --env ALE/Pong-v5 is an Atari env; "
                                         r"DQN-Replay files are written by "
                                         r"python atari.py collect --env ALE/Pong-v5"):
        data.main(["collect", "--env", "ALE/Pong-v5", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match=r"^error: --env Hopper-v4 is not an ALE env "
                                         r".*python data.py collect --env Hopper-v4 --out FILE$"):
        atari.main(["collect", "--env", "Hopper-v4", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()


K_EVAL = 4


@pytest.fixture(scope="module")
def atari_rollout():
    """A tiny DT on Breakout through lamo.rollout (its env actions and every model output recorded)
    and through conftest's step-by-step reference (unpadded windows of the last min(t+1, K) steps,
    no mask, wpe positions from 0 as in a training window). -> (rollout actions, outputs, reference
    actions, reference logits)."""
    import dataclasses
    import lamo
    import tasks
    task = tasks.get_task("breakout-medium")
    torch.manual_seed(0)
    m = lamo.build_model(lamo.resolve(lamo.Config(env="breakout-medium", model="dt", n_layer=1,
                                                  n_embd=32, context_len=K_EVAL)), task).eval()
    outs = []

    class Recorder(torch.nn.Module):
        def forward(self, *args):
            outs.append(m(*args))
            return outs[-1]

    rec = RecordActions(task)
    lamo.rollout(Recorder(), dataclasses.replace(task, env=rec), [(90, 3)], None, None, K_EVAL,
                 torch.device("cpu"), max_steps=12)
    want, ref = reference_episode(m, task, 90, 3, None, None, K_EVAL, 12, 1.0)
    return [int(a) for a in rec.actions[0]], outs, [int(a) for a in want], ref


def closest_row(outs, ref, t) -> float:
    """How far the reference's logits for step t are from the nearest of rollout's K output rows
    (slot-agnostic: which slot rollout reads is its business)."""
    return (outs[t][0] - ref[t]).abs().max(-1).values.min().item()


def test_atari_rollout_equals_training_windows(atari_rollout):
    """Atari evaluation shows the model what training shows it at every step: right-padded windows
    from slot 0 while the episode is shorter than K, then the last K real steps, with no empty
    slot between (rollout once shifted the window at t = K - 1, before it was full, leaving one
    until t = 2K - 3). Same actions as the reference, and each step's logits among rollout's
    rows."""
    got, outs, want, ref = atari_rollout
    assert got == want and len(want) == 12 and len(set(want)) > 1  # the choice moves with the input
    for t in range(len(ref)):
        assert closest_row(outs, ref, t) < 1e-5, t


def test_atari_model_pieces():
    """The official Atari model: Nature CNN on stacked frames, an Embedding for actions (+ residual
    MLP blocks with mlp), Linear + Tanh logits for LaMo and kzl DT's plain Linear for DT;
    cross-entropy over the real steps only."""
    import lamo
    import tasks
    task = tasks.get_task("breakout-medium")
    lamo_cfg = lamo.resolve(lamo.Config(env="breakout-medium", pretrained="none", n_layer=1,
                                        n_embd=32, n_head=2))
    m = lamo.build_model(lamo_cfg, task).eval()
    assert (isinstance(m.embed_state[0], lamo.NatureCNN) and
            isinstance(m.embed_action.fc1, torch.nn.Embedding))
    assert isinstance(m.predict_action[-1], torch.nn.Tanh) and m.add_wpe and m.timestep_before_ln
    states = torch.randint(0, 256, (2, 5, 4, 84, 84)).float()
    actions = torch.randint(0, 4, (2, 5))
    logits = m(states, actions, torch.rand(2, 5, 1), torch.arange(5).expand(2, -1))
    assert logits.shape == (2, 5, 4) and logits.abs().max() <= 1
    dt = lamo.build_model(lamo.resolve(lamo.Config(env="breakout-medium", model="dt")), task)
    assert isinstance(dt.predict_action, torch.nn.Linear) and dt.predict_action.bias is None
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noise = torch.zeros(2, 5, 4)
    noise[0, 3:] = 100.0                                      # padded steps: any logits, same loss
    assert (lamo.action_loss(logits + noise, actions, mask, True) ==
            lamo.action_loss(logits, actions, mask, True))
    real = torch.nn.functional.cross_entropy(logits[mask.bool()], actions[mask.bool()])
    assert torch.allclose(lamo.action_loss(logits, actions, mask, True), real)


def test_token_schedule_equals_the_official_scheduler():
    """lamo.learning_rate + count_tokens against experiment-atari's CustomLRScheduler on torch's
    _LRScheduler, stepped as core.py steps it (tokens += a batch's count; scheduler.step(tokens),
    which adds the running total to its own count again). Small warm-up / final counts, so 60
    steps cross the warm-up, the cosine and its turn past final_tokens."""
    import math
    from types import SimpleNamespace

    import lamo

    class Official(torch.optim.lr_scheduler._LRScheduler):
        def __init__(self, optimizer, warmup_tokens, final_tokens):
            self.tokens, self.warmup_tokens, self.final_tokens = 0, warmup_tokens, final_tokens
            super().__init__(optimizer)

        def get_lr(self):
            if self.tokens < self.warmup_tokens:
                mult = float(self.tokens) / float(max(1, self.warmup_tokens))
            else:
                progress = float(self.tokens - self.warmup_tokens) / float(
                    max(1, self.final_tokens - self.warmup_tokens))
                mult = max(0.1, 0.5 * (1.0 + math.cos(math.pi * progress)))
            return [lr * mult for lr in self.base_lrs]

        def step(self, tokens=None):
            if tokens is not None:
                self.tokens += tokens
            super().step()

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = Official(opt, 2e5, 2e6)
    cfg = lamo.Config(lr=1e-3, warmup_tokens=2e5, final_tokens=2e6)
    run = SimpleNamespace(action_tokens=0, schedule_tokens=0)
    counts = np.random.default_rng(0).integers(2000, 3841, 60)
    tokens, official, ours = 0, [], []
    for step, n in enumerate(counts):
        official.append(opt.param_groups[0]["lr"])            # the lr optimizer.step() uses
        ours.append(lamo.learning_rate(cfg, step, run.schedule_tokens))
        opt.step()                                            # no gradient: a no-op
        tokens += int(n)
        sched.step(tokens)
        lamo.count_tokens(run, int(n))
    assert ours == pytest.approx(official, rel=1e-12, abs=1e-15)
    # warm-up from 0, the cosine down to its 10% floor, then back up past final_tokens
    floor = official.index(1e-4)
    assert official[0] == 0 and max(official[:floor]) > 0.99e-3 and max(official[floor:]) > 9e-4
