"""What the AsymVLM scheduler and model runner tell each other, as plain picklable data.

The scheduler attaches a :class:`StepPlan` to each ``SchedulerOutput`` (attribute
``asymvlm``); the runner attaches ``{request_id: RequestDecision}`` to its
``ModelRunnerOutput`` (attribute ``asymvlm_decisions``). Extra attributes survive the
pickling of the multiprocess executor, and under tensor parallelism every rank receives the
same plan, so every rank applies the one decision that rank 0 returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.budget import num_tokens_to_keep

__all__ = ["ImageDecision", "Materialize", "ProbeSpec", "RequestDecision", "StepPlan"]


@dataclass
class ProbeSpec:
    """Decide these images of a request in this step (its encoder inputs run in it)."""

    features: list[int]
    """Indices into the request's ``mm_features``."""
    options: dict[str, Any] = field(default_factory=dict)
    """The request's options in their ``vllm_xargs`` form
    (:meth:`~asymvlm_vllm.core.request_options.RequestOptions.to_extra_args`)."""
    answer_spans: list[tuple[int, int]] = field(default_factory=list)
    """Token ranges of the previous answers, when the multi-turn rule must choose among them."""


@dataclass
class Materialize:
    """How to build a pruned encoder-cache entry: rows ``keep_rows`` of ``source``'s
    ``num_rows`` encoder-output rows (from the cached source, or by slicing a fresh encoder
    output of ``num_rows`` rows stored under the pruned identifier)."""

    source: str
    keep_rows: list[int]
    num_rows: int


@dataclass
class StepPlan:
    """The scheduler's AsymVLM instructions for one step (``SchedulerOutput.asymvlm``)."""

    probes: dict[str, ProbeSpec] = field(default_factory=dict)
    materialize: dict[str, Materialize] = field(default_factory=dict)
    """Pruned identifier → how to build it; applied before the step frees encoder outputs."""
    mrope: dict[str, tuple[list[list[int]], int]] = field(default_factory=dict)
    """Request id → (kept tokens' original (3, T') M-RoPE positions, position delta), for
    requests (re)admitted in this step after pruning."""
    encoder_only: bool = False
    """Every request of the step is a probe: the runner runs the encoder and decides, and skips
    the language model's forward pass and sampling (see ``AsymVLMScheduler._encoder_only``)."""
    text: dict[str, Any] = field(default_factory=dict)
    """Request id → its :class:`~asymvlm_vllm.core.eviction.BlockEviction`, for requests
    (re)admitted in this step whose generated tokens are evicted past a budget."""

    def __bool__(self) -> bool:
        return bool(self.probes or self.materialize or self.mrope or self.text)


@dataclass
class ImageDecision:
    """One image's decision. ``keep_rows`` index its encoder-output rows and always include
    the structural rows (e.g. LLaVA-NeXT newlines)."""

    feature: int
    num_rows: int
    num_prunable: int
    keep_rows: list[int]
    gap: float
    budget_ratio: float
    """The budget rule's ratio for ``gap``; ``min_keep`` may have raised the count above it."""

    @property
    def num_kept(self) -> int:
        return len(self.keep_rows)

    @property
    def num_kept_prunable(self) -> int:
        return self.num_kept - (self.num_rows - self.num_prunable)

    @property
    def keep_ratio(self) -> float:
        """What was actually kept: kept prunable rows / prunable rows (1.0 with none)."""
        return self.num_kept_prunable / self.num_prunable if self.num_prunable else 1.0

    def outcome(self) -> dict:
        """This image's entry in a request's outcome."""
        floor = self.num_kept_prunable > num_tokens_to_keep(self.num_prunable, self.budget_ratio, 0)
        return {"tokens": self.num_rows, "kept": self.num_kept, "gap": round(self.gap, 6),
                "keep_ratio": round(self.keep_ratio, 6), "budget_ratio": self.budget_ratio,
                "min_keep_applied": floor}


@dataclass
class RequestDecision:
    """The runner's answer to a :class:`ProbeSpec` (``ModelRunnerOutput.asymvlm_decisions``)."""

    images: list[ImageDecision] = field(default_factory=list)
    mrope_positions: list[list[int]] | None = None
    """The unpruned prompt's (3, T) M-RoPE positions, for M-RoPE models."""
    mrope_next_position: int | None = None
    """Position of the first generated token of the unpruned prompt."""
    dropped_answers: list[int] = field(default_factory=list)
    """Indices into the probe's ``answer_spans`` of the answers to drop, ascending."""
    scoring_seconds: float = 0.0
    error: str | None = None
    """Why no decision could be made; the request then runs unpruned."""
