"""(helper) `pagedjax serve` in a subprocess on a loopback port, for the robustness
benchmarks (fuzz_server.py, load.py): start it, read its /metrics, stop it.

The default model is a tiny random Llama written to a temporary directory (these
benchmarks measure the server, not the model); `--model` takes any model instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import httpx


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model_dir() -> str:
    """A tiny random Llama checkpoint (with a tokenizer and a chat template)."""
    from random_checkpoint import make_tiny_llama

    return make_tiny_llama(tempfile.mkdtemp(prefix="pagedjax-bench-"))


class ServerProcess:
    """`pagedjax serve MODEL --port P ARGS...`, its output in a log file."""

    def __init__(self, model: Optional[str], args: Sequence[str], api_key: str = "bench"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="pagedjax-serve-"), "serve.log")
        command = [sys.executable, "-m", "pagedjax.cli", "serve"]
        command += [model] if model else []
        command += ["--port", str(self.port), "--api-key", api_key, *args]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, JAX_PLATFORMS=os.environ.get(
                                            "JAX_PLATFORMS", "cpu")))

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until /health answers 200 (raises if the process exits or time runs out)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pagedjax serve exited; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"pagedjax serve did not start; see {self.log_path}")

    @property
    def headers(self) -> dict:
        """The auth header of this server's API key."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def metrics(self) -> dict[str, float]:
        """Every unlabelled-or-labelled pagedjax: sample of /metrics, by metric name."""
        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("pagedjax:"):
                name = line.split("{", 1)[0].split(" ", 1)[0][len("pagedjax:"):]
                values[name] = float(line.rsplit(" ", 1)[-1])
        return values

    def rss_bytes(self) -> int:
        """The server process's resident memory."""
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self, timeout_s: float = 60) -> int:
        """SIGINT (a graceful shutdown), then kill if it lingers; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
