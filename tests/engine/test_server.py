"""``vllm serve MODEL --plugin asymvlm``: the OpenAI server end to end, on CPU, tiny LLaVA.

The server (``tests/engine/server.py``, one per test session, shared with the hostile-client
tests) is started exactly as the README shows plus the CPU test settings. The tests talk to it
with ``httpx`` and the official ``openai`` client. Each test sends its own requests: any one
passes alone and in any order; ``/metrics`` is compared as a before/after delta.

The llava-1.5 preset keeps at least 32 tokens per image (``min_keep``); the tiny model's image
has 64, so overrides below the floor also send ``asymvlm_min_keep``.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import pytest

from .server import PRESET_MIN_KEEP, REQUEST_TIMEOUT_S, VISION_TOKENS, image_content as _image_content, tail as _tail

pytestmark = pytest.mark.slow


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
    assert image["budget_ratio"] in (0.5, 0.35, 0.25)  # one of the preset's threshold tiers
    assert image["keep_ratio"] == image["kept"] / VISION_TOKENS  # what was actually kept
    assert image["min_keep_applied"] == (image["kept"] > math.floor(VISION_TOKENS * image["budget_ratio"]))
    assert image["gap"] >= 0 and outcome["probe_seconds"] >= outcome["scoring_seconds"] >= 0
    # usage.prompt_tokens is the prompt as submitted; the outcome says how much was prefilled.
    assert body["usage"]["prompt_tokens"] == outcome["prompt_tokens"]
    pruned_away = outcome["vision_tokens"] - outcome["vision_tokens_kept"]
    assert outcome["prompt_tokens_prefilled"] == outcome["prompt_tokens"] - pruned_away
    assert body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["content"] is not None


def test_debug_log_line(server):
    # VLLM_LOGGING_LEVEL=DEBUG: logger vllm.asymvlm, one line per pruned request (engine-core process)
    body = _ok(server.chat(_image_content(11)))
    pattern = (rf"AsymVLM: request {re.escape(body['id'])}\S*: vision tokens 64 -> (\d+), prompt (\d+) -> (\d+) tokens, "
               r"images \[\{'tokens': 64, 'kept': \1,")
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
        (12, {"asymvlm_keep_ratio": 0.01}, PRESET_MIN_KEEP),
        (5, {"asymvlm_budget": "moderate", "asymvlm_min_keep": 1}, 22),  # the preset's ratio_moderate 0.35
    ):
        outcome = _ok(server.chat(_image_content(seed), xargs))["kv_transfer_params"]["asymvlm"]
        assert outcome["status"] == "pruned", xargs
        (image,) = outcome["images"]
        assert outcome["vision_tokens_kept"] == expected == image["kept"], (xargs, outcome)
        # keep_ratio is what was kept; budget_ratio what the rule asked for; min_keep may raise it.
        assert image["keep_ratio"] == expected / VISION_TOKENS
        ratio = xargs.get("asymvlm_keep_ratio", 0.35)
        assert image["budget_ratio"] == ratio
        floor = xargs.get("asymvlm_min_keep", PRESET_MIN_KEEP)
        assert expected == max(floor, math.floor(VISION_TOKENS * ratio))
        assert image["min_keep_applied"] == (floor > math.floor(VISION_TOKENS * ratio))


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
    ({"asymvlm": "maybe"}, "asymvlm: must be the string 'on' or 'off'"),
    ({"asymvlm": "off", "asymvlm_keep_ratio": 0.5}, "asymvlm_"),
    ({"asymvlm_keep_ratio": 0.5, "asymvlm_budget": "aggressive"}, "asymvlm_keep_ratio"),
    ({"asymvlm_text_eviction": True}, "asymvlm_text_eviction: must be the string 'on' or 'off'"),
    ({"asymvlm_text_eviction": "yes"}, "asymvlm_text_eviction"),
    ({"asymvlm_text_budget": 0}, "asymvlm_text_budget"),
    ({"asymvlm_text_budget": "64"}, "asymvlm_text_budget: must be a JSON integer"),
    ({"asymvlm_text_budget": 64.5}, "asymvlm_text_budget"),
    ({"asymvlm_text_eviction": "off", "asymvlm_text_budget": 64}, "asymvlm_text_budget"),
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
    outcome = completion.model_extra["kv_transfer_params"]["asymvlm"]
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] == 16
    assert completion.usage.prompt_tokens == outcome["prompt_tokens"]

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": _image_content(10)}],
                                       max_tokens=4, extra_body={"vllm_xargs": {"asymvlm_keep_ratio": 1.5}})
    assert "asymvlm_keep_ratio" in str(info.value)


# ----------------------------------------------------------------------------- metrics


def test_metrics_count_the_outcomes(server):
    before = server.metrics()
    outcomes = []
    for seed, xargs in ((13, None), (14, {"asymvlm": "off"}), (15, {"asymvlm_keep_ratio": 0.75})):
        outcomes.append(_ok(server.chat(_image_content(seed), xargs))["kv_transfer_params"]["asymvlm"])
    _ok(server.chat([{"type": "text", "text": "Say something."}]))  # text-only: not counted
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    statuses = Counter(o["status"] for o in outcomes)
    assert statuses == {"pruned": 2, "off": 1}
    for status, count in statuses.items():
        assert delta(f'asymvlm_requests_total{{status="{status}"}}') == count
    assert sum(delta(k) for k in after if k.startswith("asymvlm_requests_total{")) == len(outcomes)
    assert delta("asymvlm_vision_tokens_total") == sum(o["vision_tokens"] for o in outcomes)
    assert delta("asymvlm_vision_tokens_kept_total") == sum(o["vision_tokens_kept"] for o in outcomes)
    assert delta("asymvlm_keep_ratio_count") == len(outcomes)
    assert delta("asymvlm_keep_ratio_sum") == pytest.approx(sum(o["vision_tokens_kept"] / o["vision_tokens"]
                                                                for o in outcomes))
    probed = [o for o in outcomes if "probe_seconds" in o]
    assert delta("asymvlm_probe_seconds_count") == len(probed) == statuses["pruned"]
    assert delta("asymvlm_probe_seconds_sum") == pytest.approx(sum(o["probe_seconds"] for o in probed))
    assert delta("asymvlm_scoring_seconds_count") == len(probed)
    assert delta("asymvlm_scoring_seconds_sum") == pytest.approx(sum(o["scoring_seconds"] for o in probed))


def test_text_eviction_reports_its_outcome_and_metrics(server):
    """A long answer with a 32-token eviction budget (per request; the preset leaves eviction
    off): the outcome says what was evicted, streaming included, and /metrics agrees."""
    before = server.metrics()
    xargs = {"asymvlm_text_budget": 32}
    body = _ok(server.chat(_image_content(16), xargs, max_tokens=200, ignore_eos=True))
    outcome = body["kv_transfer_params"]["asymvlm"]
    assert outcome["status"] == "pruned"
    text = outcome["text"]
    assert text["status"] == "on" and text["budget_tokens"] == 32
    assert text["evicted_blocks"] >= 3 and text["evicted_tokens"] == 32 * text["evicted_blocks"]
    assert text["eviction_steps"] >= 1 and text["eviction_seconds"] >= 0
    prefilled = outcome["prompt_tokens_prefilled"]
    assert 0 < text["peak_live_blocks"] <= math.ceil(prefilled / 32) + 1 + 1 + 1  # prompt + budget + protected + 1
    assert body["usage"]["completion_tokens"] == 200
    # VLLM_LOGGING_LEVEL=DEBUG: one line per eviction on logger vllm.asymvlm (the worker's)
    pattern = rf"AsymVLM: request {re.escape(body['id'])}\S*: evicted blocks \[\d+(, \d+)*\] \(\d+ live tokens before\)"
    deadline = time.monotonic() + 10
    while len(re.findall(pattern, server.log.read_text(errors="replace"))) < text["eviction_steps"]:
        assert time.monotonic() < deadline, _tail(server.log)
        time.sleep(0.5)

    import httpx
    import json

    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=REQUEST_TIMEOUT_S,
                      json=server.chat_body([{"type": "text", "text": "Tell a long story."}], 120, stream=True,
                                            ignore_eos=True, vllm_xargs=xargs)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    streamed = [c["kv_transfer_params"]["asymvlm"] for c in chunks if (c.get("kv_transfer_params") or {}).get("asymvlm")]
    assert len(streamed) == 1 and streamed[0]["text"]["evicted_blocks"] >= 1  # on the final chunk only
    assert "status" not in streamed[0]  # a text-only request: no vision fields
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    texts = [text, streamed[0]["text"]]
    assert delta('asymvlm_text_requests_total{status="on"}') == 2
    assert delta("asymvlm_evicted_blocks_total") == sum(t["evicted_blocks"] for t in texts)
    assert delta("asymvlm_evicted_tokens_total") == sum(t["evicted_tokens"] for t in texts)
    assert delta("asymvlm_evictions_total") == sum(t["eviction_steps"] for t in texts)
    assert delta("asymvlm_peak_live_blocks_sum") == sum(t["peak_live_blocks"] for t in texts)
    assert delta("asymvlm_eviction_seconds_count") == 2
    assert delta("asymvlm_requests_total{status=\"pruned\"}") == 1  # the image request only
