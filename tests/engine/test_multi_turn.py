"""The multi-turn rule in the real engine (CPU, tiny models): whole previous answers dropped
before prefill through the same probe → decide → rewrite as vision pruning.

A conversation of three finished turns (images in the first and third) and a question: its
three previous answers (17, 24 and 9 tokens on the tiny tokenizer) exceed an answer budget of
35 tokens, so the engine drops the least image-relevant of the two older answers (the newest is
protected); dropping either one is enough, so which one goes is the rule's ranking. For LLaVA, Qwen2.5-VL (M-RoPE) and Gemma 3 it must drop exactly the answers that the
transformers path's rule drops (``MultiTurnEviction`` over the spans ``answer_token_spans``
finds by running the processor per answer; the engine finds them from the chat template's
turn markers instead) and then generate the transformers path's tokens from the same pruned
prompt (the engine's vision keep set, the dropped answers removed).
"""

from __future__ import annotations

import pytest
import torch

from .helpers import EnginePool, engine_image, greedy_params, num_free_blocks, recorded_decisions, scheduler
from .test_asymvlm_engine import hf_reference

pytestmark = pytest.mark.slow

ANSWERS = [
    "A red square on a blue background.",
    "The quick brown fox jumps over the lazy dog.",
    "The total is 42 dollars.",
]
QUESTIONS = ["What is shown in this picture?", "Describe the image in one sentence.",
             "What is the total amount on this invoice?", "Which colour is the largest shape in the chart?"]
ANSWER_BUDGET = 35  # either older answer alone brings the three under it: the ranking decides which
KV_CACHE_BYTES = 32 * 2**20
CONFIG = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1},
          "text": {"multi_turn": True, "multi_turn_answer_budget": ANSWER_BUDGET, "protected_recent_answers": 1}}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def engines(engine_models):
    with EnginePool(engine_models) as pool:
        yield pool


def _conversation(seed: int):
    """(OpenAI-style messages for vLLM, transformers-style messages, images)."""
    images = [engine_image(seed), engine_image(seed + 1)]
    with_image = {0: images[0], 2: images[1]}
    openai, hf = [], []
    for turn, question in enumerate(QUESTIONS):
        parts, hf_parts = [], []
        if turn in with_image:
            parts.append({"type": "image_pil", "image_pil": with_image[turn]})
            hf_parts.append({"type": "image"})
        parts.append({"type": "text", "text": question})
        hf_parts.append({"type": "text", "text": question})
        openai.append({"role": "user", "content": parts})
        hf.append({"role": "user", "content": hf_parts})
        if turn < len(ANSWERS):
            openai.append({"role": "assistant", "content": ANSWERS[turn]})
            hf.append({"role": "assistant", "content": [{"type": "text", "text": ANSWERS[turn]}]})
    return openai, hf, images


def _reference_drop(vlm, hf_messages, images):
    """The transformers path's multi-turn rule on the unpruned conversation."""
    from asymvlm_vllm.core.eviction import MultiTurnEviction
    from asymvlm_vllm.hf.multiturn import answer_token_spans, conversation_inputs, image_embeddings

    inputs = conversation_inputs(vlm.processor, hf_messages, images, vlm.adapter)
    ids = inputs["input_ids"][0]
    spans = answer_token_spans(vlm.processor, hf_messages, images, ids, vlm.adapter)
    vision = ids == vlm.adapter.image_token_id(vlm.model)
    with torch.inference_mode():
        tokens = vlm.model.get_input_embeddings()(ids.masked_fill(vision, 0)[None])[0]
        per_message = [sum(1 for p in m["content"] if p.get("type") == "image") for m in hf_messages]
        rows = image_embeddings(vlm, inputs, per_message)
    dropped = MultiTurnEviction(ANSWER_BUDGET, 1).select_answers(spans, tokens, rows)
    prompt_text = vlm.adapter.render(vlm.processor, hf_messages, add_generation_prompt=True)
    return spans, dropped, prompt_text


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3", "phi3_v"])
def test_engine_drops_the_answers_the_transformers_path_drops(engines, hf_models, family):
    llm = engines.build(family, family, CONFIG, KV_CACHE_BYTES)
    free_before = num_free_blocks(llm)
    openai, hf_messages, images = _conversation(seed=50)
    with recorded_decisions(scheduler(llm)) as decisions:
        (out,) = llm.chat([openai], greedy_params(MAX_TOKENS), use_tqdm=False)
    outcome = out.kv_transfer_params["asymvlm"]
    vlm = hf_models(family)
    spans, dropped, prompt_text = _reference_drop(vlm, hf_messages, images)
    assert sum(b - a for a, b in spans) > ANSWER_BUDGET and dropped, "the rule has nothing to choose: a weak test"
    assert outcome["status"] == "pruned"
    assert outcome["previous_answers"] == len(spans) == 3
    assert outcome["answers_dropped"] == dropped
    assert len(dropped) == 1, "both older answers dropped: the ranking was not tested"
    assert outcome["answer_tokens_dropped"] == sum(spans[i][1] - spans[i][0] for i in dropped)

    (decision,) = decisions.values()
    ref = hf_reference(vlm, prompt_text, images, decision, causal=True, max_tokens=MAX_TOKENS,
                       drop_spans=[spans[i] for i in dropped])
    assert list(out.prompt_token_ids) == ref.inputs["input_ids"][0].tolist()
    assert outcome["prompt_tokens_prefilled"] == ref.prompt.lm_lengths[0]
    assert list(out.outputs[0].token_ids) == ref.tokens
    assert num_free_blocks(llm) == free_before


def test_answers_within_the_budget_are_all_kept(engines):
    llm = engines.build("llava-roomy", "llava", {**CONFIG, "text": {**CONFIG["text"], "multi_turn_answer_budget": 100}},
                        KV_CACHE_BYTES)
    openai, _, _ = _conversation(seed=52)
    (out,) = llm.chat([openai], greedy_params(4), use_tqdm=False)
    outcome = out.kv_transfer_params["asymvlm"]
    assert outcome["status"] == "pruned" and "answers_dropped" not in outcome
    pruned_away = outcome["vision_tokens"] - outcome["vision_tokens_kept"]
    assert outcome["prompt_tokens_prefilled"] == outcome["prompt_tokens"] - pruned_away
