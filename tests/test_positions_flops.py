"""The position convention and the prefill FLOPs estimate (core, no model needed)."""

import pytest
import torch

from asymvlm_vllm.core.flops import prefill_flops
from asymvlm_vllm.core.positions import kept_mrope_positions, next_position, pruned_positions, text_query_mask


def test_prefill_flops_is_the_papers_per_layer_sum():
    # n = 3, d = 2, m = 5: 4·3·4 + 2·9·2 + 3·3·2·5 = 48 + 36 + 90 = 174 per layer
    assert prefill_flops(3, 2, 5, 1) == 174
    assert prefill_flops(3, 2, 5, 4) == 4 * 174
    assert prefill_flops(0, 4096, 11008, 32) == 0
    # Pruning 2,300 of 2,330 tokens to 30 %: attention's n² term makes the saving super-linear.
    full, pruned = prefill_flops(2330, 3072, 8192, 32), prefill_flops(30 + 690, 3072, 8192, 32)
    assert pruned / full < 720 / 2330


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_prefill_flops_rejects_non_counts(bad):
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 0"):
        prefill_flops(bad, 2, 2, 1)


def test_one_d_positions_are_contiguous_after_pruning():
    assert pruned_positions(4).tolist() == [0, 1, 2, 3]
    assert next_position(pruned_positions(4)) == 4 and next_position(torch.empty(0)) == 0
    with pytest.raises(ValueError):
        pruned_positions(-1)


def test_mrope_positions_are_kept_not_renumbered():
    positions = torch.tensor([[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]])
    keep = torch.tensor([True, False, True, True, False, True])
    assert kept_mrope_positions(positions, keep).tolist() == [[0, 1, 1, 3], [0, 1, 2, 3], [0, 2, 1, 3]]
    assert next_position(positions) == 4  # after the unpruned maximum, not the kept count
    with pytest.raises(ValueError, match=r"shape \(3, T\)"):
        kept_mrope_positions(positions[:2], keep)
    with pytest.raises(ValueError, match="bool mask"):
        kept_mrope_positions(positions, keep.long())


def test_text_query_excludes_vision_rows_and_image_structure_tokens():
    ids = torch.tensor([2, 7, 9, 9, 9, 8, 30, 31])  # bos, <boi>, 3 image rows, <eoi>, question
    vision = ids == 9
    assert text_query_mask(ids, vision, {7, 8}).tolist() == [True, False, False, False, False, False, True, True]
    with pytest.raises(ValueError, match="differ in shape"):
        text_query_mask(ids, vision[:3], set())
