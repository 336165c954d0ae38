import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from asymvlm_vllm.core import (
    BlockEviction,
    EvictionPolicy,
    H2OEviction,
    MultiTurnEviction,
    StreamingLLMEviction,
    ThresholdEviction,
    accumulate_attention,
    answer_image_similarity,
    block_attention_mass,
    head_mean_attention,
    keep_mask,
)

# The shared matrix: every per-step policy must pass every test below that takes `policy`.
POLICIES = [
    ThresholdEviction(budget=8, recent=1),
    ThresholdEviction(budget=0, recent=0),
    BlockEviction(budget=8, block_size=4, protected_recent_blocks=1),
    BlockEviction(budget=0, block_size=1, protected_recent_blocks=0),
    H2OEviction(heavy=4, recent=4),
    StreamingLLMEviction(sinks=2, recent=4),
]
PAPER_POLICIES = [p for p in POLICIES if isinstance(p, (ThresholdEviction, BlockEviction))]


@st.composite
def cache_states(draw):
    """(attention (H, T), num_prompt_tokens) with ties likely."""
    total = draw(st.integers(1, 48))
    prompt = draw(st.integers(0, total))
    heads = draw(st.integers(1, 3))
    values = draw(st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.3]), min_size=heads * total, max_size=heads * total))
    return torch.tensor(values).view(heads, total), prompt


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
@given(state=cache_states())
def test_evicted_positions_are_sorted_unique_and_live(policy, state):
    attention, prompt = state
    assert isinstance(policy, EvictionPolicy)
    got = policy.evict(attention, prompt)
    assert got.dtype == torch.int64 and got.ndim == 1
    assert torch.all(got[1:] > got[:-1])
    assert got.numel() == 0 or (0 <= int(got[0]) and int(got[-1]) < attention.shape[1])
    assert torch.equal(got, policy.evict(attention.mean(0), prompt))  # heads are averaged


def _has_candidates(policy, prompt, total):
    if isinstance(policy, ThresholdEviction):
        return total - policy.recent > prompt
    return math.ceil(total / policy.block_size) - 1 - policy.protected_recent_blocks > math.ceil(prompt / policy.block_size)


@pytest.mark.parametrize("policy", PAPER_POLICIES, ids=repr)
@given(state=cache_states())
def test_paper_policies_never_evict_prompt_and_act_only_past_the_budget(policy, state):
    attention, prompt = state
    total = attention.shape[1]
    got = policy.evict(attention, prompt).tolist()
    assert all(p >= prompt for p in got), "a prompt or vision position was evicted"
    if isinstance(policy, BlockEviction) or policy.recent > 0:
        assert total - 1 not in got, "the newest token was evicted"
    if total - prompt <= policy.budget:
        assert got == []
    elif _has_candidates(policy, prompt, total):
        assert got, "over budget with candidates, yet nothing was evicted"
    else:
        assert got == []


def _threshold_reference(importance, prompt, budget, recent):
    total = len(importance)
    excess = total - prompt - budget
    cands = list(range(prompt, max(prompt, total - recent)))
    if excess <= 0:
        return []
    return sorted(sorted(cands, key=lambda i: (importance[i], i))[: min(excess, len(cands))])


@given(cache_states(), st.integers(0, 10), st.integers(0, 3))
def test_threshold_eviction_matches_reference(state, budget, recent):
    attention, prompt = state
    got = ThresholdEviction(budget, recent).evict(attention, prompt).tolist()
    assert got == _threshold_reference(attention.mean(0).tolist(), prompt, budget, recent)
    total = attention.shape[1]
    if total - prompt > budget and total - recent - prompt >= total - prompt - budget:
        assert total - prompt - len(got) == budget  # enough candidates: back to exactly the budget


def _block_reference(mass, prompt, total, budget, bs, protected):
    excess = total - prompt - budget
    nblocks = math.ceil(total / bs)
    cands = [b for b in range(nblocks) if b * bs >= prompt and b < nblocks - 1 - protected]
    if excess <= 0:
        return []
    return sorted(sorted(cands, key=lambda b: (mass[b], b))[: min(math.ceil(excess / bs), len(cands))])


@given(cache_states(), st.integers(0, 12), st.integers(1, 6), st.integers(0, 2))
def test_block_eviction_matches_reference_and_evicts_whole_blocks(state, budget, bs, protected):
    attention, prompt = state
    total = attention.shape[1]
    policy = BlockEviction(budget, bs, protected)
    mass = block_attention_mass(attention, bs)
    blocks = policy.evict_generated_blocks(mass, prompt, total).tolist()
    assert blocks == _block_reference(mass.tolist(), prompt, total, budget, bs, protected)
    assert (prompt - 1) // bs not in blocks if prompt else True  # the last prompt token's block stays
    assert (total - 1) // bs not in blocks  # the newest token's block stays
    positions = policy.evict(attention, prompt).tolist()
    assert positions == [b * bs + i for b in blocks for i in range(bs)]


def test_block_eviction_worked_example():
    # 10 prompt tokens, 22 generated, blocks of 4: blocks 0-2 hold prompt (2 mixed), 3-7 generated.
    attention = torch.zeros(32)
    attention[12:16] = 0.5  # block 3 important
    attention[16:20] = 0.0  # block 4 unimportant
    attention[20:24] = 0.1  # block 5
    policy = BlockEviction(budget=16, block_size=4, protected_recent_blocks=1)
    # 22 - 16 = 6 excess -> 2 blocks; candidates 3, 4, 5 (6 protected, 7 newest); lowest mass: 4, 5.
    assert policy.evict_generated_blocks(block_attention_mass(attention, 4), 10, 32).tolist() == [4, 5]


def test_block_importance_shape_is_checked():
    with pytest.raises(ValueError, match=r"block_importance must have shape \(3,\)"):
        BlockEviction(4, 4).evict_generated_blocks(torch.zeros(2), 2, 9)


def test_block_attention_mass_sums_head_means_per_block():
    attention = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, 1.0]])
    assert block_attention_mass(attention, 2).tolist() == [4.0, 4.0, 3.0]


@given(cache_states(), st.integers(0, 6), st.integers(0, 6))
def test_h2o_keeps_recent_window_and_heavy_hitters(state, heavy, recent):
    attention, prompt = state
    total = attention.shape[1]
    evicted = set(H2OEviction(heavy, recent).evict(attention, prompt).tolist())
    kept = [i for i in range(total) if i not in evicted]
    assert set(range(max(0, total - recent), total)) <= set(kept)
    older_kept = [i for i in kept if i < total - recent]
    assert len(older_kept) == min(heavy, max(0, total - recent))
    imp = attention.mean(0)
    if evicted and older_kept:
        assert max(imp[list(evicted)]) <= min(imp[older_kept])  # heavy hitters beat every evicted token


def test_h2o_considers_prompt_tokens_too():
    attention = torch.tensor([0.0, 0.9, 0.0, 0.8, 0.1, 0.1])
    assert H2OEviction(heavy=2, recent=1).evict(attention, num_prompt_tokens=4).tolist() == [0, 2, 4]


@pytest.mark.parametrize("total, sinks, recent, evicted", [(10, 2, 3, [2, 3, 4, 5, 6]), (4, 2, 3, []), (1, 4, 0, []), (6, 0, 0, [0, 1, 2, 3, 4, 5])])
def test_streaming_llm_keeps_sinks_and_recent(total, sinks, recent, evicted):
    assert StreamingLLMEviction(sinks, recent).evict(torch.rand(total), 0).tolist() == evicted


def test_accumulate_attention_and_compaction():
    acc = accumulate_attention(None, torch.tensor([[0.5, 0.5], [0.3, 0.7]]))
    acc = accumulate_attention(acc, torch.tensor([0.2, 0.2, 0.6]))
    torch.testing.assert_close(acc, torch.tensor([0.6, 0.8, 0.6]))
    evicted = H2OEviction(heavy=1, recent=1).evict(acc, 0)
    assert evicted.tolist() == [0]
    assert acc[keep_mask(3, evicted)].tolist() == pytest.approx([0.8, 0.6])
    with pytest.raises(ValueError, match="accumulated"):
        accumulate_attention(torch.zeros(4), torch.zeros(3))


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_bad_state_is_refused(policy):
    with pytest.raises(ValueError, match="NaN"):
        policy.evict(torch.tensor([0.1, float("nan")]), 0)
    with pytest.raises(ValueError, match="exceeds the live tokens"):
        policy.evict(torch.rand(3), 4)


@pytest.mark.parametrize("make", [lambda: ThresholdEviction(-1), lambda: BlockEviction(4, 0), lambda: H2OEviction(2, -3), lambda: StreamingLLMEviction(1.5, 2), lambda: MultiTurnEviction(-1)])
def test_bad_policy_parameters_are_refused(make):
    with pytest.raises(ValueError, match="must be an integer"):
        make()


def test_head_mean_attention_shapes():
    assert head_mean_attention(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="shape"):
        head_mean_attention(torch.zeros(1, 2, 3))


# ---- multi-turn -------------------------------------------------------------------------------

D = 16


def _conversation(seed=0):
    """Image tokens along e0; answer 0 off-topic (e1), answer 1 on-topic (e0), answer 2 mixed."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(D)
    images = e[0] + 0.05 * torch.randn(20, D, generator=g)
    tokens = 0.05 * torch.randn(40, D, generator=g)
    spans = [(5, 12), (15, 22), (25, 30)]
    tokens[5:12] += e[1]
    tokens[15:22] += e[0]
    tokens[25:30] += (e[0] + e[1]) / 2
    return spans, tokens, images


def test_multi_turn_drops_the_least_relevant_whole_answer():
    spans, tokens, images = _conversation()
    sims = [answer_image_similarity(tokens[a:b], images) for a, b in spans]
    assert sims[1] > sims[2] > sims[0]
    policy = MultiTurnEviction(answer_budget=12, protected_recent_answers=1)
    assert policy.select_answers(spans, tokens, images) == [0]  # 19 tokens -> drop answer 0 (7) -> 12
    assert policy.evict_answers(spans, tokens, images).tolist() == list(range(5, 12))
    assert MultiTurnEviction(answer_budget=5, protected_recent_answers=1).select_answers(spans, tokens, images) == [0, 1]
    assert MultiTurnEviction(answer_budget=0, protected_recent_answers=0).select_answers(spans, tokens, images) == [0, 1, 2]
    assert MultiTurnEviction(answer_budget=19).select_answers(spans, tokens, images) == []


@given(st.integers(0, 30), st.integers(0, 3), st.integers(0, 2**16))
def test_multi_turn_only_ever_returns_answer_positions(budget, protected, seed):
    spans, tokens, images = _conversation(seed)
    policy = MultiTurnEviction(budget, protected)
    chosen = policy.select_answers(spans, tokens, images)
    positions = set(policy.evict_answers(spans, tokens, images).tolist())
    answer_positions = {p for a, b in spans for p in range(a, b)}
    assert positions <= answer_positions
    assert not set(chosen) & set(range(len(spans) - protected, len(spans)))
    kept_tokens = sum(b - a for i, (a, b) in enumerate(spans) if i not in chosen)
    assert kept_tokens <= budget or len(chosen) == max(0, len(spans) - protected)


@pytest.mark.parametrize("spans, match", [([(5, 3)], "empty or outside"), ([(0, 50)], "outside"), ([(0, 10), (5, 12)], "not overlap")])
def test_multi_turn_refuses_bad_spans(spans, match):
    _, tokens, images = _conversation()
    with pytest.raises(ValueError, match=match):
        MultiTurnEviction(4).select_answers(spans, tokens, images)
