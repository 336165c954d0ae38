"""Every environment variable asymvlm-vllm reads, in one place.

``VLLM_USE_V2_MODEL_RUNNER`` (vLLM's own)
    Read and set by ``--plugin asymvlm`` on GPUs: AsymVLM runs on vLLM's V1 model runner, so
    the plugin sets it to ``0`` and refuses to start when it is explicitly ``1``.
``TRITON_INTERPRET`` (Triton's own)
    ``1`` runs Triton kernels in Triton's interpreter on CPU tensors. The tests set it where
    there is no CUDA; with it, ``vision.decide_with: triton`` runs the fused kernel on the CPU
    engine (slowly: a test of the engine's kernel path, not a way to serve).
``sys.argv`` (not a variable, but read the same way)
    The plugin entry point acts only when the command line contains ``--plugin asymvlm``.
"""

from __future__ import annotations

import os

__all__ = ["V2_RUNNER_VARIABLE", "select_v1_model_runner", "triton_interpreted", "v2_model_runner_forced"]

V2_RUNNER_VARIABLE = "VLLM_USE_V2_MODEL_RUNNER"


def v2_model_runner_forced() -> bool:
    """Whether ``VLLM_USE_V2_MODEL_RUNNER`` explicitly asks for vLLM's Model Runner V2."""
    value = os.environ.get(V2_RUNNER_VARIABLE)
    return value is not None and value.strip().lower() in ("1", "true")


def select_v1_model_runner() -> None:
    """Set ``VLLM_USE_V2_MODEL_RUNNER=0`` for this process and the engine processes it starts."""
    os.environ[V2_RUNNER_VARIABLE] = "0"


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET=1`` runs Triton kernels in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
