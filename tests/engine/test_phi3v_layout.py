"""Phi-3-V's separator rows, as AsymVLM's layout says, against vLLM's own HD transform.

vLLM's ``Phi3HDImageEmbedding.hd_feature_transform`` is run on marker features (0 at every
patch, 1 in ``sub_GN``, 2 in ``glb_GN``, an identity projection): where its output is not 0 is
where the model put a separator. :func:`asymvlm_vllm.core.layouts.hd_image_layout` must say the
same rows, for every crop grid the processor can produce with up to 16 crops.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asymvlm_vllm.core.layouts import HD_CROP_PX, hd_image_layout

pytestmark = pytest.mark.slow


def _marker_embedding():
    """vLLM's class with markers instead of learned values (its own __init__ would build CLIP):
    0 at every patch, 1 in ``sub_GN``, 2 in ``glb_GN``, and a projection that reads channel 0."""
    from vllm.model_executor.models.phi3v import Phi3HDImageEmbedding

    class Markers(Phi3HDImageEmbedding):
        def __init__(self):
            nn.Module.__init__(self)
            dim = 4 * 1024
            self.hd_transform_order = "sub_glb"
            self.glb_GN = nn.Parameter(torch.full((1, 1, dim), 2.0), requires_grad=False)
            self.sub_GN = nn.Parameter(torch.full((1, 1, 1, dim), 1.0), requires_grad=False)
            self.img_projection = nn.Sequential(nn.Linear(dim, 1))
            with torch.no_grad():
                self.img_projection[0].weight.zero_()
                self.img_projection[0].weight[0, 0] = 1.0
                self.img_projection[0].bias.zero_()

    return Markers()


def _vllm_separator_rows(h_crop: int, w_crop: int) -> torch.Tensor:
    stub = _marker_embedding()
    crops = 1 + h_crop * w_crop
    features = torch.zeros(1, crops, 576, 1024)
    sizes = torch.tensor([[h_crop * HD_CROP_PX, w_crop * HD_CROP_PX]])
    with torch.no_grad():
        (out,) = stub.hd_feature_transform(features, sizes)
    return out[:, 0] != 0


GRIDS = [(h, w) for h in range(1, 17) for w in range(1, 17) if h * w <= 16]


@pytest.mark.parametrize(("h_crop", "w_crop"), GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
def test_separator_rows_are_where_vllms_hd_transform_puts_them(h_crop, w_crop):
    expected = _vllm_separator_rows(h_crop, w_crop)
    layout = hd_image_layout(h_crop * HD_CROP_PX, w_crop * HD_CROP_PX)
    assert layout.num_rows == expected.shape[0]
    assert torch.equal(layout.separator_mask(), expected)
    assert layout.num_separators == int(expected.sum())
