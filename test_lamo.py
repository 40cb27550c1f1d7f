"""lamo's tests: all offline, CPU, tiny models (shared fixtures in conftest.py). Sections follow the
issues: GPT-2 + LoRA, data, training and evaluation, paper-comparable runs, Kitchen. Atari's data
side is in test_atari.py, sweep.py's in test_sweep.py."""
import copy
import hashlib
import io
import json
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data
import gpt2_loader
import lamo
import tasks
from conftest import TINY, RecordActions, read_metrics, reference_episode, timeless_metrics
from data import LamoError

REPO = Path(__file__).parent


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own GPT-2 encoding, the oracle for ours: its download cache pre-seeded with the
    repository's BPE files (file name = sha1 of the URL it would fetch), so it runs offline."""
    import tiktoken
    d = tmp_path_factory.mktemp("tiktoken")
    for f in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{f}"
        shutil.copy(data.BPE_DIR / f, d / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(d))
    yield tiktoken.get_encoding("gpt2")
    mp.undo()


def hub_file(model, path: Path, drop=(), dtype=torch.float32):
    """Write `model` the way the hub's model.safetensors is laid out: no prefix, causal-mask
    buffers kept."""
    from safetensors.torch import save_file
    sd = {k.removeprefix("transformer."): v.to(dtype).contiguous()
          for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file({k: v for k, v in sd.items() if not k.startswith(drop)}, str(path))
    return path


def logits(m, idx):
    with torch.no_grad():
        out = m(idx)
    return out.logits if hasattr(out, "logits") else out


IDX = torch.randint(0, 50257, (2, 23), generator=torch.Generator().manual_seed(0))


# ========================================================================= GPT-2 and LoRA (issue 2)
def test_logits_match_transformers(hf_tiny, tmp_path):
    hf, folder = hf_tiny
    ours = lamo.GPT2.from_pretrained(str(folder)).eval()
    assert (logits(ours, IDX) - logits(hf, IDX)).abs().max() < 1e-5
    # In float64 the two agree to ~1e-13, so a near miss (exact-erf GELU instead of tanh: 1.6e-5 in
    # float32; a LayerNorm eps of 1e-6) is 8 orders of magnitude away, not a hair over 1e-5.
    hf64, ours64 = copy.deepcopy(hf).double(), copy.deepcopy(ours).double()
    assert (logits(ours64, IDX) - logits(hf64, IDX)).abs().max() < 1e-10
    # The hub's layout: unprefixed names, attn.bias buffers present, config.json beside.
    hub = tmp_path / "hub"
    hub.mkdir()
    hub_file(hf, hub / "model.safetensors")
    shutil.copy(folder / "config.json", hub / "config.json")
    ours = lamo.GPT2.from_pretrained(str(hub / "model.safetensors")).eval()
    assert (logits(ours, IDX) - logits(hf, IDX)).abs().max() < 1e-5


def test_config_inferred_without_config_json(tmp_path):
    import transformers
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{**TINY, "n_embd": 128, "n_head": 2, "n_layer": 3})).eval()
    ours = lamo.GPT2.from_pretrained(str(hub_file(hf, tmp_path / "model.safetensors"))).eval()
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd,
            ours.config.n_positions) == (3, 2, 128, 128)
    assert (logits(ours, IDX) - logits(hf, IDX)).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files(hf_tiny, tmp_path, dtype):
    """A checkpoint stored in bf16 or fp16 loads as those values in float32 (bf16 is 16 bits that
    numpy cannot name: read as uint16, then viewed as bfloat16)."""
    hf, folder = hf_tiny
    (tmp_path / "half").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "half" / "config.json")      # 4 heads
    rounded = copy.deepcopy(hf)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(dtype).float())
    hub_file(hf, tmp_path / "half" / "model.safetensors", dtype=dtype)
    ours = lamo.GPT2.from_pretrained(str(tmp_path / "half")).eval()
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert torch.equal(ours.h[1].mlp.c_fc.weight, rounded.transformer.h[1].mlp.c_fc.weight.t())
    assert (logits(ours, IDX) - logits(rounded, IDX)).abs().max() < 1e-5


def test_download_cache_resume_and_corruption(server, cache, capsys):
    blob = bytes(range(256)) * 4000
    server.files["/gpt2/model.safetensors"] = blob
    url = server.url + "/gpt2/model.safetensors"
    dest = cache / "x" / "model.safetensors"
    kw = dict(local_hint="pass it yourself", size=len(blob),
              sha256=hashlib.sha256(blob).hexdigest())
    assert data.download(url, dest, **kw).read_bytes() == blob
    assert "model.safetensors" in capsys.readouterr().err           # the tqdm progress bar
    n = len(server.requests)
    data.download(url, dest, **kw)
    assert len(server.requests) == n                                 # cached: no request
    # A truncated .part is resumed with a Range request.
    dest.unlink()
    dest.with_name(dest.name + ".part").write_bytes(blob[:1000])
    assert data.download(url, dest, **kw).read_bytes() == blob
    assert server.requests[-1][1].get("Range") == "bytes=1000-"
    # A connection dropped mid-file keeps the .part and says how to go on; the next call resumes it.
    dest.unlink()
    server.cut_after = 300_000
    with pytest.raises(LamoError, match=r"after (\d+) bytes.*run again to resume") as e:
        data.download(url, dest, **kw)
    kept = int(re.search(r"after (\d+) bytes", str(e.value)).group(1))
    assert (not dest.exists() and
            0 < kept == dest.with_name(dest.name + ".part").stat().st_size <= 300_000)
    server.cut_after = None
    assert data.download(url, dest, **kw).read_bytes() == blob
    # A corrupted file (right size, wrong bytes) is refused and leaves nothing under the final name.
    dest.unlink()
    server.files["/gpt2/model.safetensors"] = blob[:-1] + b"\x00"
    with pytest.raises(LamoError, match="sha256.*corrupt"):
        data.download(url, dest, **kw)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    # Without a size or sha256 to check: a .part longer than the file (the server's 416 names the
    # file's length) is removed, a whole .part is taken, and a file sent without its length is
    # taken with a note that it is unchecked.
    server.files["/gpt2/model.safetensors"] = blob
    for part, ok in ((blob + b"x", False), (blob, True)):
        dest.unlink(missing_ok=True)
        dest.with_name(dest.name + ".part").write_bytes(part)
        if ok:
            assert data.download(url, dest, local_hint="").read_bytes() == blob
        else:
            with pytest.raises(LamoError, match=f"held {len(blob) + 1} bytes where .* has "
                                                f"{len(blob)}; removed it"):
                data.download(url, dest, local_hint="")
            assert not dest.with_name(dest.name + ".part").exists()
    dest.unlink()
    server.no_length = True
    capsys.readouterr()
    assert data.download(url, dest, local_hint="").read_bytes() == blob
    assert "sent no length" in capsys.readouterr().err
    dest.unlink()
    data.download(url, dest, **kw)                   # a known size and sha256: checked, no note
    assert "sent no length" not in capsys.readouterr().err
    server.no_length = False
    # Offline: the error names the URL and says how to pass the file.
    with pytest.raises(LamoError, match=r"http://127\.0\.0\.1:1/.*pass it yourself"):
        data.download("http://127.0.0.1:1/nothing", cache / "y", local_hint="pass it yourself")


def test_gpt2_loader_downloads_hub_sizes(server, hf_tiny, monkeypatch, cache):
    hf, folder = hf_tiny
    blob = (folder / "model.safetensors").read_bytes()
    server.files["/gpt2/model.safetensors"] = blob
    server.files["/gpt2/config.json"] = (folder / "config.json").read_bytes()
    monkeypatch.setattr(gpt2_loader, "HF_URL", server.url + "/{name}/{file}")
    monkeypatch.setitem(gpt2_loader.KNOWN_FILES, "gpt2",
                        (len(blob), hashlib.sha256(blob).hexdigest()))
    ours = lamo.GPT2.from_pretrained("gpt2").eval()
    assert (cache / "gpt2" / "model.safetensors").exists()
    assert (logits(ours, IDX) - logits(hf, IDX)).abs().max() < 1e-5
    n = len(server.requests)
    lamo.GPT2.from_pretrained("gpt2")
    assert len(server.requests) == n


def test_lora_init_merge_and_trainable(hf_tiny):
    _, folder = hf_tiny
    base = lamo.GPT2.from_pretrained(str(folder)).eval()
    m = lamo.GPT2.from_pretrained(str(folder), lora_rank=4).eval()
    assert torch.equal(logits(m, IDX), logits(base, IDX))           # B = 0: exactly GPT-2 at init
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    w0 = m.h[0].attn.c_attn.weight.detach().clone()
    unmerged = logits(m, IDX)
    assert (unmerged - logits(base, IDX)).abs().max() > 1e-3        # the update does something
    # The adapter by hand, per projection: q|k|v += (alpha / r) B_j A_j x, alpha 32 / r 4 = 8.
    c = m.h[0].attn.c_attn
    x = torch.randn(3, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A, B, W, b = (t.detach().double() for t in (c.lora_A, c.lora_B, c.weight, c.bias))
    by_hand = x @ W.T + b + 8.0 * torch.cat([x @ A[j].T @ B[j].T for j in range(3)], -1)
    with torch.no_grad():
        assert (c(x.float()).double() - by_hand).abs().max() < 1e-5
    # Merged: the weight is W + 8 B_j A_j, and the model is a plain GPT-2 (no adapter) holding the
    # merged weights, so an adapter still running on top of them would count the update twice.
    merged = {i: m.h[i].attn.c_attn.weight.detach() + 8.0 * torch.cat(
        [m.h[i].attn.c_attn.lora_B[j] @ m.h[i].attn.c_attn.lora_A[j] for j in range(3)]).detach()
        for i in range(2)}
    m.merge()
    assert (m.h[0].attn.c_attn.weight - merged[0]).abs().max() < 1e-6
    plain = copy.deepcopy(base)
    with torch.no_grad():
        for i in range(2):
            plain.h[i].attn.c_attn.weight.copy_(merged[i])
    assert (logits(m, IDX) - logits(plain, IDX)).abs().max() < 1e-5
    assert (logits(m, IDX) - unmerged).abs().max() < 1e-5
    m.unmerge()
    assert torch.equal(m.h[0].attn.c_attn.weight, w0)              # restored bit for bit
    assert torch.equal(logits(m, IDX), unmerged)                    # and the adapter runs again
    lamo.mark_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"h.{i}.attn.c_attn.{k}" for i in range(2)
                         for k in ("lora_A", "lora_B", "bias")}


def test_lora_dropout_only_on_the_adapter_input():
    """dropout(x) feeds the LoRA path only: with B = 0 a training-mode forward is the frozen layer's
    exactly; with B != 0 it draws masks (two calls differ), and evaluation is deterministic."""
    torch.manual_seed(0)
    c = lamo.LoRAQKV(16, 4, 8.0, 0.5)
    with torch.no_grad():
        c.weight.normal_(0, 0.2)
        c.bias.normal_(0, 0.2)
    x = torch.randn(2, 7, 16)
    frozen = torch.nn.functional.linear(x, c.weight, c.bias)
    c.train()
    assert torch.equal(c(x), frozen)
    with torch.no_grad():
        c.lora_B.normal_(0, 0.5)
    assert not torch.allclose(c(x), c(x))
    c.eval()
    assert torch.equal(c(x), c(x)) and not torch.allclose(c(x), frozen)


def test_fused_lora_is_one_adapter_over_qkv():
    """--lora-fused, PEFT's LoRA on c_attn (the official Atari code): one pair, A (r, d) shared by
    q, k and v and B (3d, r), so [q | k | v] += (alpha / r) B A x; merged and unmerged agree. It is
    Atari's default, with dropout 0 (the official GPT-2 never leaves eval mode); D4RL tasks keep
    a pair each and dropout 0.1."""
    torch.manual_seed(0)
    c = lamo.LoRAQKV(16, 4, 8.0, 0.0, fused=True).eval()
    assert c.lora_A.shape == (1, 4, 16) and c.lora_B.shape == (1, 48, 4)
    with torch.no_grad():
        for t in (c.weight, c.bias, c.lora_B):
            t.normal_(0, 0.2)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    A, B, W, b = (t.detach().double()[0] if t.dim() == 3 else t.detach().double()
                  for t in (c.lora_A, c.lora_B, c.weight, c.bias))
    by_hand = x @ W.T + b + 2.0 * (x @ A.T) @ B.T                    # alpha 8 / r 4 = 2
    with torch.no_grad():
        unmerged = c(x.float())
        assert (unmerged.double() - by_hand).abs().max() < 1e-5
        c.merge()
        assert (c(x.float()) - unmerged).abs().max() < 1e-5
    with torch.device("meta"):
        m = lamo.GPT2(lamo.GPTConfig(lora_rank=32, lora_fused=True))
    assert lamo.mark_trainable(m, lamo.LORA_TRAINABLE[:1], verbose=False)[0] == 12 * 98_304
    atari, hopper = (lamo.resolve(lamo.Config(env=e)) for e in ("breakout-medium",
                                                                 "hopper-medium-v2"))
    assert (atari.lora_fused, atari.dropout) == (True, 0.0)
    assert (hopper.lora_fused, hopper.dropout) == (False, 0.1)
    assert lamo.resolve(lamo.Config(env="breakout-medium", model="dt")).dropout == 0.0
    with torch.device("meta"):                               # and they reach the model
        model = lamo.build_model(replace(atari, pretrained="none", n_layer=1, n_head=12,
                                         n_embd=768), tasks.get_task("breakout-medium"))
    attn = model.gpt.h[0].attn
    assert attn.c_attn.lora_A.shape == (1, 32, 768) and attn.p == 0 and attn.resid_drop.p == 0


def test_lora_count_gpt2_small():
    with torch.device("meta"):                               # shapes only: no 500 MB of random init
        m = lamo.GPT2(lamo.GPTConfig(lora_rank=16))
    n_train, n_total = lamo.mark_trainable(m)
    assert n_train == 912_384
    assert f"{100 * n_train / n_total:.2f}" == "0.73"


def test_bad_model_files(tmp_path, hf_tiny):
    _, folder = hf_tiny
    good = (folder / "model.safetensors").read_bytes()
    cases = {"unknown model 'gpt3'": "gpt3"}
    (tmp_path / "notes.txt").write_text("hello, I am not a tensor file")
    cases["not a safetensors file"] = tmp_path / "notes.txt"
    (tmp_path / "cut.safetensors").write_bytes(good[:len(good) // 2])
    cases["truncated"] = tmp_path / "cut.safetensors"
    import transformers
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY))
    (tmp_path / "nolayer").mkdir()                    # config.json says 2 layers, the file holds 1
    hub_file(hf, tmp_path / "nolayer" / "model.safetensors", drop=("h.1.",))
    shutil.copy(folder / "config.json", tmp_path / "nolayer" / "config.json")
    cases["missing 12 GPT-2 tensor(s), e.g. h.1.ln_1"] = tmp_path / "nolayer"
    cases["missing 12 GPT-2 tensor(s), e.g. h.0.ln_1"] = hub_file(hf, tmp_path / "gap.safetensors",
                                                                  drop=("h.0.",))
    (tmp_path / "erf").mkdir()                        # a GPT-2-shaped model with another activation
    hub_file(hf, tmp_path / "erf" / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "erf" / "config.json").write_text(json.dumps({**config,
                                                              "activation_function": "gelu"}))
    cases["activation_function 'gelu'; GPT-2 uses the tanh GELU"] = tmp_path / "erf"
    for expect, path in cases.items():
        with pytest.raises(LamoError) as e:
            lamo.GPT2.from_pretrained(str(path))
        msg = str(e.value)
        assert expect in msg and "\n" not in msg and str(path) in msg, msg
    # The CLI prints that one line, without a traceback, before touching any data.
    r = subprocess.run([sys.executable, "lamo.py", "--pretrained", "gpt3"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown model 'gpt3'")


# ============================================================================ data (issue 3)
def write_d4rl(path, n, obs_dim=11, act_dim=3, terminals=(), timeouts=(), **override):
    arrays = {"observations": np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim),
              "actions": np.tile(np.arange(n, dtype=np.float32)[:, None], (1, act_dim)),
              "rewards": np.arange(n, dtype=np.float32),
              "terminals": np.isin(np.arange(n), terminals),
              "timeouts": np.isin(np.arange(n), timeouts), **override}
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return path


def test_split_hdf5_and_pickle(tmp_path, capsys):
    # episodes: 0-2 terminal, 3-6 timeout, 7-8 both flags at once, 9-11 an unterminated tail
    path = write_d4rl(tmp_path / "d.hdf5", 12, terminals=(2, 8), timeouts=(6, 8))
    trajs = data.load_trajectories(path, 11, 3)
    assert [t["rewards"].tolist() for t in trajs] == [[0, 1, 2], [3, 4, 5, 6], [7, 8]]
    assert "dropped an unterminated tail of 3 steps" in capsys.readouterr().out
    assert [t["terminals"].tolist() for t in trajs] == [[False, False, True], [False] * 4,
                                                        [False, True]]
    assert trajs[1]["observations"].shape == (4, 11) and trajs[1]["observations"][0, 0] == 3 * 11
    with open(tmp_path / "d.pkl", "wb") as f:
        pickle.dump([{**t, "next_observations": t["observations"]} for t in trajs], f)
    again = data.load_trajectories(tmp_path / "d.pkl", 11, 3)
    for a, b in zip(trajs, again, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in data.KEYS)


def test_refuse_inconsistent_files(tmp_path):
    bad_len = write_d4rl(tmp_path / "a.hdf5", 6, terminals=(5,), rewards=np.zeros(5, np.float32))
    with pytest.raises(LamoError, match="'rewards' has 5 rows"):
        data.load_trajectories(bad_len, 11, 3)
    bad_dim = write_d4rl(tmp_path / "b.hdf5", 6, obs_dim=17, terminals=(5,))
    with pytest.raises(LamoError, match=r"'observations' has shape \(6, 17\), expected \(N, 11\)"):
        data.load_trajectories(bad_dim, 11, 3)


def test_frac_subsets():
    a, b = data.subset_indices(1000, 0.1, 0), data.subset_indices(1000, 0.1, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, data.subset_indices(1000, 0.1, 1))
    # floor(frac * n), at least 1, worked by hand: 218.6 -> 218, 5.955 -> 5, 0.07 -> 1,
    # 0.29 * 100 -> 29 (float gives 28.999999999999996), 0.3 * 10 -> 3 (float: 3.0000000000000004).
    for (n, f), k in {(2186, 0.1): 218, (1000, 0.3): 300, (10, 0.3): 3, (1191, 0.005): 5,
                      (7, 0.01): 1, (5, 1.0): 5, (100, 0.29): 29, (3, 0.5): 1}.items():
        idx = data.subset_indices(n, f, 0)
        assert len(idx) == k == len(set(idx.tolist())), (n, f)
        assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n
    # Uniform over trajectories (the MuJoCo/Kitchen rule), whatever their lengths.
    lengths = [1] * 50 + [1000] * 50
    trajs = [{"rewards": np.zeros(n)} for n in lengths]
    counts = np.zeros(100)
    for seed in range(200):
        counts[HOPPER.subset(trajs, 0.1, seed)] += 1
    assert 0.7 < counts[50:].sum() / counts[:50].sum() < 1.4
    for f in (0, -0.1, 1.5):
        with pytest.raises(LamoError, match=f"--frac must be in \\(0, 1\\], got {f}"):
            data.subset_indices(10, f, 0)


def reference_batch(trajs, pairs, K, max_ep_len, scale, mean, std):
    """The Decision Transformer's per-sample loop (kzl get_batch), slow and obvious."""
    out = [[] for _ in range(5)]
    for i, si in pairs:
        t = trajs[i]
        s = (t["observations"][si:si + K] - mean) / std
        a = t["actions"][si:si + K]
        n = len(s)
        rtg = np.array([t["rewards"][j:].sum() for j in range(si, si + n)]) / scale
        ts = np.minimum(np.arange(si, si + n), max_ep_len - 1)
        pad = K - n
        for o, v in zip(out, (np.concatenate([np.zeros((pad, s.shape[1])), s]),
                              np.concatenate([np.full((pad, a.shape[1]), -10.0), a]),
                              np.concatenate([np.zeros(pad), rtg])[:, None],
                              np.concatenate([np.zeros(pad), ts]),
                              np.concatenate([np.zeros(pad), np.ones(n)]))):
            o.append(v)
    return [torch.tensor(np.stack(o), dtype=torch.float32) for o in out]


def test_batches_match_reference(tiny_hdf5):
    trajs = data.load_trajectories(tiny_hdf5)
    b = data.TrajectoryBatcher(trajs, K=20, max_ep_len=50, rtg_scale=1000.0, seed=0)
    last = len(trajs[3]["rewards"]) - 1
    pairs = [(0, 0), (3, last), (3, last - 5), (5, 7), (9, 2)]        # start, padded ends, middle
    got = b.window(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    assert isinstance(got, data.Batch)
    # statistics over every transition (float32)
    obs = np.concatenate([t["observations"] for t in trajs])
    want = reference_batch(trajs, pairs, 20, 50, 1000.0, obs.mean(0), obs.std(0) + 1e-6)
    for g, w, name in zip(got, want, ("states", "actions", "rtg", "timesteps", "mask")):
        assert g.shape == w.shape and torch.allclose(g.float(), w, atol=1e-5), name
    assert got.mask[1].sum() == 1 and got.actions[1, 0, 0] == -10     # one real step, rest padding


def test_skip_best_trajectory_never_draws_the_best(tiny_hdf5, tmp_path):
    """--skip-best-trajectory, the official experiment.py's sampling: the subset's highest-return
    trajectory is never drawn, the others still in proportion to their lengths, and the state
    statistics unchanged; Atari's batcher refuses it."""
    trajs = data.load_trajectories(tiny_hdf5)
    returns = [t["rewards"].sum() for t in trajs]
    best = int(np.argmax(returns))
    for ts in (trajs, [trajs[best]] + trajs[:best] + trajs[best + 1:]):    # and the best first
        b = data.TrajectoryBatcher(ts, K=5, max_ep_len=1000, rtg_scale=1000.0, seed=0,
                                   skip_best=True)
        first = int(np.argmax([t["rewards"].sum() for t in ts]))
        drawn = np.minimum(np.searchsorted(b.cdf, b.rng.random(20_000), side="right"),
                           len(ts) - 1)
        counts = np.bincount(drawn, minlength=len(ts))
        assert counts[first] == 0 and (np.delete(counts, first) > 0).all()
        width = np.diff(np.r_[0, b.cdf])                # each trajectory's probability
        lengths = np.delete(b.lengths, first)
        np.testing.assert_allclose(np.delete(width, first), lengths / lengths.sum())
        all_ = data.TrajectoryBatcher(ts, K=5, max_ep_len=1000, rtg_scale=1000.0, seed=0)
        np.testing.assert_array_equal(b.state_mean, all_.state_mean)
    cfg = lamo.resolve(lamo.Config(model="dt", data=str(tiny_hdf5), skip_best_trajectory=True))
    run = lamo.start_run(cfg, tmp_path / "r", resume=False)             # the flag reaches it
    assert (np.diff(np.r_[0, run.batcher.cdf]) == 0).sum() == 1
    assert "never drawn" in run.batcher.describe()
    with pytest.raises(LamoError, match="--skip-best-trajectory reproduces experiment-d4rl"):
        lamo.resolve(lamo.Config(env="breakout-medium", model="dt", skip_best_trajectory=True))


def test_batcher_normalises_draws_by_length_and_starts_uniformly():
    """Two trajectories of 10 and 90 steps whose first observation is 0 and 1, the second constant:
    states normalised over all 100 transitions (mean 0.9, std 0.3: -3 and 1/3; the constant one 0,
    not NaN); the long one drawn 9 times in 10; starts uniform over every step (0..89)."""
    trajs = [{"observations": np.tile(np.array([[v, 5.0]], np.float32), (n, 1)),
              "actions": np.zeros((n, 1), np.float32), "rewards": np.ones(n, np.float32),
              "terminals": np.zeros(n, bool)} for v, n in ((0.0, 10), (1.0, 90))]
    b = data.TrajectoryBatcher(trajs, K=5, max_ep_len=1000, rtg_scale=1.0, seed=0)
    batch = b.sample(20_000)
    real = batch.mask.bool()
    assert torch.allclose(batch.states[..., 0][real].unique(), torch.tensor([-3.0, 1 / 3]),
                          atol=1e-4)
    assert torch.equal(batch.states[..., 1][real].unique(), torch.zeros(1))
    long = batch.states[:, -1, 0] > 0                     # the last slot is always a real step
    assert abs(long.float().mean().item() - 0.9) < 0.015
    first = (~real).sum(1)                                 # left padding: the first real slot
    start = batch.timesteps[torch.arange(len(first)), first]
    counts = torch.bincount(start[long], minlength=90)
    # every start, about as often
    assert len(counts) == 90 and counts.min() > 0.5 * counts.float().mean()
    # rtg by hand
    assert torch.equal(batch.rtg[:, -1, 0][long], 90.0 - batch.timesteps[:, -1][long].float())


def test_downloads_d4rl_and_corpus(server, tmp_path, monkeypatch, cache):
    blob = write_d4rl(tmp_path / "src.hdf5", 8, terminals=(3, 7)).read_bytes()
    server.files["/d4rl/hopper_medium_replay-v2.hdf5"] = blob
    task = tasks.get_task("hopper-medium-replay-v2")
    assert task.source == ("http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/"
                           "hopper_medium_replay-v2.hdf5")
    trajs, files = data.load_d4rl(
        replace(task, source=server.url + "/d4rl/hopper_medium_replay-v2.hdf5"))
    assert files == [cache / "d4rl" / "hopper_medium_replay-v2.hdf5"] and len(trajs) == 2
    text = "Valkyria Chronicles III is a tactical role-playing game.\n" * 50
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr(data.WIKITEXT_MEMBER, text)
    server.files["/wikitext.zip"] = zbuf.getvalue()
    monkeypatch.setattr(data, "WIKITEXT_URL", server.url + "/wikitext.zip")
    tokens = data.lm_tokens()
    assert data.gpt2_tokenizer().decode(tokens.tolist()) == text
    # the host refuses that one
    assert "python-requests" not in server.requests[-1][1]["User-Agent"]


def test_tokenizer_roundtrip_and_cache(tiktoken_gpt2, tiny_txt, monkeypatch):
    tok = data.gpt2_tokenizer()                                   # from assets/gpt2-bpe, no network
    para = ("LaMo adapts GPT-2 to offline RL — with LoRA, MLP embeddings, and a language loss "
            "(λ=0.1).")
    assert tok.decode(tok.encode_ordinary(para)) == para
    for text in (para, tiny_txt.read_text(), " = Valkyria = \n \n 1 @,@ 000 \t<|endoftext|>"):
        # tiktoken's own gpt2
        assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    assert (tok.eot_token == tiktoken_gpt2.eot_token == 50256 and
            tok.n_vocab == tiktoken_gpt2.n_vocab)
    assert tok.encode_ordinary("<|endoftext|>") != [50256]           # text, never the special token
    wiki = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles  \n\n"
            "\t x , 1 @,@ 000 \n") * 20
    whole = tok.encode_ordinary(wiki)
    assert np.concatenate(list(data.encode_chunked(tok, wiki, chunk_chars=7))).tolist() == whole
    first = data.lm_tokens(str(tiny_txt))
    assert first.dtype == np.uint16 and tok.decode(first.tolist()) == tiny_txt.read_text()
    monkeypatch.setattr(data, "gpt2_tokenizer",
                        lambda: pytest.fail("tokenised again instead of reusing the cache"))
    assert np.array_equal(data.lm_tokens(str(tiny_txt)), first)
    batch = data.LMBatcher(first, B=2, T=16, seed=0).sample()
    assert batch.shape == (2, 17) and batch.dtype == torch.int64
    # Random blocks of 17 consecutive corpus tokens: each row is the corpus from some offset on.
    corpus = np.asarray(first, dtype=np.int64)
    seen = set()
    for row in data.LMBatcher(first, B=64, T=16, seed=1).sample().numpy():
        at = [i for i in range(len(corpus) - 16) if np.array_equal(corpus[i:i + 17], row)]
        assert at, row
        seen.add(tuple(row))
    assert len(seen) > 5                # the text repeats every ~16 tokens: several distinct blocks


def test_collect_writes_d4rl_layout(tmp_path):
    out = tmp_path / "c.hdf5"
    data.main(["collect", "--env", "Hopper-v4", "--policy", "random", "--episodes", "3",
               "--max-steps", "30", "--out", str(out)])
    with h5py.File(out) as f:
        assert set(f.keys()) >= {"observations", "actions", "rewards", "terminals", "timeouts"}
    trajs = data.load_trajectories(out, 11, 3)
    assert len(trajs) == 3
    assert all(t["observations"].shape[1] == 11 and t["actions"].shape[1] == 3 for t in trajs)
    # Episodes cut by the time limit are marked as timeouts (not terminals), so they split too; the
    # PD controller keeps the hopper up for 25 steps. Each row's next observation is the next row's
    # own.
    data.main(["collect", "--env", "Hopper-v4", "--policy", "noisy", "--episodes", "4",
               "--max-steps", "25", "--out", str(tmp_path / "n.hdf5")])
    with h5py.File(tmp_path / "n.hdf5") as f:
        term, timeout = f["terminals"][()], f["timeouts"][()]
        ends = np.flatnonzero(term | timeout)
        assert len(ends) == 4 and ends[-1] == len(term) - 1 and not (term & timeout).any()
        lengths = np.diff(np.concatenate([[-1], ends]))
        assert timeout.sum() >= 1 and np.all(lengths[timeout[ends]] == 25) and np.all(lengths <= 25)
        inner = np.setdiff1d(np.arange(len(term) - 1), ends)
        assert np.array_equal(f["next_observations"][()][inner], f["observations"][()][inner + 1])
    assert len(data.load_trajectories(tmp_path / "n.hdf5", 11, 3)) == 4


# ================================================================ training and evaluation (issue 4)
HOPPER = tasks.get_task("hopper-medium-v2")


def test_eval_only_rebuilds_a_random_frozen_body(tiny_hdf5, tmp_path, capsys):
    """--pretrained none with LoRA: the frozen random body is not in the checkpoint; --eval-only
    rebuilds it from the run's seed whatever the process's generator holds, and evaluates what the
    run evaluated."""
    out = tmp_path / "r"
    lamo.main(["--pretrained", "none", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
               "--data", str(tiny_hdf5), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
               "--context-len", "5", "--eval-episodes", "2", "--targets", "100",
               "--eval-max-steps", "30", "--out", str(out)])
    torch.manual_seed(123)
    lamo.main(["--eval-only", str(out / "ckpt.pt")])
    assert "identical to the evaluation stored in the checkpoint" in capsys.readouterr().out
    # another body (another torch's initialisation): refused, for --eval-only and --resume
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert len(ckpt["frozen_sums"]) == 15          # wte, wpe, ln_f's two, one block's 11
    torch.save({**ckpt, "frozen_sums": ckpt["frozen_sums"] * 1.01}, out / "ckpt.pt")
    for argv in (["--eval-only", str(out / "ckpt.pt")], ["--resume", str(out), "--steps", "4"]):
        with pytest.raises(SystemExit, match="the frozen weights differ from those the checkpoint"):
            lamo.main(argv)


def test_end_to_end_resume_and_eval_only(tmp_path, tiny_hdf5, hf_tiny, tiny_txt):
    _, folder = hf_tiny
    common = ["--data", str(tiny_hdf5), "--env", "hopper-medium-v2", "--pretrained", str(folder),
              "--eval-every", "10", "--eval-episodes", "2", "--lm-coef", "0.1",
              "--lm-corpus", str(tiny_txt), "--lm-seq-len", "64", "--log-every", "5"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run([sys.executable, "lamo.py", *common, "--steps", "20", "--out", str(a)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = {"config.json", "subset.json", "metrics.jsonl", "ckpt.pt", "summary.json",
                "curve.png"}
    assert expected <= {p.name for p in a.iterdir()}
    assert "headline" in r.stdout and json.loads((a / "summary.json").read_text())["step"] == 20
    evals = [m for m in read_metrics(a) if "eval" in m]
    assert ([m["step"] for m in evals] == [10, 20] and
            set(evals[0]["eval"]) == {"3600", "2600", "2200", "1800"})
    # the LM batch really ran
    assert all(m["lm_loss"] > 5 for m in read_metrics(a) if "lm_loss" in m)
    # D4RL's hopper: random -20.272305, expert 3234.3 (by hand)
    for e in evals[-1]["eval"].values():
        assert e["score_mean"] == pytest.approx(100 * (e["return_mean"] + 20.272305) / 3254.572305,
                                                rel=1e-9)
        assert e["score_std"] == pytest.approx(100 * e["return_std"] / 3254.572305, rel=1e-9)
    # --resume continues at step 20 with exactly what one 40-step run produces.
    lamo.main(["--resume", str(a), "--steps", "40"])
    lamo.main([*common, "--steps", "40", "--out", str(b)])
    assert timeless_metrics(a) == timeless_metrics(b)
    # --eval-only reproduces the checkpoint's last evaluation.
    ckpt = torch.load(b / "ckpt.pt", weights_only=False)
    assert (ckpt["step"] == 40 and
            lamo.main(["--eval-only", str(b / "ckpt.pt")]) == ckpt["last_eval"])
    # A run folder is never overwritten; a resumed run cannot change its recipe.
    for argv, msg in [([*common, "--out", str(a)], "exists and is not empty"),
                      (["--resume", str(a), "--lr", "0.1"], "cannot change --lr")]:
        with pytest.raises(SystemExit, match=msg):
            lamo.main(argv)


def dt_model(seed=0, **kw):
    torch.manual_seed(seed)
    return lamo.build_model(lamo.resolve(lamo.Config(model="dt", **kw)), HOPPER).eval()


def test_batched_eval_equals_sequential():
    m = dt_model()
    with torch.no_grad():
        m.predict_action[0].weight.mul_(0.1)           # small actions: the hopper stands a while
    episodes = [(tgt, 100 + i) for tgt in (3600, 1800) for i in range(8)]
    run = lambda eps: lamo.rollout(m, HOPPER, eps, np.zeros(11), np.ones(11), 20,
                                   torch.device("cpu"))
    batched, lengths = run(episodes)
    one = [run([e])[0][0] for e in episodes]
    assert lengths.min() > 20                          # long enough to pass the K-step padded phase
    assert np.array_equal(batched, np.array(one))      # bit for bit, not approximately


def test_rollout_equals_a_step_by_step_reference():
    """rollout (batched, left-padded and masked K-slot windows) takes the actions that the reference
    loop above takes, episode by episode: padding, mask, normalisation, returns-to-go and timesteps
    as training shows them to the model. K = 5 over 40 steps covers the padded and the rolling
    phase."""
    m = dt_model(3)
    g = np.random.default_rng(0)
    mean, std = g.normal(0, 0.5, 11), g.uniform(0.5, 2.0, 11)
    episodes = [(3600, 7), (1800, 8), (900, 9)]
    rec = RecordActions(HOPPER)
    task = replace(HOPPER, env=rec)
    lamo.rollout(m, task, episodes, mean, std, 5, torch.device("cpu"), max_steps=40)
    for (target, seed), got in zip(episodes, rec.actions, strict=True):
        want, _ = reference_episode(m, HOPPER, target, seed, mean, std, 5, 40,
                                    1000.0)  # scale by hand
        assert len(got) == len(want) > 5
        assert np.allclose(np.array(got), np.array(want), atol=1e-5), (target, seed)


@pytest.mark.parametrize("embed", ["linear", "mlp"])
def test_padding_does_not_change_prediction(embed):
    m = dt_model(embed=embed)
    L, K = 5, 20
    g = torch.Generator().manual_seed(0)
    s, a, r = (torch.randn(1, L, 11, generator=g), torch.randn(1, L, 3, generator=g),
               torch.rand(1, L, 1, generator=g))
    t = torch.arange(100, 100 + L)[None]
    ref = m(s, a, r, t)[:, -1]
    mask = torch.cat([torch.zeros(1, K - L), torch.ones(1, L)], 1)
    outs = []
    for fill in (0.0, 7.0):                            # the pad values must not matter at all
        pad = lambda x: torch.cat([torch.full((1, K - L, x.shape[2]), fill), x], 1)
        outs.append(m(pad(s), pad(a), pad(r),
                      torch.cat([torch.zeros(1, K - L, dtype=torch.long), t], 1), mask)[:, -1])
    assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], ref, atol=1e-6)
    # Fully padded rows stay finite through backward (a -inf mask would make them NaN).
    m.train()
    loss = lamo.action_loss(m(pad(s), pad(a), pad(r), torch.zeros(1, K, dtype=torch.long), mask),
                            pad(a), mask)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_trainable_sets_and_lambda_zero(hf_tiny, tiny_hdf5, monkeypatch, tmp_path):
    _, folder = hf_tiny

    def trainable(**kw):
        m = lamo.build_model(lamo.resolve(lamo.Config(pretrained=str(folder), lm_seq_len=64, **kw)),
                             HOPPER)
        return ({n for n, p in m.named_parameters() if p.requires_grad},
                {n for n, _ in m.named_parameters()})

    lora, names = trainable(finetune="lora")
    heads = {n for n in names if n.startswith(("embed_", "predict_"))}
    assert {n.split(".")[0] for n in heads} == {"embed_timestep", "embed_return", "embed_state",
                                                "embed_action", "embed_ln", "predict_action"}
    assert lora == heads | {f"gpt.h.{i}.attn.c_attn.{k}" for i in range(2)
                            for k in ("lora_A", "lora_B", "bias")}
    full, names = trainable(finetune="full")
    assert full == names and not any("lora_" in n for n in names)
    assert trainable(finetune="frozen")[0] == heads
    # lambda = 0: the corpus is never read and no LM forward runs.
    monkeypatch.setattr(lamo, "lm_tokens",
                        lambda *a: pytest.fail("read the corpus with lambda = 0"))
    monkeypatch.setattr(lamo, "lm_loss", lambda *a: pytest.fail("ran the LM batch with lambda = 0"))
    lamo.main(["--data", str(tiny_hdf5), "--pretrained", str(folder), "--lm-coef", "0",
               "--steps", "3", "--eval-every", "3", "--eval-episodes", "1", "--targets", "100",
               "--out", str(tmp_path / "r")])
    # a flag that would do nothing
    with pytest.raises(SystemExit, match="--lm-corpus has no effect"):
        lamo.main(["--data", str(tiny_hdf5), "--lm-coef", "0", "--lm-corpus", "x.txt"])


@pytest.mark.parametrize("argv, message", [
    (["--env", "hopper-medium-v2", "--warmup-tokens", "1e6"],
     "--warmup-tokens counts action tokens, which only a discrete-action task"),
    (["--env", "kitchen-partial-v2", "--finetune", "frozen", "--lm-coef", "0.1"],
     "--lm-coef 0.1 has no effect with --finetune frozen"),
    (["--grad-clip", "-1"], "--grad-clip must be > 0, got -1"),
    (["--grad-clip", "0"], "--grad-clip must be > 0, got 0"),
    (["--frac", "1.5"], r"--frac must be in \(0, 1\], got 1.5"),
    (["--eval-max-steps", "0"], "--eval-max-steps must be >= 1, got 0"),
    (["--eval-workers", "-1"], "--eval-workers must be >= 0"),
    (["--wandb-group", "g"], "--wandb-group has no effect without --wandb"),
    (["--model", "dt", "--pretrained", "gpt2"],
     "--model dt is a model of its own shape, trained from scratch: it takes no --pretrained"),
    (["--targets", "3600,1800,3600"], "3600 is there twice; for more episodes per target"),
])
def test_flags_that_would_do_harm_or_nothing(argv, message):
    """Each a one-line error before anything loads: a flag that would train at lr 0, run an LM
    batch that trains nothing, flip or zero the gradients, or drop a group of episodes."""
    with pytest.raises(LamoError, match=message):
        cfg, given = lamo.parse_args(argv)
        lamo.pack_runs(lamo.resolve(cfg, given), given)            # what main does first


def test_defaults_that_do_not_apply_and_abbreviations():
    """Kitchen's default lambda 0.1 with a frozen body (nothing on the language path trains) is
    0; an abbreviated flag is an error, not another flag (--se is not --seed)."""
    cfg, given = lamo.parse_args(["--env", "kitchen-partial-v2", "--finetune", "frozen"])
    assert lamo.resolve(cfg, given).lm_coef == 0
    cfg, given = lamo.parse_args(["--env", "kitchen-partial-v2", "--finetune", "lora"])
    assert lamo.resolve(cfg, given).lm_coef == 0.1
    with pytest.raises(SystemExit):
        lamo.parse_args(["--se", "5"])


def test_a_pack_that_fails_to_start_leaves_no_folder(tiny_hdf5, tmp_path, monkeypatch):
    """A run of a pack that fails while loading takes the new folders of the runs started before
    it away, so the corrected command finds none in its way."""
    real_start = lamo.start_run

    def second_fails(cfg, folder, resume):
        if cfg.seed == 1:
            raise LamoError("cannot load")
        return real_start(cfg, folder, resume)
    monkeypatch.setattr(lamo, "start_run", second_fails)
    argv = ["--model", "dt", "--n-layer", "1", "--data", str(tiny_hdf5), "--seed", "0", "1",
            "--out", str(tmp_path / "pk")]
    with pytest.raises(SystemExit, match="cannot load"):
        lamo.main(argv)
    assert not (tmp_path / "pk" / "s0").exists()


def test_lm_batches_reach_the_corpus_end_and_its_tokens_are_made_once(tmp_path, monkeypatch):
    """Every whole block's start is drawn, the last too (its last token a target), and a corpus of
    exactly one block is enough. A process that waits for another's tokenising does not tokenise
    again (data.lm_tokens: locked, as a download is)."""
    starts = data.LMBatcher(np.arange(10), 500, 8, seed=0).sample()[:, 0]
    assert set(starts.tolist()) == {0, 1}
    assert data.LMBatcher(np.arange(9), 1, 8, seed=0).sample()[0].tolist() == list(range(9))
    monkeypatch.setenv("LAMO_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world")
    out = []
    monkeypatch.setattr(data, "tokenise", lambda c, dest: out.append(dest) or
                        np.array([1, 2], np.uint16).tofile(dest))
    data.lm_tokens(str(corpus))                     # tokenised: where it goes and its lock
    dest = out[0]
    dest.unlink()
    import fcntl
    import threading
    lock = open(dest.with_name(dest.name + ".lock"), "a")
    fcntl.flock(lock, fcntl.LOCK_EX)                # another process, tokenising ...

    def finish():                                  # ... writes the tokens and lets go
        np.array([3, 4], np.uint16).tofile(dest)
        fcntl.flock(lock, fcntl.LOCK_UN)
    threading.Timer(0.5, finish).start()
    assert data.lm_tokens(str(corpus)).tolist() == [3, 4] and len(out) == 1
    lock.close()


def test_lm_loss_is_transformers_loss(hf_tiny):
    """The language loss is GPT-2's next-token cross-entropy: transformers' own loss with labels =
    the block (it shifts them itself), with position embeddings."""
    hf, folder = hf_tiny
    ours = lamo.GPT2.from_pretrained(str(folder)).eval()
    block = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(block, labels=block).loss
        assert abs(lamo.lm_loss(ours, block).item() - want.item()) < 1e-5


def tiny_run(tmp_path, name, *flags, data_path):
    """A 1-layer, d=32 DT-preset run on `data_path`, evaluated once on a 10-step episode."""
    out = tmp_path / name
    lamo.main(["--model", "dt", "--n-layer", "1", "--n-embd", "32", "--dropout", "0",
               "--data", str(data_path), "--eval-episodes", "1", "--eval-max-steps", "10",
               "--targets", "100", "--out", str(out), *flags])
    return out


def test_logged_losses_are_averages_and_lr_warms_up(tiny_hdf5, tmp_path):
    """--log-every 2 logs the mean of the two steps' losses (the last, partial window its own); the
    lr of step i (from 1) under --warmup 4 is lr * min(1, i / 4): 2.5e-4, 5e-4, 7.5e-4, 1e-3,
    1e-3."""
    flags = ["--steps", "5", "--eval-every", "5", "--warmup", "4", "--lr", "1e-3"]
    one = [m for m in read_metrics(tiny_run(tmp_path, "one", *flags, "--log-every", "1",
                                            data_path=tiny_hdf5))
           if "action_loss" in m]
    two = [m for m in read_metrics(tiny_run(tmp_path, "two", *flags, "--log-every", "2",
                                            data_path=tiny_hdf5))
           if "action_loss" in m]
    assert np.allclose([m["lr"] for m in one], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-12,
                       atol=0)
    assert [m["step"] for m in two] == [2, 4, 5]
    for key in ("action_loss", "grad_norm"):
        v = [m[key] for m in one]
        assert np.allclose([m[key] for m in two], [(v[0] + v[1]) / 2, (v[2] + v[3]) / 2, v[4]],
                           rtol=1e-6), key
    assert len({m["action_loss"] for m in one}) == 5


def test_grad_clip_bounds_the_update(tiny_hdf5, tmp_path):
    """Clipping the gradient to a global norm of 1e-12 leaves AdamW (eps 1e-8) almost nothing to
    step with: the weights stay where lr 0 leaves them, while the default clip moves them."""
    flags = ["--steps", "3", "--eval-every", "3", "--log-every", "1", "--weight-decay", "0",
             "--warmup", "1", "--lr", "1e-3"]
    runs = {name: torch.load(tiny_run(tmp_path, name, *flags, *extra,
                                      data_path=tiny_hdf5) / "ckpt.pt",
                             weights_only=False)["trainable"]
            for name, extra in (("still", ["--lr", "0"]), ("clipped", ["--grad-clip", "1e-12"]),
                                ("free", []))}
    diff = lambda a, b: max((runs[a][k] - runs[b][k]).abs().max().item() for k in runs[a])
    assert diff("clipped", "still") < 1e-6 and diff("free", "still") > 1e-4


def test_lm_coef_weights_the_language_gradient(hf_tiny, tiny_hdf5, tiny_txt, tmp_path):
    """The step-1 gradient is g_action + lambda * g_LM (both the same for every lambda: same seed,
    same batches), so its squared norm is quadratic in lambda: its third difference over lambda =
    1, 2, 3, 4 vanishes, and lambda changes it."""
    norms = []
    for lam in (1, 2, 3, 4):
        out = tmp_path / f"lm{lam}"
        lamo.main(["--data", str(tiny_hdf5), "--pretrained", str(hf_tiny[1]), "--lm-coef", str(lam),
                   "--dropout", "0", "--lm-corpus", str(tiny_txt), "--lm-seq-len", "16",
                   "--steps", "1", "--eval-every", "1", "--eval-episodes", "1",
                   "--eval-max-steps", "5", "--targets", "100", "--out", str(out)])
        norms.append(read_metrics(out)[0]["grad_norm"] ** 2)
    n1, n2, n3, n4 = norms
    assert abs(n2 - n1) > 1e-3 * n1
    assert abs(n4 - 3 * n3 + 3 * n2 - n1) < 1e-4 * n4


# raised inside torch's compiler
@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")
def test_compile_flag_compiles_and_matches_eager(tiny_hdf5, tmp_path):
    """--compile really compiles (dynamo captures a graph) and, without dropout, gives eager's
    losses."""
    # private, but the plainest proof that a graph was built
    from torch._dynamo.utils import counters
    base = ["--model", "dt", "--n-layer", "1", "--n-embd", "32", "--dropout", "0",
            "--data", str(tiny_hdf5), "--steps", "4", "--log-every", "2", "--eval-every", "4",
            "--eval-episodes", "1", "--targets", "100"]
    torch._dynamo.reset()
    counters.clear()
    lamo.main([*base, "--compile", "--out", str(tmp_path / "c")])
    assert counters["stats"]["unique_graphs"] >= 1
    lamo.main([*base, "--out", str(tmp_path / "e")])
    losses = [[m["action_loss"] for m in read_metrics(tmp_path / r) if "action_loss" in m]
              for r in "ce"]
    assert len(losses[0]) == 2 and np.allclose(losses[0], losses[1], rtol=1e-5, atol=0)


def test_compile_mode_reaches_torch_compile_and_needs_compile(tiny_hdf5, tmp_path, monkeypatch):
    """--compile-mode is torch.compile's mode, for a run and for a pack (reduce-overhead: CUDA
    graphs on a GPU); without --compile it is a one-line error, not a flag that does nothing."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    base = ["--model", "dt", "--n-layer", "1", "--n-embd", "32", "--data", str(tiny_hdf5),
            "--steps", "2", "--eval-every", "2", "--eval-episodes", "1", "--targets", "100"]
    lamo.main([*base, "--compile", "--compile-mode", "reduce-overhead",
               "--out", str(tmp_path / "r")])
    lamo.main([*base, "--compile", "--compile-mode", "max-autotune", "--seed", "0", "1",
               "--out", str(tmp_path / "p")])
    assert modes == ["reduce-overhead", "max-autotune"]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["compile_mode"] == \
        "reduce-overhead"
    with pytest.raises(SystemExit, match="--compile-mode reduce-overhead has no effect without"):
        lamo.main([*base, "--compile-mode", "reduce-overhead", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--compile-mode 'fast': choose one of default"):
        lamo.main([*base, "--compile", "--compile-mode", "fast", "--out", str(tmp_path / "y")])


def test_nan_stops_and_ctrl_c_saves(tiny_hdf5, monkeypatch, tmp_path):
    import os
    import signal
    real, calls = lamo.action_loss, []

    def loss_with(event_at, event):
        def f(*a):
            calls.append(1)
            out = real(*a)
            if len(calls) == event_at:
                return event(out)
            return out
        return f

    base = ["--model", "dt", "--n-layer", "1", "--batch-size", "16", "--data", str(tiny_hdf5),
            "--steps", "40", "--eval-every", "20", "--log-every", "5", "--eval-episodes", "1",
            "--targets", "100", "--eval-max-steps", "100"]
    monkeypatch.setattr(lamo, "action_loss", loss_with(23, lambda out: out * float("nan")))
    with pytest.raises(SystemExit, match="NaN/inf.*is intact"):
        lamo.main([*base, "--out", str(tmp_path / "nan")])
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=False)["step"] == 20
    assert json.loads((tmp_path / "nan" / "stopped.json").read_text()) == {
        "stopped_before_step": 25}
    # A finite loss with an inf gradient (NaN weights after the clip) at step 20, an evaluation
    # step: caught before it checkpoints.
    calls.clear()
    def inf_gradient(out):
        out.register_hook(lambda grad: grad * float("inf"))
        return out
    monkeypatch.setattr(lamo, "action_loss", loss_with(20, inf_gradient))
    with pytest.raises(SystemExit, match="before step 20; stopped. It saved no checkpoint"):
        lamo.main([*base, "--out", str(tmp_path / "inf")])
    calls.clear()
    monkeypatch.setattr(lamo, "action_loss",
                        loss_with(7, lambda out: os.kill(os.getpid(), signal.SIGINT) or out))
    with pytest.raises(SystemExit) as e:
        lamo.main([*base, "--out", str(tmp_path / "int")])
    assert e.value.code == 130
    assert torch.load(tmp_path / "int" / "ckpt.pt", weights_only=False)["step"] == 7
    monkeypatch.setattr(lamo, "action_loss", real)
    with pytest.raises(SystemExit, match="at step 7 without an evaluation yet; give --steps above"):
        lamo.main(["--resume", str(tmp_path / "int"), "--steps", "7"])
    lamo.main(["--resume", str(tmp_path / "int")])
    assert json.loads((tmp_path / "int" / "summary.json").read_text())["step"] == 40
    lamo.main(["--resume", str(tmp_path / "nan")])          # retried: no longer marked stopped
    assert (tmp_path / "nan" / "summary.json").exists()
    assert not (tmp_path / "nan" / "stopped.json").exists()
    # ... with the rows of an uninterrupted run, the one at step 10 (steps 6-10) included
    lamo.main([*base, "--out", str(tmp_path / "whole")])
    assert timeless_metrics(tmp_path / "int") == timeless_metrics(tmp_path / "whole")


def test_resume_of_a_pack_folder_leaves_out_its_stopped_runs(tmp_path, capsys):
    """--resume PACK_DIR: the runs not finished, less one that went NaN/inf (stopped.json), which
    is at an older step than its pack-mates and is named with the command that retries it; with
    a new --steps, the finished runs too."""
    for name, files in {"a": ["ckpt.pt"], "b": ["ckpt.pt", "stopped.json"],
                        "c": ["ckpt.pt", "summary.json"]}.items():
        (tmp_path / name).mkdir()
        for f in ["config.json", *files]:
            (tmp_path / name / f).write_text("{}")
    assert lamo.pack_members([tmp_path], extend=False) == [tmp_path / "a"]
    assert f"left out {tmp_path / 'b'}: it went NaN/inf" in capsys.readouterr().out
    assert lamo.pack_members([tmp_path], extend=True) == [tmp_path / "a", tmp_path / "c"]
    assert lamo.pack_members([tmp_path / "b"], extend=False) == [tmp_path / "b"]   # named: retried


def test_resume_cuts_what_came_after_its_checkpoint(tiny_hdf5, tmp_path, monkeypatch, capsys):
    """--resume: metrics.jsonl loses the rows written after the checkpoint (a run killed between
    checkpoints) and the run's history is the checkpoint's evaluations; a dataset whose files,
    statistics or --frac subset changed is refused; --eval-only takes its allowed overrides
    (--targets). A NaN between a logging step and an evaluation stops the run before it
    checkpoints."""
    out = tmp_path / "r"
    base = ["--model", "dt", "--n-layer", "1", "--data", str(tiny_hdf5), "--steps", "4",
            "--eval-every", "2", "--eval-episodes", "1", "--targets", "100",
            "--eval-max-steps", "20"]
    lamo.main([*base, "--log-every", "1", "--out", str(out)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "action_loss": 1.0}) + "\n")
    saved = (out / "config.json").read_text()     # as saved before lora_fused etc. existed:
    (out / "config.json").write_text(json.dumps({k: v for k, v in json.loads(saved).items()
                                                 if k not in lamo.SAVED_BEFORE}))
    cfg, _ = lamo.load_saved_config({"resume": str(out)})      # they trained as their defaults
    assert all(getattr(cfg, k) is v for k, v in lamo.SAVED_BEFORE.items())
    (out / "config.json").write_text(saved)
    run = lamo.start_run(*lamo.load_saved_config({"resume": str(out)}), resume=True)
    assert [h["step"] for h in run.history] == [2, 4]
    assert [m["step"] for m in read_metrics(out)][-1] == 4
    assert list(lamo.main(["--eval-only", str(out / "ckpt.pt"), "--targets", "50,20"])) == [
        "50", "20"]
    # a bad override is refused before it reaches config.json
    with pytest.raises(SystemExit, match="--eval-every must be >= 1, got 0"):
        lamo.main(["--resume", str(out), "--steps", "6", "--eval-every", "0"])
    assert json.loads((out / "config.json").read_text())["eval_every"] == 2
    # a line torn by a kill mid-write: the last is dropped, one before it refused
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "action_lo')
    lamo.start_run(*lamo.load_saved_config({"resume": str(out)}), resume=True)
    assert "its last line was cut short (killed mid-write); dropped" in capsys.readouterr().out
    (out / "metrics.jsonl").write_text('{"step": 1, "act\n' + (out / "metrics.jsonl").read_text())
    with pytest.raises(SystemExit, match="metrics.jsonl: line 1 is not JSON"):
        lamo.main(["--resume", str(out), "--steps", "6"])
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().split("\n", 1)[1])
    # --eval-only compares only with an evaluation of the same weights
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    torch.save({**ckpt, "last_eval_step": 2}, tmp_path / "later.pt")
    lamo.main(["--eval-only", str(tmp_path / "later.pt")])
    assert "last evaluation ran at step 2, before these weights" in capsys.readouterr().out
    # other data than the checkpoint's: other files, or other statistics
    for changed in ({"data_sha256": ["0" * 64]}, {"state_mean": ckpt["state_mean"] + 1}):
        torch.save({**ckpt, **changed}, out / "ckpt.pt")
        with pytest.raises(SystemExit, match="the dataset changed since .* sha256"):
            lamo.main(["--resume", str(out), "--steps", "6"])
    torch.save(ckpt, out / "ckpt.pt")
    subset = json.loads((out / "subset.json").read_text())
    (out / "subset.json").write_text(json.dumps({**subset, "indices": subset["indices"][:-1]}))
    with pytest.raises(SystemExit, match="its --frac subset differs"):
        lamo.main(["--resume", str(out), "--steps", "6"])
    real = lamo.action_loss
    monkeypatch.setattr(lamo, "action_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(SystemExit, match="It saved no checkpoint before that"):
        lamo.main([*base, "--log-every", "50", "--out", str(tmp_path / "nan")])
    assert not (tmp_path / "nan" / "ckpt.pt").exists()


def collect_with_gains(path, episodes, max_steps, seed):
    """A D4RL-layout hdf5 of Hopper-v4 episodes, each driven by k x (the PD controller of data.py's
    collector) + 10% uniform noise, k drawn per episode in [-1, 1]: k near 1 stands (return ~300 in
    300 steps), k below 0 pushes the joints the wrong way and falls (~10-30). -> episode returns."""
    env = data.make_env("Hopper-v4", max_steps)
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        gain, done, ret = rng.uniform(-1, 1), False, 0.0
        while not done:
            a = (gain * data.noisy_controller(obs, 3, 0.0, rng) +
                 0.1 * rng.uniform(-1, 1, 3)).astype(np.float32)
            nxt, r, term, trunc, _ = env.step(a)
            for k, v in zip(cols, (obs, a, r, term, trunc and not term)):
                cols[k].append(v)
            obs, done, ret = nxt, term or trunc, ret + r
        returns.append(ret)
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            f[k] = np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32)
    return np.array(returns)


def test_dt_learns_to_condition_on_return(tmp_path, capsys):
    """Trained on episodes whose return is set by a per-episode gain on a PD controller (returns ~5
    to ~325, mean 141), the DT preset must act on the return it is asked for: a high target stands,
    a low one falls, and the high one beats the data's mean. The gain, not the noise, sets the
    return, so the two targets ask for different deterministic behaviours (with data.py's noisy
    collector, whose low returns come from noise whose mean is still a standing controller, the
    outcome hung on float rounding: it failed with 1 thread and passed with 2)."""
    returns = collect_with_gains(tmp_path / "gains.hdf5", 60, 300, seed=1)
    lamo.main(["--model", "dt", "--data", str(tmp_path / "gains.hdf5"), "--steps", "1200",
               "--eval-every", "1200", "--warmup", "50", "--lr", "1e-3", "--batch-size", "64",
               "--context-len", "5", "--eval-episodes", "4",
               "--targets", "1000,30", "--out", str(tmp_path / "run")])
    ev = [m for m in read_metrics(tmp_path / "run") if "eval" in m][-1]["eval"]
    high, low = ev["1000"]["return_mean"], ev["30"]["return_mean"]
    print(f"dataset mean {returns.mean():.1f}, target 1000 -> {high:.1f}, target 30 -> {low:.1f}")
    assert high > 3 * low and high > 1.5 * returns.mean()


# ================================================================== paper-comparable runs (issue 9)
# action_loss of the first 6 steps of a tiny run (hf_tiny, tiny_hdf5, lambda 0), as the code before
# the task table gave them (commit 2b9cacf) on one machine. Compared within 1e-6 relative, not bit
# for bit: another CPU's kernels round differently (an AVX-512 host: 1.9e-7 relative on the first
# loss, the largest seen), while one-line changes to the MuJoCo path move them by 1.8e-6 (embed_ln
# or ln_f eps 1e-5 -> 1e-6) to 3e-2 (timestep + 1); TEST-NOTES lists them. Changes below float32's
# resolution here (the GPT-2 blocks' eps) are caught in float64 by the parity and token tests
# instead.
PIN_RTOL = 1e-6
PINNED = {"linear": [0.32108521461486816, 0.31066858768463135, 0.32103079557418823,
                     0.32055598497390747, 0.2982567250728607, 0.320565402507782],
          "mlp": [0.12472877651453018, 0.1218414157629013, 0.12182515114545822, 0.12720726430416107,
                  0.10901036113500595, 0.1232314258813858]}


@pytest.mark.parametrize("embed", ["linear", "mlp"])
def test_mujoco_losses_pinned(embed, hf_tiny, tiny_hdf5, tmp_path):
    _, folder = hf_tiny
    lamo.main(["--data", str(tiny_hdf5), "--pretrained", str(folder), "--lm-coef", "0",
               "--embed", embed, "--steps", "6", "--log-every", "1", "--eval-every", "6",
               "--eval-episodes", "1", "--targets", "100", "--out", str(tmp_path / "r")])
    losses = [m["action_loss"] for m in read_metrics(tmp_path / "r") if "action_loss" in m]
    assert len(losses) == len(PINNED[embed])
    rel = np.abs(np.array(losses) / np.array(PINNED[embed]) - 1)
    assert rel.max() < PIN_RTOL, f"relative differences to the pinned losses: {rel.tolist()}"


def test_learning_rate_schedules_by_hand():
    """Steps: linear warm-up then constant. Tokens (official Atari): linear warm-up to lr, then
    0.5 (1 + cos(pi p)) with p the progress from warmup_tokens to final_tokens, never below 10%."""
    steps = lamo.Config(lr=1e-3, warmup=4, warmup_tokens=0.0)
    assert [lamo.learning_rate(steps, i, 0) for i in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    tok = lamo.Config(lr=1e-3, warmup=1, warmup_tokens=100.0, final_tokens=1100.0)
    got = [lamo.learning_rate(tok, 99, t) for t in (0, 50, 100, 350, 600, 850, 1100, 5000)]
    assert got == pytest.approx([0, 5e-4, 1e-3, 8.535534e-4, 5e-4, 1.464466e-4, 1e-4, 1e-4],
                                rel=1e-6)


def test_summary_rule_by_hand():
    """summary.json's numbers: per target the final and best score and the mean over evaluations
    after 80% of the steps; the headline is the best target by that mean. The paper's protocol (an
    evaluation every 2,500 of 100k steps) gives the last 8."""
    import runs
    history = [{"step": 10 * i, "eval": {"100": {"score_mean": float(i), "return_mean": 2.0 * i},
                                         "50": {"score_mean": 20.0 if i <= 8 else i - 4.0,
                                                "return_mean": 1.0}}}
               for i in range(1, 11)]
    s = runs.summarize(history, 100)
    assert s["targets"]["100"] == {"final": 10, "best": 10, "last20": 9.5, "last20_return": 19,
                                   "n_last20": 2}
    assert s["targets"]["50"] == {"final": 6, "best": 20, "last20": 5.5, "last20_return": 1,
                                  "n_last20": 2}
    assert (s["headline"], s["headline_target"]) == (9.5, "100")
    paper = [{"step": 2500 * i, "eval": {"1": {"score_mean": 0.0, "return_mean": 0.0}}}
             for i in range(1, 41)]
    assert runs.summarize(paper, 100_000)["targets"]["1"]["n_last20"] == 8


def test_paper_reference_only_for_the_papers_settings():
    """summary.json's "paper" is the paper's number for a run that trains what the paper's cell
    trained: the task's defaults, and GPT-2 medium on Kitchen Complete 30% (Table 1); its budget
    and evaluation may differ. Any other setting of the method: None, and a note naming it."""
    ref = lambda **kw: lamo.paper_reference(lamo.resolve(lamo.Config(**kw), kw))
    assert ref(env="hopper-medium-v2", frac=0.1, steps=2000, eval_episodes=2, seed=4,
               targets="3600") == ((73.7, 3.5, "Table 3"), "")
    assert ref(env="hopper-medium-v2", frac=0.1, model="dt") == ((57.3, 3.8, "Table 3"), "")
    assert ref(env="hopper-medium-v2", frac=0.1, finetune="full") == (
        None, "the paper's Table 3 (73.7) trained --finetune lora, this run full: not compared")
    assert ref(env="kitchen-complete-v2", frac=0.3) == (
        None, "the paper's Table 1 (45.9) trained --pretrained gpt2-medium, this run gpt2: "
              "not compared")
    assert ref(env="kitchen-complete-v2", frac=0.3, pretrained="gpt2-medium")[0] == (
        45.9, 2.9, "Table 1")
    assert ref(env="hopper-medium-v2", frac=0.2) == (None, "")            # no such cell


def test_task_defaults_from_the_official_scripts():
    for env in ("hopper", "walker2d", "halfcheetah"):
        cfg = lamo.resolve(lamo.Config(env=f"{env}-medium-v2"))
        # run.sh, run_hopper.sh
        assert cfg.lm_coef == 0 and (cfg.embed == "linear") == (env == "hopper")
        assert ((cfg.lr, cfg.weight_decay, cfg.warmup, cfg.context_len, cfg.batch_size) ==
                (1e-4, 1e-5, 2500, 20, 64))
    kitchen = lamo.resolve(lamo.Config(env="kitchen-partial-v2"))
    # run_cotrain.sh
    assert (kitchen.lm_coef, kitchen.embed, kitchen.targets) == (0.1, "mlp", "5,4,3,2,1")
    assert lamo.resolve(lamo.Config(env="hopper-medium-v2", lm_coef=0.1)).lm_coef == 0.1
    with pytest.raises(LamoError, match="unknown task 'hopper-v9'; known: hopper-medium-v2"):
        lamo.resolve(lamo.Config(env="hopper-v9"))


def test_scores_and_scales_by_hand():
    """Normalised scores from REFERENCE.md's reference returns, worked by hand; return-to-go
    scales."""
    cases = {"hopper-medium-v2": ([3234.3, -20.272305, 1607.0138475], [100, 0, 50]),
             "walker2d-medium-v2": ([4592.3, 1.629008], [100, 0]),
             "halfcheetah-medium-v2": ([12135.0, -280.178953, 5927.4105235], [100, 0, 50]),
             "kitchen-complete-v2": ([0, 1, 2, 4], [0, 25, 50, 100]),
             "breakout-medium": ([31.8, 1.7, 16.75], [100, 0, 50])}
    for name, (returns, scores) in cases.items():
        assert np.allclose(tasks.get_task(name).score(returns), scores, rtol=0, atol=1e-8), name
    assert [tasks.get_task(n).rtg_scale
            for n in ("hopper-medium-v2", "kitchen-partial-v2", "breakout-medium")] == [1000, 1, 1]


class ConstantPolicy(torch.nn.Module):
    """Stands in for the model in rollout: always the same action."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, states, actions, rtg, timesteps, mask=None):
        return torch.full((*timesteps.shape, actions.shape[-1]), self.value)


def test_actions_clipped_in_evaluation():
    """D4RL's NormalizedBoxEnv clips actions before stepping; Gymnasium's control cost would
    charge the raw action. An out-of-range action must score as its clipped value."""
    run = lambda value: lamo.rollout(ConstantPolicy(value), HOPPER, [(3600, 0)], np.zeros(11),
                                     np.ones(11), 20, torch.device("cpu"), max_steps=30)
    (big,), _ = run(5.0)
    (one,), _ = run(1.0)
    assert big == one
    env = HOPPER.make_env(30)                         # unclipped, the same episode would score less
    env.reset(seed=0)
    raw = sum(env.step(np.full(3, 5.0, np.float32))[1] for _ in range(5))
    env.reset(seed=0)
    clipped = sum(env.step(np.full(3, 1.0, np.float32))[1] for _ in range(5))
    assert raw < clipped


def test_dt_preset_relu_and_eps(hf_tiny):
    """kzl DT's blocks use ReLU; the official get_optimizer gives eps 1e-6 only to pre-trained
    bodies."""
    dt = lamo.resolve(lamo.Config(model="dt"))
    assert ((dt.activation, dt.adam_eps, dt.n_layer, dt.n_head, dt.n_embd) ==
            ("relu", 1e-8, 3, 1, 128))
    m = lamo.build_model(dt, HOPPER).eval()
    x = torch.randn(2, 5, 128)
    mlp = m.gpt.h[0].mlp
    assert torch.allclose(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x))))
    assert lamo.make_optimizer(m, dt, torch.device("cpu"))[1].defaults["eps"] == 1e-8
    no_pretraining = lamo.resolve(lamo.Config(pretrained="none"))      # "LaMo w/o pre-training"
    assert (no_pretraining.activation, no_pretraining.adam_eps) == ("gelu_tanh", 1e-8)
    assert lamo.resolve(lamo.Config(pretrained=str(hf_tiny[1]))).adam_eps == 1e-6


def test_embeddings_stay_fp32_under_bf16():
    """Returns-to-go 3000 and 3001 (scale 1000) must give different tokens in a bf16 run; bf16's
    step at 3.0 is 1/64, so an embedding inside autocast would see the same input twice. Checked
    inside the model's own forward (hooks), where the body's autocast is."""
    m = lamo.build_model(lamo.resolve(lamo.Config(model="dt", embed="mlp")), HOPPER,
                         precision="bf16").eval()
    states, actions, steps = (torch.zeros(2, 1, 11), torch.zeros(2, 1, 3),
                              torch.zeros(2, 1, dtype=torch.long))
    rtg = torch.tensor([3.000, 3.001]).view(2, 1, 1)
    seen = {}
    hook = lambda name: (lambda mod, inp, out: seen.__setitem__(name, out))
    for name in ("embed_return", "embed_state", "embed_action", "embed_timestep", "embed_ln"):
        getattr(m, name).register_forward_hook(hook(name))
    m.gpt.h[0].attn.c_attn.register_forward_hook(hook("body"))
    out = m(states, actions, rtg, steps)
    assert all(seen[k].dtype == torch.float32 for k in seen if k != "body"), (
        {k: v.dtype for k, v in seen.items()})
    assert not torch.equal(seen["embed_return"][0], seen["embed_return"][1])
    assert not torch.equal(seen["embed_ln"][0], seen["embed_ln"][1])
    assert seen["body"].dtype == torch.bfloat16                        # the body does run in bf16
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):   # what the test guards against
        assert torch.equal(*m.embed_return(rtg))


@pytest.mark.parametrize("embed", ["linear", "mlp"])
def test_mujoco_tokens_and_head_by_hand(embed):
    """The MuJoCo/Kitchen token sequence and action head, written out in float64 from the weights:
    per timestep R, s, a; embed_ln (eps 1e-5) over the stacked tokens, then the timestep embedding;
    no wpe; the action read from the s token's hidden state; mlp: fc2(GELU_erf(fc1 x)) + fc1 x and
    a Linear-GELU-Linear head without tanh; linear: Linear and a Linear + tanh head."""
    m32 = dt_model(5, embed=embed)
    m = copy.deepcopy(m32).double()
    g = torch.Generator().manual_seed(0)
    B, K = 2, 4
    s, a = (torch.randn(B, K, 11, generator=g, dtype=torch.float64),
            torch.randn(B, K, 3, generator=g, dtype=torch.float64))
    r, t = (torch.rand(B, K, 1, generator=g, dtype=torch.float64),
            torch.tensor([[0, 1, 2, 3], [500, 501, 502, 503]]))
    lin = lambda layer, x: x @ layer.weight.T + layer.bias
    emb = ((lambda mod, x: lin(mod, x)) if embed == "linear" else
           (lambda mod, x: lin(mod.fc2, 0.5 * lin(mod.fc1, x) *
                                        (1 + torch.erf(lin(mod.fc1, x) / 2 ** 0.5))) +
                           lin(mod.fc1, x)))
    with torch.no_grad():
        stacked = torch.stack([emb(m.embed_return, r), emb(m.embed_state, s),
                               emb(m.embed_action, a)], 2).reshape(B, 3 * K, -1)
        mu, var = stacked.mean(-1, keepdim=True), stacked.var(-1, unbiased=False, keepdim=True)
        tokens = (stacked - mu) / torch.sqrt(var + 1e-5) * m.embed_ln.weight + m.embed_ln.bias
        tokens = tokens + m.embed_timestep.weight[t].repeat_interleave(3, 1)
        assert (m.embed(s, a, r, t) - tokens).abs().max() < 1e-12
        # The head, on the body's output at the s_t tokens (the forward casts to float32 after the
        # body).
        h = m32.gpt.body(tokens.float())[:, 1::3]
        head = m32.predict_action
        if embed == "linear":
            want = torch.tanh(lin(head[0], h))
        else:
            x = lin(head[0], h)
            want = lin(head[2], 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)))
        assert (m32(s.float(), a.float(), r.float(), t) - want).abs().max() < 1e-5


# ============================================================================ Kitchen (issue 10)
KITCHEN = tasks.get_task("kitchen-complete-v2")


@pytest.fixture(scope="session")
def tiny_minari(tmp_path_factory):
    """A 3-episode Minari dataset recorded by minari's own DataCollector in FrankaKitchen-v1 (random
    actions, 30 steps), in a temporary MINARI_DATASETS_PATH; -> (dataset id, what was recorded).
    Random actions complete no subtask, so a wrapper under the collector sets each step's reward
    (0 to 3, as if that many subtasks were done): a loader that zeroed or shifted them would
    show."""
    import gymnasium as gym
    import gymnasium_robotics
    from minari import DataCollector
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.mktemp("minari")))
    gym.register_envs(gymnasium_robotics)

    class SetRewards(gym.Wrapper):
        rng = np.random.default_rng(0)

        def step(self, action):
            obs, _, terminated, truncated, info = self.env.step(action)
            return obs, float(self.rng.integers(0, 4)), terminated, truncated, info

    env = DataCollector(SetRewards(gym.make(
        "FrankaKitchen-v1", max_episode_steps=30,
        tasks_to_complete=list(tasks.KITCHEN_TASKS["complete"]))), record_infos=False)
    env.action_space.seed(0)
    recorded = []
    for ep in range(3):
        obs, _ = env.reset(seed=ep)
        episode = {"observations": [], "actions": [], "rewards": []}
        done = False
        while not done:
            action = env.action_space.sample()
            episode["observations"].append(obs["observation"].copy())   # the env reuses its arrays
            episode["actions"].append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            episode["rewards"].append(reward)
            done = terminated or truncated
        recorded.append({k: np.array(v) for k, v in episode.items()})
    env.create_dataset(dataset_id="D4RL/kitchen/tiny-v2", algorithm_name="random",
                       author="lamo tests", author_email="tests@lamo.invalid",
                       description="lamo's tiny test dataset",
                       eval_env=KITCHEN.gym_id, code_permalink="https://example.invalid/lamo")
    yield "D4RL/kitchen/tiny-v2", recorded
    mp.undo()


def test_minari_loader_matches_the_collector(tiny_minari):
    name, recorded = tiny_minari
    trajs, files = KITCHEN.load(name)
    assert len(trajs) == len(recorded) == 3 and files and files[0].suffix == ".hdf5"
    for t, r in zip(trajs, recorded, strict=True):
        # T+1 obs -> T
        assert len(t["observations"]) == len(t["actions"]) == len(r["actions"]) == 30
        assert (np.allclose(t["observations"], r["observations"]) and
                np.allclose(t["actions"], r["actions"]))
        # step by step
        assert np.array_equal(t["rewards"], r["rewards"]) and r["rewards"].sum() > 10
    folder = Path(files[0]).parent.parent                      # a dataset folder works like its id
    assert all(np.array_equal(a["actions"], b["actions"])
               for a, b in zip(KITCHEN.load(str(folder))[0], trajs))
    env = KITCHEN.make_env(5)
    assert env.reset(seed=0)[0].shape == (59,) and env.action_space.shape == (9,)


def test_kitchen_end_to_end(tiny_minari, hf_tiny, tiny_txt, tmp_path, capsys):
    name, _ = tiny_minari
    out = tmp_path / "k"
    lamo.main(["--env", "kitchen-complete-v2", "--data", name, "--pretrained", str(hf_tiny[1]),
               "--steps", "20", "--eval-every", "20", "--eval-episodes", "2",
               "--lm-corpus", str(tiny_txt), "--lm-seq-len", "64", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert (set(summary["targets"]) == {"5", "4", "3", "2", "1"} and
            summary["task"] == "kitchen-complete-v2")
    assert (summary["metric"].startswith("D4RL normalised score") and
            summary["evaluation_env"] == "FrankaKitchen-v1")
    # the paper's cell, which a tiny GPT-2 does not train: named, not compared
    assert summary["paper"] is None
    note = "the paper's Table 1 (64.2) trained --pretrained gpt2, this run"
    assert note in capsys.readouterr().out
    # lambda 0.1 by default
    assert all(m["lm_loss"] > 0 for m in read_metrics(out) if "lm_loss" in m)
    ev = [m for m in read_metrics(out) if "eval" in m][-1]["eval"]
    # 100 * return / 4
    assert all(e["score_mean"] == pytest.approx(25 * e["return_mean"]) for e in ev.values())


def test_kitchen_errors(tiny_minari, monkeypatch):
    r = subprocess.run([sys.executable, "lamo.py", "--env", "kitchen-mixed-v2", "--model", "dt",
                        "--data", "D4RL/kitchen/no-such-v9"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load Minari dataset 'D4RL/kitchen/no-such-v9'"), last
    monkeypatch.setitem(sys.modules, "minari", None)           # as if not installed
    with pytest.raises(LamoError,
                       match=r"^kitchen-complete-v2 needs the minari package: pip install"):
        KITCHEN.load(tiny_minari[0])


def test_wandb_logging(tiny_hdf5, tmp_path, monkeypatch):
    """--wandb: a one-line error without the package; with it, the run's config, group and every
    metrics row go to W&B (a stand-in module records the calls), and --resume keeps the W&B run
    id."""
    import importlib.machinery
    import types
    base = ["--model", "dt", "--n-layer", "1", "--n-embd", "32", "--data", str(tiny_hdf5),
            "--steps", "4", "--log-every", "2", "--eval-every", "4", "--eval-episodes", "1",
            "--targets", "100", "--wandb", "lamo-tests", "--wandb-group", "hopper_f1_dt"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit,
                       match="^error: --wandb needs the wandb package: pip install wandb$"):
        lamo.main([*base, "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
        log=lambda row, step: calls.append(("log", step, row)),
        finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    lamo.main([*base, "--out", str(tmp_path / "r")])
    init = calls[0][1]
    assert (init["project"], init["group"], init["id"]) == ("lamo-tests", "hopper_f1_dt", "abc123")
    assert init["config"]["model"] == "dt" and init["config"]["wandb"] == "lamo-tests"
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [2, 4, 4] and "action_loss" in logged[0][2]
    assert "eval/100/score_mean" in logged[2][2] and calls[-1] == ("finish",)
    fake.util.generate_id = lambda: pytest.fail("a resumed run must keep its W&B id")
    lamo.main(["--resume", str(tmp_path / "r"), "--steps", "6"])
    assert (calls[-1] == ("finish",) and
            [c for c in calls if c[0] == "init"][-1][1]["id"] == "abc123")


# ============================================================================ Ant (issue 18)
ANT = tasks.get_task("ant-medium-v2")


@pytest.fixture(scope="module")
def tiny_ant(tmp_path_factory):
    """A tiny ant-medium-v2 in D4RL's layout: 3 noisy Ant-v4 episodes of at most 40 steps (27
    columns, as Ant-v4 observes without contact forces), widened to D4RL's 111 with the 84
    contact-force columns zero, as in D4RL's own files. -> (the D4RL-layout file, the 27-column
    collect output)."""
    folder = tmp_path_factory.mktemp("ant")
    raw = data.collect("Ant-v4", "noisy", 3, folder / "raw.hdf5", seed=0, max_steps=40)
    with h5py.File(raw) as f:
        arrays = {k: f[k][()] for k in f}
    for k in ("observations", "next_observations"):
        arrays[k] = np.pad(arrays[k], ((0, 0), (0, 84)))
    with h5py.File(folder / "tiny.hdf5", "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return folder / "tiny.hdf5", raw


def test_ant_downloads_and_keeps_the_27_columns_ant_v4_observes(tiny_ant, server, cache, tmp_path):
    d4rl_file, raw = tiny_ant
    server.files["/d4rl/ant_medium-v2.hdf5"] = d4rl_file.read_bytes()
    assert ANT.source == tasks.D4RL_URL.format(file="ant_medium-v2")
    assert ANT.source.endswith("/offline_rl/gym_mujoco_v2/ant_medium-v2.hdf5")
    trajs, files = data.load_d4rl_ant(replace(ANT, source=server.url + "/d4rl/ant_medium-v2.hdf5"))
    assert files == [cache / "d4rl" / "ant_medium-v2.hdf5"] and len(server.requests) == 1
    # The loader's rows are the evaluation env's observations: episode 0 of collect began at
    # reset(seed=0), and the env the task evaluates in returns the same 27 numbers there.
    env = ANT.make_env(5)
    first, _ = env.reset(seed=0)
    assert env.observation_space.shape == ANT.obs_shape == (27,) and env.action_space.shape == (8,)
    assert [t["observations"].shape[1] for t in trajs] == [27] * 3
    assert np.allclose(trajs[0]["observations"][0], first, atol=1e-6)
    assert np.abs(trajs[0]["observations"]).max(0).min() > 0           # no all-zero column is kept
    # The 27-column file (python data.py collect --env Ant-v4) reads the same.
    again, _ = ANT.load(str(raw))
    for a, b in zip(trajs, again, strict=True):
        assert np.array_equal(a["observations"], b["observations"])
    # A file with real contact forces, or of another width, is refused in one line.
    with h5py.File(d4rl_file) as f:
        arrays = {k: f[k][()] for k in f}
    arrays["observations"][7, 27 + 40] = 0.5
    forces = tmp_path / "forces.hdf5"
    with h5py.File(forces, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    with pytest.raises(LamoError, match=r"columns 27..110 are not all zero \(max \|x\| 0.5\)"):
        ANT.load(str(forces))
    narrow = write_d4rl(tmp_path / "narrow.hdf5", 6, obs_dim=17, act_dim=8, terminals=(5,))
    with pytest.raises(LamoError, match=r"'observations' has shape \(6, 17\), expected \(N, 111\)"):
        ANT.load(str(narrow))


def test_ant_end_to_end(tiny_ant, hf_tiny, tmp_path):
    """python lamo.py --env ant-medium-v2 --data tiny.hdf5: LaMo's MuJoCo recipe on Ant, scored
    with D4RL's ant reference returns (random -325.6, expert 3879.7, worked by hand)."""
    out = tmp_path / "ant"
    lamo.main(["--env", "ant-medium-v2", "--data", str(tiny_ant[0]),
               "--pretrained", str(hf_tiny[1]), "--steps", "4", "--eval-every", "4",
               "--eval-episodes", "1", "--eval-max-steps", "20",
               "--batch-size", "4", "--out", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert ((cfg["embed"], cfg["lr"], cfg["weight_decay"], cfg["context_len"]) ==
            ("mlp", 1e-4, 1e-5, 20))
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["targets"]) == {"4000", "3000"} and summary["evaluation_env"] == "Ant-v4"
    ev = [m for m in read_metrics(out) if "eval" in m][-1]["eval"]
    for e in ev.values():
        assert e["score_mean"] == pytest.approx(100 * (e["return_mean"] + 325.6) / 4205.3, rel=1e-9)
