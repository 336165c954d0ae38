"""``vllm serve MODEL --plugin asymvlm``: the OpenAI server end to end, on CPU, tiny LLaVA.

One server for the whole module (start-up takes about 100 s on 2 cores), started exactly as the
README shows (plus the CPU test settings), with ``VLLM_LOGGING_LEVEL=DEBUG`` so that the
scheduler's per-request line can be checked too. The tests talk to it with ``httpx`` and with
the official ``openai`` client, and at the end compare ``/metrics`` with the outcomes seen.

The llava-1.5 preset keeps at least 32 tokens per image (``min_keep``); the tiny model's image
has 64, so overrides below the floor also send ``asymvlm_min_keep``.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from .helpers import engine_image, subprocess_env

pytestmark = pytest.mark.slow

# About 100 s on 2 idle cores; 280 s was measured with other jobs sharing them. A server that
# exits early fails at once, with its log.
STARTUP_TIMEOUT_S = 480
REQUEST_TIMEOUT_S = 120
VISION_TOKENS = 64  # the tiny LLaVA's image: 8 x 8 patches
PRESET_MIN_KEEP = 32  # configs/llava-1.5.yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"(no log: {e})"


class Server:
    def __init__(self, url: str, model: str, log: Path):
        self.url, self.model, self.log = url, model, log
        self.outcomes: list[dict] = []  # every asymvlm outcome the tests received

    def chat(self, content, xargs: dict | None = None, max_tokens: int = 4):
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0.0}
        if xargs is not None:
            body["vllm_xargs"] = xargs
        response = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        if response.status_code == 200:
            self.record(response.json().get("kv_transfer_params"))
        return response

    def record(self, kv_transfer_params) -> dict | None:
        outcome = (kv_transfer_params or {}).get("asymvlm")
        if outcome is not None:
            self.outcomes.append(outcome)
        return outcome


@pytest.fixture(scope="module")
def server(engine_models, tmp_path_factory):
    model = str(engine_models("llava"))
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("vllm")), "serve", model,
        "--plugin", "asymvlm", "--asymvlm-config", "llava-1.5",
        "--host", "127.0.0.1", "--port", str(port),
        # CPU test settings (the same as the in-process engine tests)
        "--enforce-eager", "--max-model-len", "512", "--dtype", "float32", "--block-size", "32",
        "--compilation-config", '{"custom_ops": ["none"]}', "--max-num-seqs", "4",
    ]
    env = subprocess_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as deployed: engine core in its own process
    env["VLLM_LOGGING_LEVEL"] = "DEBUG"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, log)
        yield Server(url, model, log)
    finally:
        _stop(process)


def _wait_healthy(process: subprocess.Popen, url: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode} during start-up; log tail:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s; log tail:\n{_tail(log)}")
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
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
        # the leader is gone; make sure no child of the group lingers
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _image_url(seed: int) -> dict:
    buffer = io.BytesIO()
    engine_image(seed).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def _image_content(seed: int, question: str = "What is in the image?") -> list[dict]:
    # A new image per test: an earlier unpruned run of the same image would be a prefix-cache hit.
    return [_image_url(seed), {"type": "text", "text": question}]


def _ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


# ----------------------------------------------------------------------------- requests


def test_image_request_is_pruned_and_reports_its_outcome(server):
    body = _ok(server.chat(_image_content(1)))
    outcome = body["kv_transfer_params"]["asymvlm"]
    assert outcome["status"] == "pruned"
    assert outcome["vision_tokens"] == VISION_TOKENS
    assert PRESET_MIN_KEEP <= outcome["vision_tokens_kept"] < outcome["vision_tokens"]
    (image,) = outcome["images"]
    assert image["tokens"] == VISION_TOKENS and image["kept"] == outcome["vision_tokens_kept"]
    assert image["keep_ratio"] in (0.5, 0.35, 0.25)  # one of the preset's threshold tiers
    assert image["gap"] >= 0 and outcome["probe_seconds"] >= outcome["scoring_seconds"] >= 0
    # usage.prompt_tokens is the prompt as submitted; the outcome says how much was prefilled.
    assert body["usage"]["prompt_tokens"] == outcome["prompt_tokens"]
    pruned_away = outcome["vision_tokens"] - outcome["vision_tokens_kept"]
    assert outcome["prompt_tokens_prefilled"] == outcome["prompt_tokens"] - pruned_away
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["content"] is not None


def test_debug_log_line(server):
    # VLLM_LOGGING_LEVEL=DEBUG: logger vllm.asymvlm, one line per pruned request (engine-core process)
    pattern = (r"AsymVLM: request \S+: vision tokens 64 -> (\d+), prompt (\d+) -> (\d+) tokens, images "
               r"\[\{'tokens': 64, 'kept': \1,")
    deadline = time.monotonic() + 10
    while not re.search(pattern, server.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, _tail(server.log)
        time.sleep(0.5)


def test_text_only_request_has_no_outcome(server):
    body = _ok(server.chat([{"type": "text", "text": "Say something."}]))
    assert "asymvlm" not in (body.get("kv_transfer_params") or {})


def test_keep_ratio_override(server):
    for seed, xargs, expected in (
        (2, {"asymvlm_keep_ratio": 0.75}, 48),
        (3, {"asymvlm_keep_ratio": 0.25, "asymvlm_min_keep": 1}, 16),
        (4, {"asymvlm_keep_ratio": 0.25}, PRESET_MIN_KEEP),  # the preset's floor still applies
        (5, {"asymvlm_budget": "moderate", "asymvlm_min_keep": 1}, 22),  # the preset's ratio_moderate 0.35
    ):
        outcome = _ok(server.chat(_image_content(seed), xargs))["kv_transfer_params"]["asymvlm"]
        assert outcome["status"] == "pruned", xargs
        assert outcome["vision_tokens_kept"] == expected == outcome["images"][0]["kept"], (xargs, outcome)
        ratio = xargs.get("asymvlm_keep_ratio")
        if ratio is not None:
            assert outcome["images"][0]["keep_ratio"] == ratio
            assert expected == max(xargs.get("asymvlm_min_keep", PRESET_MIN_KEEP), math.floor(VISION_TOKENS * ratio))


def test_off_request_is_not_pruned(server):
    pruned = _ok(server.chat(_image_content(6)))
    body = _ok(server.chat(_image_content(7), {"asymvlm": "off"}))
    outcome = body["kv_transfer_params"]["asymvlm"]
    assert outcome["status"] == "off"
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == VISION_TOKENS
    assert "images" not in outcome and "probe_seconds" not in outcome
    # same prompt shape, pruned or not: usage reports the submitted prompt either way
    assert body["usage"]["prompt_tokens"] == pruned["usage"]["prompt_tokens"] == outcome["prompt_tokens"]


@pytest.mark.parametrize("xargs, named", [
    ({"asymvlm_keep_ratio": 1.5}, "asymvlm_keep_ratio"),
    ({"asymvlm_keep_ratio": 0}, "asymvlm_keep_ratio"),
    ({"asymvlm_keep_ratio": "lots"}, "asymvlm_keep_ratio"),
    ({"asymvlm_keepratio": 0.5}, "asymvlm_keepratio"),
    ({"asymvlm_min_keep": 0}, "asymvlm_min_keep"),
    ({"asymvlm_min_keep": 2.5}, "asymvlm_min_keep"),
    ({"asymvlm_budget": "tight"}, "asymvlm_budget"),
    ({"asymvlm": "maybe"}, "asymvlm: must be 'on' or 'off'"),
    ({"asymvlm": "off", "asymvlm_keep_ratio": 0.5}, "asymvlm_"),
    ({"asymvlm_keep_ratio": 0.5, "asymvlm_budget": "aggressive"}, "asymvlm_keep_ratio"),
])
def test_bad_request_options_are_http_400(server, xargs, named):
    response = server.chat(_image_content(8), xargs)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert named in message, message


def test_openai_client(server):
    openai = pytest.importorskip("openai")

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", timeout=REQUEST_TIMEOUT_S,
                           max_retries=0)  # a retried request would count twice in /metrics
    messages = [{"role": "user", "content": _image_content(9)}]
    completion = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=4, temperature=0.0,
        extra_body={"vllm_xargs": {"asymvlm_keep_ratio": 0.25, "asymvlm_min_keep": 1}},
    )
    outcome = server.record(completion.model_extra["kv_transfer_params"])
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] == 16
    assert completion.usage.prompt_tokens == outcome["prompt_tokens"]

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": _image_content(10)}],
                                       max_tokens=4, extra_body={"vllm_xargs": {"asymvlm_keep_ratio": 1.5}})
    assert "asymvlm_keep_ratio" in str(info.value)


# ----------------------------------------------------------------------------- metrics (last: sums all of the above)


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("asymvlm_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_equal_the_outcomes_seen(server):
    import httpx

    outcomes = server.outcomes
    assert outcomes  # the tests above ran against this server
    metrics = _samples(httpx.get(f"{server.url}/metrics", timeout=30).text)
    statuses = Counter(o["status"] for o in outcomes)
    for status, count in statuses.items():
        assert metrics[f'asymvlm_requests_total{{status="{status}"}}'] == count
    assert sum(v for k, v in metrics.items() if k.startswith("asymvlm_requests_total{")) == len(outcomes)
    assert metrics["asymvlm_vision_tokens_total"] == sum(o["vision_tokens"] for o in outcomes)
    assert metrics["asymvlm_vision_tokens_kept_total"] == sum(o["vision_tokens_kept"] for o in outcomes)
    with_images = [o for o in outcomes if o["vision_tokens"]]
    assert metrics["asymvlm_keep_ratio_count"] == len(with_images)
    assert metrics["asymvlm_keep_ratio_sum"] == pytest.approx(sum(o["vision_tokens_kept"] / o["vision_tokens"]
                                                                   for o in with_images))
    probed = [o for o in outcomes if "probe_seconds" in o]
    assert metrics["asymvlm_probe_seconds_count"] == len(probed) == statuses["pruned"]
    assert metrics["asymvlm_probe_seconds_sum"] == pytest.approx(sum(o["probe_seconds"] for o in probed))
    assert metrics["asymvlm_scoring_seconds_count"] == len(probed)
    assert metrics["asymvlm_scoring_seconds_sum"] == pytest.approx(sum(o["scoring_seconds"] for o in probed))
