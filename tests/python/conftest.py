"""Fixtures: the tiny test model and a real kvs-worker process on an ephemeral loopback port.

KVS_WORKER names the kvs-worker binary (CTest sets it); KVS_SOURCE_DIR the source tree.
The tiny model is built from the default model's vocabulary by tests/tools/make_tiny_gguf.py.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

SRC = pathlib.Path(os.environ.get("KVS_SOURCE_DIR", pathlib.Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(SRC / "client" / "python"))

import kvstream  # noqa: E402

VOCAB = pathlib.Path(os.environ.get("KVS_MODEL_DIR", pathlib.Path.home() / ".cache/kvstream/models")) \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"


def worker_binary():
    path = os.environ.get("KVS_WORKER")
    if not path:
        for build in ("build", "build-srv"):
            cand = SRC / build / "kvs-worker"
            if cand.exists():
                return str(cand)
        pytest.fail("set KVS_WORKER to the kvs-worker binary")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny.gguf"
    subprocess.run([sys.executable, str(SRC / "tests/tools/make_tiny_gguf.py"), "-o", str(out),
                    "--type", "q8_0", "--layers", "2", "--n-embd", "64", "--n-head", "4",
                    "--n-head-kv", "2", "--n-ff", "128", "--ctx", "2048", "--vocab", str(VOCAB)],
                   check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="session")
def default_model():
    """The default model (SmolLM2-135M-Instruct Q4_1), which scripts/setup.sh fetches."""
    if os.environ.get("KVS_TEST_QUICK"):
        # the sanitizer run of scripts/test.sh: the default model's 30 layers under ASan would
        # outrun these tests' timings (the 8-client load test, latency under appends); the
        # release run runs them
        pytest.skip("KVS_TEST_QUICK: default-model tests run in the release build's run")
    if not VOCAB.exists():
        pytest.fail(f"the default model {VOCAB} is missing: run scripts/setup.sh")
    return str(VOCAB)


class Worker:
    """A kvs-worker process; start() waits for its 'listening on' line."""

    def __init__(self, model, data_dir=None, extra=(), threads=1, cells=4096):
        self.model, self.data_dir, self.extra = model, data_dir, list(extra)
        self.threads, self.cells = threads, cells
        self.proc = None
        self.endpoint = None

    def start(self, listen="tcp://127.0.0.1:*"):
        cmd = [worker_binary(), "--model", self.model, "--listen", listen, "--threads",
               str(self.threads), "--cells", str(self.cells), "--fsync", "always"] + self.extra
        if self.data_dir:
            cmd += ["--data-dir", str(self.data_dir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"worker did not start: {line!r} {self.proc.stderr.read()}")
        self.endpoint = line.strip().split("listening on ", 1)[1]
        return self

    def client(self, timeout=30.0):
        return kvstream.Client(self.endpoint, timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def worker(tiny_model, tmp_path):
    w = Worker(tiny_model, data_dir=tmp_path / "data").start()
    yield w
    rc = w.stop()
    assert rc == 0, f"worker exit status {rc} after SIGTERM"


@pytest.fixture
def client(worker):
    c = worker.client()
    yield c
    c.close()
