"""Kernel tests run on the device given by the `device` parameter.

Without CUDA, Triton's interpreter runs the kernels on CPU tensors: TRITON_INTERPRET must be
set before triton.language is first imported, which is why tests/conftest.py sets it (this file
sets it too, for runs of tests/kernels alone from another root). With CUDA (and no TRITON_INTERPRET), the `cpu` parameter
is skipped and the `gpu`-marked `cuda` parameter runs the compiled kernels.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

DEVICES = [
    pytest.param("cpu", id="cpu-interpreter", marks=pytest.mark.skipif(not INTERPRETED, reason="CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
