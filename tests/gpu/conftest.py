"""``tests/gpu``: vLLM's engine on CUDA with tiny models (every test ``gpu``-marked). vLLM runs
in process here; run this folder in its own pytest process (``tests/engine`` configures vLLM for
the CPU at collection)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the tests reach into the scheduler
