"""Fixtures shared by the test files: all offline and CPU-sized. Downloads are exercised against a
loopback HTTP server started here, on small files the tests make in the real formats."""
import http.server
import threading

import pytest
import torch

import data

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)   # a tiny GPT-2


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
    """A loopback HTTP server over an in-memory {path: bytes}, honouring Range, recording requests."""

    def __init__(self):
        self.files, self.requests, self.cut_after = {}, [], None   # cut_after: drop the connection early
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append((self.path, dict(self.headers)))
                body = owner.files.get(self.path)
                if body is None:
                    return self.send_error(404)
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if "Range" in self.headers else 0
                self.send_response(206 if start else 200)
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
    return data.collect("Hopper-v4", "noisy", 10, tmp_path_factory.mktemp("d") / "tiny.hdf5", seed=0, max_steps=100)


@pytest.fixture(scope="session")
def tiny_txt(tmp_path_factory):
    p = tmp_path_factory.mktemp("txt") / "tiny.txt"
    p.write_text("The hopper learns to hop from offline data, one token at a time.\n" * 300, encoding="utf-8")
    return p
