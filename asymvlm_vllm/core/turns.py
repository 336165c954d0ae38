"""Previous answers in a tokenised chat prompt, found from the chat template's structure.

An engine holds a chat prompt only as token ids. The chat template puts the same tokens before
every assistant answer (the end of the user's turn and the assistant header, e.g.
``<end_of_turn>\\n<start_of_turn>model\\n``) and after it (the end of the answer's turn and
the next header). :func:`learn_turn_markers` renders one small conversation once per model and
reads those two token runs *as they are tokenised in context*; :func:`find_answer_spans` then
finds every previous answer of a prompt with one scan, without running the processor per
answer.

The spans follow the transformers path's convention (``hf.multiturn.answer_token_spans``): an
answer's first token is in the span even where tokenisation merged it with the template text
before it (LLaVA's ``ASSISTANT:`` + `` The``), and its last token is outside where it merged
with the text after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["TurnMarkers", "find_answer_spans", "learn_turn_markers"]

_QUESTION = "What is in the picture"
_ANSWER = "A small red square"
_FOLLOW_UP = "Where is it"


@dataclass(frozen=True)
class TurnMarkers:
    """The token runs around every previous assistant answer of a chat prompt.

    Attributes
    ----------
    before : tuple of int
        Tokens between a user turn's text and the answer (end of turn, assistant header).
    after : tuple of int
        Tokens between the answer and the next user turn's text.
    """

    before: tuple[int, ...]
    after: tuple[int, ...]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def learn_turn_markers(render: Callable[[list[dict], bool], str], tokenize: Callable[[str], list[int]],
                       is_blank: Callable[[int], bool]) -> TurnMarkers:
    """Learn a chat template's answer markers from one rendered conversation.

    Whitespace-only tokens at the outer ends of the markers are left out: in a real prompt
    they can merge with what surrounds them (an image's expansion, the next question).

    Parameters
    ----------
    render : ``(messages, add_generation_prompt) -> str``
        The model's chat template; messages use list-of-parts content.
    tokenize : ``str -> list of int``
        The tokenizer, as the engine tokenises a rendered prompt (no added special tokens).
    is_blank : ``int -> bool``
        Whether a token decodes to whitespace only.

    Raises
    ------
    ValueError
        When the template does not render the conversation's texts verbatim, in order.
    """
    def user(text: str) -> dict:
        return {"role": "user", "content": [{"type": "text", "text": text}]}

    messages = [user(_QUESTION), {"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]},
                user(_FOLLOW_UP)]
    full = render(messages, True)
    q_end = full.find(_QUESTION)
    a_start = full.find(_ANSWER, q_end + len(_QUESTION)) if q_end >= 0 else -1
    f_start = full.find(_FOLLOW_UP, a_start + len(_ANSWER)) if a_start >= 0 else -1
    if min(q_end, a_start, f_start) < 0:
        raise ValueError("the chat template does not render user and assistant texts verbatim and in order")
    q_end += len(_QUESTION)
    a_end = a_start + len(_ANSWER)
    ids = tokenize(full)

    def boundary(position: int) -> int:
        return _common_prefix(ids, tokenize(full[:position]))

    question_end, answer_start, answer_end, follow_up = (boundary(p) for p in (q_end, a_start, a_end, f_start))
    if not question_end <= answer_start < answer_end <= follow_up:
        raise ValueError("cannot locate the answer's tokens in the rendered conversation")
    before, after = list(ids[question_end:answer_start]), list(ids[answer_end:follow_up])
    while before and is_blank(before[0]):
        before.pop(0)
    while after and is_blank(after[-1]):
        after.pop()
    if not before or not after:
        raise ValueError("the chat template puts no tokens between the turns; answers cannot be told apart")
    return TurnMarkers(tuple(before), tuple(after))


def _find(ids: Sequence[int], run: tuple[int, ...], start: int) -> int:
    n = len(run)
    first = run[0]
    for i in range(start, len(ids) - n + 1):
        if ids[i] == first and tuple(ids[i: i + n]) == run:
            return i
    return -1


def find_answer_spans(prompt_token_ids: Sequence[int], markers: TurnMarkers, is_blank: Callable[[int], bool],
                      excluded: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """Half-open token ranges of the previous answers of a chat prompt, in order.

    An answer is the text between an occurrence of ``markers.before`` (and any whitespace-only
    tokens after it, which are template text) and the next occurrence of ``markers.after``; the
    final generation prompt (``before`` with no ``after``) is not an answer. Spans that would
    overlap an ``excluded`` range (image placeholders) are skipped.

    Parameters
    ----------
    prompt_token_ids : sequence of int
    markers : TurnMarkers
    is_blank : ``int -> bool``
        Whether a token decodes to whitespace only.
    excluded : sequence of (start, end)
    """
    spans = []
    position = 0
    while True:
        found = _find(prompt_token_ids, markers.before, position)
        if found < 0:
            break
        start = found + len(markers.before)
        while start < len(prompt_token_ids) and is_blank(prompt_token_ids[start]):
            start += 1
        end = _find(prompt_token_ids, markers.after, start)
        if end < 0:
            break
        if end > start and not any(a < end and start < b for a, b in excluded):
            spans.append((start, end))
        position = end + len(markers.after)
    return spans
