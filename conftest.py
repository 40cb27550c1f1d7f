"""Fixtures shared by the test files: all offline and CPU-sized. Downloads are exercised against a
loopback HTTP server started here, on small files the tests make in the real formats."""
import http.server
import json
import threading

import numpy as np
import pytest
import torch

import data

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)   # a tiny GPT-2


# ----------------------------------------------------------------------------- a run's metrics
def read_metrics(folder) -> list[dict]:
    """A run folder's metrics.jsonl, a dict a row."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def action_losses(folder) -> list[float]:
    """A run's logged action losses, in order."""
    return [m["action_loss"] for m in read_metrics(folder) if "action_loss" in m]


def timeless_metrics(folder) -> list[dict]:
    """A run folder's metrics rows without their wall-clock figures, which no two runs share."""
    return [{k: v for k, v in r.items() if k not in ("steps_per_s", "eval_s")}
            for r in read_metrics(folder)]


# ----------------------------------------------------------------------------- evaluation reference
class RecordActions:
    """Wraps a task's env factory: every env it makes appends the actions it is stepped with."""

    def __init__(self, task):
        self.task, self.actions = task, []

    def __call__(self, task, max_steps):
        import gymnasium as gym
        taken = []
        self.actions.append(taken)

        class Recorder(gym.Wrapper):
            def step(self, action):
                taken.append(np.array(action).copy())
                return self.env.step(action)
        return Recorder(self.task.env(self.task, max_steps))


def adamw_side_by_side(device, lrs, wds, shapes, steps: int, **torch_kw):
    """pack.RunAdamW over stacks (R, *shape) with an lr and a weight decay per run, and one torch
    AdamW per run (torch_kw: fused=True, as a run alone on a GPU), stepped on the same gradients
    of 1e-2 to 1e2, the last shape's tensor without a gradient.
    -> (start, stacks, RunAdamW, each run's tensors, each run's AdamW)."""
    import pack
    R = len(lrs)
    torch.manual_seed(0)
    start = [torch.randn(R, *s, device=device) for s in shapes]
    stacks = [torch.nn.Parameter(x.clone()) for x in start]
    packed = pack.RunAdamW(stacks, lr=lrs, weight_decay=wds, eps=1e-6)
    alone = [[torch.nn.Parameter(x[r].clone()) for x in start] for r in range(R)]
    torchs = [torch.optim.AdamW(ps, lr=lr, weight_decay=wd, eps=1e-6, **torch_kw)
              for ps, lr, wd in zip(alone, lrs, wds)]
    last = len(shapes) - 1
    for step in range(steps):
        grads = [torch.randn(R, *s, device=device) * 10.0 ** (step % 5 - 2) for s in shapes]
        for i, p in enumerate(stacks):
            p.grad = grads[i].clone() if i != last else None
        packed.step()
        for r, (params, opt) in enumerate(zip(alone, torchs)):
            for i, p in enumerate(params):
                p.grad = grads[i][r].clone() if i != last else None
            opt.step()
    return start, stacks, packed, alone, torchs


def reference_episode(model, task, target, seed, mean, std, K, T, scale):
    """One evaluation episode, a step at a time, the way training windows look: the last min(t+1, K)
    real steps only (no padding, so no mask), states (obs - mean) / std, returns-to-go target minus
    the rewards so far, / scale; the current action slot filled with junk (causality hides it),
    earlier ones with the model's actions. -> the actions stepped with, and the model's output row
    for each step."""
    env = task.make_env(T)
    obs, _ = env.reset(seed=seed)
    states, actions, rtgs, taken, outs = [], [], [], [], []
    rtg = target
    for t in range(T):
        states.append((obs - mean) / std if mean is not None else obs)
        rtgs.append(rtg / scale)
        L = min(t + 1, K)
        junk = 3 if task.discrete else np.full(task.act_dim, 7.0)
        a = np.array((actions[len(actions) - L + 1:] if L > 1 else []) + [junk])
        with torch.no_grad():
            out = model(torch.tensor(np.array(states[-L:]), dtype=torch.float32)[None],
                        torch.tensor(a, dtype=torch.long if task.discrete else torch.float32)[None],
                        torch.tensor(rtgs[-L:], dtype=torch.float32).view(1, L, 1),
                        torch.arange(t - L + 1, t + 1)[None])[0, -1]
        outs.append(out)
        raw = int(out.argmax()) if task.discrete else out.numpy()
        actions.append(raw)           # the window keeps the model's action, the env gets it clipped
        action = raw if task.discrete else np.clip(raw, -1, 1)
        taken.append(np.array(action))
        obs, r, term, trunc, _ = env.step(action)
        rtg -= r
        if term or trunc:
            break
    env.close()
    return taken, outs


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def cpu_only(request, monkeypatch):
    """Every test but those marked `cuda` runs on the CPU, on a GPU machine too: --device auto
    resolves to cpu here and in the processes the tests start. The suite's bit-for-bit claims are
    CPU claims (README, Tests), so it passes the same way on any machine."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Server:
    """A loopback HTTP server over an in-memory {path: bytes}, honouring Range, recording
    requests."""

    def __init__(self):
        # cut_after: drop the connection early; no_length: send no Content-Length
        self.files, self.requests, self.cut_after, self.no_length = {}, [], None, False
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append((self.path, dict(self.headers)))
                body = owner.files.get(self.path)
                if body is None:
                    return self.send_error(404)
                start = (int(self.headers["Range"].split("=")[1].rstrip("-"))
                         if "Range" in self.headers else 0)
                if start >= len(body):              # nothing there: 416, naming the length
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206 if start else 200)
                if not owner.no_length:
                    self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:][:owner.cut_after])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """A random transformers GPT-2, saved as transformers saves it (prefixed names, config.json)."""
    import transformers
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="session")
def tiny_hdf5(tmp_path_factory):
    return data.collect("Hopper-v4", "noisy", 10, tmp_path_factory.mktemp("d") / "tiny.hdf5",
                        seed=0, max_steps=100)


@pytest.fixture(scope="session")
def tiny_txt(tmp_path_factory):
    p = tmp_path_factory.mktemp("txt") / "tiny.txt"
    p.write_text("The hopper learns to hop from offline data, one token at a time.\n" * 300,
                 encoding="utf-8")
    return p
