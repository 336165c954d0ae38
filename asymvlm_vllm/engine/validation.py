"""Per-request validation of ``vllm_xargs`` at the front end (HTTP 400 on bad values).

Two places check a request's ``asymvlm*`` keys, with the same rule
(:func:`~asymvlm_vllm.core.request_options.request_options_from_extra_args`):

* the OpenAI request models' ``to_sampling_params`` (chat, completions, responses), which
  the server calls before it starts a response: a bad value is HTTP 400 for streaming
  requests too, never an error event inside a 200 stream;
* every custom logits processor's ``validate_params``, which vLLM calls when a request is
  admitted (``vllm.LLM`` and any other way into the engine). AsymVLM registers
  :class:`AsymVLMRequestValidator`, which only validates: it leaves logits untouched.

vLLM's front end loads this module when it builds its request validators, with or without
``--plugin asymvlm`` (the explicit-flags form), and loading it installs both front-end hooks.
"""

from __future__ import annotations

import functools
import threading

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, LogitsProcessor

from ..core.request_options import RequestOptionsError, request_options_from_extra_args
from .metrics import install_output_hook

__all__ = ["AsymVLMRequestValidator", "VALIDATOR_QUALNAME", "install_request_hooks"]

VALIDATOR_QUALNAME = "asymvlm_vllm.engine.validation:AsymVLMRequestValidator"

# The OpenAI request models whose ``to_sampling_params`` carry ``vllm_xargs`` into extra_args.
_REQUEST_MODELS = (
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"),
)
_lock = threading.Lock()
_installed = False


def _check(sampling_params) -> None:
    try:
        request_options_from_extra_args(getattr(sampling_params, "extra_args", None))
    except RequestOptionsError as e:
        raise ValueError(str(e)) from None


class AsymVLMRequestValidator(LogitsProcessor):
    """Rejects requests whose ``asymvlm*`` extra arguments are invalid; otherwise inert."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _check(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass


def install_request_hooks() -> None:
    """Validate ``vllm_xargs`` where the server builds sampling parameters, and read outcomes
    into the ``asymvlm_*`` metrics (idempotent)."""
    global _installed
    install_output_hook()
    with _lock:
        if _installed:
            return
        import importlib

        from vllm.exceptions import VLLMValidationError

        for module_name, class_name in _REQUEST_MODELS:
            try:
                model = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue
            original = model.to_sampling_params

            @functools.wraps(original)
            def to_sampling_params(self, *args, _original=original, **kwargs):
                params = _original(self, *args, **kwargs)
                try:
                    _check(params)
                except ValueError as e:
                    raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
                return params

            model.to_sampling_params = to_sampling_params
        _installed = True


install_request_hooks()
