"""workers: the evaluation's envs, stepped in this process or in N worker processes.

    envs = Envs(task, workers=4)          # 4 processes, each holding a contiguous block of episodes
    obs = envs.reset(T, seeds)            # (N, *obs) for N episodes
    obs, r, done = envs.step(rows, actions)  # rows: the episodes still running, in order

A batched evaluation (lamo.rollout) runs one model forward per env step for every live episode;
with R runs of a pack x 80 episodes, stepping 1,280 Gymnasium envs one after another becomes the
cost (a Hopper step is about 0.15 ms on one core). Workers step their blocks at once. The envs are
Gymnasium's own (EnvPool's Hopper is another implementation, so scores would stop being
comparable), every episode is reset with its own seed, and the arrays come back through pipes as
they are, so returns with N workers equal N = 1 bit for bit.

A pool lives as long as its run (or pack): starting a worker imports the task's module (torch
included, about 3 s on this 2-core CPU), which would cost more than most evaluations if done
each time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback

import numpy as np


def default_workers() -> int:
    """The cores this process may use: OMP_NUM_THREADS where set (sweep.py sets each run's share),
    else its CPU affinity."""
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        return max(1, int(threads))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Block:
    """Some of the episodes' envs; what a worker holds, and what Envs holds itself at N = 1."""

    def __init__(self, task):
        self.task, self.envs = task, []

    def reset(self, T: int, seeds: list[int]):
        """New envs, each reset with its seed. -> (obs, the envs' action space)."""
        self.close()
        self.envs = [self.task.make_env(T) for _ in seeds]
        obs = np.stack([env.reset(seed=seed)[0] for env, seed in zip(self.envs, seeds)])
        return obs, self.envs[0].action_space

    def step(self, rows: list[int], actions: np.ndarray):
        """rows index this block's envs. -> (obs, rewards, done) of those rows."""
        steps = [self.envs[i].step(a) for i, a in zip(rows, actions)]
        obs = np.stack([s[0] for s in steps])
        rewards = np.array([s[1] for s in steps], dtype=np.float64)
        done = np.array([s[2] or s[3] for s in steps])
        return obs, rewards, done

    def close(self):
        for env in self.envs:
            env.close()
        self.envs = []


def serve(conn, task):
    """A worker: holds a Block and runs what the parent sends, until ("close", None) or the parent
    is gone. Ctrl-C and SIGTERM are the parent's to handle (it finishes its step and checkpoints);
    a worker killed by them would take the evaluation down with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    block = Block(task)
    while True:
        try:
            command, args = conn.recv()
        except EOFError:                        # the parent died without closing us
            return
        if command == "close":
            block.close()
            conn.close()
            return
        try:
            conn.send(("ok", getattr(block, command)(*args)))
        except Exception:                       # the parent raises it, with this traceback
            conn.send(("error", traceback.format_exc()))


class WorkerError(RuntimeError):
    pass


class Envs:
    """N episodes' envs over `workers` processes (1: in this process, no pipes)."""

    def __init__(self, task, workers: int = 1):
        self.task, self.workers = task, workers
        self.local = Block(task) if workers == 1 else None
        self.conns, self.procs, self.blocks = [], [], []
        if workers > 1:
            # spawn, not fork: the parent holds torch's thread pools and maybe a CUDA context.
            ctx = mp.get_context("spawn")
            for _ in range(workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=serve, args=(child, task), daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)

    def reset(self, T: int, seeds: list[int]) -> np.ndarray:                # -> (N, *obs)
        """Episode i gets a new env reset with seeds[i]; also sets self.action_space."""
        if self.local:
            obs, self.action_space = self.local.reset(T, seeds)
            return obs
        # Contiguous blocks, as equal as can be: worker w holds episodes bounds[w]:bounds[w + 1].
        self.bounds = np.linspace(0, len(seeds), self.workers + 1).astype(int)
        parts = [seeds[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        obs, spaces = zip(*self.ask([("reset", (T, p)) if p else None for p in parts]))
        self.action_space = spaces[0]
        return np.concatenate(obs)

    def step(self, rows: np.ndarray, actions: np.ndarray):
        """rows: the live episodes, ascending; actions: one per row. -> (obs, rewards, done)."""
        if self.local:
            return self.local.step(rows, actions)
        which = np.searchsorted(self.bounds, rows, side="right") - 1   # each row's worker
        jobs = [("step", (rows[which == w] - self.bounds[w], actions[which == w]))
                if (which == w).any() else None for w in range(self.workers)]
        obs, rewards, done = zip(*self.ask(jobs))
        return np.concatenate(obs), np.concatenate(rewards), np.concatenate(done)

    def ask(self, jobs) -> list:
        """Send each worker its job (None: nothing for it), then collect the answers in order."""
        try:
            for conn, job in zip(self.conns, jobs):
                if job is not None:
                    conn.send(job)
            replies = [conn.recv() for conn, job in zip(self.conns, jobs) if job is not None]
        except (EOFError, OSError) as e:        # a worker that died, e.g. one that failed to start
            raise WorkerError(f"an evaluation worker died ({e!r}); its error, if it printed one, "
                              f"is above (a script that starts lamo's evaluation needs the "
                              f"`if __name__ == '__main__':` guard)") from None
        answers = []
        for status, value in replies:
            if status == "error":
                raise WorkerError(f"an evaluation worker failed:\n{value}")
            answers.append(value)
        return answers

    def close(self):
        if self.local:
            self.local.close()
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except OSError:                     # it died already
                pass
        for proc in self.procs:
            proc.join(timeout=10)
        self.conns, self.procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
