"""Phi-3-V's separator rows in the engine glue (``asymvlm_vllm/engine/families.py``), without vLLM.

The runner asks ``VisionFamily.structural_rows`` which encoder-output rows of an image are
separators. It reads the image's HD layout from the feature's ``image_sizes``; where the engine
holds no image data (``feature.data`` is None) it infers the layout from the row count when only
one crop grid has it. Both must give the rows the HD transform puts there, written out here from
its definition: for ``h x w`` crops, ``12h`` rows of ``12w`` merged patches each ended by a
newline, one global separator, then 12 rows of 12 global-view patches each ended by a newline.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from asymvlm_vllm.core.errors import AsymVLMError
from asymvlm_vllm.engine.families import VisionFamily, _phi3v_layout, family_for

PHI3V = VisionFamily("Phi3VForCausalLM")


def num_rows(h: int, w: int) -> int:
    return 12 * h * (12 * w + 1) + 1 + 12 * 13


def separator_rows(h: int, w: int) -> list[int]:
    width = 12 * w + 1
    glb = 12 * h * width
    return [r * width + 12 * w for r in range(12 * h)] + [glb] + [glb + 1 + r * 13 + 12 for r in range(12)]


def grids_with(rows: int) -> list[tuple[int, int]]:
    """Every crop grid whose image has ``rows`` rows."""
    return [(h, w) for h in range(1, rows // 144 + 1) for w in range(1, rows // 144 + 1) if num_rows(h, w) == rows]


def without_data():
    return SimpleNamespace(data=None, identifier="stub")


def with_sizes(height: int, width: int):
    return SimpleNamespace(data={"image_sizes": SimpleNamespace(data=torch.tensor([height, width]))}, identifier="stub")


# Every grid of up to 16 crops (Phi-3.5-Vision's num_crops), the tiny model's three among them.
GRIDS = [(h, w) for h in range(1, 17) for w in range(1, 17) if h * w <= 16]


def test_the_formula_is_the_tiny_models_token_counts():
    assert (num_rows(2, 1), num_rows(1, 2), num_rows(2, 2)) == (469, 457, 757)
    assert [len(separator_rows(h, w)) for h, w in ((2, 1), (1, 2), (2, 2))] == [37, 25, 37]


@pytest.mark.parametrize(("h", "w"), GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
def test_separators_from_image_sizes_and_from_the_row_count(h, w):
    rows = torch.zeros(num_rows(h, w), 8)
    expected = torch.zeros(rows.shape[0], dtype=torch.bool)
    expected[separator_rows(h, w)] = True
    from_sizes = PHI3V.structural_rows(None, with_sizes(336 * h, 336 * w), rows)
    assert torch.equal(from_sizes, expected)
    if len(grids_with(rows.shape[0])) == 1:
        assert torch.equal(PHI3V.structural_rows(None, without_data(), rows), expected)
        layout = _phi3v_layout(without_data(), rows.shape[0])
        assert (layout.h_crop, layout.w_crop) == (h, w)
    else:  # another grid has as many rows: without image_sizes the request runs unpruned
        with pytest.raises(AsymVLMError, match="crop grids fit"):
            PHI3V.structural_rows(None, without_data(), rows)


def test_the_ambiguous_row_counts_are_the_ones_expected():
    # 12h(12w + 1) is equal for 13 x 1 and 1 x 14 crops (2185 rows): the only clash within 16 crops.
    ambiguous = {(h, w) for h, w in GRIDS if len(grids_with(num_rows(h, w))) > 1}
    assert ambiguous == {(13, 1), (1, 14)}
    assert num_rows(13, 1) == num_rows(1, 14) == 2185


def test_feature_data_without_image_sizes_falls_back_to_the_row_count():
    rows = torch.zeros(num_rows(1, 2), 4)
    feature = SimpleNamespace(data={"pixel_values": SimpleNamespace(data=torch.zeros(1))}, identifier="stub")
    assert PHI3V.structural_rows(None, feature, rows).nonzero().flatten().tolist() == separator_rows(1, 2)


def test_row_counts_no_layout_has_are_errors():
    with pytest.raises(AsymVLMError, match="0 crop grids fit"):
        PHI3V.structural_rows(None, without_data(), torch.zeros(num_rows(2, 1) + 1, 4))
    with pytest.raises(AsymVLMError, match="encoder output"):  # image_sizes and rows disagree
        PHI3V.structural_rows(None, with_sizes(672, 336), torch.zeros(num_rows(1, 2), 4))


def test_the_family_of_a_phi3v_config():
    family = family_for(SimpleNamespace(architectures=["Phi3VForCausalLM"]))
    assert family == PHI3V and not family.uses_mrope and family.structure_token_ids == frozenset()
    assert family.grid_shape(without_data(), 432) is None  # crops and global view: no single grid
