import pytest
import torch

from asymvlm_vllm.core import (
    CosineRanker,
    LearnedRanker,
    RandomRanker,
    SpiralRanker,
    UniformBudget,
    VisionTokenRanker,
    decide_vision_pruning,
    score_vision_tokens,
    spiral_order,
)

D = 8
W = torch.linspace(0.0, 3.0, D)
# The shared matrix: every ranker must pass every test below that takes `ranker`.
RANKERS = [LearnedRanker(W), CosineRanker(), SpiralRanker(), RandomRanker(seed=7)]


def _inputs(h, w, t=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t * h * w, D, generator=g), torch.randn(5, D, generator=g), (t, h, w) if t > 1 else (h, w)


@pytest.mark.parametrize("ranker", RANKERS, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("h, w, t", [(1, 1, 1), (1, 5, 1), (3, 4, 1), (6, 6, 2)])
def test_every_ranker_gives_deterministic_finite_float32_scores(ranker, h, w, t):
    vision, text, grid = _inputs(h, w, t)
    assert isinstance(ranker, VisionTokenRanker)
    scores = ranker.score(vision, text, grid)
    assert scores.dtype == torch.float32 and scores.shape == (vision.shape[0],)
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, ranker.score(vision, text, grid))
    d = decide_vision_pruning(scores, UniformBudget(0.5))
    assert d.num_keep == max(1, vision.shape[0] // 2)


def test_learned_ranker_is_the_weighted_score_and_cosine_is_unit_weight():
    vision, text, grid = _inputs(4, 4)
    assert torch.equal(LearnedRanker(W).score(vision, text, grid), score_vision_tokens(vision, text, W))
    assert torch.equal(LearnedRanker(torch.ones(D)).score(vision, text), CosineRanker().score(vision, text))


def test_spiral_order_is_clockwise_from_the_corner():
    assert spiral_order(3, 4).tolist() == [0, 1, 2, 3, 7, 11, 10, 9, 8, 4, 5, 6]
    assert spiral_order(1, 1).tolist() == [0]
    assert spiral_order(4, 1).tolist() == [0, 1, 2, 3]
    assert sorted(spiral_order(7, 5).tolist()) == list(range(35))


def test_spiral_ranker_drops_the_border_first():
    vision, text, grid = _inputs(4, 4)
    d = decide_vision_pruning(SpiralRanker().score(vision, text, grid), UniformBudget(0.25))
    assert d.keep_indices.tolist() == [5, 6, 9, 10]  # the centre 2x2
    d = decide_vision_pruning(SpiralRanker().score(vision, text, grid), UniformBudget(0.75))
    assert set(range(16)) - set(d.keep_indices.tolist()) == {0, 1, 2, 3}  # the top row goes first


def test_spiral_ranker_repeats_per_frame_and_checks_the_grid():
    vision, text, grid = _inputs(3, 3, t=2)
    s = SpiralRanker().score(vision, text, grid)
    assert torch.equal(s[:9], s[9:]) and int(s[:9].argmax()) == 4
    with pytest.raises(ValueError, match="has 12 patches, vision has 18 rows"):
        SpiralRanker().score(vision, text, (3, 4))
    with pytest.raises(ValueError, match="needs grid_shape"):
        SpiralRanker().score(vision, text)


def test_random_ranker_is_seeded_and_ignores_content():
    vision, text, _ = _inputs(5, 5)
    a = RandomRanker(3).score(vision, text)
    assert torch.equal(a, RandomRanker(3).score(vision * 2 + 1, text[:1]))
    assert not torch.equal(a, RandomRanker(4).score(vision, text))
