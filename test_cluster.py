"""What a cluster run relies on (issue 19): progress as plain lines in a log file, dataset hashes
computed once, downloads that two processes can start at once. The Slurm check itself is
tests/slurm_check.sh (it needs root and apt; .ci/run runs it after the test suite)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import lamo

REPO = Path(__file__).parent


def test_a_run_logs_plain_lines_to_a_file(tiny_hdf5, tmp_path):
    """stderr is a file, as in a Slurm job: timed progress lines (step, steps/s, ETA, loss, lr,
    score), no carriage-return redraws."""
    log = tmp_path / "slurm.out"
    with open(log, "w") as f:   # LAMO_LOG_SECONDS=0: a line every --log-every steps, not every 30 s
        r = subprocess.run([sys.executable, "lamo.py", "--model", "dt", "--data", str(tiny_hdf5),
                            "--steps", "30", "--eval-every", "15", "--eval-episodes", "1",
                            "--eval-max-steps", "20", "--log-every", "10",
                            "--out", str(tmp_path / "r")],
                           cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "LAMO_LOG_SECONDS": "0"})
    text = log.read_text()
    assert r.returncode == 0, text[-2000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("train: ")]
    assert [line.split()[1] for line in lines] == ["0/30", "10/30", "20/30", "30/30"]
    assert "step/s, ETA" in lines[-1] and "loss " in lines[-1] and "lr " in lines[-1]
    assert "score " in lines[-1]


class CountingSha256:
    """hashlib.sha256 that counts the bytes it is fed."""
    fed = 0

    def __init__(self):
        self.h = hashlib.new("sha256")

    def update(self, chunk):
        CountingSha256.fed += len(chunk)
        self.h.update(chunk)

    def hexdigest(self):
        return self.h.hexdigest()


def test_a_second_start_hashes_no_dataset_bytes(tiny_hdf5, tmp_path, monkeypatch):
    """summary.json names every dataset file with its sha256; a resume or a requeued job must not
    read a 7 GB file again for it, and a file that changed must be hashed anew."""
    copy = tmp_path / "data.hdf5"
    copy.write_bytes(tiny_hdf5.read_bytes())
    monkeypatch.setattr(data.hashlib, "sha256", CountingSha256)
    args = ["--model", "dt", "--data", str(copy), "--steps", "2", "--eval-every", "2",
            "--eval-episodes", "1", "--eval-max-steps", "5", "--log-every", "1"]
    lamo.main([*args, "--out", str(tmp_path / "a")])
    assert CountingSha256.fed == copy.stat().st_size
    digest = hashlib.new("sha256", copy.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["data"][str(copy)] == digest
    lamo.main(["--resume", str(tmp_path / "a"), "--steps", "4"])
    lamo.main([*args, "--out", str(tmp_path / "b")])
    assert CountingSha256.fed == copy.stat().st_size                  # nothing read again
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))   # touched
    lamo.main([*args, "--out", str(tmp_path / "c")])
    assert CountingSha256.fed == 2 * copy.stat().st_size


def test_two_processes_download_one_file_once(server, tmp_path):
    """Two shards starting together on a shared cache: one downloads, the other waits for the lock
    and finds the file complete; no error, one request, one verified file."""
    body = os.urandom(300_000)
    server.files["/d.hdf5"] = body
    dest = tmp_path / "cache" / "d.hdf5"
    dest.parent.mkdir(parents=True)
    code = (f"import data; from pathlib import Path; data.download({server.url + '/d.hdf5'!r}, "
            f"Path({str(dest)!r}), local_hint='x', size={len(body)}, "
            f"sha256={hashlib.sha256(body).hexdigest()!r})")
    with data.locked(dest):                   # both start while the lock is held, then race for it
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        early = []
        for p in procs:                       # until each says it waits (or ends, failing below)
            early.append("")
            for line in p.stderr:
                early[-1] += line
                if "waiting for another process downloading d.hdf5" in line:
                    break
    errors = [e + p.communicate(timeout=300)[1] for e, p in zip(early, procs)]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert all("waiting for another process downloading d.hdf5" in e for e in errors)
    assert dest.read_bytes() == body and len(server.requests) == 1
    assert not dest.with_name("d.hdf5.part").exists()


def test_a_requeued_job_checkpoints_on_sigterm_and_the_sweeps_sigint(tiny_hdf5, monkeypatch,
                                                                     tmp_path):
    """Slurm's requeue or preemption sends SIGTERM to every process of the job, and sweep.py
    passes a SIGINT on to its run: the pair is one stop, saved after the current step, never an
    abort. (Two Ctrl-Cs still abort, test_lamo.py.)"""
    real = lamo.action_loss
    calls = []

    def loss(*args):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(lamo, "action_loss", loss)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        lamo.main(["--model", "dt", "--data", str(tiny_hdf5), "--steps", "40", "--eval-every", "20",
                   "--eval-episodes", "1", "--targets", "100", "--out", str(out)])
    assert stopped.value.code == 130
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 7
