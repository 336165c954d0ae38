"""Scheduler-level tests: vLLM's real scheduler, KV cache manager and encoder-cache manager on
CPU, driven by :class:`~asymvlm_vllm.engine.simulation.SimulatedRunner` (no model, no engine).

vLLM must see ``VLLM_TARGET_DEVICE=cpu`` before it is first imported (this machine may have no
GPU, and vLLM cannot infer the platform without one).
"""

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
