"""The model's chat-template turn markers, learned once in the engine core (multi-turn rule).

The engine core sees prompts as token ids only. The scheduler learns, from the model's own chat
template and tokenizer (as vLLM's front end resolves them: the processor's template, else the
tokenizer's), where previous assistant answers sit (:mod:`asymvlm_vllm.core.turns`). A template
given to the server with ``--chat-template`` is not visible here; the model's own must render
turns the same way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from ..core.turns import TurnMarkers, learn_turn_markers

__all__ = ["model_turn_markers"]

logger = logging.getLogger("vllm.asymvlm")


def model_turn_markers(model_config: Any) -> tuple[TurnMarkers, Callable[[int], bool]] | None:
    """(markers, is_blank) for the served model, or None (logged) when they cannot be learned."""
    try:
        from vllm.renderers.hf import resolve_chat_template, resolve_chat_template_content_format
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(model_config)
        if tokenizer is None:
            raise ValueError("the engine runs without a tokenizer (skip_tokenizer_init)")
        template = resolve_chat_template(tokenizer, None, None, model_config=model_config)
        if template is None:
            raise ValueError("the model has no chat template")

        # A "string" template (Phi-3.5-V's) takes each message's text as one string, as vLLM's
        # front end then renders it.
        string_content = resolve_chat_template_content_format(template, None, "auto", tokenizer,
                                                              model_config=model_config) == "string"

        def render(messages: list[dict], add_generation_prompt: bool) -> str:
            if string_content:
                messages = [{**m, "content": "\n".join(p["text"] for p in m["content"])} for m in messages]
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)

        @functools.lru_cache(maxsize=4096)
        def is_blank(token_id: int) -> bool:
            return not tokenizer.decode([token_id]).strip()

        markers = learn_turn_markers(render, lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
                                     is_blank)
    except Exception as e:  # the rule is then off; requests are served as without it
        logger.warning("AsymVLM: multi-turn answer dropping is unavailable: %s: %s", type(e).__name__, e)
        return None
    logger.debug("AsymVLM: chat turns are marked by %s ... %s", markers.before, markers.after)
    return markers, is_blank
