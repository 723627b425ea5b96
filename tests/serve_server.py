"""A real `lmlab serve` process on loopback for the serve tests (started, waited for, stopped)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, key: str | None):
        self.proc, self.port, self.key = proc, port, key
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def post(self, path: str, body=None, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, headers={**self.headers(), **kw.pop("headers", {})},
                             timeout=60, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers(), timeout=60, **kw)

    def healthy(self) -> bool:
        return requests.get(self.url + "/health", timeout=10).json() == {"status": "ok"}

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@contextlib.contextmanager
def process(cmd: list[str], health_url: str, *, env: dict | None = None, timeout: float = 120
            ) -> Iterator[subprocess.Popen]:
    """Start a server process, wait until `health_url` answers 200, and SIGTERM it afterwards."""
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{' '.join(cmd[:4])} exited ({proc.returncode}):\n{log.read()[-5000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(health_url, timeout=10).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(cmd[:4])} did not come up")
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def serve(model: str | Path, *args: str, key: str | None = KEY, threads: int = 1,
          timeout: float = 120) -> Iterator[Server]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LMLAB_API_KEY", None)
    if key:
        env["LMLAB_API_KEY"] = key
    cmd = [sys.executable, "-m", "lmlab", "serve", str(model), "--port", str(port), "--threads", str(threads), *args]
    with process(cmd, f"http://127.0.0.1:{port}/health", env=env, timeout=timeout) as proc:
        yield Server(proc, port, key)


def train_tiny(run: Path, data: Path, *overrides: str) -> Path:
    """A tiny lmlab run to serve (a few steps: what is served matters, not how good it is)."""
    from lmlab.cli import main

    assert main(["train", "--data", str(data), "--out", str(run), "--model.n_head=2", "--train.batch_size=2",
                 "--train.progress=false", "--train.eval_iters=1", "-q", *overrides]) == 0
    return run
