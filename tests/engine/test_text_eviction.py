"""Text eviction in the real engine (in-process, CPU, tiny random models, real scheduler and KV
cache manager), checked against the transformers path and a float64 oracle.

Every evicting request here also has its image pruned to half (uniform 0.5), so both halves of
AsymVLM run on the same request. The block size is vLLM's (32: the CPU backend wants multiples
of 32), the budget 32 generated tokens, one protected block, 160 greedy tokens with EOS ignored.

1. **Same blocks, same tokens as the transformers path.** For LLaVA, Qwen2.5-VL (M-RoPE) and
   Gemma 3, the transformers path's block-granular eviction (``BlockEviction`` over an
   ``EvictingCache``, the same pruned prompt) evicts the same logical blocks at the same steps and
   generates the same 160 tokens. The importance the engine computed for each candidate block
   equals a float64 oracle (``tests/reference.py``) over the transformers path's full
   final-layer attention at that step (within 2e-5), and the oracle's rule picks the blocks the
   engine evicted.
2. **Eviction off changes nothing**: a budget larger than any answer, and a request that turns
   eviction off, give plain vLLM's tokens.
3. **Bounded memory, nothing lost**: stepping the engine by hand, every evicting request's live
   blocks (read from vLLM's KV cache manager) stay within ⌈prompt/bs⌉ + ⌈budget/bs⌉ +
   protected + 1; evicted blocks are null blocks in the manager and zero in the runner's block
   table; requests without eviction run beside them untouched; an abort mid-generation and the
   end of every request give every block back.
4. **Prefix caching**: a second identical request reuses the first one's prompt blocks (a prefix
   hit), evicts the same blocks and generates the same tokens; no block computed after the
   request's eviction could start is in the prefix cache.
5. **Preemption** (a pool too small for two long answers): a preempted request comes back by
   recomputing all its tokens, evicts again, and every block comes back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.reference import block_attention_mass_reference, evict_blocks_reference

from .helpers import (
    EnginePool, engine_image, greedy_params, model_runner, num_free_blocks, recorded_decisions, scheduler,
)
from .test_asymvlm_engine import QUESTION, Req, _prompt_text, hf_reference
from .test_engine_scenarios import _drain

pytestmark = pytest.mark.slow

BLOCK_SIZE = 32
BUDGET = 32
PROTECTED = 1
MAX_TOKENS = 160
KV_CACHE_BYTES = 32 * 2**20
CONFIG = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1},
          "text": {"enabled": True, "budget_tokens": BUDGET, "protected_recent_blocks": PROTECTED,
                   "block_size": BLOCK_SIZE}}
IMPORTANCE_ATOL = 2e-5


@pytest.fixture(scope="module")
def engines(engine_models):
    with EnginePool(engine_models) as pool:
        yield pool


def _prompt(engines, family: str, seed: int, question: str = QUESTION) -> dict:
    text = _prompt_text(engines.processor(family), Req("r", (seed,), question))
    return {"prompt": text, "multi_modal_data": {"image": engine_image(seed)}}


def _cap(num_prompt_tokens: int) -> int:
    return math.ceil(num_prompt_tokens / BLOCK_SIZE) + math.ceil(BUDGET / BLOCK_SIZE) + PROTECTED + 1


def _reference_evictions(trace) -> list[tuple[list[int], object]]:
    """(logical blocks, step) of every transformers-path eviction, in order."""
    out = []
    for step in trace.steps:
        if not step.evicted.numel():
            continue
        stream = step.stream_ids[step.evicted]
        blocks = sorted(set((stream // BLOCK_SIZE).tolist()))
        expected = torch.cat([torch.arange(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE) for b in blocks])
        assert torch.equal(stream.sort().values, expected), "the reference evicted a partial block"
        out.append((blocks, step))
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3", "phi3_v"])
def test_engine_evicts_the_blocks_the_transformers_path_evicts(engines, hf_models, family):
    from asymvlm_vllm.core.eviction import BlockEviction

    llm = engines.build(family, family, CONFIG, KV_CACHE_BYTES)
    sched = scheduler(llm)
    sched.eviction_log = []
    free_before = num_free_blocks(llm)
    prompt = _prompt(engines, family, seed=40)
    with recorded_decisions(sched) as decisions:
        (out,) = llm.generate([prompt], greedy_params(MAX_TOKENS), use_tqdm=False)
    log, sched.eviction_log = sched.eviction_log, None
    outcome = out.kv_transfer_params["asymvlm"]
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] < outcome["vision_tokens"]
    (decision,) = decisions.values()
    ref = hf_reference(hf_models(family), prompt["prompt"], [prompt["multi_modal_data"]["image"]], decision,
                       causal=True, max_tokens=MAX_TOKENS, eviction=BlockEviction(BUDGET, BLOCK_SIZE, PROTECTED))
    num_prompt = ref.prompt.lm_lengths[0]
    assert outcome["prompt_tokens_prefilled"] == num_prompt

    reference = _reference_evictions(ref.generation.trace)
    ours = [choice.block_indices for _, choice in log]
    assert len(ours) >= 3, f"too few evictions to test anything: {ours}"
    assert ours == [blocks for blocks, _ in reference], f"{family}: engine evicted {ours}, transformers {reference}"
    assert list(out.outputs[0].token_ids) == ref.tokens, f"{family}: the evicting engine and transformers diverge"

    for (_, choice), (blocks, step) in zip(log, reference):
        oracle = block_attention_mass_reference(step.attention.numpy(), BLOCK_SIZE)
        live_tokens = step.stream_ids.shape[0]
        assert choice.num_live_tokens == live_tokens and len(choice.importance) == len(oracle)
        first = math.ceil(num_prompt / BLOCK_SIZE)
        candidates = range(first, len(oracle) - 1 - PROTECTED)
        ours_mass = np.array(choice.importance)[list(candidates)]
        np.testing.assert_allclose(ours_mass, oracle[list(candidates)], rtol=0, atol=IMPORTANCE_ATOL)
        chosen_live = evict_blocks_reference(oracle, num_prompt, live_tokens, BUDGET, BLOCK_SIZE, PROTECTED)
        live_blocks = sorted(set((step.stream_ids // BLOCK_SIZE).tolist()))
        assert [live_blocks[i] for i in chosen_live] == blocks

    text = outcome["text"]
    assert text["status"] == "on" and text["budget_tokens"] == BUDGET
    assert text["evicted_blocks"] == sum(map(len, ours)) and text["evicted_tokens"] == BLOCK_SIZE * text["evicted_blocks"]
    assert text["eviction_steps"] == len(ours)
    assert 0 < text["peak_live_blocks"] <= _cap(num_prompt)
    assert num_free_blocks(llm) == free_before


NEVER_DUE = {"vision": {"budget": {"rule": "uniform", "ratio": 1.0}},
             "text": {"enabled": True, "budget_tokens": 4096, "block_size": BLOCK_SIZE}}


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "gemma3", "phi3_v"])
def test_eviction_off_or_never_due_gives_plain_vllm_tokens(engines, family):
    """vLLM without the plugin, and the plugin (keep 1.0) with eviction configured but never due
    (a budget above the answer) or turned off per request: the same tokens, image and
    text-only requests alike. The compaction path stays idle: no request has holes."""
    plain = engines.build(f"{family}-plain", family, None, KV_CACHE_BYTES)
    plugin = engines.build(f"{family}-never-due", family, NEVER_DUE, KV_CACHE_BYTES)
    prompts = [_prompt(engines, family, seed=41), {"prompt": "A text-only prompt about colours and shapes."}]
    expected = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, greedy_params(40), use_tqdm=False)]
    for extra in (None, {"asymvlm_text_eviction": "off"}):
        plugin.reset_prefix_cache()
        outs = plugin.generate(prompts, greedy_params(40, extra_args=extra), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == expected, extra
        for o in outs:
            text = ((o.kv_transfer_params or {}).get("asymvlm") or {}).get("text")
            assert text is None if extra else (text["evicted_blocks"] == 0 and text["status"] == "on")
    assert not any(0 in ids for state in model_runner(plugin).requests.values() for ids in state.block_ids)


def test_live_blocks_stay_within_the_cap_and_all_come_back(engines):
    llm = engines.build("llava", "llava", CONFIG, KV_CACHE_BYTES)
    llm.reset_prefix_cache()
    engine, sched, runner = llm.llm_engine, scheduler(llm), model_runner(llm)
    free_before = num_free_blocks(llm)
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    engine.add_request("evict-a", _prompt(engines, "llava", 42), greedy_params(MAX_TOKENS))
    engine.add_request("evict-b", {"prompt": "Tell a long story about a red square."},
                       greedy_params(MAX_TOKENS, extra_args={"asymvlm_text_budget": 40}))
    engine.add_request("keep-all", {"prompt": "Another story, kept whole."},
                       greedy_params(MAX_TOKENS, extra_args={"asymvlm_text_eviction": "off"}))
    engine.add_request("aborted", {"prompt": "This one is aborted halfway."}, greedy_params(MAX_TOKENS))
    seen = {"max_live": {}, "holes": set(), "steps": 0}

    def check():
        seen["steps"] += 1
        if seen["steps"] == 100:
            engine.abort_request(["aborted"])
        for req_id, request in sched.requests.items():
            record = sched._text_active(req_id)
            blocks = managers[0].req_to_blocks.get(req_id, [])
            live = [b for b in blocks if not b.is_null]
            if record is None:
                assert len(live) == len(blocks), "a request without eviction has holes"
                continue
            budget = record.policy.budget
            cap = math.ceil(request.num_prompt_tokens / BLOCK_SIZE) + math.ceil(budget / BLOCK_SIZE) + PROTECTED + 1
            assert len(live) <= cap, f"{req_id}: {len(live)} live blocks > cap {cap}"
            holes = [i for i, b in enumerate(blocks) if b.is_null]
            assert all(i >= math.ceil(request.num_prompt_tokens / BLOCK_SIZE) for i in holes), "a prompt block was evicted"
            state = runner.requests.get(req_id)
            name = req_id.rsplit("-", 1)[0]  # vLLM appends a suffix to the id the caller gave
            if state is not None and holes:
                assert all(state.block_ids[0][i] == 0 for i in holes)
                seen["holes"].add(name)
            seen["max_live"][name] = max(seen["max_live"].get(name, 0), len(live))

    schedule = sched.schedule

    def schedule_and_check(*args, **kwargs):  # right after allocation: the most a step holds
        output = schedule(*args, **kwargs)
        check()
        return output

    sched.schedule = schedule_and_check
    try:
        finished = _drain(llm)
    finally:
        del sched.schedule
    assert set(finished) == {"evict-a", "evict-b", "keep-all"}  # an aborted request sends no output
    assert {"evict-a", "evict-b"} <= seen["holes"]
    assert "keep-all" not in seen["holes"] and finished["keep-all"].kv_transfer_params is None
    assert len(finished["evict-a"].outputs[0].token_ids) == MAX_TOKENS
    assert seen["steps"] >= 100 and "aborted" not in sched.requests
    for name in ("evict-a", "evict-b"):
        text = finished[name].kv_transfer_params["asymvlm"]["text"]
        assert text["peak_live_blocks"] == seen["max_live"][name]
        assert text["evicted_blocks"] > 0
    assert num_free_blocks(llm) == free_before, "KV blocks leaked"
    assert not sched._text
    # The runner hears of the last finished requests with the next step; nothing beyond vLLM's own state.
    assert set(runner._text_requests) <= set(runner.requests)


def test_a_prefix_hit_evicts_the_same_blocks_and_evicted_blocks_are_never_cached(engines):
    llm = engines.build("llava", "llava", CONFIG, KV_CACHE_BYTES)
    llm.reset_prefix_cache()
    sched = scheduler(llm)
    prompt = {"prompt": "USER: Count slowly from one to a thousand.\nASSISTANT:" * 3}
    sched.eviction_log = []
    (first,) = llm.generate([prompt], greedy_params(MAX_TOKENS), use_tqdm=False)
    first_log, sched.eviction_log = sched.eviction_log, []
    (second,) = llm.generate([prompt], greedy_params(MAX_TOKENS), use_tqdm=False)
    second_log, sched.eviction_log = sched.eviction_log, None
    num_prompt = len(first.prompt_token_ids)
    assert second.num_cached_tokens == (num_prompt // BLOCK_SIZE) * BLOCK_SIZE > 0  # its prompt's full blocks
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    assert [c.block_indices for _, c in second_log] == [c.block_indices for _, c in first_log] != []

    # The whole conversation so far as the next prompt (a client continuing the answer): its
    # cache hit stops at the blocks computed before eviction could start (prompt + budget); the
    # blocks after attended without the evicted tokens and were never offered for reuse.
    history = list(first.prompt_token_ids) + list(first.outputs[0].token_ids)
    (third,) = llm.generate([{"prompt_token_ids": history}],
                            greedy_params(1, extra_args={"asymvlm_text_eviction": "off"}), use_tqdm=False)
    assert third.num_cached_tokens == ((num_prompt + BUDGET) // BLOCK_SIZE) * BLOCK_SIZE
    assert third.num_cached_tokens < (len(history) // BLOCK_SIZE) * BLOCK_SIZE - BLOCK_SIZE


def test_a_preempted_evicting_request_recomputes_and_evicts_again(engines):
    """Two long answers in a pool that cannot hold both: one is preempted, comes back by
    recomputing all of its tokens (its holes are gone), is evicted again, and finishes."""
    llm = engines.build("llava-small", "llava", CONFIG, KV_CACHE_BYTES, num_gpu_blocks_override=14,
                        enable_prefix_caching=False, max_model_len=320)
    engine, sched = llm.llm_engine, scheduler(llm)
    free_before = num_free_blocks(llm)
    sched.eviction_log = []
    prompts = ["USER: Say everything you know about circles.\nASSISTANT:",
               "USER: Say everything you know about squares.\nASSISTANT:",
               "USER: Say everything you know about triangles.\nASSISTANT:"]
    for i, text in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt": text}, greedy_params(MAX_TOKENS, extra_args={"asymvlm_text_budget": 96}))
    events: list[tuple[str, str]] = []
    preempt = sched._preempt_request

    def record_preemption(request, *args, **kwargs):
        events.append(("preempted", request.request_id))
        return preempt(request, *args, **kwargs)

    sched._preempt_request = record_preemption
    apply = sched._apply_eviction

    def record_eviction(request_id, choice):
        applied = apply(request_id, choice)
        if applied:
            events.append(("evicted", request_id))
        return applied

    sched._apply_eviction = record_eviction
    try:
        finished = _drain(llm)
    finally:
        del sched._preempt_request, sched._apply_eviction
        sched.eviction_log = None
    assert all(len(out.outputs[0].token_ids) == MAX_TOKENS for out in finished.values())
    preempted = [rid for kind, rid in events if kind == "preempted"]
    assert preempted, "nothing was preempted: the pool is too large for this test"
    victim = preempted[0]
    after = events[events.index(("preempted", victim)) + 1:]
    assert ("evicted", victim) in after, "the preempted request did not evict again after it came back"
    assert num_free_blocks(llm) == free_before


def test_the_eviction_cost_benchmark_runs(tmp_path):
    """``benchmarks/eviction_cost.py --cpu-test-engine`` stays runnable (its numbers are not
    checked: speed lives in the benchmark)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "eviction_cost.py"
    spec = importlib.util.spec_from_file_location("eviction_cost_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "eviction_cost.json"
    bench.main(["--cpu-test-engine", "--requests", "2", "--output-tokens", "140", "--budget", "8", "--rounds", "1",
                "--out", str(out)])
    never, evict = json.loads(out.read_text())
    assert (never["setting"], evict["setting"]) == ("never due", "evict")
    assert never["evicted_blocks"] == 0 < evict["evicted_blocks"]
    assert {"commit", "dirty", "device", "vllm", "torch", "median_step_ratio"} <= set(evict)
