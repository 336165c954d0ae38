"""A failure inside AsymVLM ends (or unprunes) that request, never the engine.

The real engine (in-process, CPU, tiny LLaVA, uniform keep 0.5) with a failure injected into
each per-request path of the plugin in turn: probing (scheduler), deciding (runner), rewriting
(scheduler) and materialising the pruned embeddings (runner). Each time the request finishes:

* probing, deciding, rewriting: with status ``error``, a reason that names the failure, and the
  answer of the same request run unpruned;
* materialising: pruned as usual: the runner encodes the image again and slices it.

Then the next request is pruned normally, and every KV block is back in the pool. The same
holds for an engine deciding with the fused kernel (``vision.decide_with: triton``) when its
launch or the read-back of its decisions fails: the step's probes run unpruned.
"""

from __future__ import annotations

import logging

import pytest

from .helpers import chat_messages, engine_image, free_llm, greedy_params, make_plugin_llm, num_free_blocks, scheduler

pytestmark = pytest.mark.slow

PRUNE_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
QUESTION = "What is shown in this picture?"


def _engine(engine_models, config):
    with pytest.MonkeyPatch.context() as mp:
        engine = make_plugin_llm(engine_models("llava"), config, mp)
        try:
            yield engine
        finally:
            free_llm(engine)


@pytest.fixture(scope="module")
def llm(engine_models):
    yield from _engine(engine_models, PRUNE_HALF)


def _ask(llm, seed: int, **extra):
    free = num_free_blocks(llm)
    (out,) = llm.chat([chat_messages(engine_image(seed), QUESTION)], greedy_params(6, extra_args=extra or None),
                      use_tqdm=False)
    assert num_free_blocks(llm) == free, "KV blocks leaked"
    assert not scheduler(llm).has_unfinished_requests()
    return list(out.outputs[0].token_ids), out.kv_transfer_params["asymvlm"]


def _boom(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("where, target, reason", [
    ("probing", "asymvlm_vllm.engine.scheduler.AsymVLMScheduler._schedule_probe", "probing failed: RuntimeError"),
    ("deciding", "asymvlm_vllm.engine.runner.decide_request", "deciding failed: RuntimeError"),
    ("rewriting", "asymvlm_vllm.engine.scheduler.rewrite_prompt", "rewriting failed: RuntimeError"),
])
def test_a_failure_unprunes_the_request_and_the_engine_goes_on(llm, where, target, reason):
    seed = {"probing": 10, "deciding": 11, "rewriting": 12}[where]
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # vLLM's "vllm" logger does not propagate to pytest's capture
    logger = logging.getLogger("vllm.asymvlm")
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(target, _boom)
            tokens, outcome = _ask(llm, seed)
    finally:
        logger.removeHandler(handler)
    assert outcome["status"] == "error" and outcome["reason"].startswith(reason), outcome
    assert "injected failure" in outcome["reason"]
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 64
    assert any(r.exc_info and "injected failure" in str(r.exc_info[1]) for r in records), "the failure was not logged"
    unpruned, off = _ask(llm, seed, asymvlm="off")
    assert off["status"] == "off" and tokens == unpruned
    _, after = _ask(llm, seed + 100)
    assert after["status"] == "pruned" and after["vision_tokens_kept"] == 32


def test_a_failed_materialisation_encodes_the_image_again(llm):
    from asymvlm_vllm.engine.runner import AsymVLMRunnerMixin

    calls = []
    original = AsymVLMRunnerMixin._cache_encoder_output

    def record(self, mm_hash, output, *args, **kwargs):
        calls.append((mm_hash, int(output.shape[0])))
        return original(self, mm_hash, output, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AsymVLMRunnerMixin, "_materialize", _boom)
        mp.setattr(AsymVLMRunnerMixin, "_cache_encoder_output", record)
        tokens, outcome = _ask(llm, 20)
    reencoded = [h for h, _ in calls if "#asymvlm" in h]
    assert reencoded, f"the pruned entry was not encoded again: {calls}"
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] == 32
    # The same request with nothing broken (its pruned embeddings now come from the cache).
    expected, normal = _ask(llm, 20)
    assert normal["images"] == outcome["images"] and tokens == expected


@pytest.fixture(scope="module")
def kernel_llm(engine_models):
    """The same engine deciding with the fused kernel (Triton's interpreter on this CPU)."""
    yield from _engine(engine_models, {"vision": {**PRUNE_HALF["vision"], "decide_with": "triton"}})


@pytest.mark.parametrize("target, seed", [
    ("asymvlm_vllm.kernels.vision_selection.select_vision_tokens", 30),  # the launch
    ("asymvlm_vllm.engine.runner.PendingDecisions.result", 40),  # reading the decisions back
])
def test_a_failing_kernel_unprunes_its_step_and_the_engine_goes_on(kernel_llm, target, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(target, _boom)
        tokens, outcome = _ask(kernel_llm, seed)
    assert outcome["status"] == "error" and outcome["reason"] == "deciding failed: RuntimeError: injected failure"
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 64
    unpruned, off = _ask(kernel_llm, seed, asymvlm="off")
    assert tokens == unpruned
    _, after = _ask(kernel_llm, seed + 1)
    assert after["status"] == "pruned" and after["vision_tokens_kept"] == 32
