"""Every sampling option crossed with pruning, in the real engine (in-process, CPU, tiny LLaVA).

Three engines of one tiny LLaVA: vLLM without the plugin (``plain``), AsymVLM keeping every
token (``keep_all``) and AsymVLM keeping half (``prune``, ``min_keep`` 1). Each option runs

* on ``plain`` and ``keep_all`` with the same image: the answers are identical (seeded
  sampling included), and ``keep_all`` reports an outcome;
* on ``prune`` pruned and with ``asymvlm: "off"``: nothing crashes, the outcome is there and
  says what happened, and the option does what vLLM documents (the top-k logprobs come back,
  the stop string stops, only allowed tokens appear, the JSON schema holds, ...).

``prompt_logprobs`` (and so ``echo`` with logprobs) run unpruned, with status
``unsupported_option``: the front end lines prompt logprobs up with the submitted prompt.
Every engine's blocks all come back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from .helpers import EnginePool, chat_messages, engine_image, num_free_blocks, scheduler

pytestmark = pytest.mark.slow

KV_CACHE_BYTES = 64 * 2**20
KEEP_ALL = {"vision": {"budget": {"rule": "uniform", "ratio": 1.0}}}
PRUNE_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
QUESTION = "What is shown in this picture?"
MAX_TOKENS = 8


@dataclass(frozen=True)
class Option:
    name: str
    params: dict[str, Any]
    pruned_status: str = "pruned"


def _json_schema_params() -> dict[str, Any]:
    from vllm.sampling_params import StructuredOutputsParams

    return {"structured_outputs": StructuredOutputsParams(json={"type": "string", "enum": ["yes", "no"]}),
            "max_tokens": 16, "ignore_eos": False}


OPTIONS = [
    Option("greedy", {}),
    Option("seed", {"temperature": 0.8, "seed": 1234}),
    Option("seed_n3", {"temperature": 1.0, "seed": 7, "n": 3}),
    Option("n2_unseeded_top_k1", {"temperature": 1.0, "top_k": 1, "n": 2}),
    Option("top_p_min_p", {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "seed": 3}),
    Option("logprobs", {"logprobs": 5}),
    Option("prompt_logprobs", {"prompt_logprobs": 2, "logprobs": 1}, "unsupported_option"),
    Option("prompt_logprobs_0", {"prompt_logprobs": 0}, "unsupported_option"),
    Option("min_tokens", {"min_tokens": 6, "ignore_eos": False}),
    Option("penalties", {"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.3}),
    Option("logit_bias", {"logit_bias": {5: 100.0}}),
    Option("allowed_token_ids", {"allowed_token_ids": [5, 6, 7, 8]}),
    Option("bad_words", {"bad_words": ["the", "a"]}),
    Option("stop_token_ids", {"stop_token_ids": [5], "logit_bias": {5: 100.0}}),
    Option("json_schema", {}),  # filled by _params (needs vllm imported)
]


def _params(option: Option, **extra_args):
    from vllm import SamplingParams

    kwargs = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    kwargs.update(_json_schema_params() if option.name == "json_schema" else option.params)
    return SamplingParams(**kwargs, extra_args=extra_args or None)


class _Engines(EnginePool):
    def __call__(self, kind: str):
        config = {"plain": None, "keep_all": KEEP_ALL, "prune": PRUNE_HALF}[kind]
        return self.build(kind, "llava", config, KV_CACHE_BYTES)


@pytest.fixture(scope="module")
def engines(engine_models):
    with _Engines(engine_models) as pool:
        yield pool


def _run(llm, image_seed: int, params):
    free = num_free_blocks(llm)
    (out,) = llm.chat([chat_messages(engine_image(image_seed), QUESTION)], params, use_tqdm=False)
    assert num_free_blocks(llm) == free, "KV blocks leaked"
    assert not scheduler(llm).has_unfinished_requests()
    return out


def _completions(out) -> list[list[int]]:
    return [list(c.token_ids) for c in out.outputs]


def _outcome(out) -> dict:
    outcome = (out.kv_transfer_params or {}).get("asymvlm")
    assert outcome is not None, "no AsymVLM outcome on an image request"
    return outcome


def _prompt_logprobs(out):
    if out.prompt_logprobs is None:
        return None
    return [None if p is None else {t: round(lp.logprob, 4) for t, lp in p.items()} for p in out.prompt_logprobs]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_keep_all_is_identical_to_vllm_without_the_plugin(engines, option):
    seed = 100 + OPTIONS.index(option)
    plain = _run(engines("plain"), seed, _params(option))
    keep_all = _run(engines("keep_all"), seed, _params(option))
    assert _completions(keep_all) == _completions(plain)
    assert [c.text for c in keep_all.outputs] == [c.text for c in plain.outputs]
    assert _prompt_logprobs(keep_all) == _prompt_logprobs(plain)
    for ours, theirs in zip(keep_all.outputs, plain.outputs):
        assert (ours.logprobs is None) == (theirs.logprobs is None)
        if ours.logprobs is not None:
            for a, b in zip(ours.logprobs, theirs.logprobs):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    outcome = _outcome(keep_all)
    assert outcome["status"] == option.pruned_status
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 64


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_pruned_and_off_run_and_report(engines, option):
    llm = engines("prune")
    seed = 200 + OPTIONS.index(option)
    pruned = _run(llm, seed, _params(option))
    off = _run(llm, seed + 50, _params(option, asymvlm="off"))
    outcome = _outcome(pruned)
    assert outcome["status"] == option.pruned_status, outcome
    if option.pruned_status == "pruned":
        assert outcome["vision_tokens_kept"] == 32 and outcome["prompt_tokens_prefilled"] == outcome["prompt_tokens"] - 32
        (image,) = outcome["images"]
        assert image["keep_ratio"] == image["budget_ratio"] == 0.5 and not image["min_keep_applied"]
    else:
        assert outcome["vision_tokens_kept"] == 64 and "prompt_logprobs" in outcome["reason"]
        # Unpruned, the prompt logprobs cover the whole submitted prompt.
        assert len(pruned.prompt_logprobs) == len(pruned.prompt_token_ids) == outcome["prompt_tokens"]
    assert _outcome(off)["status"] == "off"
    n = option.params.get("n", 1)
    for out in (pruned, off):
        assert len(out.outputs) == n
        for completion in out.outputs:
            tokens = list(completion.token_ids)
            assert 1 <= len(tokens) <= 16
            _check_documented_behaviour(option, completion, tokens)


def _check_documented_behaviour(option: Option, completion, tokens: list[int]) -> None:
    p = option.params
    if "logprobs" in p:
        assert completion.logprobs is not None and len(completion.logprobs) == len(tokens)
        assert all(len(entry) >= p["logprobs"] for entry in completion.logprobs)
    if option.name == "allowed_token_ids":
        assert set(tokens) <= set(p["allowed_token_ids"])
    if option.name == "logit_bias":
        assert tokens == [5] * MAX_TOKENS
    if option.name == "stop_token_ids":
        assert tokens == [5] and completion.finish_reason == "stop"
    if option.name == "min_tokens":
        assert len(tokens) >= p["min_tokens"]
    if option.name == "json_schema":
        if completion.finish_reason == "stop":
            assert json.loads(completion.text) in ("yes", "no")
        else:
            assert completion.text.lstrip().startswith('"')
    if option.name == "n2_unseeded_top_k1":
        assert len(tokens) == MAX_TOKENS


def test_seeded_sampling_is_reproducible_when_pruned(engines):
    llm = engines("prune")
    option = next(o for o in OPTIONS if o.name == "seed_n3")
    first = _run(llm, 300, _params(option))
    again = _run(llm, 301, _params(option))  # another image: a new probe, a new rewrite
    third = _run(llm, 300, _params(option))  # the first image again: a prefix-cache hit of its pruned blocks
    assert _outcome(first)["status"] == _outcome(third)["status"] == "pruned"
    assert _completions(third) == _completions(first)
    assert len({tuple(t) for t in _completions(first)}) > 1  # n = 3 samples, not one repeated
    assert _completions(again) != _completions(first)


def test_stop_string_keeps_the_outcome(engines):
    llm = engines("prune")
    greedy = _run(llm, 400, _params(OPTIONS[0]))
    text = greedy.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    from vllm import SamplingParams

    stopped = _run(llm, 400, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, stop=[stop]))
    completion = stopped.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert text.startswith(completion.text) and len(completion.text) < len(text)
    # The front end found the stop string and aborted the request in the engine: the outcome
    # came with the request's first output and is handed out with the final one.
    assert _outcome(stopped)["status"] == "pruned"
    assert _outcome(stopped)["images"] == _outcome(greedy)["images"]
