"""Text eviction on the transformers path: the real tiny models, every family, batched."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, DynamicCache

from asymvlm_vllm.core.eviction import BlockEviction, H2OEviction, StreamingLLMEviction, ThresholdEviction
from asymvlm_vllm.hf import PrunedVLM
from asymvlm_vllm.hf.attention import final_full_attention_layer, language_model_layers
from asymvlm_vllm.hf.generation import EvictingCache, generate_from_prompt

from .conftest import ALL_FAMILIES, random_image, sizes_for

# Different lengths, so the batch is left-padded (Qwen2.5-VL: different image sizes too).
QUESTIONS = ["Describe the image in one sentence.", "What is shown?"]
SIZES = ((224, 224), (196, 280))
NEW_TOKENS = 40  # long enough for every policy to evict many times
IDENTITY_TOKENS = 24


def _inputs(vlm, samples=(0, 1)):
    sizes = sizes_for(vlm, SIZES)
    return vlm.process([random_image(i, *sizes[i]) for i in samples], [QUESTIONS[i] for i in samples])


def _generate(vlm, prompt, policy=None, new_tokens=NEW_TOKENS, trace=False):
    """``vlm.generate_from`` with an optional trace (same eos and pad handling)."""
    eos = vlm.model.generation_config.eos_token_id
    eos = frozenset(eos if isinstance(eos, list) else [eos])
    return generate_from_prompt(vlm.model, prompt, new_tokens, eos, vlm.processor.tokenizer.pad_token_id, policy,
                                vlm.tap if policy is not None else None, vlm.adapter.uses_mrope, trace=trace)



class LogitsRecorder:
    """The last-position logits (B, V) of every forward pass of ``model``'s LM head."""

    def __init__(self, model):
        self.steps: list[torch.Tensor] = []
        self.handle = model.lm_head.register_forward_hook(lambda m, i, out: self.steps.append(out[:, -1].clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def plain_model(tiny_model_dirs):
    """family -> a freshly loaded SDPA model that never had the tap installed."""
    cache = {}

    def get(family, attn="sdpa"):
        if (family, attn) not in cache:
            if family == "phi3_v":  # no transformers class: the project's, which loads without remote code
                from asymvlm_vllm.hf.phi3v import load_phi3v

                model = load_phi3v(tiny_model_dirs(family), attn_implementation=attn)
            else:
                model = AutoModelForImageTextToText.from_pretrained(tiny_model_dirs(family), attn_implementation=attn,
                                                                    local_files_only=True)
            cache[family, attn] = model.eval()
        return cache[family, attn]

    return get


def _prefill_kwargs(prompt, cache):
    return dict(prompt.model_inputs(), past_key_values=cache, use_cache=True)


def _step_kwargs(vlm, ids, mask, positions, cache):
    pos = positions[:, None]
    return dict(input_ids=ids[:, None], attention_mask=mask, past_key_values=cache, use_cache=True,
                position_ids=pos[None].expand(3, -1, -1) if vlm.adapter.uses_mrope else pos)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_eviction_off_is_plain_generation(family, tiny_vlm, plain_model):
    vlm, plain = tiny_vlm(family), plain_model(family)
    inputs = _inputs(vlm)
    with torch.inference_mode():
        ref = plain.generate(**inputs, do_sample=False, max_new_tokens=IDENTITY_TOKENS, output_logits=True,
                             return_dict_in_generate=True)
    prompt = vlm.prune(inputs)  # keep-all budget: the full prompt
    with LogitsRecorder(vlm.model) as off_logits:
        off = vlm.generate_from(prompt, IDENTITY_TOKENS)
    with LogitsRecorder(vlm.model) as never_logits:
        never = vlm.generate_from(prompt, IDENTITY_TOKENS, eviction=ThresholdEviction(budget=10**6))
    width = inputs["input_ids"].shape[1]
    for b, tokens in enumerate(off.tokens):
        assert tokens == ref.sequences[b, width: width + len(tokens)].tolist()
        for step in range(len(tokens)):  # Gemma 3's tiny model repeats one token: compare logits too
            torch.testing.assert_close(off_logits.steps[step][b], ref.logits[step][b], atol=1e-5, rtol=1e-5)
    assert never.tokens == off.tokens and never.evicted_tokens == [0, 0]
    assert never.live_tokens == off.live_tokens == [n + IDENTITY_TOKENS - 1 for n in prompt.lm_lengths]
    # the tap and the evicting cache change nothing while nothing is evicted: bit-identical
    assert len(never_logits.steps) == len(off_logits.steps) == IDENTITY_TOKENS
    assert all(torch.equal(a, b) for a, b in zip(never_logits.steps, off_logits.steps))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_final_attention_is_the_eager_attention(family, tiny_vlm, plain_model):
    vlm, eager, sdpa = tiny_vlm(family), plain_model(family, "eager"), plain_model(family)
    prompt = vlm.prune(_inputs(vlm))
    final = final_full_attention_layer(vlm.model)
    assert final == len(language_model_layers(vlm.model)) - 1  # the tiny models end in a full layer
    tap = vlm.tap
    with torch.inference_mode():
        cache = EvictingCache()
        with tap.record():
            out = vlm.model(**_prefill_kwargs(prompt, cache))
        plain_out = sdpa(**_prefill_kwargs(prompt, DynamicCache(config=sdpa.config)))
        assert torch.equal(out.logits, plain_out.logits)  # recording leaves SDPA's output bit-identical
        eager_out = eager(**_prefill_kwargs(prompt, EvictingCache()), output_attentions=True)
        torch.testing.assert_close(tap.final_attention, eager_out.attentions[final][:, :, -1], atol=1e-5, rtol=0)

        # decode 3 tokens, evict different entries per sample, then compare one more step
        mask, positions = prompt.attention_mask, prompt.next_positions.clone()
        ids = out.logits[:, -1].argmax(-1)
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            ids = vlm.model(**_step_kwargs(vlm, ids, mask, positions, cache)).logits[:, -1].argmax(-1)
            positions = positions + 1
        width = mask.shape[1]
        live = [mask[b].bool().nonzero().flatten() for b in range(2)]
        keep = [torch.cat([live[0][:-20], live[0][-18:]]),  # sample 0 loses 2 entries
                torch.cat([live[1][:5], live[1][12:-3], live[1][-2:]])]  # sample 1 loses 8, one generated
        new_width = max(k.shape[0] for k in keep)
        index = torch.zeros(2, new_width, dtype=torch.long)
        mask = torch.zeros(2, new_width, dtype=mask.dtype)
        for b, k in enumerate(keep):
            index[b, new_width - k.shape[0]:], mask[b, new_width - k.shape[0]:] = k, 1
        before = [layer.keys.clone() for layer in cache.layers]
        cache.keep_entries(index)
        for layer, old in zip(cache.layers, before):
            for b, k in enumerate(keep):
                assert torch.equal(layer.keys[b, :, new_width - k.shape[0]:], old[b, :, k])
        assert new_width < width
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        eager_cache = copy.deepcopy(cache)
        with tap.record():
            out = vlm.model(**_step_kwargs(vlm, ids, mask, positions, cache))
        eager_out = eager(**_step_kwargs(vlm, ids, mask, positions, eager_cache), output_attentions=True)
    attention = tap.final_attention
    assert attention.shape == (2, vlm.model.config.get_text_config().num_attention_heads, new_width + 1)
    torch.testing.assert_close(attention, eager_out.attentions[final][:, :, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, eager_out.logits, atol=1e-4, rtol=1e-4)
    assert torch.all(attention.permute(0, 2, 1)[mask == 0] == 0)  # padding slots get nothing
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]), atol=1e-5, rtol=0)


def _fresh_first_layer_keys(vlm, token_ids, positions):
    """First-layer keys (heads, n, d) of tokens at the given positions: they depend on nothing else."""
    pos = positions[None]
    with torch.inference_mode():
        cache = DynamicCache()
        vlm.model.model.language_model(input_ids=token_ids[None], position_ids=pos[None].expand(3, -1, -1)
                                       if vlm.adapter.uses_mrope else pos, past_key_values=cache, use_cache=True)
    return cache.layers[0].keys[0]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_threshold_eviction_keeps_the_budget_and_the_prompt(family, tiny_vlm):
    vlm, budget = tiny_vlm(family), 6
    prompt = vlm.prune(_inputs(vlm))
    policy = ThresholdEviction(budget=budget)
    generation = _generate(vlm, prompt, policy, trace=True)
    trace = generation.trace
    prompt_len = prompt.lm_lengths
    fed = [len(t) - 1 for t in generation.tokens]
    assert fed == [NEW_TOKENS - 1] * 2
    steps = {(s.sample, s.step): s for s in trace.steps}
    assert len(steps) == 2 * fed[0]
    for (b, step), record in steps.items():
        live_generated = int((record.stream_ids >= prompt_len[b]).sum())
        assert live_generated == min(step + 1, budget + 1)  # the policy sees at most budget + the new token
        evicted = record.stream_ids[record.evicted]
        assert torch.all(evicted >= prompt_len[b])  # never a prompt or vision entry
        assert record.evicted.shape[0] == max(0, live_generated - budget)
        # the core rule on the recorded attention, and what that means: the least attended go
        assert torch.equal(record.evicted, policy.evict(record.attention, record.num_prompt_tokens))
        torch.testing.assert_close(record.importance, record.attention.mean(0))
        torch.testing.assert_close(record.attention.sum(-1), torch.ones(record.attention.shape[0]), atol=1e-5, rtol=0)
        candidates = torch.zeros(record.stream_ids.shape[0], dtype=torch.bool)
        candidates[prompt_len[b]: -policy.recent] = True
        candidates[record.evicted] = False
        if record.evicted.numel() and candidates.any():
            assert record.importance[record.evicted].max() <= record.importance[candidates].min()
    for b in range(2):
        evicted = sum(s.evicted.shape[0] for s in trace.steps if s.sample == b)
        assert generation.evicted_tokens[b] == evicted == fed[b] - budget
        assert generation.live_tokens[b] == prompt_len[b] + budget == trace.stream_ids[b].shape[0]
        assert torch.equal(trace.stream_ids[b][: prompt_len[b]], torch.arange(prompt_len[b]))

    # the prompt's keys and values are exactly the prefill's, in every layer
    with torch.inference_mode():
        reference = DynamicCache()
        vlm.model(**_prefill_kwargs(prompt, reference))
    width = trace.attention_mask.shape[1]
    for layer, ref_layer in zip(trace.cache.layers, reference.layers):
        for b in range(2):
            start = width - trace.stream_ids[b].shape[0]
            ref_start = ref_layer.keys.shape[2] - prompt_len[b]
            assert torch.equal(layer.keys[b, :, start: start + prompt_len[b]], ref_layer.keys[b, :, ref_start:])
            assert torch.equal(layer.values[b, :, start: start + prompt_len[b]], ref_layer.values[b, :, ref_start:])
    # the surviving generated tokens sit at the positions of their generation order, not of the cache
    for b in range(2):
        ids = trace.stream_ids[b][prompt_len[b]:]
        order = ids - prompt_len[b]
        assert order[-1] == fed[b] - 1 and order.shape[0] == budget
        tokens = torch.tensor(generation.tokens[b])[order]
        expected = _fresh_first_layer_keys(vlm, tokens, prompt.next_positions[b] + order)
        cached = trace.cache.layers[0].keys[b, :, width - budget:]
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
        # had positions restarted from the cache length, the newest token would sit elsewhere
        wrong = _fresh_first_layer_keys(vlm, tokens[-1:], prompt.next_positions[b, None] + budget - 1)
        assert not torch.allclose(cached[:, -1:], wrong, atol=1e-3)


def test_block_eviction_evicts_whole_generated_blocks(tiny_vlm):
    vlm = tiny_vlm("qwen2_5_vl")
    prompt = vlm.prune(_inputs(vlm))
    policy = BlockEviction(budget=8, block_size=4, protected_recent_blocks=1)
    generation = _generate(vlm, prompt, policy, trace=True)
    evictions = [s for s in generation.trace.steps if s.evicted.numel()]
    assert evictions
    size = policy.block_size
    for record in evictions:
        assert record.evicted.shape[0] % size == 0
        blocks = record.evicted.view(-1, size)
        assert torch.all(blocks[:, 0] % size == 0) and torch.all(blocks.diff(dim=1) == 1)  # aligned, whole
        assert torch.all(record.stream_ids[record.evicted] >= prompt.lm_lengths[record.sample])
        assert torch.equal(record.evicted, policy.evict(record.attention, record.num_prompt_tokens))
        # candidates: blocks wholly after the prompt, before the protected ones and the newest
        first = -(-record.num_prompt_tokens // size)
        end = (record.stream_ids.shape[0] - 1) // size - policy.protected_recent_blocks
        assert torch.all((blocks[:, 0] // size >= first) & (blocks[:, 0] // size < end))
        generated = record.stream_ids.shape[0] - record.num_prompt_tokens
        if (end - first) * size >= generated - policy.budget:
            assert generated - record.evicted.shape[0] <= policy.budget
        else:
            assert record.evicted.shape[0] == (end - first) * size
    for b in range(2):
        assert generation.evicted_tokens[b] == sum(s.evicted.shape[0] for s in evictions if s.sample == b) > 0


def test_h2o_keeps_heavy_hitters_and_recent_tokens(tiny_vlm):
    vlm = tiny_vlm("llava")
    prompt = vlm.prune(_inputs(vlm))
    policy = H2OEviction(heavy=24, recent=8)
    generation = _generate(vlm, prompt, policy, new_tokens=20, trace=True)
    scores: list[dict[int, float]] = [{}, {}]  # accumulated attention per stream id, recomputed here
    for record in generation.trace.steps:
        b = record.sample
        step_attention = record.attention.mean(0)
        for i, sid in enumerate(record.stream_ids.tolist()):
            scores[b][sid] = scores[b].get(sid, 0.0) + float(step_attention[i])
        expected = torch.tensor([scores[b][sid] for sid in record.stream_ids.tolist()])
        torch.testing.assert_close(record.importance, expected, atol=1e-5, rtol=1e-5)
        total = record.stream_ids.shape[0]
        assert record.evicted.shape[0] == max(0, total - 24 - 8)
        survivors = torch.ones(total, dtype=torch.bool)
        survivors[record.evicted] = False
        assert survivors[-8:].all()  # the recent window
        if record.evicted.numel():
            heavy = survivors.clone()
            heavy[-8:] = False
            assert int(heavy.sum()) == 24
            assert record.importance[record.evicted].max() <= record.importance[heavy].min()
    assert [s.shape[0] for s in generation.trace.stream_ids] == generation.live_tokens == [32, 32]
    # prompt entries are candidates too, so the samples (different prompt lengths) evict different counts
    assert generation.evicted_tokens == [n + 19 - 32 for n in prompt.lm_lengths]
    assert generation.evicted_tokens[0] != generation.evicted_tokens[1]


def test_streaming_llm_keeps_sinks_and_recent_tokens(tiny_vlm):
    vlm = tiny_vlm("gemma3")
    prompt = vlm.prune(_inputs(vlm))
    generation = _generate(vlm, prompt, StreamingLLMEviction(sinks=4, recent=16), new_tokens=24, trace=True)
    for record in generation.trace.steps:
        stream = record.stream_ids
        survivors = torch.ones(stream.shape[0], dtype=torch.bool)
        survivors[record.evicted] = False
        assert torch.equal(stream[survivors], torch.cat([stream[:4], stream[4:][-16:]]))
    for b in range(2):
        last = prompt.lm_lengths[b] + 23
        assert trace_ids(generation, b) == [0, 1, 2, 3] + list(range(last - 16, last))
        assert generation.evicted_tokens[b] == prompt.lm_lengths[b] + 23 - 20


def trace_ids(generation, b):
    return generation.trace.stream_ids[b].tolist()


@pytest.mark.parametrize("family, policies", [
    ("llava", (ThresholdEviction(budget=5), H2OEviction(heavy=30, recent=6))),
    ("qwen2_5_vl", (BlockEviction(budget=4, block_size=2), StreamingLLMEviction(sinks=2, recent=12))),
])
def test_samples_evict_independently(family, policies, tiny_vlm):
    vlm = tiny_vlm(family)
    batch_prompt = vlm.prune(_inputs(vlm))
    alone_prompts = [vlm.prune(_inputs(vlm, (b,))) for b in range(2)]
    for policy in policies:
        batched = _generate(vlm, batch_prompt, policy, new_tokens=24, trace=True)
        for b in range(2):
            alone = _generate(vlm, alone_prompts[b], policy, new_tokens=24, trace=True)
            assert batched.tokens[b] == alone.tokens[0], policy
            assert batched.evicted_tokens[b] == alone.evicted_tokens[0]
            assert trace_ids(batched, b) == trace_ids(alone, 0)
        if isinstance(policy, (H2OEviction, StreamingLLMEviction)):  # prompt entries are candidates
            assert batched.evicted_tokens[0] != batched.evicted_tokens[1]


def test_gemma3_sliding_window_under_the_evicting_cache(tiny_model_dirs, tiny_vlm):
    """A window shorter than the prompt: the mask-applied window of :class:`EvictingCache`
    equals transformers' own sliding layers while nothing is evicted."""
    directory = tiny_model_dirs("gemma3")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    config.text_config.sliding_window = 8
    model = AutoModelForImageTextToText.from_pretrained(directory, config=config, attn_implementation="sdpa",
                                                        local_files_only=True).eval()
    wide_vlm = tiny_vlm("gemma3")  # same weights, window 1024: longer than everything here
    vlm = PrunedVLM(model, wide_vlm.processor)
    prompt = vlm.prune(_inputs(vlm))
    with LogitsRecorder(model) as own_window:
        off = _generate(vlm, prompt, None, new_tokens=12)
    with LogitsRecorder(model) as mask_window:
        never = _generate(vlm, prompt, ThresholdEviction(budget=10**6), new_tokens=12)
    assert never.tokens == off.tokens
    for a, b in zip(own_window.steps, mask_window.steps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with LogitsRecorder(wide_vlm.model) as wide:
        _generate(wide_vlm, prompt, ThresholdEviction(budget=10**6), new_tokens=12)
    assert not torch.allclose(wide.steps[-1], mask_window.steps[-1], atol=1e-3)  # the window matters here


def test_finished_samples_stop_growing_and_evicting(tiny_vlm):
    vlm, budget = tiny_vlm("llava"), 3
    prompt = vlm.prune(_inputs(vlm))
    policy = ThresholdEviction(budget=budget)
    full = _generate(vlm, prompt, policy, new_tokens=20)
    # a token sample 0 emits late and sample 1 never does plays end-of-sequence
    stop = next(t for i, t in enumerate(full.tokens[0]) if i >= 6 and t not in full.tokens[1] + full.tokens[0][:i])
    end = full.tokens[0].index(stop) + 1
    stopped = generate_from_prompt(vlm.model, prompt, 20, frozenset({stop}), vlm.processor.tokenizer.pad_token_id,
                                   policy, vlm.tap, trace=True)
    assert stopped.tokens == [full.tokens[0][:end], full.tokens[1]]  # the other sample is unaffected
    assert stopped.evicted_tokens == [end - 1 - budget, full.evicted_tokens[1]]  # end-of-sequence is never fed
    assert stopped.live_tokens == [prompt.lm_lengths[0] + budget, full.live_tokens[1]]
    assert max(s.step for s in stopped.trace.steps if s.sample == 0) == end - 2
    assert trace_ids(stopped, 1) == trace_ids(_generate(vlm, prompt, policy, new_tokens=20, trace=True), 1)
