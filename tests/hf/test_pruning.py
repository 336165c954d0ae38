"""Pruned inference on the transformers path, for every supported family (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from asymvlm_vllm.core import (
    AsymVLMConfig,
    AsymVLMError,
    ScorerFileError,
    ScorerMetadata,
    ThresholdBudget,
    UniformBudget,
    decide_vision_pruning,
    save_scorer,
    score_vision_tokens,
)
from asymvlm_vllm.core.positions import text_query_mask
from asymvlm_vllm.hf import PrunedVLM, load_image
from asymvlm_vllm.hf.families import adapter_for

from .conftest import ALL_FAMILIES, random_image, sizes_for

QUESTIONS = ["What is shown in this picture?", "Describe the image in one sentence please."]


def _inputs(vlm, n=1, sizes=((224, 224), (160, 224))):
    sizes = sizes_for(vlm, sizes)
    images = [random_image(i, *sizes[i % len(sizes)]) for i in range(n)]
    return vlm.process(images, QUESTIONS[:n])


class LMInputRecorder:
    """Records what the language model (decoder stack) receives on each call."""

    def __init__(self, model):
        self.calls = []
        lm = model.model.language_model
        self.handle = lm.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "position_ids", "attention_mask")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.inference_mode()
def _hf_merged_embeds(vlm, inputs, b):
    """Independent of asymvlm's pruning code: HF's own feature merge for sample ``b``."""
    model = vlm.model
    ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
    image_token = vlm.adapter.image_token_id(model)  # Phi-3-V's config has none: 32044, as vLLM writes it
    emb = model.get_input_embeddings()(ids.masked_fill(ids == image_token, 0)[None])[0]
    feats = vlm.adapter.image_features(model, inputs)
    rows = torch.cat(feats).to(emb.dtype)
    emb = emb.masked_scatter((ids == image_token)[:, None], rows)
    return ids, emb, feats


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_keep_all_is_token_identical_to_the_unmodified_model(tiny_vlm, family):
    vlm = tiny_vlm(family)
    inputs = _inputs(vlm)
    with torch.inference_mode():
        reference = vlm.model.generate(**inputs, max_new_tokens=12, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
    ours = vlm.generate(inputs, max_new_tokens=12, budget=UniformBudget(1.0))
    assert ours.tokens[0] == reference.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.prompt.lm_lengths == [inputs["input_ids"].shape[1]]
    # The first step's logits too, not only their argmax (random tiny models repeat tokens).
    with torch.inference_mode():
        prompt = vlm.prune(inputs, UniformBudget(1.0))
        logits = vlm.model(**prompt.model_inputs()).logits[0, -1]
    torch.testing.assert_close(logits, reference.logits[0][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_pruning_shortens_what_the_language_model_receives(tiny_vlm, family):
    vlm = tiny_vlm(family)
    inputs = _inputs(vlm)
    full_length = inputs["input_ids"].shape[1]
    with LMInputRecorder(vlm.model) as recorder:
        out = vlm.generate(inputs, max_new_tokens=3, budget=UniformBudget(0.5))
    prefill = recorder.calls[0]["inputs_embeds"]
    (image,) = out.prompt.images[0]
    pruned = image.decision.num_tokens - image.decision.num_keep
    assert image.decision.num_keep == image.decision.num_tokens // 2 > 0
    assert prefill.shape[1] == full_length - pruned == out.prompt.lm_lengths[0]
    assert all(call["inputs_embeds"].shape[1] == 1 for call in recorder.calls[1:])  # decode steps


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_kept_set_is_what_the_core_selects(tiny_vlm, family):
    vlm = tiny_vlm(family)
    inputs = _inputs(vlm, n=2)
    budget = ThresholdBudget(gap_low=0.0, gap_high=1.0, ratio_aggressive=0.3, ratio_moderate=0.5, ratio_conservative=0.8)
    prompt = vlm.prune(inputs, budget)
    adapter = adapter_for(vlm.model)
    for b in range(2):
        ids, emb, feats = _hf_merged_embeds(vlm, inputs, b)
        vision = ids == adapter.image_token_id(vlm.model)
        text = emb[text_query_mask(ids, vision, adapter.structure_token_ids(vlm.model))]
        (image,) = prompt.images[b]
        rows = feats[b][image.prunable]
        expected = decide_vision_pruning(score_vision_tokens(rows, text), budget)
        assert torch.equal(image.decision.keep_indices, expected.keep_indices)
        assert image.decision.gap == expected.gap and image.decision.keep_ratio == expected.keep_ratio
        kept_ids = prompt.kept_token_ids[b]
        assert int((kept_ids == adapter.image_token_id(vlm.model)).sum()) == int(image.kept_rows.sum())
        assert torch.equal(kept_ids[~(kept_ids == adapter.image_token_id(vlm.model))], ids[~vision])  # text untouched


@pytest.mark.parametrize("family", ["llava", "llava_next", "gemma3", "phi3_v"])
def test_pruned_logits_match_hf_on_the_same_rows_removed(tiny_vlm, family):
    """1-D RoPE: the pruned prompt is exactly HF's merged prompt with those rows deleted, at
    contiguous positions (HF's default positions for an unpadded prompt)."""
    vlm = tiny_vlm(family)
    inputs = _inputs(vlm)
    prompt = vlm.prune(inputs, UniformBudget(0.4))
    ids, emb, _ = _hf_merged_embeds(vlm, inputs, 0)
    keep = prompt.keep_masks[0]
    assert int(keep.sum()) < keep.shape[0]
    with torch.inference_mode():
        kwargs = {}
        if family == "gemma3":  # bidirectional attention over the kept image span
            kwargs["token_type_ids"] = (ids[keep] == vlm.model.config.image_token_id).long()[None]
        expected = vlm.model(inputs_embeds=emb[keep][None], **kwargs).logits[0, -1]
        ours = vlm.model(**prompt.model_inputs()).logits[0, -1]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_qwen_kept_tokens_keep_their_original_mrope_positions(tiny_vlm):
    vlm = tiny_vlm("qwen2_5_vl")
    inputs = _inputs(vlm)
    full, _ = vlm.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    with LMInputRecorder(vlm.model) as recorder:
        out = vlm.generate(inputs, max_new_tokens=3, budget=UniformBudget(0.3))
    keep = out.prompt.keep_masks[0]
    prefill_positions = recorder.calls[0]["position_ids"]
    assert prefill_positions.shape == (3, 1, int(keep.sum()))
    assert torch.equal(prefill_positions[:, 0], full[:, 0, keep])
    # Kept image tokens are not renumbered: their (h, w) grid coordinates have gaps.
    assert int(keep.sum()) < keep.shape[0]
    # Decoding continues after the unpruned prompt's largest position, on all three axes.
    first_decode = recorder.calls[1]["position_ids"]
    assert first_decode.flatten().tolist() == [int(full.max()) + 1] * 3


def test_gemma3_bidirectional_image_attention_follows_the_pruned_span(tiny_vlm):
    vlm = tiny_vlm("gemma3")
    inputs = _inputs(vlm)
    prompt = vlm.prune(inputs, UniformBudget(0.5))
    types = prompt.token_type_ids[0]
    image_rows = types.nonzero().flatten()
    assert image_rows.numel() == prompt.images[0][0].decision.num_keep
    assert torch.equal(image_rows, torch.arange(image_rows[0], image_rows[0] + image_rows.numel()))  # one contiguous span
    # Bidirectional: the first kept image token's output depends on the last kept image token.
    def hidden(embeds):
        return vlm.model.model(inputs_embeds=embeds, attention_mask=prompt.attention_mask,
                               position_ids=prompt.position_ids, token_type_ids=prompt.token_type_ids).last_hidden_state
    with torch.inference_mode():
        base = hidden(prompt.inputs_embeds)
        changed = prompt.inputs_embeds.clone()
        changed[0, image_rows[-1]] += 1.0
        after = hidden(changed)
    assert not torch.allclose(base[0, image_rows[0]], after[0, image_rows[0]])
    assert torch.equal(base[0, : image_rows[0]], after[0, : image_rows[0]])  # text before the image stays causal


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_batch_gets_different_kept_counts_and_matches_single_runs(tiny_vlm, family):
    vlm = tiny_vlm(family)
    inputs = _inputs(vlm, n=2)
    budgets = [UniformBudget(0.25), UniformBudget(0.75)]
    batch = vlm.generate(inputs, max_new_tokens=6, budget=budgets)
    kept = batch.prompt.vision_tokens_kept
    assert kept[0] != kept[1]
    assert batch.prompt.inputs_embeds.shape[1] == max(batch.prompt.lm_lengths)
    for b in range(2):
        single = vlm.generate(_inputs_single(vlm, b), max_new_tokens=6, budget=budgets[b])
        assert single.prompt.lm_lengths == [batch.prompt.lm_lengths[b]]
        assert torch.equal(single.prompt.images[0][0].decision.keep_indices, batch.prompt.images[b][0].decision.keep_indices)
        assert single.tokens[0] == batch.tokens[b]


def _inputs_single(vlm, b, sizes=((224, 224), (160, 224))):
    sizes = sizes_for(vlm, sizes)
    return vlm.process([random_image(b, *sizes[b % len(sizes)])], [QUESTIONS[b]])


def test_llava_next_newline_rows_are_never_pruned(tiny_vlm):
    vlm = tiny_vlm("llava_next")
    inputs = _inputs(vlm)
    prompt = vlm.prune(inputs, UniformBudget(0.1))
    (image,) = prompt.images[0]
    newlines = ~image.prunable
    assert 0 < int(newlines.sum()) < image.prunable.numel()
    assert image.kept_rows[newlines].all()
    # They are the rows holding the model's image_newline vector.
    _, emb, _ = _hf_merged_embeds(vlm, inputs, 0)
    rows = emb[image.positions]
    is_newline = (rows == vlm.model.model.image_newline.to(rows.dtype)).all(-1)
    assert torch.equal(is_newline, newlines)


def test_a_text_only_request_is_untouched(tiny_vlm):
    vlm = tiny_vlm("llava")
    inputs = vlm.processor(text=["USER: hello there ASSISTANT:"], return_tensors="pt")
    with torch.inference_mode():
        reference = vlm.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    out = vlm.generate(inputs, max_new_tokens=5, budget=UniformBudget(0.3))
    assert out.prompt.images == [[]] and out.prompt.lm_lengths == [inputs["input_ids"].shape[1]]
    assert out.tokens[0] == reference[0, inputs["input_ids"].shape[1]:].tolist()


def test_min_keep_and_the_config_budget_are_honoured(tiny_model_dirs):
    config = AsymVLMConfig.from_dict({"vision": {"budget": {"rule": "uniform", "ratio": 0.05}, "min_keep": 10}})
    vlm = PrunedVLM.from_pretrained(tiny_model_dirs("llava"), config)
    prompt = vlm.prune(_inputs(vlm))
    assert prompt.images[0][0].decision.num_keep == 10
    disabled = AsymVLMConfig.from_dict({"vision": {"enabled": False, "budget": {"rule": "uniform", "ratio": 0.05}}})
    vlm = PrunedVLM(vlm.model, vlm.processor, disabled)
    assert vlm.prune(_inputs(vlm)).images[0][0].decision.num_keep == 64


def test_bad_inputs_give_clear_errors(tiny_model_dirs, tiny_vlm, tmp_path):
    with pytest.raises(AsymVLMError, match="image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(AsymVLMError, match="cannot read .*junk.png as an image"):
        load_image(tmp_path / "junk.png")
    vlm = tiny_vlm("llava")
    with pytest.raises(AsymVLMError, match="question is empty"):
        vlm.process([random_image(0)], ["   "])
    wrong = save_scorer(tmp_path / "w.safetensors", torch.ones(64),
                        ScorerMetadata(architecture="LlavaForConditionalGeneration", hidden_size=64))
    config = AsymVLMConfig.from_dict({"vision": {"scorer": str(wrong)}})
    with pytest.raises(ScorerFileError, match="hidden size"):
        PrunedVLM.from_pretrained(tiny_model_dirs("llava"), config)
    with pytest.raises(AsymVLMError, match="not a model directory"):
        PrunedVLM.from_pretrained(tmp_path)
    class LlamaForCausalLM:  # a text-only model: nothing to prune
        pass

    with pytest.raises(ValueError, match="LlamaForCausalLM is not supported"):
        adapter_for(LlamaForCausalLM())
