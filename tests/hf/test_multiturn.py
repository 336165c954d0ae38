"""The multi-turn rule on the transformers path: whole previous answers dropped before prefill."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asymvlm_vllm.core import AsymVLMError
from asymvlm_vllm.core.eviction import MultiTurnEviction, ThresholdEviction
from asymvlm_vllm.hf.multiturn import answer_token_spans, conversation_inputs, image_embeddings

from .conftest import ALL_FAMILIES, random_image, sizes_for

ANSWERS = [
    "A red square on a blue background.",
    "The quick brown fox jumps over the lazy dog.",
    "The total is 42 dollars.",
]


def _conversation(image_in_current_turn: bool = False, family: str = ""):
    """Three finished turns (images in the first and third) and the current question."""
    current = [{"type": "text", "text": "Which colour is the largest shape in the chart?"}]
    if image_in_current_turn:
        current.insert(0, {"type": "image"})
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this picture?"}]},
        {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "Describe the image in one sentence."},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[1]}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the total amount on this invoice?"}]},
        {"role": "assistant", "content": ANSWERS[2]},
        {"role": "user", "content": current},
    ]
    sizes = sizes_for(family, [(224, 224 + 28 * i) for i in range(3 if image_in_current_turn else 2)])
    images = [random_image(i, *size) for i, size in enumerate(sizes)]
    return messages, images


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_answer_spans_are_exactly_the_answers(family, tiny_vlm):
    vlm = tiny_vlm(family)
    messages, images = _conversation(family=family)
    ids = conversation_inputs(vlm.processor, messages, images, vlm.adapter)["input_ids"][0]
    spans = answer_token_spans(vlm.processor, messages, images, ids, vlm.adapter)
    assert len(spans) == 3
    tokenizer = vlm.processor.tokenizer
    for (start, end), answer in zip(spans, ANSWERS):
        assert tokenizer.decode(ids[start:end]).strip() == answer
        assert not torch.any(ids[start:end] == vlm.adapter.image_token_id(vlm.model))
    assert tokenizer.decode(ids[spans[0][1]: spans[1][0]]).count("Describe the image in one sentence.") == 1


def _relevance(vlm, messages, images, spans):
    """Mean over an answer's tokens of its best cosine match among the image rows, here by hand
    (structural rows, Phi-3-V's separators, excluded: they carry no image content)."""
    inputs = conversation_inputs(vlm.processor, messages, images, vlm.adapter)
    ids = inputs["input_ids"][0]
    with torch.inference_mode():
        tokens = vlm.model.get_input_embeddings()(ids[None])[0]
        features = vlm.adapter.image_features(vlm.model, inputs)
        prunable = vlm.adapter.prunable_rows(vlm.model, inputs, features)
        rows = torch.cat([f[m] for f, m in zip(features, prunable)])  # every image: the current turn has none
    cosine = F.normalize(tokens, dim=-1) @ F.normalize(rows, dim=-1).T
    return [float(cosine[a:b].max(dim=1).values.mean()) for a, b in spans]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "phi3_v"])
def test_small_answer_budget_drops_the_least_similar_answers(family, tiny_vlm):
    vlm = tiny_vlm(family)
    messages, images = _conversation(family=family)
    base = vlm.chat(messages, images, max_new_tokens=4)
    spans = base.answer_spans
    lengths = [b - a for a, b in spans]
    relevance = _relevance(vlm, messages, images, spans)
    least = min((0, 1), key=lambda i: relevance[i])  # the newest answer (2) is protected
    assert abs(relevance[0] - relevance[1]) > 1e-4

    one = vlm.chat(messages, images, 4, multi_turn=MultiTurnEviction(answer_budget=sum(lengths) - 1))
    everything = vlm.chat(messages, images, 4, multi_turn=MultiTurnEviction(answer_budget=0))
    assert one.dropped_answers == [least]
    assert everything.dropped_answers == [0, 1]  # all but the protected newest, even over budget
    unprotected = vlm.chat(messages, images, 4, multi_turn=MultiTurnEviction(answer_budget=0, protected_recent_answers=0))
    assert unprotected.dropped_answers == [0, 1, 2]

    for result in (one, everything, unprotected):
        assert result.answer_spans == spans
        dropped = torch.zeros(base.prompt.prompt_lengths[0], dtype=torch.bool)
        for i in result.dropped_answers:
            dropped[spans[i][0]: spans[i][1]] = True
        assert result.dropped_answer_tokens == int(dropped.sum()) == sum(lengths[i] for i in result.dropped_answers)
        # the language model's input shrinks by exactly those tokens, and only them
        assert result.prompt.lm_lengths[0] == base.prompt.lm_lengths[0] - result.dropped_answer_tokens
        assert torch.equal(result.prompt.keep_masks[0], base.prompt.keep_masks[0] & ~dropped)
        assert torch.equal(result.prompt.inputs_embeds[0], base.prompt.inputs_embeds[0][~dropped[base.prompt.keep_masks[0]]])
        assert result.prompt.vision_tokens_kept == base.prompt.vision_tokens_kept
        if vlm.adapter.uses_mrope:  # survivors keep their M-RoPE positions
            assert torch.equal(result.prompt.position_ids[:, 0], base.prompt.position_ids[:, 0][:, ~dropped])
        else:
            assert torch.equal(result.prompt.position_ids[0], torch.arange(result.prompt.lm_lengths[0]))


def test_large_answer_budget_changes_nothing(tiny_vlm):
    vlm = tiny_vlm("llava")
    messages, images = _conversation(image_in_current_turn=True)
    plain = vlm.chat(messages, images, max_new_tokens=8)
    kept = vlm.chat(messages, images, max_new_tokens=8, multi_turn=MultiTurnEviction(answer_budget=10**6))
    assert kept.dropped_answers == [] and plain.dropped_answers == []
    assert kept.tokens == plain.tokens
    assert torch.equal(kept.prompt.inputs_embeds, plain.prompt.inputs_embeds)
    # a chat without earlier turns is the single-question path
    single = vlm.chat([messages[-1]], images[-1:], max_new_tokens=8)
    reference = vlm.generate(vlm.process(images[-1:], [messages[-1]["content"][1]["text"]]), max_new_tokens=8)
    assert single.tokens == reference.tokens and single.answer_spans == []


def test_current_turn_images_are_what_answers_are_compared_with(tiny_vlm):
    vlm = tiny_vlm("llava")  # 64 rows per image
    for with_current, expected in ((False, 128), (True, 64)):
        messages, images = _conversation(image_in_current_turn=with_current)
        inputs = conversation_inputs(vlm.processor, messages, images)
        per_message = [sum(p.get("type") == "image" for p in m["content"]) if isinstance(m["content"], list) else 0
                       for m in messages]
        with torch.inference_mode():
            rows = image_embeddings(vlm, inputs, per_message)
            features = vlm.adapter.image_features(vlm.model, inputs)
        assert rows.shape == (expected, vlm.hidden_size)
        assert torch.equal(rows[-64:], features[-1])


def test_multi_turn_and_text_eviction_compose(tiny_vlm):
    vlm = tiny_vlm("qwen2_5_vl")
    messages, images = _conversation(image_in_current_turn=True)
    result = vlm.chat(messages, images, max_new_tokens=16, multi_turn=MultiTurnEviction(answer_budget=8),
                      eviction=ThresholdEviction(budget=4))
    assert result.dropped_answers == [0, 1]
    assert result.evicted_tokens == [15 - 4]
    assert result.live_tokens == [result.prompt.lm_lengths[0] + 4]


@pytest.mark.parametrize("change, message", [
    (lambda m, i: (m, i[:1]), "2 image parts but 1 images"),
    (lambda m, i: (m[:-1], i), "must end with a user turn"),
    (lambda m, i: ([m[1]] + m, i), "message 0 is an assistant answer that does not follow a user turn"),
    (lambda m, i: (m[:1] + [{"role": "assistant", "content": " "}] + m[2:], i), "empty assistant answer"),
    (lambda m, i: ([{"role": "robot", "content": "hi"}] + m, i), "role 'robot'"),
])
def test_bad_conversations_are_refused(change, message, tiny_vlm):
    vlm = tiny_vlm("llava")
    messages, images = change(*_conversation())
    with pytest.raises(AsymVLMError, match=message):
        vlm.chat(messages, images, max_new_tokens=2)


def test_multi_turn_rule_needs_images(tiny_vlm):
    vlm = tiny_vlm("llava")
    messages = [{"role": "user", "content": "hello there!"}, {"role": "assistant", "content": ANSWERS[0]},
                {"role": "user", "content": "Describe it."}]
    text_only = vlm.chat(messages, [], max_new_tokens=2)  # a text-only chat works without the rule
    (start, end), = text_only.answer_spans
    assert vlm.processor.tokenizer.decode(text_only.prompt.input_ids[0][start:end]).strip() == ANSWERS[0]
    with pytest.raises(AsymVLMError, match="has none"):
        vlm.chat(messages, [], max_new_tokens=2, multi_turn=MultiTurnEviction(answer_budget=0))


def test_the_vision_tower_runs_once_per_chat_turn(tiny_vlm):
    vlm = tiny_vlm("llava")
    messages, images = _conversation()
    calls = []
    handle = vlm.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = vlm.chat(messages, images, max_new_tokens=2, multi_turn=MultiTurnEviction(answer_budget=0))
    finally:
        handle.remove()
    assert result.dropped_answers and len(calls) == 1


@pytest.mark.parametrize("image_in_current_turn", [False, True])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_turn_markers_find_the_same_spans_without_the_processor(family, tiny_vlm, image_in_current_turn):
    """What the engine does (``core.turns``): learn the template's turn markers once from one
    rendered conversation, then find every answer with one scan of the token ids."""
    from asymvlm_vllm.core.turns import find_answer_spans, learn_turn_markers

    vlm = tiny_vlm(family)
    tokenizer = vlm.processor.tokenizer

    def render(messages, add_generation_prompt):  # Phi-3-V: string content, as vLLM renders it
        return vlm.adapter.render(vlm.processor, messages, add_generation_prompt)

    def is_blank(token_id):
        return not tokenizer.decode([token_id]).strip()

    markers = learn_turn_markers(render, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], is_blank)
    messages, images = _conversation(image_in_current_turn, family)
    ids = conversation_inputs(vlm.processor, messages, images, vlm.adapter)["input_ids"][0]
    expected = answer_token_spans(vlm.processor, messages, images, ids, vlm.adapter)
    assert find_answer_spans(ids.tolist(), markers, is_blank) == expected
    # Image placeholders are never inside an answer; a span that would overlap one is skipped.
    image = (ids == vlm.adapter.image_token_id(vlm.model)).nonzero().flatten().tolist()
    assert find_answer_spans(ids.tolist(), markers, is_blank, [(expected[1][0], expected[1][0] + 1)]) == \
        [expected[0], expected[2]]
    assert not any(a <= p < b for a, b in expected for p in image)
