"""OpenAI's GPT-2 weights, read straight from the released safetensors files (no transformers,
no safetensors package). `load_gpt2(name_or_path)` -> (config dict, {name: tensor}) in lamo's
naming, which is Hugging Face's without the `transformer.` prefix, with Conv1D weights transposed
to nn.Linear's (out, in) layout. lamo.GPT2.from_pretrained builds the model from it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from data import LamoError, cache_dir, download

HF_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
VOCAB_SIZE = 50257       # GPT-2's BPE vocabulary, the same for every size
N_POSITIONS = 1024       # GPT-2's context, the same for every size
SIZES = {  # n_layer, n_head, n_embd (OpenAI's hparams.json); all have head dim 64
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
KNOWN_FILES = {"gpt2": (548_105_171,
                        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707")}
# GPT-2 stores these as Conv1D weights, shaped (in, out); nn.Linear wants (out, in). Two of them are
# square for attn.c_proj (d, d), so the shape asserts below cannot catch a forgotten transpose: this
# list is the only thing that does.
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers and the LM head (tied to wte). Anchored: a plain endswith("attn.bias") would
# also drop the real c_attn.bias.
SKIPPED = re.compile(r"(^|\.)attn\.(masked_)?bias$|^lm_head\.weight$")
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def resolve(name_or_path: str) -> tuple[Path, Path | None]:
    """-> (model.safetensors, config.json or None), downloading the hub sizes into the cache."""
    if name_or_path in SIZES:
        folder = cache_dir() / name_or_path
        size, sha = KNOWN_FILES.get(name_or_path, (None, None))
        hint = f"pass the local file or its folder with --pretrained PATH"
        get = lambda f, **kw: download(HF_URL.format(name=name_or_path, file=f), folder / f,
                                       local_hint=hint, **kw)
        return get("model.safetensors", size=size, sha256=sha), get("config.json")
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "model.safetensors"
        if not p.exists():
            raise LamoError(f"{name_or_path}: folder holds no model.safetensors")
    elif not p.exists():
        raise LamoError(f"unknown model {name_or_path!r}: use one of {', '.join(SIZES)}, "
                        f"a model.safetensors file, or a folder holding one")
    cfg = p.parent / "config.json"
    return p, (cfg if cfg.exists() else None)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Parse safetensors by hand: 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then raw little-endian data (offsets from the data
    start)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if len(raw) < 8:
        raise LamoError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
    n = int(raw[:8].view("<u8")[0])
    if n > min(len(raw) - 8, 100 << 20):
        raise LamoError(f"{path}: not a safetensors file (header length {n} does not fit a "
                        f"{len(raw)}-byte file)")
    try:
        header = json.loads(bytes(raw[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LamoError(f"{path}: not a safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise LamoError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        if end > len(data):
            raise LamoError(f"{path}: truncated: tensor {name} needs bytes up to {end} of the "
                            f"data section, the file has {len(data)}; download it again")
        out[name] = (data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"]),
                     info["dtype"])
    return out


def expected_shapes(c: dict) -> dict[str, tuple]:
    """Every tensor GPT-2 needs, in nn.Linear layout, from its config."""
    d, V = c["n_embd"], c["vocab_size"]
    shapes = {"wte.weight": (V, d), "wpe.weight": (c["n_positions"], d), "ln_f.weight": (d,),
              "ln_f.bias": (d,)}
    for i in range(c["n_layer"]):
        for k, s in {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (3 * d, d),
                     "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d),
                     "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                     "mlp.c_fc.weight": (4 * d, d), "mlp.c_fc.bias": (4 * d,),
                     "mlp.c_proj.weight": (d, 4 * d), "mlp.c_proj.bias": (d,)}.items():
            shapes[f"h.{i}.{k}"] = s
    return shapes


def load_gpt2(name_or_path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path, cfg_path = resolve(name_or_path)
    tensors = {}
    for name, arr in read_safetensors(path).items():
        name = name.removeprefix("transformer.")      # files saved by transformers carry the prefix
        if not SKIPPED.search(name):
            tensors[name] = arr
    if "wte.weight" not in tensors:
        raise LamoError(f"{path}: no wte.weight tensor; not a GPT-2 checkpoint")
    V, d = tensors["wte.weight"][0].shape
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))}
    config = {"n_layer": max(layers) + 1 if layers else 0, "n_embd": d,
              "n_head": d // 64,  # head dim 64
              "vocab_size": V,
              "n_positions": (tensors["wpe.weight"][0].shape[0] if "wpe.weight" in tensors
                              else N_POSITIONS),
              "layer_norm_epsilon": 1e-5}
    if cfg_path is not None:
        hf = json.loads(Path(cfg_path).read_text())
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LamoError(f"{cfg_path}: activation_function {act!r}; "
                            f"GPT-2 uses the tanh GELU (gelu_new)")
        config.update({k: hf[k] for k in config if k in hf})
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise LamoError(f"{path}: missing {len(missing)} GPT-2 tensor(s), "
                        f"e.g. {', '.join(missing[:3])}")
    unknown = [k for k in tensors if k not in shapes]
    if unknown:
        raise LamoError(f"{path}: unexpected tensor(s) {', '.join(unknown[:3])}; "
                        f"not a GPT-2 checkpoint")
    state = {}
    for k, (arr, dtype) in tensors.items():
        t = torch.from_numpy(np.array(arr))                  # copy out of the read-only memmap
        t = t.view(torch.bfloat16).float() if dtype == "BF16" else t.float()
        if k.endswith(TRANSPOSED):
            _check_shape(path, k, t.shape[::-1], shapes[k])
            t = t.t().contiguous()
        _check_shape(path, k, t.shape, shapes[k])
        state[k] = t
    return config, state


def _check_shape(path, name, got, want):
    """An assert on every tensor's shape, phrased as a user-facing error (a wrong file, not a
    bug)."""
    if tuple(got) != tuple(want):
        raise LamoError(f"{path}: {name} has shape {tuple(got)}, expected {tuple(want)} "
                        f"for this config")
