"""``vllm serve TINY_LLAVA --plugin asymvlm`` for the server tests: one process per test session.

The server is started exactly as the README shows (plus the CPU test settings), with
``VLLM_LOGGING_LEVEL=DEBUG`` so that the scheduler's per-request line can be checked, and is
shared by every server test module (start-up takes 100-280 s on 2 cores). Tests must not
depend on each other's requests: counters are compared as deltas (:meth:`Server.metrics`).

``test_server_phi3v.py`` starts its own ``vllm serve TINY_PHI --plugin asymvlm --trust-remote-code``
(:data:`PHI3V_SERVER_FLAGS`) for its module.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import engine_image, subprocess_env

STARTUP_TIMEOUT_S = 480
REQUEST_TIMEOUT_S = 120
VISION_TOKENS = 64  # the tiny LLaVA's image: 8 x 8 patches
PRESET_MIN_KEEP = 32  # configs/llava-1.5.yaml
SERVER_FLAGS = (
    "--plugin", "asymvlm", "--asymvlm-config", "llava-1.5",
    # CPU test settings (the same as the in-process engine tests)
    "--enforce-eager", "--max-model-len", "512", "--dtype", "float32", "--block-size", "32",
    "--compilation-config", '{"custom_ops": ["none"]}', "--max-num-seqs", "4",
)
# Tiny Phi-3.5-Vision: no --asymvlm-config (the preset of its architecture, phi-3.5-vision);
# its processor is remote code in the model directory, so the user opts in. An image is
# 457-757 tokens (1 x 2 to 2 x 2 HD crops).
PHI3V_SERVER_FLAGS = (
    "--plugin", "asymvlm", "--trust-remote-code",
    "--enforce-eager", "--max-model-len", "2048", "--max-num-batched-tokens", "2048", "--dtype", "float32",
    "--block-size", "32", "--compilation-config", '{"custom_ops": ["none"]}', "--max-num-seqs", "4",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(no log: {e})"


class Server:
    """A running ``vllm serve``."""

    def __init__(self, url: str, model: str, log: Path, process: subprocess.Popen):
        self.url, self.model, self.log, self.process = url, model, log, process

    def chat_body(self, content, max_tokens: int = 4, **extra) -> dict:
        """A greedy one-turn chat request (``extra``: more request fields, e.g. ``vllm_xargs``)."""
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0.0, **extra}

    def post(self, path: str, body: dict, timeout: float = REQUEST_TIMEOUT_S):
        import httpx

        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def chat(self, content, xargs: dict | None = None, max_tokens: int = 4, **extra):
        if xargs is not None:
            extra["vllm_xargs"] = xargs
        return self.post("/v1/chat/completions", self.chat_body(content, max_tokens, **extra))

    def metrics(self) -> dict[str, float]:
        """Every sample on ``/metrics`` (vLLM's and AsymVLM's), by name with labels."""
        from benchmarks.common import metrics_sample

        return metrics_sample(self.url)

    def alive(self) -> bool:
        import httpx

        try:
            return self.process.poll() is None and httpx.get(f"{self.url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False


def image_url(seed: int, fmt: str = "PNG", size: tuple[int, int] = (224, 224)) -> dict:
    buffer = io.BytesIO()
    engine_image(seed, size[1], size[0]).save(buffer, format=fmt)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/{fmt.lower()};base64,{data}"}}


def image_content(seed: int, question: str = "What is in the image?") -> list[dict]:
    # A new image per test: an earlier unpruned run of the same image would be a prefix-cache hit.
    return [image_url(seed), {"type": "text", "text": question}]


def serve_command(model: str, flags=SERVER_FLAGS) -> tuple[list[str], dict]:
    """The ``vllm serve`` command line on a free port, and its environment."""
    command = [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1",
               "--port", str(free_port()), *flags]
    env = subprocess_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as deployed: engine core in its own process
    env["VLLM_LOGGING_LEVEL"] = "DEBUG"
    return command, env


def start_server(model: str, log: Path, flags=SERVER_FLAGS) -> Server:
    command, env = serve_command(model, flags)
    port = int(command[command.index("--port") + 1])
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", model, log, process)
    try:
        _wait_healthy(server)
    except BaseException:
        stop_server(process)
        raise
    return server


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.alive():
        if server.process.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.process.returncode} during start-up; log tail:\n{tail(server.log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s; log tail:\n{tail(server.log)}")
        time.sleep(1)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (API server, engine core, workers), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure no child of the group lingers
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return
