"""Vision pruning inside vLLM's engine on CUDA (``gpu``-marked; skipped without a CUDA device), with
async scheduling on as vLLM defaults on GPUs, tiny LLaVA and Qwen2.5-VL, Triton attention, float32:

1. keep 1.0 is token-identical to vLLM without the plugin;
2. a pruned request generates what the transformers path generates from the same keep set
   (float32 on both sides, TF32 off), and holds ⌈(kept + text) / block size⌉ prompt blocks;
3. probes under async scheduling with aborts and preemption in a tiny pool: every request ends
   once, every block comes back.
"""

from __future__ import annotations

import math

import pytest
import torch

from .helpers import BLOCK_SIZE, engine, free, scheduler

pytestmark = pytest.mark.gpu

QUESTION = "What is shown in this picture?"
HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
KEEP_ALL = {"vision": {"budget": {"rule": "uniform", "ratio": 1.0}}}


def _image(seed: int):
    from tests.hf.conftest import random_image

    return random_image(seed, 224, 224)


def _chat(seed: int):
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": _image(seed)},
                                         {"type": "text", "text": QUESTION}]}]


def _greedy(n: int = 12):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_keep_all_is_token_identical_to_plain_vllm(tiny_model_dirs, family):
    model = tiny_model_dirs(family)
    results = {}
    for name, config in (("plain", None), ("keep_all", KEEP_ALL)):
        llm = engine(model, config)
        try:
            assert llm.llm_engine.vllm_config.scheduler_config.async_scheduling
            outs = llm.chat([_chat(1), _chat(2)], _greedy())
            results[name] = [list(o.outputs[0].token_ids) for o in outs]
            if config is not None:
                assert all(o.kv_transfer_params["asymvlm"]["status"] == "pruned" for o in outs)
        finally:
            free(llm)
    assert results["keep_all"] == results["plain"]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_pruned_request_matches_the_transformers_path(tiny_model_dirs, family, monkeypatch):
    from asymvlm_vllm.core.budget import UniformBudget
    from asymvlm_vllm.hf import PrunedVLM
    from asymvlm_vllm.hf.generation import generate_from_prompt
    from asymvlm_vllm.hf.pruning import prune_prompt

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = tiny_model_dirs(family)
    llm = engine(model, HALF)
    decisions, held = {}, {}
    sched = scheduler(llm)
    apply, schedule = sched._apply_decision, sched.schedule

    def record(request_id, decision):
        decisions[request_id] = decision
        return apply(request_id, decision)

    def schedule_and_count(*args, **kwargs):
        output = schedule(*args, **kwargs)
        for request_id in output.num_scheduled_tokens:
            blocks = sched.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.get(request_id, [])
            held[request_id] = max(held.get(request_id, 0), len(blocks))
        return output

    sched._apply_decision, sched.schedule = record, schedule_and_count
    try:
        (out,) = llm.chat([_chat(3)], _greedy())
    finally:
        free(llm)
    outcome = out.kv_transfer_params["asymvlm"]
    assert outcome["status"] == "pruned" and outcome["vision_tokens_kept"] < outcome["vision_tokens"]
    ((request_id, decision),) = decisions.items()
    # Blocks for the kept tokens only (plus the answer's), fewer than the unpruned prompt needs.
    prefilled = outcome["prompt_tokens_prefilled"]
    assert math.ceil(prefilled / BLOCK_SIZE) <= held[request_id] <= math.ceil((prefilled + 12) / BLOCK_SIZE)
    assert held[request_id] < math.ceil(outcome["prompt_tokens"] / BLOCK_SIZE)

    vlm = PrunedVLM.from_pretrained(model)
    vlm.model.to("cuda")
    text = vlm.processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": QUESTION}]}],
                                             add_generation_prompt=True, tokenize=False)
    inputs = vlm.processor(text=[text], images=[[_image(3)]], return_tensors="pt").to("cuda")
    (image,) = decision.images
    keep = list(image.keep_rows)

    class Fixed:
        def score(self, vision, text_rows, grid_shape=None):
            scores = torch.zeros(vision.shape[0], device=vision.device)
            scores[keep] = 1.0
            return scores

    with torch.inference_mode():
        prompt = prune_prompt(vlm.model, vlm.adapter, inputs, Fixed(), UniformBudget(len(keep) / image.num_rows), 1)
    generation = generate_from_prompt(vlm.model, prompt, 12, frozenset(), 0, mrope=vlm.adapter.uses_mrope)
    assert prompt.lm_lengths[0] == outcome["prompt_tokens_prefilled"]
    assert list(out.outputs[0].token_ids) == generation.tokens[0]


def test_async_probes_with_aborts_and_preemption_leave_nothing_behind(tiny_model_dirs):
    llm = engine(tiny_model_dirs("llava"), HALF, num_gpu_blocks_override=24, max_model_len=384)
    core = llm.llm_engine
    sched = scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    preempted = []
    preempt = sched._preempt_request

    def record_preemption(request, *args, **kwargs):
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    sched._preempt_request = record_preemption
    try:
        for i in range(6):
            core.add_request(f"r{i}", {"prompt": f"USER: <image>\n{QUESTION} {i}\nASSISTANT:",
                                       "multi_modal_data": {"image": _image(10 + i)}}, _greedy(160))
        finished, steps = {}, 0
        while core.has_unfinished_requests():
            steps += 1
            if steps in (2, 40):  # one in flight during its probe, one while generating
                core.abort_request([f"r{steps % 5}"])
            for out in core.step():
                if out.finished:
                    assert out.request_id not in finished
                    finished[out.request_id] = out
            assert steps < 5000
    finally:
        del sched._preempt_request
        free_after = pool.get_num_free_blocks()
        free(llm)
    assert preempted, "the pool was large enough for everything: nothing was preempted"
    assert free_after == free_before
    assert len(finished) >= 4
