"""``vllm serve TINY_PHI --plugin asymvlm --trust-remote-code``: Phi-3.5-Vision through the OpenAI server.

The tiny Phi-3-V directory carries its processor as remote code, so the server starts only when
the user opts in with ``--trust-remote-code`` (and fails with vLLM's own message otherwise). With
no ``--asymvlm-config`` the plugin takes the preset of the architecture (``phi-3.5-vision``:
threshold tiers, ``min_keep: 64``). The separator rows of an image (``12·h_crop + 13`` of them:
the newlines and the global separator) are never pruned, so an image keeps them on top of its
budget: ``kept = separators + max(min_keep, ⌊patch rows · ratio⌋)``.

One server for the module (about a minute to start on 2 cores), stopped at its end.
"""

from __future__ import annotations

import math
import subprocess

import pytest

from .server import PHI3V_SERVER_FLAGS, image_url, serve_command, start_server, stop_server

pytestmark = pytest.mark.slow

PRESET_MIN_KEEP = 64  # configs/phi-3.5-vision.yaml
PRESET_RATIOS = (0.5, 0.35, 0.25)
# (width, height) of the image -> (rows, separator rows): 12h(12w + 1) + 157 and 12h + 13 for h x w crops.
WIDE = (128, 64)  # 1 x 2 crops
SQUARE = (224, 224)  # 2 x 2 crops
ROWS = {WIDE: (457, 25), SQUARE: (757, 37)}


@pytest.fixture(scope="module")
def phi3v_server(engine_models, tmp_path_factory):
    running = start_server(str(engine_models("phi3_v")), tmp_path_factory.mktemp("vllm-serve-phi3v") / "server.log",
                           PHI3V_SERVER_FLAGS)
    try:
        yield running
    finally:
        stop_server(running.process)


def _chat(server, seed: int, size, xargs=None) -> dict:
    content = [image_url(seed, size=size), {"type": "text", "text": "What is in the image?"}]
    response = server.chat(content, xargs)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("size", [WIDE, SQUARE], ids=["1x2-crops", "2x2-crops"])
def test_image_chat_is_pruned_and_keeps_the_separators(phi3v_server, size):
    body = _chat(phi3v_server, 70 + list(ROWS).index(size), size)
    outcome = body["kv_transfer_params"]["asymvlm"]
    assert outcome["status"] == "pruned", outcome
    rows, separators = ROWS[size]
    (image,) = outcome["images"]
    assert image["tokens"] == outcome["vision_tokens"] == rows
    assert image["budget_ratio"] in PRESET_RATIOS  # one of the preset's threshold tiers
    patches = rows - separators
    assert image["kept"] == outcome["vision_tokens_kept"] == separators + max(
        PRESET_MIN_KEEP, math.floor(patches * image["budget_ratio"]))
    assert outcome["prompt_tokens_prefilled"] == outcome["prompt_tokens"] - (rows - image["kept"])
    assert body["usage"]["prompt_tokens"] == outcome["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["content"] is not None


def test_the_preset_floor_applies_on_top_of_the_separators(phi3v_server):
    """A request ratio far below the floor: the Phi-3.5-Vision preset's min_keep (64) patch rows
    are kept, and every separator row besides."""
    outcome = _chat(phi3v_server, 72, WIDE, {"asymvlm_keep_ratio": 0.1})["kv_transfer_params"]["asymvlm"]
    assert outcome["status"] == "pruned", outcome
    (image,) = outcome["images"]
    rows, separators = ROWS[WIDE]
    assert math.floor((rows - separators) * 0.1) < PRESET_MIN_KEEP
    assert (image["tokens"], image["kept"], image["budget_ratio"]) == (rows, separators + PRESET_MIN_KEEP, 0.1)
    assert image["min_keep_applied"] is True


def test_text_only_request_has_no_outcome(phi3v_server):
    response = phi3v_server.chat([{"type": "text", "text": "Say something."}])
    assert response.status_code == 200, response.text
    assert "asymvlm" not in (response.json().get("kv_transfer_params") or {})


def test_serve_without_trust_remote_code_does_not_start(engine_models):
    flags = tuple(f for f in PHI3V_SERVER_FLAGS if f != "--trust-remote-code")
    command, env = serve_command(str(engine_models("phi3_v")), flags)
    result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "trust_remote_code" in output, output[-3000:]
    assert "Application startup complete" not in output
