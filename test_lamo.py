"""lamo's tests: all offline, CPU, tiny models (shared fixtures in conftest.py). Sections follow the
issues: GPT-2 + LoRA, data, training and evaluation, paper-comparable runs, Kitchen. Atari's data side
is in test_atari.py, sweep.py's in test_sweep.py."""
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
from conftest import TINY
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


def hub_file(model, path: Path, drop=()):
    """Write `model` the way the hub's model.safetensors is laid out: no prefix, causal-mask buffers kept."""
    from safetensors.torch import save_file
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
    save_file({k: v for k, v in sd.items() if not k.startswith(drop)}, str(path))
    return path


def logits(m, idx):
    with torch.no_grad():
        out = m(idx)
    return out.logits if hasattr(out, "logits") else out


IDX = torch.randint(0, 50257, (2, 23), generator=torch.Generator().manual_seed(0))


# ============================================================================ GPT-2 and LoRA (issue 2)
def test_logits_match_transformers(hf_tiny, tmp_path):
    hf, folder = hf_tiny
    ours = lamo.GPT2.from_pretrained(str(folder)).eval()
    assert (logits(ours, IDX) - logits(hf, IDX)).abs().max() < 1e-5
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
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, "n_embd": 128, "n_head": 2, "n_layer": 3})).eval()
    ours = lamo.GPT2.from_pretrained(str(hub_file(hf, tmp_path / "model.safetensors"))).eval()
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd, ours.config.n_positions) == (3, 2, 128, 128)
    assert (logits(ours, IDX) - logits(hf, IDX)).abs().max() < 1e-5


def test_download_cache_resume_and_corruption(server, cache, capsys):
    blob = bytes(range(256)) * 4000
    server.files["/gpt2/model.safetensors"] = blob
    url = server.url + "/gpt2/model.safetensors"
    dest = cache / "x" / "model.safetensors"
    kw = dict(local_hint="pass it yourself", size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
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
    assert not dest.exists() and 0 < kept == dest.with_name(dest.name + ".part").stat().st_size <= 300_000
    server.cut_after = None
    assert data.download(url, dest, **kw).read_bytes() == blob
    # A corrupted file (right size, wrong bytes) is refused and leaves nothing under the final name.
    dest.unlink()
    server.files["/gpt2/model.safetensors"] = blob[:-1] + b"\x00"
    with pytest.raises(LamoError, match="sha256.*corrupt"):
        data.download(url, dest, **kw)
    assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
    # Offline: the error names the URL and says how to pass the file.
    with pytest.raises(LamoError, match=r"http://127\.0\.0\.1:1/.*pass it yourself"):
        data.download("http://127.0.0.1:1/nothing", cache / "y", local_hint="pass it yourself")


def test_gpt2_loader_downloads_hub_sizes(server, hf_tiny, monkeypatch, cache):
    hf, folder = hf_tiny
    blob = (folder / "model.safetensors").read_bytes()
    server.files["/gpt2/model.safetensors"] = blob
    server.files["/gpt2/config.json"] = (folder / "config.json").read_bytes()
    monkeypatch.setattr(gpt2_loader, "HF_URL", server.url + "/{name}/{file}")
    monkeypatch.setitem(gpt2_loader.KNOWN_FILES, "gpt2", (len(blob), hashlib.sha256(blob).hexdigest()))
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
    m.merge()
    assert (logits(m, IDX) - unmerged).abs().max() < 1e-5
    m.unmerge()
    assert torch.equal(m.h[0].attn.c_attn.weight, w0)              # restored bit for bit
    lamo.mark_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"h.{i}.attn.c_attn.{k}" for i in range(2) for k in ("lora_A", "lora_B", "bias")}


def test_lora_count_gpt2_small():
    with torch.device("meta"):                                      # shapes only: no 500 MB of random init
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
    cases["missing 12 GPT-2 tensor(s), e.g. h.0.ln_1"] = hub_file(hf, tmp_path / "gap.safetensors", drop=("h.0.",))
    for expect, path in cases.items():
        with pytest.raises(LamoError) as e:
            lamo.GPT2.from_pretrained(str(path))
        msg = str(e.value)
        assert expect in msg and "\n" not in msg and str(path) in msg, msg
    # The CLI prints that one line, without a traceback, before touching any data.
    r = subprocess.run([sys.executable, "lamo.py", "--pretrained", "gpt3"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown model 'gpt3'")


# ============================================================================ data (issue 3)
def write_d4rl(path, n, obs_dim=11, act_dim=3, terminals=(), timeouts=(), **override):
    arrays = {"observations": np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim),
              "actions": np.tile(np.arange(n, dtype=np.float32)[:, None], (1, act_dim)),
              "rewards": np.arange(n, dtype=np.float32), "terminals": np.isin(np.arange(n), terminals),
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
    assert [t["terminals"].tolist() for t in trajs] == [[False, False, True], [False] * 4, [False, True]]
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
    for n, f in [(2186, 0.1), (1000, 0.3), (10, 0.3), (1191, 0.005), (7, 0.01), (5, 1.0)]:
        idx = data.subset_indices(n, f, 0)
        assert len(idx) == max(1, int(np.floor(f * n + 1e-9))) == len(set(idx.tolist()))
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
    want = reference_batch(trajs, pairs, 20, 50, 1000.0, b.state_mean, b.state_std)
    for g, w, name in zip(got, want, ("states", "actions", "rtg", "timesteps", "mask")):
        assert g.shape == w.shape and torch.allclose(g.float(), w, atol=1e-5), name
    assert got.mask[1].sum() == 1 and got.actions[1, 0, 0] == -10     # one real step, rest padding


def test_downloads_d4rl_and_corpus(server, tmp_path, monkeypatch, cache):
    blob = write_d4rl(tmp_path / "src.hdf5", 8, terminals=(3, 7)).read_bytes()
    server.files["/d4rl/hopper_medium_replay-v2.hdf5"] = blob
    task = tasks.get_task("hopper-medium-replay-v2")
    assert task.source == "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5"
    trajs, files = data.load_d4rl(replace(task, source=server.url + "/d4rl/hopper_medium_replay-v2.hdf5"))
    assert files == [cache / "d4rl" / "hopper_medium_replay-v2.hdf5"] and len(trajs) == 2
    text = "Valkyria Chronicles III is a tactical role-playing game.\n" * 50
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr(data.WIKITEXT_MEMBER, text)
    server.files["/wikitext.zip"] = zbuf.getvalue()
    monkeypatch.setattr(data, "WIKITEXT_URL", server.url + "/wikitext.zip")
    tokens = data.lm_tokens()
    assert data.gpt2_tokenizer().decode(tokens.tolist()) == text
    assert "python-requests" not in server.requests[-1][1]["User-Agent"]   # the host refuses that one


def test_tokenizer_roundtrip_and_cache(tiktoken_gpt2, tiny_txt, monkeypatch):
    tok = data.gpt2_tokenizer()                                      # from assets/gpt2-bpe, no network
    para = "LaMo adapts GPT-2 to offline RL — with LoRA, MLP embeddings, and a language loss (λ=0.1)."
    assert tok.decode(tok.encode_ordinary(para)) == para
    for text in (para, tiny_txt.read_text(), " = Valkyria = \n \n 1 @,@ 000 \t<|endoftext|>"):
        assert tok.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)   # tiktoken's own gpt2
    assert tok.eot_token == tiktoken_gpt2.eot_token == 50256 and tok.n_vocab == tiktoken_gpt2.n_vocab
    assert tok.encode_ordinary("<|endoftext|>") != [50256]            # text, never the special token
    wiki = " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles  \n\n\t x , 1 @,@ 000 \n" * 20
    whole = tok.encode_ordinary(wiki)
    assert np.concatenate(list(data.encode_chunked(tok, wiki, chunk_chars=7))).tolist() == whole
    first = data.lm_tokens(str(tiny_txt))
    assert first.dtype == np.uint16 and tok.decode(first.tolist()) == tiny_txt.read_text()
    monkeypatch.setattr(data, "gpt2_tokenizer", lambda: pytest.fail("tokenised again instead of reusing the cache"))
    assert np.array_equal(data.lm_tokens(str(tiny_txt)), first)
    batch = data.LMBatcher(first, B=2, T=16, seed=0).sample()
    assert batch.shape == (2, 17) and batch.dtype == torch.int64


def test_collect_writes_d4rl_layout(tmp_path):
    out = tmp_path / "c.hdf5"
    data.main(["collect", "--env", "Hopper-v4", "--policy", "random", "--episodes", "3", "--max-steps", "30",
               "--out", str(out)])
    with h5py.File(out) as f:
        assert set(f.keys()) >= {"observations", "actions", "rewards", "terminals", "timeouts"}
    trajs = data.load_trajectories(out, 11, 3)
    assert len(trajs) == 3
    assert all(t["observations"].shape[1] == 11 and t["actions"].shape[1] == 3 for t in trajs)


# ============================================================================ training and evaluation (issue 4)
HOPPER = tasks.get_task("hopper-medium-v2")


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_resume_and_eval_only(tmp_path, tiny_hdf5, hf_tiny, tiny_txt):
    _, folder = hf_tiny
    common = ["--data", str(tiny_hdf5), "--env", "hopper-medium-v2", "--pretrained", str(folder),
              "--eval-every", "20", "--eval-episodes", "2", "--lm-coef", "0.1", "--lm-corpus", str(tiny_txt),
              "--lm-seq-len", "64", "--log-every", "10"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run([sys.executable, "lamo.py", *common, "--steps", "40", "--out", str(a)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = {"config.json", "subset.json", "metrics.jsonl", "ckpt.pt", "summary.json"}
    try:
        import matplotlib  # noqa: F401
        expected.add("curve.png")
    except ImportError:
        pass
    assert expected <= {p.name for p in a.iterdir()}
    assert "headline" in r.stdout and json.loads((a / "summary.json").read_text())["step"] == 40
    evals = [m for m in read_metrics(a) if "eval" in m]
    assert [m["step"] for m in evals] == [20, 40] and set(evals[0]["eval"]) == {"3600", "2600", "2200", "1800"}
    assert all(m["lm_loss"] > 5 for m in read_metrics(a) if "lm_loss" in m)   # the LM batch really ran
    # --resume continues at step 40 with exactly what one 80-step run produces.
    lamo.main(["--resume", str(a), "--steps", "80"])
    lamo.main([*common, "--steps", "80", "--out", str(b)])
    assert strip_timing(read_metrics(a)) == strip_timing(read_metrics(b))
    # --eval-only reproduces the checkpoint's last evaluation.
    ckpt = torch.load(b / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 80 and lamo.main(["--eval-only", str(b / "ckpt.pt")]) == ckpt["last_eval"]
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
    run = lambda eps: lamo.rollout(m, HOPPER, eps, np.zeros(11), np.ones(11), 20, torch.device("cpu"))
    batched, lengths = run(episodes)
    one = [run([e])[0][0] for e in episodes]
    assert lengths.min() > 20                          # long enough to pass the K-step padded phase
    assert np.array_equal(batched, np.array(one))      # bit for bit, not approximately


@pytest.mark.parametrize("embed", ["linear", "mlp"])
def test_padding_does_not_change_prediction(embed):
    m = dt_model(embed=embed)
    L, K = 5, 20
    g = torch.Generator().manual_seed(0)
    s, a, r = torch.randn(1, L, 11, generator=g), torch.randn(1, L, 3, generator=g), torch.rand(1, L, 1, generator=g)
    t = torch.arange(100, 100 + L)[None]
    ref = m(s, a, r, t)[:, -1]
    mask = torch.cat([torch.zeros(1, K - L), torch.ones(1, L)], 1)
    outs = []
    for fill in (0.0, 7.0):                            # the pad values must not matter at all
        pad = lambda x: torch.cat([torch.full((1, K - L, x.shape[2]), fill), x], 1)
        outs.append(m(pad(s), pad(a), pad(r), torch.cat([torch.zeros(1, K - L, dtype=torch.long), t], 1), mask)[:, -1])
    assert torch.equal(outs[0], outs[1]) and torch.allclose(outs[0], ref, atol=1e-6)
    # Fully padded rows stay finite through backward (a -inf mask would make them NaN).
    m.train()
    loss = lamo.action_loss(m(pad(s), pad(a), pad(r), torch.zeros(1, K, dtype=torch.long), mask), pad(a), mask)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_trainable_sets_and_lambda_zero(hf_tiny, tiny_hdf5, monkeypatch, tmp_path):
    _, folder = hf_tiny

    def trainable(**kw):
        m = lamo.build_model(lamo.resolve(lamo.Config(pretrained=str(folder), lm_seq_len=64, **kw)), HOPPER)
        return {n for n, p in m.named_parameters() if p.requires_grad}, {n for n, _ in m.named_parameters()}

    lora, names = trainable(finetune="lora")
    heads = {n for n in names if n.startswith(("embed_", "predict_"))}
    assert {n.split(".")[0] for n in heads} == {"embed_timestep", "embed_return", "embed_state", "embed_action",
                                                "embed_ln", "predict_action"}
    assert lora == heads | {f"gpt.h.{i}.attn.c_attn.{k}" for i in range(2) for k in ("lora_A", "lora_B", "bias")}
    full, names = trainable(finetune="full")
    assert full == names and not any("lora_" in n for n in names)
    assert trainable(finetune="frozen")[0] == heads
    # lambda = 0: the corpus is never read and no LM forward runs.
    monkeypatch.setattr(lamo, "lm_tokens", lambda *a: pytest.fail("read the corpus with lambda = 0"))
    monkeypatch.setattr(lamo, "lm_loss", lambda *a: pytest.fail("ran the LM batch with lambda = 0"))
    lamo.main(["--data", str(tiny_hdf5), "--pretrained", str(folder), "--lm-coef", "0", "--steps", "3",
               "--eval-every", "3", "--eval-episodes", "1", "--targets", "100", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="--lm-corpus has no effect"):   # a flag that would do nothing
        lamo.main(["--data", str(tiny_hdf5), "--lm-coef", "0", "--lm-corpus", "x.txt"])


@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")   # raised inside torch's compiler
def test_compile_flag_compiles_and_matches_eager(tiny_hdf5, tmp_path):
    """--compile really compiles (dynamo captures a graph) and, without dropout, gives eager's losses."""
    from torch._dynamo.utils import counters    # private, but the plainest proof that a graph was built
    base = ["--model", "dt", "--n-layer", "1", "--n-embd", "32", "--dropout", "0", "--data", str(tiny_hdf5),
            "--steps", "4", "--log-every", "2", "--eval-every", "4", "--eval-episodes", "1", "--targets", "100"]
    torch._dynamo.reset()
    counters.clear()
    lamo.main([*base, "--compile", "--out", str(tmp_path / "c")])
    assert counters["stats"]["unique_graphs"] >= 1
    lamo.main([*base, "--out", str(tmp_path / "e")])
    losses = [[m["action_loss"] for m in read_metrics(tmp_path / r) if "action_loss" in m] for r in "ce"]
    assert len(losses[0]) == 2 and np.allclose(losses[0], losses[1], rtol=1e-5, atol=0)


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

    base = ["--model", "dt", "--data", str(tiny_hdf5), "--steps", "40", "--eval-every", "20", "--log-every", "5",
            "--eval-episodes", "1", "--targets", "100"]
    monkeypatch.setattr(lamo, "action_loss", loss_with(23, lambda out: out * float("nan")))
    with pytest.raises(SystemExit, match="NaN/inf.*is intact"):
        lamo.main([*base, "--out", str(tmp_path / "nan")])
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=False)["step"] == 20
    calls.clear()
    monkeypatch.setattr(lamo, "action_loss", loss_with(7, lambda out: os.kill(os.getpid(), signal.SIGINT) or out))
    with pytest.raises(SystemExit) as e:
        lamo.main([*base, "--out", str(tmp_path / "int")])
    assert e.value.code == 130
    assert torch.load(tmp_path / "int" / "ckpt.pt", weights_only=False)["step"] == 7
    monkeypatch.setattr(lamo, "action_loss", real)
    lamo.main(["--resume", str(tmp_path / "int")])
    assert json.loads((tmp_path / "int" / "summary.json").read_text())["step"] == 40


def test_dt_learns_to_condition_on_return(tmp_path, capsys):
    """A PD controller with per-episode noise gives returns from ~20 to ~300; trained on that, the DT
    preset must act better for a high target than a low one, and beat the data's mean."""
    path = data.collect("Hopper-v4", "noisy", 60, tmp_path / "noisy.hdf5", seed=1, max_steps=300)
    mean_return = data.trajectory_returns(data.load_trajectories(path)).mean()
    lamo.main(["--model", "dt", "--data", str(path), "--steps", "1200", "--eval-every", "1200", "--warmup", "50",
               "--lr", "1e-3", "--batch-size", "64", "--context-len", "5", "--eval-episodes", "4",
               "--targets", "1000,50", "--out", str(tmp_path / "run")])
    ev = [m for m in read_metrics(tmp_path / "run") if "eval" in m][-1]["eval"]
    high, low = ev["1000"]["return_mean"], ev["50"]["return_mean"]
    print(f"dataset mean {mean_return:.1f}, target 1000 -> {high:.1f}, target 50 -> {low:.1f}")
    assert high > 1.5 * low and high > 1.5 * mean_return


# ============================================================================ paper-comparable runs (issue 9)
# action_loss of the first 6 steps of a tiny run (hf_tiny, tiny_hdf5, lambda 0), as the code before the
# task table gave them (commit 2b9cacf) on one machine. Compared within 1e-6 relative, not bit for bit:
# another CPU's kernels round differently (an AVX-512 host: 1.9e-7 relative on the first loss, the
# largest seen), while one-line changes to the MuJoCo path move them by 1.8e-6 (embed_ln or ln_f eps
# 1e-5 -> 1e-6) to 3e-2 (timestep + 1); TEST-NOTES lists them. Changes below float32's resolution here
# (the GPT-2 blocks' eps) are caught in float64 by the parity and token tests instead.
PIN_RTOL = 1e-6
PINNED = {"linear": [0.32108521461486816, 0.31066858768463135, 0.32103079557418823, 0.32055598497390747,
                     0.2982567250728607, 0.320565402507782],
          "mlp": [0.12472877651453018, 0.1218414157629013, 0.12182515114545822, 0.12720726430416107,
                  0.10901036113500595, 0.1232314258813858]}


@pytest.mark.parametrize("embed", ["linear", "mlp"])
def test_mujoco_losses_pinned(embed, hf_tiny, tiny_hdf5, tmp_path):
    _, folder = hf_tiny
    lamo.main(["--data", str(tiny_hdf5), "--pretrained", str(folder), "--lm-coef", "0", "--embed", embed,
               "--steps", "6", "--log-every", "1", "--eval-every", "6", "--eval-episodes", "1", "--targets", "100",
               "--out", str(tmp_path / "r")])
    losses = [m["action_loss"] for m in read_metrics(tmp_path / "r") if "action_loss" in m]
    assert len(losses) == len(PINNED[embed])
    rel = np.abs(np.array(losses) / np.array(PINNED[embed]) - 1)
    assert rel.max() < PIN_RTOL, f"relative differences to the pinned losses: {rel.tolist()}"


def test_task_defaults_from_the_official_scripts():
    for env in ("hopper", "walker2d", "halfcheetah"):
        cfg = lamo.resolve(lamo.Config(env=f"{env}-medium-v2"))
        assert cfg.lm_coef == 0 and (cfg.embed == "linear") == (env == "hopper")   # run.sh, run_hopper.sh
        assert (cfg.lr, cfg.weight_decay, cfg.warmup, cfg.context_len, cfg.batch_size) == (1e-4, 1e-5, 2500, 20, 64)
    kitchen = lamo.resolve(lamo.Config(env="kitchen-partial-v2"))
    assert (kitchen.lm_coef, kitchen.embed, kitchen.targets) == (0.1, "mlp", "5,4,3,2,1")  # run_cotrain.sh
    assert lamo.resolve(lamo.Config(env="hopper-medium-v2", lm_coef=0.1)).lm_coef == 0.1
    with pytest.raises(LamoError, match="unknown task 'hopper-v9'; known: hopper-medium-v2"):
        lamo.resolve(lamo.Config(env="hopper-v9"))


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
    run = lambda value: lamo.rollout(ConstantPolicy(value), HOPPER, [(3600, 0)], np.zeros(11), np.ones(11), 20,
                                     torch.device("cpu"), max_steps=30)
    (big,), _ = run(5.0)
    (one,), _ = run(1.0)
    assert big == one
    env = HOPPER.make_env(30)                          # unclipped, the same episode would score less
    env.reset(seed=0)
    raw = sum(env.step(np.full(3, 5.0, np.float32))[1] for _ in range(5))
    env.reset(seed=0)
    clipped = sum(env.step(np.full(3, 1.0, np.float32))[1] for _ in range(5))
    assert raw < clipped


def test_dt_preset_relu_and_eps(hf_tiny):
    """kzl DT's blocks use ReLU; the official get_optimizer gives eps 1e-6 only to pre-trained bodies."""
    dt = lamo.resolve(lamo.Config(model="dt"))
    assert (dt.activation, dt.adam_eps, dt.n_layer, dt.n_head, dt.n_embd) == ("relu", 1e-8, 3, 1, 128)
    m = lamo.build_model(dt, HOPPER).eval()
    x = torch.randn(2, 5, 128)
    mlp = m.gpt.h[0].mlp
    assert torch.allclose(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x))))
    assert lamo.make_optimizer(m, dt, torch.device("cpu"))[1].defaults["eps"] == 1e-8
    no_pretraining = lamo.resolve(lamo.Config(pretrained="none"))      # "LaMo w/o pre-training"
    assert (no_pretraining.activation, no_pretraining.adam_eps) == ("gelu_tanh", 1e-8)
    assert lamo.resolve(lamo.Config(pretrained=str(hf_tiny[1]))).adam_eps == 1e-6


def test_embeddings_stay_fp32_under_bf16():
    """Returns-to-go 3000 and 3001 (scale 1000) must give different tokens in a bf16 run; bf16's step
    at 3.0 is 1/64, so an embedding inside autocast would see the same input twice."""
    m = lamo.build_model(lamo.resolve(lamo.Config(model="dt", embed="mlp")), HOPPER, precision="bf16").eval()
    states, actions, steps = torch.zeros(2, 1, 11), torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long)
    rtg = torch.tensor([3.000, 3.001]).view(2, 1, 1)
    tokens = m.embed(states, actions, rtg, steps)
    assert tokens.dtype == torch.float32 and not torch.equal(tokens[0], tokens[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):   # what the test guards against
        assert torch.equal(*m.embed_return(rtg))
    assert torch.isfinite(m(states, actions, rtg, steps)).all()   # the bf16 body runs


# ============================================================================ Kitchen (issue 10)
KITCHEN = tasks.get_task("kitchen-complete-v2")


@pytest.fixture(scope="session")
def tiny_minari(tmp_path_factory):
    """A 3-episode Minari dataset recorded by minari's own DataCollector in FrankaKitchen-v1 (random
    actions, 30 steps), in a temporary MINARI_DATASETS_PATH; -> (dataset id, what was recorded)."""
    import gymnasium as gym
    import gymnasium_robotics
    from minari import DataCollector
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.mktemp("minari")))
    gym.register_envs(gymnasium_robotics)
    env = DataCollector(gym.make("FrankaKitchen-v1", tasks_to_complete=list(tasks.KITCHEN_TASKS["complete"]),
                                 max_episode_steps=30), record_infos=False)
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
    env.create_dataset(dataset_id="D4RL/kitchen/tiny-v2", algorithm_name="random", author="lamo tests",
                       author_email="tests@lamo.invalid", description="lamo's tiny test dataset",
                       eval_env=KITCHEN.gym_id, code_permalink="https://example.invalid/lamo")
    yield "D4RL/kitchen/tiny-v2", recorded
    mp.undo()


def test_minari_loader_matches_the_collector(tiny_minari):
    name, recorded = tiny_minari
    trajs, files = KITCHEN.load(name)
    assert len(trajs) == len(recorded) == 3 and files and files[0].suffix == ".hdf5"
    for t, r in zip(trajs, recorded, strict=True):
        assert len(t["observations"]) == len(t["actions"]) == len(r["actions"]) == 30   # T+1 obs -> T
        assert np.allclose(t["observations"], r["observations"]) and np.allclose(t["actions"], r["actions"])
        assert t["rewards"].sum() == r["rewards"].sum()
    folder = Path(files[0]).parent.parent                      # a dataset folder works like its id
    assert all(np.array_equal(a["actions"], b["actions"]) for a, b in zip(KITCHEN.load(str(folder))[0], trajs))
    env = KITCHEN.make_env(5)
    assert env.reset(seed=0)[0].shape == (59,) and env.action_space.shape == (9,)


def test_kitchen_end_to_end(tiny_minari, hf_tiny, tiny_txt, tmp_path):
    name, _ = tiny_minari
    out = tmp_path / "k"
    lamo.main(["--env", "kitchen-complete-v2", "--data", name, "--pretrained", str(hf_tiny[1]), "--steps", "20",
               "--eval-every", "20", "--eval-episodes", "2", "--lm-corpus", str(tiny_txt), "--lm-seq-len", "64",
               "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["targets"]) == {"5", "4", "3", "2", "1"} and summary["task"] == "kitchen-complete-v2"
    assert summary["metric"].startswith("D4RL normalised score") and summary["evaluation_env"] == "FrankaKitchen-v1"
    assert summary["paper"] == {"mean": 64.2, "std": 5.3, "table": "Table 1"}   # the paper's cell for this run
    assert all(m["lm_loss"] > 0 for m in read_metrics(out) if "lm_loss" in m)   # lambda 0.1 by default
    ev = [m for m in read_metrics(out) if "eval" in m][-1]["eval"]
    assert all(e["score_mean"] == 25 * e["return_mean"] for e in ev.values())   # 100 * return / 4


def test_kitchen_errors(tiny_minari, monkeypatch):
    r = subprocess.run([sys.executable, "lamo.py", "--env", "kitchen-mixed-v2", "--model", "dt", "--data",
                        "D4RL/kitchen/no-such-v9"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load Minari dataset 'D4RL/kitchen/no-such-v9'"), last
    monkeypatch.setitem(sys.modules, "minari", None)           # as if not installed
    with pytest.raises(LamoError, match=r"^kitchen-complete-v2 needs the minari package: pip install"):
        KITCHEN.load(tiny_minari[0])


def test_wandb_logging(tiny_hdf5, tmp_path, monkeypatch):
    """--wandb: a one-line error without the package; with it, the run's config, group and every
    metrics row go to W&B (a stand-in module records the calls), and --resume keeps the W&B run id."""
    import importlib.machinery
    import types
    base = ["--model", "dt", "--n-layer", "1", "--n-embd", "32", "--data", str(tiny_hdf5), "--steps", "4",
            "--log-every", "2", "--eval-every", "4", "--eval-episodes", "1", "--targets", "100",
            "--wandb", "lamo-tests", "--wandb-group", "hopper_f1_dt"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match="^error: --wandb needs the wandb package: pip install wandb$"):
        lamo.main([*base, "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
        log=lambda row, step: calls.append(("log", step, row)), finish=lambda: calls.append(("finish",)))
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
    assert calls[-1] == ("finish",) and [c for c in calls if c[0] == "init"][-1][1]["id"] == "abc123"
