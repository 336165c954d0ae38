"""Per-request validation of ``vllm_xargs`` at the front end (HTTP 400 on bad values).

vLLM calls every custom logits processor's ``validate_params`` when a request is admitted
and turns a ``ValueError`` into HTTP 400 with its message. AsymVLM registers this one, which
only validates: it leaves logits untouched and tells vLLM that greedy sampling is unaffected.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, LogitsProcessor

from ..core.request_options import RequestOptionsError, request_options_from_extra_args
from .metrics import install_output_hook

# vLLM's front end loads this module when it builds its request validators, with or without
# `--plugin asymvlm`: the explicit-flags form gets the asymvlm_* metrics this way too.
install_output_hook()

__all__ = ["AsymVLMRequestValidator", "VALIDATOR_QUALNAME"]

VALIDATOR_QUALNAME = "asymvlm_vllm.engine.validation:AsymVLMRequestValidator"


class AsymVLMRequestValidator(LogitsProcessor):
    """Rejects requests whose ``asymvlm*`` extra arguments are invalid; otherwise inert."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        try:
            request_options_from_extra_args(sampling_params.extra_args)
        except RequestOptionsError as e:
            raise ValueError(str(e)) from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
