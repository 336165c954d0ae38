"""Tiny random-weight VLMs, built offline once per test session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asymvlm_vllm.hf.tiny import FAMILIES

ALL_FAMILIES = sorted(FAMILIES)
# Families whose model directory carries remote processor code (Phi-3.5-Vision's processing_phi3_v.py).
# The product never trusts it by default; the tests trust the tiny directories they built themselves.
REMOTE_CODE_FAMILIES = frozenset({"phi3_v"})


def trust_remote_code(family: str) -> bool:
    """``trust_remote_code`` for a tiny model of ``family``: True only where its processor needs it."""
    return family in REMOTE_CODE_FAMILIES


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Decoding the tiny models is hundreds of small ops: on a shared 2-core machine intra-op
    threads only contend (about 10x slower), so the transformers tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vlm(tiny_model_dirs):
    """A function family -> a session-shared ``PrunedVLM`` (float32, cosine ranker, keep-all default)."""
    from asymvlm_vllm.hf import PrunedVLM

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = PrunedVLM.from_pretrained(tiny_model_dirs(family),
                                                      trust_remote_code=trust_remote_code(family))
        return cache[family]

    return get


# Phi-3-V runs CLIP ViT-L/14-336 once per 336-px crop plus once for the global view: a square
# image is 2 x 2 crops (5 passes, 757 tokens), a 2:1 one 1 x 2 crops (3 passes, 457 or 469
# tokens). Its tests use wide and tall images, (height, width), alternately.
PHI3V_SIZES = ((64, 128), (128, 64))


def sizes_for(family_or_vlm, sizes):
    """``sizes`` ((height, width) per image) for a family, or for a ``PrunedVLM``: Phi-3-V gets
    :data:`PHI3V_SIZES` instead (as many, alternating), every other family ``sizes`` unchanged."""
    family = getattr(getattr(family_or_vlm, "adapter", None), "architecture", family_or_vlm)
    if family in ("phi3_v", "Phi3VForCausalLM"):
        return tuple(PHI3V_SIZES[i % len(PHI3V_SIZES)] for i in range(len(sizes)))
    return tuple(sizes)


def random_image(seed: int, height: int = 224, width: int = 224) -> Image.Image:
    """A noise image with a few flat rectangles, so patches differ in content."""
    rs = np.random.RandomState(seed)
    pixels = (rs.rand(height, width, 3) * 255).astype("uint8")
    for _ in range(3):
        y, x = rs.randint(0, height // 2), rs.randint(0, width // 2)
        pixels[y : y + height // 3, x : x + width // 3] = rs.randint(0, 255, size=3)
    return Image.fromarray(pixels)


def remote_hd_transform():
    """``HD_transform(img, hd_num)`` of the Phi-3-V image processor the tiny checkpoints ship
    (remote code, loaded from its file here), to check the project's own code against."""
    import importlib.util
    from pathlib import Path

    import asymvlm_vllm.hf

    path = Path(asymvlm_vllm.hf.__file__).parent / "phi3v_remote" / "image_processing_phi3_v.py"
    spec = importlib.util.spec_from_file_location("tiny_phi3v_image_processing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HD_transform


# ---------------------------------------------------------------- reading shapes-task pixels


def cell_tile(image, cell: int) -> np.ndarray:
    """The (8, 8, 3) int pixels of ``cell`` of a shapes-task image (array or PIL)."""
    from asymvlm_vllm.hf import shapes

    row, col = divmod(cell, shapes.GRID)
    pixels = np.asarray(image).astype(int)
    return pixels[row * shapes.CELL:(row + 1) * shapes.CELL, col * shapes.CELL:(col + 1) * shapes.CELL]


def colourful(tile: np.ndarray) -> np.ndarray:
    """Where a tile is not grey (the background noise has equal channels): (8, 8) bool."""
    return (tile.max(-1) - tile.min(-1)) > 40


def nearest_colour(tile: np.ndarray) -> str:
    """The task colour nearest the mean of a tile's colourful pixels."""
    from asymvlm_vllm.hf import shapes

    mean = tile[colourful(tile)].mean(0)
    return min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - mean).sum())
