"""Workers that install the AsymVLM model runner (``--worker-cls``).

* :class:`AsymVLMWorker` — GPUs. AsymVLM runs on vLLM's V1 model runner: Model Runner V2
  (vLLM's GPU default) builds a step's batch before its encoder runs and has no hook the
  probe step can use yet. ``--plugin asymvlm`` sets ``VLLM_USE_V2_MODEL_RUNNER=0``; an engine
  that still selects V2 stops at start-up with that instruction.
* :class:`AsymVLMCPUWorker` — the CPU platform, which always uses the V1 runner.
"""

from __future__ import annotations

import threading

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from ..core.errors import ConfigError
from .runner import AsymVLMRunnerMixin

__all__ = ["AsymVLMCPUModelRunner", "AsymVLMCPUWorker", "AsymVLMGPUModelRunner", "AsymVLMWorker"]

V2_RUNNER_MESSAGE = (
    "AsymVLM needs vLLM's V1 model runner, but this engine selected Model Runner V2. "
    "Start it with VLLM_USE_V2_MODEL_RUNNER=0 (`vllm serve ... --plugin asymvlm` sets it for you)."
)


class AsymVLMGPUModelRunner(AsymVLMRunnerMixin, GPUModelRunner):
    """vLLM's V1 GPU model runner with AsymVLM's probe decisions."""


class AsymVLMCPUModelRunner(AsymVLMRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with AsymVLM's probe decisions."""


class AsymVLMWorker(Worker):
    """vLLM's GPU worker, building :class:`AsymVLMGPUModelRunner`."""

    def _make_model_runner(self):
        if self.use_v2_model_runner:
            raise ConfigError(V2_RUNNER_MESSAGE)
        return AsymVLMGPUModelRunner(self.vllm_config, self.device)


_RUNNER_SWAP = threading.Lock()


class AsymVLMCPUWorker(CPUWorker):
    """vLLM's CPU worker, building :class:`AsymVLMCPUModelRunner`."""

    def init_device(self):
        if self.use_v2_model_runner:
            raise ConfigError(V2_RUNNER_MESSAGE)
        # CPUWorker.init_device constructs the runner by its module-level name and has no
        # factory method to override; swap the name for the duration of the call.
        import vllm.v1.worker.cpu_worker as cpu_worker

        with _RUNNER_SWAP:
            original = cpu_worker.CPUModelRunner
            cpu_worker.CPUModelRunner = AsymVLMCPUModelRunner
            try:
                super().init_device()
            finally:
                cpu_worker.CPUModelRunner = original
