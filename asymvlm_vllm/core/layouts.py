"""Where the structure rows sit in an image's features, for families whose layout is fixed.

Phi-3-V's HD transform lays an image out, in prompt order, as its crops' 2 x 2-merged patches
(``12·h_crop`` rows of ``12·w_crop`` patches, each row ended by a learned newline ``sub_GN``),
one global separator ``glb_GN``, then the 336-px global view (12 rows of 12 patches and a
newline each). Newlines and the separator carry no image content: they are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import AsymVLMError

__all__ = ["HD_CROP_PX", "HD_MERGED_SIDE", "HDImageLayout", "hd_image_layout"]

HD_CROP_PX = 336  # CLIP ViT-L/14-336's input side
HD_MERGED_SIDE = 12  # 24 x 24 patches per crop, merged 2 x 2


@dataclass(frozen=True)
class HDImageLayout:
    """The feature rows of one Phi-3-V image of ``h_crop`` x ``w_crop`` crops."""

    h_crop: int
    w_crop: int

    @property
    def sub_grid(self) -> tuple[int, int]:
        """Patch grid of the HD crops together: (12·h_crop, 12·w_crop)."""
        return (HD_MERGED_SIDE * self.h_crop, HD_MERGED_SIDE * self.w_crop)

    @property
    def global_grid(self) -> tuple[int, int]:
        return (HD_MERGED_SIDE, HD_MERGED_SIDE)

    @property
    def num_rows(self) -> int:
        """All rows: ``(h·w + 1)·144 + 1 + (h + 1)·12``, the processor's image token count."""
        rows, cols = self.sub_grid
        return rows * (cols + 1) + 1 + HD_MERGED_SIDE * (HD_MERGED_SIDE + 1)

    @property
    def size_px(self) -> tuple[int, int]:
        """(height, width) of the HD-transformed image, in pixels."""
        return (HD_CROP_PX * self.h_crop, HD_CROP_PX * self.w_crop)

    @property
    def num_separators(self) -> int:
        """Newlines of both parts and the global separator: ``12·h_crop + 1 + 12``."""
        return self.sub_grid[0] + 1 + HD_MERGED_SIDE

    def separator_mask(self, device: torch.device | str | None = None) -> Tensor:
        """(num_rows,) bool: True at the newline rows and the global separator."""
        rows, cols = self.sub_grid
        sub = torch.zeros(rows, cols + 1, dtype=torch.bool, device=device)
        sub[:, -1] = True
        glob = torch.zeros(HD_MERGED_SIDE, HD_MERGED_SIDE + 1, dtype=torch.bool, device=device)
        glob[:, -1] = True
        return torch.cat([sub.flatten(), torch.ones(1, dtype=torch.bool, device=device), glob.flatten()])


def hd_image_layout(height: int, width: int, num_rows: int | None = None) -> HDImageLayout:
    """The layout of an image that the HD transform resized and padded to ``height`` x ``width``
    pixels (the processor's ``image_sizes``; both multiples of 336).

    Raises
    ------
    AsymVLMError
        When the size is not whole crops, or the layout does not have ``num_rows`` rows (the
        image's features, when given).
    """
    if height < HD_CROP_PX or width < HD_CROP_PX or height % HD_CROP_PX or width % HD_CROP_PX:
        raise AsymVLMError(f"an HD-transformed image is whole {HD_CROP_PX}-px crops, got {height} x {width}")
    layout = HDImageLayout(height // HD_CROP_PX, width // HD_CROP_PX)
    if num_rows is not None and layout.num_rows != num_rows:
        raise AsymVLMError(f"a {height} x {width} Phi-3-V image has {layout.num_rows} rows, "
                           f"its encoder output {num_rows}")
    return layout
