"""Start `vllm-medusa serve` on loopback for a test and always take it down again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest


# A chat question the demo model answers with "Paris" by a wide margin in float32 and bf16 alike
# (top-1 minus top-2 probability >= 0.43 on every token up to "Paris", HF transformers, 2026-12-07).
# The bare "What is the capital of France?" is a near tie between "The" (0.155) and "L" (0.140) at
# its first token, which CPUs with AMX break the other way ("L'Étoile, la Marseillaise, ...").
PARIS_QUESTION = "What is the capital of France? Answer in one sentence."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def get_text(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def serve_command() -> list[str]:
    script = Path(sys.executable).with_name("vllm-medusa")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm_medusa.cli"]


@contextlib.contextmanager
def running_server(args: list[str], start_timeout: float = 420) -> Iterator[str]:
    """``vllm-medusa serve ARGS --host 127.0.0.1 --port P``; yields the base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = serve_command() + ["serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        # Own process group, so the engine-core child goes down with the server whatever happens.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                        if resp.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"server not healthy in time:\n{log.read()[-4000:]}")
                time.sleep(2)
            yield base
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
