"""Tiny random-weight VLMs, built offline once per test session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from asymvlm_vllm.hf.tiny import FAMILIES

ALL_FAMILIES = sorted(FAMILIES)


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
            cache[family] = PrunedVLM.from_pretrained(tiny_model_dirs(family))
        return cache[family]

    return get


def random_image(seed: int, height: int = 224, width: int = 224) -> Image.Image:
    """A noise image with a few flat rectangles, so patches differ in content."""
    rs = np.random.RandomState(seed)
    pixels = (rs.rand(height, width, 3) * 255).astype("uint8")
    for _ in range(3):
        y, x = rs.randint(0, height // 2), rs.randint(0, width // 2)
        pixels[y : y + height // 3, x : x + width // 3] = rs.randint(0, 255, size=3)
    return Image.fromarray(pixels)
