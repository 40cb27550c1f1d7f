"""Reacher2d (reacher2d.py): the env against facts worked out by hand from the official MJCF and
reacher_2d.py, the loader on the official pickle layout and on hdf5, the data generator with tiny
settings, and lamo.py end to end on generated data. Offline, CPU, a few seconds."""
import json
import pickle
from dataclasses import replace

import h5py
import mujoco
import numpy as np
import pytest
import torch

import lamo
import reacher2d
import tasks
from conftest import read_metrics
from data import LamoError

REACHER = tasks.get_task("reacher2d-medium")
# Tiny settings for `python reacher2d.py collect`: 2 envs x 100 steps per PPO update, 2 updates,
# 1 epoch each; the "medium" test passes at once (a return is >= 0; seed 0's is 0, so a test of
# > target would train on and fail) and every episode is kept.
TINY = ["--train-steps", "400", "--update-every", "200", "--epochs", "1", "--check-every", "200",
        "--eval-episodes", "2", "--target-return", "0", "--min-return", "-1", "--episodes", "3"]


def put(env, q, qdot=(0.0, 0.0), target=None):
    """Set the arm's joint angles and velocities (and the target's xy), then recompute positions."""
    env.set_state(np.array(q, dtype=float), np.array(qdot, dtype=float))
    if target is not None:
        env.model.body_pos[env.target][:2] = target
    mujoco.mj_forward(env.model, env.data)


def fingertip(q1, q2):
    """By hand from the MJCF: the shoulder body is turned 0.785 rad about z, its link is 0.6 long;
    the elbow body turns back by 0.785; the fingertip site sits 0.45 along the elbow link."""
    a = 0.785 + q1
    return (0.6 * np.array([np.cos(a), np.sin(a)]) +
            0.45 * np.array([np.cos(q1 + q2), np.sin(q1 + q2)]))


def test_model_and_observation_layout():
    env = reacher2d.Reacher2dEnv()
    m = env.model
    assert (m.nq, m.nv, m.nu) == (2, 2, 2) and env.dt == pytest.approx(0.15)       # 15 x 0.01
    assert tuple(m.opt.gravity) == (0, 0, 0) and m.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4
    assert env.metadata["render_fps"] == 7 and env.action_space.shape == (2,)
    assert list(m.jnt_limited) == [0, 1] and np.allclose(m.jnt_range[1], [-2.0, 3.5])
    env.reset(seed=0)
    put(env, (0.3, -1.1), (2.0, -4.0), target=(0.2, -0.7))
    obs = env._get_obs()
    tip = fingertip(0.3, -1.1)
    assert obs.shape == (12,) and obs.dtype == np.float64
    assert np.allclose(obs[0:2], np.sin([0.3, -1.1])) and np.allclose(obs[2:4], np.cos([0.3, -1.1]))
    assert np.allclose(obs[4:6], [0.15 * 2.0, 0.15 * -4.0])                      # dt * qvel
    assert np.allclose(obs[6:8], tip) and np.allclose(obs[8:10], [0.2, -0.7])
    assert np.allclose(obs[10:12], tip - [0.2, -0.7])


@pytest.mark.parametrize("offset, reward", [
    ((0.05, 0.04), 1.0),    # L1 0.09: inside the band
    ((0.06, 0.05), 0.0),    # L1 0.11, Euclidean 0.078: outside
    ((-0.02, 0.07), 1.0), ((0.0, -0.105), 0.0)])
def test_reward_is_one_inside_the_l1_band(offset, reward):
    env = reacher2d.Reacher2dEnv()
    env.reset(seed=0)
    q = (0.3, 0.5)
    put(env, q, target=fingertip(*q) + np.array(offset))
    obs, r, terminated, truncated, _ = env.step(np.zeros(2))     # at rest, no gravity: it stays put
    assert np.allclose(obs[6:8], fingertip(*q)) and r == reward and not (terminated or truncated)


def test_actions_are_clipped():
    """Out-of-range actions act as their clipped value (step clips; the motors' ctrlrange would
    too)."""
    a, b = reacher2d.Reacher2dEnv(), reacher2d.Reacher2dEnv()
    a.reset(seed=3), b.reset(seed=3)
    assert np.array_equal(a.step(np.array([5.0, -7.0]))[0], b.step(np.array([1.0, -1.0]))[0])


def test_reset_distribution_and_seeding():
    env, qpos = reacher2d.Reacher2dEnv(), []
    for seed in range(200):
        obs, _ = env.reset(seed=seed)
        goal = obs[8:10]
        assert 0.5 <= np.linalg.norm(goal) <= 1.0 and np.array_equal(goal, env.goal)  # the annulus
        assert np.all(env.data.qvel == 0) and np.all(obs[4:6] == 0)
        qpos.append(env.data.qpos.copy())
    assert np.abs(qpos).max() <= 2.0 and np.abs(qpos).max(0).min() > 1.9      # U(-2, 2) each
    first = env.reset(seed=7)[0]
    assert np.array_equal(first, env.reset(seed=7)[0])
    assert not np.array_equal(first, env.reset(seed=8)[0])


def test_no_termination_in_100_steps():
    env = REACHER.make_env()
    env.reset(seed=1)
    rng, ends = np.random.default_rng(0), []
    for t in range(100):
        _, r, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2))
        assert r in (0.0, 1.0) and not terminated
        ends.append(truncated)
    assert ends == [False] * 99 + [True]           # cut by the time limit at 100, never by the env


def official_episodes(n=3, seed=0):
    """test.py's layout: a list of dicts, rewards and terminals (100, 1), next_observations kept."""
    rng = np.random.default_rng(seed)
    return [{"observations": rng.normal(size=(100, 12)),
             "next_observations": rng.normal(size=(100, 12)),
             "actions": rng.normal(size=(100, 2)).astype(np.float32),
             "rewards": (rng.uniform(size=(100, 1)) < 0.3).astype(np.float64),
             "terminals": np.zeros((100, 1), dtype=bool)} for _ in range(n)]


def test_loader_reads_the_official_pickle_and_hdf5(tmp_path):
    episodes = official_episodes()
    with open(tmp_path / "reacher2d-medium-v2.pkl", "wb") as f:
        pickle.dump(episodes, f)
    trajs, files = REACHER.load(str(tmp_path / "reacher2d-medium-v2.pkl"))
    assert files == [tmp_path / "reacher2d-medium-v2.pkl"] and len(trajs) == 3
    for t, e in zip(trajs, episodes, strict=True):
        assert t["rewards"].shape == t["terminals"].shape == (100,)      # the trailing axis dropped
        assert t["observations"].shape == (100, 12) and t["actions"].shape == (100, 2)
        assert np.allclose(t["observations"], e["observations"])
        assert t["rewards"].sum() == e["rewards"].sum()
    with h5py.File(tmp_path / "r.hdf5", "w") as f:                    # D4RL's layout, 3 x 100 steps
        for k in ("observations", "actions", "rewards", "terminals"):
            f[k] = np.concatenate([e[k] for e in episodes]).squeeze()
        f["timeouts"] = np.arange(300) % 100 == 99
    from_hdf5, _ = REACHER.load(str(tmp_path / "r.hdf5"))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(trajs, from_hdf5, strict=True) for k in a)
    episodes[1]["observations"] = episodes[1]["observations"][:, :11]
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(episodes, f)
    with pytest.raises(LamoError,
                       match=r"'observations' has shape \(100, 11\), expected \(N, 12\)"):
        REACHER.load(str(tmp_path / "bad.pkl"))


def test_no_data_says_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        lamo.main(["--env", "reacher2d-medium", "--model", "dt", "--out", str(tmp_path / "r")])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("error: reacher2d-medium: no data at ")
    assert reacher2d.DRIVE in msg and "reacher2d-medium-{ratio}-d1-v2.pkl" in msg
    assert msg.endswith("python reacher2d.py collect")
    with pytest.raises(LamoError, match="--data nowhere.pkl: no such file"):
        REACHER.load("nowhere.pkl")


def test_ppo_pieces_by_hand():
    # returns run on across episode ends, as in the official buffer (no terminal ever set)
    assert np.allclose(reacher2d.discounted_returns(np.array([0.0, 1.0, 0.0, 1.0]), 0.5),
                       [0.625, 1.25, 0.5, 1.0])
    cfg = reacher2d.PPOConfig()
    steps = (0, 249_999, 250_000, 500_000, 2_250_000, 2_500_000, 3_000_000)
    stds = [reacher2d.action_std(s, cfg) for s in steps]
    assert stds == [0.6, 0.6, 0.55, 0.5, 0.15, 0.1, 0.1]
    policy = reacher2d.ActorCritic(12, 2)
    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    mean = policy.actor(torch.as_tensor(x))
    assert mean.abs().max() < 1                                           # tanh on the actor's mean
    mvn = torch.distributions.MultivariateNormal(mean, torch.diag(torch.full((2,), 0.6 ** 2)))
    a = mean + 0.3
    assert torch.allclose(policy.dist(torch.as_tensor(x), 0.6).log_prob(a), mvn.log_prob(a))
    assert torch.allclose(policy.dist(torch.as_tensor(x), 0.6).entropy(), mvn.entropy())


def test_generator_writes_the_official_layout_and_is_seeded(tmp_path, cache, capsys):
    reacher2d.main(["collect", *TINY])                     # no --out: where lamo.py looks
    path = reacher2d.default_data()
    assert path == cache / "reacher2d" / "reacher2d-medium-v2.pkl"
    with open(path, "rb") as f:
        episodes = pickle.load(f)
    assert isinstance(episodes, list) and len(episodes) == 3
    for e in episodes:
        assert list(e) == ["observations", "next_observations", "actions", "rewards", "terminals"]
        assert e["observations"].shape == e["next_observations"].shape == (100, 12)
        assert e["actions"].shape == (100, 2) and e["actions"].dtype == np.float32
        assert e["rewards"].shape == e["terminals"].shape == (100, 1)
        assert e["rewards"].dtype == np.float64 and set(np.unique(e["rewards"])) <= {0.0, 1.0}
        assert e["terminals"].dtype == bool and not e["terminals"].any()
        assert np.array_equal(e["observations"][1:], e["next_observations"][:-1])
        goal = e["observations"][0, 8:10]
        assert 0.5 <= np.linalg.norm(goal) <= 1.0 and np.all(e["observations"][:, 8:10] == goal)
    env = reacher2d.Reacher2dEnv()      # episode i: the next reset of a stream seeded 50,000 + i,
    for i, e in enumerate(episodes):    # apart from the training envs' (seeded 0, 1, ...)
        env.reset(seed=50_000 + i)
        assert np.array_equal(e["observations"][0], env.reset()[0])
    assert REACHER.load("")[1] == [path]                   # lamo.py finds it without --data
    reacher2d.main(["collect", *TINY, "--out", str(tmp_path / "again.pkl")])
    with open(tmp_path / "again.pkl", "rb") as f:
        again = pickle.load(f)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(episodes, again, strict=True) for k in a)
    with pytest.raises(SystemExit, match=r"^error: --out .*again.pkl exists; remove it"):
        reacher2d.main(["collect", *TINY, "--out", str(tmp_path / "again.pkl")])
    with pytest.raises(SystemExit, match=r"^error: --update-every 150 must be a multiple of 100"):
        reacher2d.main(["collect", *TINY, "--update-every", "150",
                        "--out", str(tmp_path / "x.pkl")])
    # a random policy trains no PPO: a PPO flag would do nothing (argparse's exit status 2)
    with pytest.raises(SystemExit) as e:
        reacher2d.main(["collect", "--policy", "random", "--train-steps", "400",
                        "--out", str(tmp_path / "r.pkl")])
    assert e.value.code == 2 and not (tmp_path / "r.pkl").exists()
    assert "--train-steps has no effect with --policy random" in capsys.readouterr().err
    # ... it takes --seed, --episodes and --min-return (a float): the same seed, the same data
    random = []
    for name in ("r.pkl", "r2.pkl"):
        reacher2d.main(["collect", "--policy", "random", "--episodes", "2", "--min-return", "-0.5",
                        "--seed", "3", "--out", str(tmp_path / name)])
        with open(tmp_path / name, "rb") as f:
            random.append(pickle.load(f))
    assert len(random[0]) == 2 and np.abs(random[0][0]["actions"]).max() <= 1
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(*random, strict=True) for k in a)


def test_generator_filters_and_stops_at_the_target(tmp_path):
    cfg = reacher2d.PPOConfig(min_return=0, episodes=4)            # random episodes with return > 0
    rng = np.random.default_rng(0)
    kept, tried = reacher2d.record(lambda obs: rng.uniform(-1, 1, (len(obs), 2)), cfg, batch_envs=8)
    assert len(kept) == 4 and tried > 4 and all(e["rewards"].sum() > 0 for e in kept)
    still = lambda obs: np.zeros((len(obs), 2))
    everything = reacher2d.record(still, replace(cfg, min_return=-1, episodes=3), batch_envs=2)
    assert [len(everything[0]), everything[1]] == [3, 3]          # tried counts what it looked at
    with pytest.raises(LamoError, match=r"^only 0 of 2 episodes had a return > 100; lower --min"):
        reacher2d.record(still, replace(cfg, min_return=100, episodes=1), batch_envs=2, max_tries=1)
    tiny = reacher2d.PPOConfig(train_steps=400, update_every=200, epochs=1, check_every=200,
                               eval_episodes=2,
                               target_return=101)  # a return above 100 is impossible
    with pytest.raises(LamoError,
                       match=r"^PPO did not reach --target-return 101 in 400 steps \(best "):
        reacher2d.train_medium(tiny)


def test_lamo_end_to_end_on_generated_data(tmp_path):
    reacher2d.main(["collect", *TINY, "--out", str(tmp_path / "r.pkl")])
    out = tmp_path / "run"
    lamo.main(["--env", "reacher2d-medium", "--data", str(tmp_path / "r.pkl"), "--model", "dt",
               "--n-layer", "1", "--n-embd", "32", "--steps", "4", "--eval-every", "4",
               "--warmup", "2", "--eval-episodes", "2", "--out", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["context_len"], cfg["eval_episodes"], cfg["steps"]) == (5, 2, 4)      # run.sh's K 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "reacher2d-medium" and set(summary["targets"]) == {"76", "40"}
    assert summary["paper"] is None          # a 1-layer DT is not Table 1's (lamo.paper_reference)
    ev = [m for m in read_metrics(out) if "eval" in m][-1]["eval"]
    assert all(e["length_mean"] == 100 and e["score_mean"] == e["return_mean"] for e in ev.values())


def test_task_entry_and_table1():
    assert (REACHER.rtg_scale, REACHER.targets) == (10, (76, 40))
    assert (REACHER.episode_len, REACHER.max_timestep) == (100, 100)
    assert REACHER.score([0, 36, 100]).tolist() == [0, 36, 100]
    c = lamo.resolve(lamo.Config(env="reacher2d-medium"))
    assert (c.context_len, c.steps, c.embed, c.lm_coef) == (5, 100_000, "mlp", 0)       # run.sh
    assert (c.lr, c.weight_decay, c.warmup, c.eval_episodes) == (1e-4, 1e-5, 2500, 20)
    assert lamo.resolve(lamo.Config(env="reacher2d-medium", model="dt")).context_len == 5
    cells = {frac: tuple(tasks.PAPER["reacher2d-medium", frac, model][:2]
                         for model in ("lamo", "dt"))
             for frac in (0.1, 0.3, 1.0)}
    assert cells == {0.1: ((12.4, 3.8), (2.3, 1.5)), 0.3: ((31.2, 7.6), (6.4, 2.6)),
                     1.0: ((33.0, 8.3), (22.8, 6.0))}
