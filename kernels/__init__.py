"""Triton kernels, installed as ``asymvlm_vllm.kernels`` (never as a top-level ``kernels``).

This room may import torch and triton, nothing else of the project but ``asymvlm_vllm.core``
(whose functions are the kernels' references). Every kernel has a plain-torch reference beside
it, a test against it in ``tests/kernels`` and a benchmark of the same name in ``benchmarks/``.
Kernels: ``vision_selection`` (fused scoring + adaptive top-k), ``block_table`` (compaction
after eviction holes), ``block_importance`` (per-block attention mass over the paged cache).
"""
