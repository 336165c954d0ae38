"""Text eviction inside vLLM's engine on CUDA: the runner's Triton compaction and importance, the
FlashAttention and Triton attention layouts, and CUDA graphs. ``gpu``-marked: skipped without a
CUDA device. Run on a machine where vLLM runs on CUDA (``pytest -m gpu tests/gpu``), in its own
pytest process: ``tests/engine`` configures vLLM for the CPU at collection.

1. TRITON_ATTN, float32, eager: the engine evicts the blocks the transformers path (on the same
   GPU, float32) evicts, at the same steps, and generates its tokens (a text-only prompt, budget
   32 tokens, vLLM's block size 16).
2. For each backend, bf16: the same requests with CUDA graphs (vLLM's default compilation) and
   eagerly give the same tokens and evict the same blocks; every evicting request stays within
   its cap and every block comes back. Compaction writes into fixed buffers and the query copy
   is captured, so graph replays must see this step's live blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from .helpers import BLOCK_SIZE, engine, free, scheduler

pytestmark = pytest.mark.gpu

BUDGET = 32
MAX_TOKENS = 160
PROMPTS = ["Tell a very long story about a red square and a blue circle.",
           "Describe, at length, every shape you can think of."]


def _engine(model, backend: str, dtype: str, eager: bool):
    config = {"text": {"enabled": True, "budget_tokens": BUDGET, "block_size": BLOCK_SIZE}}
    return engine(model, config, dtype=dtype, enforce_eager=eager, attention_backend=backend, max_model_len=512)


def _run(llm):
    from vllm import SamplingParams

    sched = scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    sched.eviction_log = []
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    log, sched.eviction_log = sched.eviction_log, None
    assert pool.get_num_free_blocks() == free_before, "KV blocks leaked"
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    evictions = {}
    for request_id, choice in log:
        evictions.setdefault(request_id.split("-")[0], []).append(choice.block_indices)
    for o in outs:
        text = o.kv_transfer_params["asymvlm"]["text"]
        cap = math.ceil(len(o.prompt_token_ids) / BLOCK_SIZE) + math.ceil(BUDGET / BLOCK_SIZE) + 2
        assert text["evicted_blocks"] > 0 and text["peak_live_blocks"] <= cap + 1  # +1: an async step
    return tokens, evictions, log


def test_triton_attention_evicts_what_the_transformers_path_evicts(tiny_model_dirs, monkeypatch):
    from asymvlm_vllm.core.eviction import BlockEviction
    from asymvlm_vllm.hf import PrunedVLM
    from asymvlm_vllm.hf.generation import generate_from_prompt

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 on both sides
    llm = _engine(tiny_model_dirs("llava"), "TRITON_ATTN", "float32", eager=True)
    try:
        tokens, _, log = _run(llm)
    finally:
        free(llm)
    vlm = PrunedVLM.from_pretrained(tiny_model_dirs("llava"))
    vlm.model.to("cuda")
    for prompt, ours in zip(PROMPTS, tokens):
        inputs = vlm.processor(text=[prompt], return_tensors="pt").to("cuda")
        pruned = vlm.prune(inputs)
        generation = generate_from_prompt(vlm.model, pruned, MAX_TOKENS, frozenset(), 0,
                                          eviction=BlockEviction(BUDGET, BLOCK_SIZE, 1), tap=vlm.tap, trace=True)
        assert ours == generation.tokens[0]
    assert log, "nothing was evicted"


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
def test_cuda_graphs_evict_like_eager(tiny_model_dirs, backend):
    runs = {}
    for eager in (True, False):
        llm = _engine(tiny_model_dirs("llava"), backend, "bfloat16", eager=eager)
        try:
            tokens, evictions, _ = _run(llm)
        finally:
            free(llm)
        runs[eager] = (tokens, sorted(evictions.values()))
    assert runs[True][1], "nothing was evicted"
    assert runs[False] == runs[True]
