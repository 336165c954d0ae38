"""Multi-turn chat with the turn-level rule: whole previous answers are dropped before prefill.

A conversation is a list of chat messages (``{"role": "user" | "assistant" | "system",
"content": str | list of parts}``, parts ``{"type": "text", "text": ...}`` or
``{"type": "image"}``) ending with a user turn, plus its images in the order of their image
parts. The processor renders and tokenises it as the model expects; each previous assistant
answer is then located in the processed prompt (:func:`answer_token_spans`), scored against the
images by :class:`~asymvlm_vllm.core.eviction.MultiTurnEviction`, and the dropped answers'
tokens are removed from the language-model input together with the pruned vision tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.budget import BudgetRule
from ..core.errors import AsymVLMError
from ..core.eviction import EvictionPolicy, MultiTurnEviction
from .families import FamilyAdapter
from .generation import Generation

__all__ = ["ChatGeneration", "answer_token_spans", "chat", "conversation_inputs", "image_embeddings"]

_ROLES = ("system", "user", "assistant")


@dataclass
class ChatGeneration(Generation):
    """:class:`~.generation.Generation` of a chat turn, with what the multi-turn rule did.

    Attributes
    ----------
    answer_spans : list of (int, int)
        Half-open token ranges of the previous assistant answers in the processed
        (unpruned) prompt, in conversation order.
    dropped_answers : list of int
        Indices (into the previous answers, 0 = first answer) of the answers removed before
        prefill, ascending.
    """

    answer_spans: list[tuple[int, int]] = field(default_factory=list)
    dropped_answers: list[int] = field(default_factory=list)

    @property
    def dropped_answer_tokens(self) -> int:
        """Prompt tokens removed by the multi-turn rule."""
        return sum(self.answer_spans[i][1] - self.answer_spans[i][0] for i in self.dropped_answers)


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise AsymVLMError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    return content


def _image_count(message: dict) -> int:
    return sum(1 for part in _parts(message) if part.get("type") == "image")


def _answer_text(message: dict) -> str:
    return "".join(part.get("text", "") for part in _parts(message) if part.get("type") == "text")


def _check_conversation(messages: Sequence[dict], images: Sequence) -> None:
    if not messages:
        raise AsymVLMError("the conversation has no messages")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise AsymVLMError(f"message {i} has role {role!r}; expected one of {', '.join(_ROLES)}")
        if role == "assistant":
            if _image_count(message):
                raise AsymVLMError(f"message {i} is an assistant answer with an image; only user turns may hold images")
            if not _answer_text(message).strip():
                raise AsymVLMError(f"message {i} is an empty assistant answer")
            if i == 0 or messages[i - 1]["role"] != "user":
                raise AsymVLMError(f"message {i} is an assistant answer that does not follow a user turn")
    if messages[-1]["role"] != "user":
        raise AsymVLMError("the conversation must end with a user turn (the question to answer)")
    if not _answer_text(messages[-1]).strip():
        raise AsymVLMError("the last user turn has no text; AsymVLM scores image tokens against the question's text")
    expected = sum(_image_count(m) for m in messages)
    if expected != len(images):
        raise AsymVLMError(f"the conversation has {expected} image parts but {len(images)} images were given")


def _render(processor, messages: Sequence[dict], add_generation_prompt: bool, adapter: FamilyAdapter | None) -> str:
    return (adapter or FamilyAdapter()).render(processor, messages, add_generation_prompt)


def _tokenise(processor, text: str, images: Sequence, adapter: FamilyAdapter | None):
    return (adapter or FamilyAdapter()).tokenise(processor, [text], [list(images)])


def conversation_inputs(processor, messages: Sequence[dict], images: Sequence, adapter: FamilyAdapter | None = None):
    """Processor batch (batch of 1) for a conversation that ends with the question to answer
    (``adapter``: the model family's, for families whose processor differs, e.g. Phi-3-V)."""
    _check_conversation(messages, images)
    return _tokenise(processor, _render(processor, messages, True, adapter), images, adapter)


def _common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(a.shape[0], b.shape[0])
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if differs.numel() else n


def answer_token_spans(processor, messages: Sequence[dict], images: Sequence, input_ids: Tensor,
                       adapter: FamilyAdapter | None = None) -> list[tuple[int, int]]:
    """Token ranges of the previous assistant answers in a processed conversation.

    Each answer's characters are located in the rendered chat template (between the rendering
    of the conversation before it, with the generation prompt, and the rendering through it);
    the text before the answer and the text through its end are then processed the same way
    as the whole conversation (images included, so image placeholders expand identically),
    and the answer's tokens are those between the two prefixes' agreement with ``input_ids``.
    Where tokenisation merges the answer's first token with the template text before it
    (``": The"`` → ``":", " The"``), that token is part of the span; where the answer's last
    token merges with the text after it, that token stays outside the span.

    Parameters
    ----------
    processor : the model's processor
    messages : the conversation (see the module docstring)
    images : its images, in order of their image parts
    input_ids : Tensor, shape (T,)
        The processed conversation's ids (:func:`conversation_inputs`, unpadded).
    adapter : FamilyAdapter, optional
        The model family's (as for :func:`conversation_inputs`).

    Returns
    -------
    list of (start, end), one per assistant message, in order.
    """
    _check_conversation(messages, images)
    full = _render(processor, messages, True, adapter)
    spans, images_before = [], 0
    for m, message in enumerate(messages):
        if message["role"] != "assistant":
            images_before += _image_count(message)
            continue
        before = _render(processor, messages[:m], True, adapter)
        through = _render(processor, messages[: m + 1], False, adapter)
        answer = _answer_text(message).strip()
        start = through.find(answer, len(before)) if through.startswith(before) else -1
        if start < 0:
            raise AsymVLMError(f"assistant message {m}: its text does not appear verbatim where the chat template renders it")
        end = start + len(answer)
        if not full.startswith(through[:end]):
            raise AsymVLMError(f"assistant message {m}: the chat template renders it differently once later turns follow")
        used = images[:images_before]
        first = _common_prefix(input_ids, _tokenise(processor, full[:start], used, adapter)["input_ids"][0])
        last = _common_prefix(input_ids, _tokenise(processor, full[:end], used, adapter)["input_ids"][0])
        if last <= first or (spans and first < spans[-1][1]):
            raise AsymVLMError(f"assistant message {m}: cannot locate its tokens in the processed prompt")
        spans.append((first, last))
    return spans


def image_embeddings(vlm, inputs, images_per_message: Sequence[int], features: Sequence[Tensor] | None = None) -> Tensor:
    """The projector outputs (N, D) of the current turn's images, or of all the conversation's
    images when the current turn has none; structural rows (LLaVA-NeXT newlines) excluded.
    ``features``: the adapter's ``image_features`` of ``inputs`` if already computed."""
    if features is None:
        features = vlm.image_features(inputs)
    prunable = vlm.adapter.prunable_rows(vlm.model, inputs, features)
    rows = [f[mask] for f, mask in zip(features, prunable)]
    current = images_per_message[-1]
    chosen = rows[len(rows) - current:] if current else rows
    return torch.cat(chosen)


@torch.inference_mode()
def chat(vlm, messages: Sequence[dict], images: Sequence, max_new_tokens: int = 32,
         budget: BudgetRule | None = None, multi_turn: MultiTurnEviction | None = None,
         eviction: EvictionPolicy | None = None) -> ChatGeneration:
    """Answer the last user turn of a conversation (see :meth:`~.model.PrunedVLM.chat`)."""
    inputs = conversation_inputs(vlm.processor, messages, images, vlm.adapter)
    ids = inputs["input_ids"][0]
    spans = answer_token_spans(vlm.processor, messages, images, ids, vlm.adapter)
    dropped: list[int] = []
    drop = features = None
    if multi_turn is not None and spans:
        if not images:
            raise AsymVLMError("the multi-turn rule ranks answers by similarity to the images; the conversation has none")
        vision = ids == vlm.adapter.image_token_id(vlm.model)
        token_embeddings = vlm.model.get_input_embeddings()(ids.masked_fill(vision, 0)[None])[0]
        per_message = [_image_count(m) for m in messages]
        features = vlm.image_features(inputs)  # once: pruning reuses them
        dropped = multi_turn.select_answers(spans, token_embeddings, image_embeddings(vlm, inputs, per_message, features))
        mask = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for i in dropped:
            mask[spans[i][0]: spans[i][1]] = True
        if bool((mask & vision).any()):
            raise AsymVLMError("a dropped answer overlaps image tokens; the chat template is not supported")
        drop = [mask]
    prompt = vlm.prune(inputs, budget, drop=drop, features=features)
    generation = vlm.generate_from(prompt, max_new_tokens, eviction)
    return ChatGeneration(tokens=generation.tokens, prompt=generation.prompt, live_tokens=generation.live_tokens,
                          evicted_tokens=generation.evicted_tokens, trace=generation.trace,
                          answer_spans=spans, dropped_answers=dropped)
