"""Helpers of the CUDA engine tests: build, reach into and free an in-process vLLM engine.

vLLM is imported inside the functions only: collecting ``tests/gpu`` on a machine without CUDA
(where every test here is skipped) must not load vLLM before ``tests/engine`` configures it.
"""

from __future__ import annotations

import gc

import torch

BLOCK_SIZE = 16


def engine(model, config: dict | None, **overrides):
    """An in-process ``vllm.LLM`` on CUDA (``config`` None: plain vLLM), test defaults + ``overrides``."""
    from vllm import LLM

    from asymvlm_vllm.engine.plugin import asymvlm_engine_args

    kwargs = dict(dtype="float32", block_size=BLOCK_SIZE, enforce_eager=True, attention_backend="TRITON_ATTN",
                  max_model_len=1024, max_num_seqs=4, gpu_memory_utilization=0.3, enable_prefix_caching=True,
                  limit_mm_per_prompt={"image": 1}, seed=0)
    kwargs.update(overrides)
    if config is None:
        return LLM(model=str(model), **kwargs)
    return LLM(**asymvlm_engine_args(model, config, **kwargs))


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def free(llm) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    torch.cuda.empty_cache()
