"""Calibration of the budget rules (Methods A and B) for one model and scorer.

A rule maps an image's importance gap to a keep ratio. Gaps do not depend on the budget, and
with one image per sample a rule only decides which keep ratio each sample gets. So the model
runs once per candidate ratio (a table: samples × ratios of an objective), and every rule of
the grid search is then scored by looking its per-sample ratios up in that table.

Objectives: ANLS (DocVQA's metric) or exact match of greedy answers against the labels, both
higher-is-better; or, without labels, the hidden-state discrepancy of
:func:`~asymvlm_vllm.hf.fidelity.hidden_state_discrepancy` (lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.budget import BudgetRule, LinearBudget, ThresholdBudget, UniformBudget, num_tokens_to_keep
from ..core.errors import AsymVLMError
from .fidelity import text_hidden_states, text_state_discrepancy

__all__ = [
    "ANLS_THRESHOLD",
    "ANSWER_INSTRUCTION",
    "DEFAULT_RATIO_GRID",
    "LINEAR_SLOPES_PER_STD",
    "OBJECTIVES",
    "QUANTILE_LEVELS",
    "CalibrationReport",
    "CalibrationTable",
    "Evaluation",
    "FittedRule",
    "anls",
    "best_uniform",
    "calibrate",
    "evaluate_budgets",
    "exact_match",
    "fit_linear",
    "fit_threshold",
    "levenshtein",
    "measure_table",
    "normalize_answer",
    "parse_ratio_grid",
    "score_rule",
    "threshold_candidates",
]

ANLS_THRESHOLD = 0.5
"""DocVQA's τ: a prediction whose normalised edit distance is ≥ τ scores 0."""

DEFAULT_RATIO_GRID = (0.15, 0.25, 0.35, 0.5, 0.65, 0.8, 1.0)

QUANTILE_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Candidate thresholds of Method A: these quantiles of the observed gaps (5 %, 10 %, …, 95 %)."""

LINEAR_SLOPES_PER_STD = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3)
"""Candidate slopes of Method B, as the keep-ratio change per standard deviation of the gaps."""

ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
"""Appended to questions for the task-metric objectives (the usual DocVQA evaluation prompt)."""

OBJECTIVES = {
    # name: (label, higher is better)
    "anls": ("ANLS", True),
    "exact": ("exact match", True),
    "fidelity": ("hidden-state discrepancy", False),
}

# Ratios and averages are compared with this slack: a rule whose average keep ratio is the
# target up to float rounding meets the target.
_EPS = 1e-9
# Objectives equal to this many decimals are ties (sums of the same values in another order).
_OBJECTIVE_DECIMALS = 12


# --------------------------------------------------------------------------- answer metrics


def normalize_answer(text: str) -> str:
    """Lower case, surrounding whitespace removed, inner runs of whitespace made one space."""
    return " ".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (DocVQA's metric).

    ``max over answers of (1 − NL if NL < threshold else 0)`` with
    ``NL = levenshtein(p, a) / max(len(p), len(a))`` on normalised strings
    (:func:`normalize_answer`); two empty strings are a match.
    """
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = normalize_answer(prediction)
    best = 0.0
    for answer in answers:
        ref = normalize_answer(answer)
        longest = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised answer, else 0.0."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


_ANSWER_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {"anls": anls, "exact": exact_match}


# --------------------------------------------------------------------------- input checks


def parse_ratio_grid(text: str) -> tuple[float, ...]:
    """``"0.25,0.5,1"`` → ``(0.25, 0.5, 1.0)``: sorted, duplicates removed, each in (0, 1]."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise AsymVLMError(f"--ratio-grid must be comma-separated keep ratios, got {part!r} in {text!r}") from None
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise AsymVLMError(f"--ratio-grid values must be keep ratios in (0, 1], got {value:g}")
        values.append(value)
    return tuple(sorted(set(values)))


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise AsymVLMError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def _check_target(target: float) -> None:
    if not (math.isfinite(target) and 0.0 < target <= 1.0):
        raise AsymVLMError(f"the target average keep ratio must be in (0, 1], got {target:g}")


# --------------------------------------------------------------------------- running the model


def _unpack(sample) -> tuple[object, str, tuple[str, ...]]:
    """(PIL image, question, answers) of a :class:`~.data.Sample` or an (image, question, answers) tuple."""
    if isinstance(sample, tuple):
        image, question, answers = sample
    else:
        image = sample.load_image() if hasattr(sample, "load_image") else sample.image
        question, answers = sample.question, sample.answers
    if isinstance(answers, str):
        answers = (answers,)
    return image, question, tuple(answers)


@dataclass(frozen=True)
class Evaluation:
    """Per-sample results of running the model under several budgets.

    Attributes
    ----------
    gaps : ndarray, shape (S,), float64
        Importance gap of each sample's image.
    num_tokens : ndarray, shape (S,), int64
        Prunable vision tokens of each sample's image.
    values : ndarray, shape (S, B), float64
        The objective per sample and budget.
    kept : ndarray, shape (S, B), float64
        Kept fraction of the prunable vision tokens per sample and budget (from the decisions).
    predictions : list of list of str
        Per budget, the decoded answers (task-metric objectives; empty for fidelity).
    """

    gaps: np.ndarray
    num_tokens: np.ndarray
    values: np.ndarray
    kept: np.ndarray
    predictions: list[list[str]] = field(default_factory=list)


def evaluate_budgets(
    vlm,
    samples: Sequence,
    budgets: Sequence[BudgetRule],
    objective: str,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    answer_instruction: str = "",
    progress: bool = False,
) -> Evaluation:
    """Run every sample under every budget and measure the objective.

    Parameters
    ----------
    vlm : PrunedVLM
    samples : sequence of :class:`~.data.Sample` or (PIL image, question, answers) tuples, S ≥ 1
        One image per sample.
    budgets : sequence of BudgetRule, B ≥ 1
    objective : ``"anls"``, ``"exact"`` (greedy answers vs the labels) or ``"fidelity"``
        (hidden-state discrepancy against the unpruned prompt).
    max_new_tokens : int
        Answer length cap of the task-metric objectives.
    batch_size : int
    answer_instruction : str
        Appended on a new line to each question for the task-metric objectives.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    Evaluation with arrays (S,) and (S, B).
    """
    _check_objective(objective)
    if not samples:
        raise AsymVLMError("no samples to calibrate on")
    if not budgets:
        raise ValueError("at least one budget rule is needed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    task_metric = objective in _ANSWER_METRICS
    tokenizer = vlm.processor.tokenizer
    device = vlm.model.device
    num_samples = len(samples)
    gaps = np.zeros(num_samples)
    num_tokens = np.zeros(num_samples, dtype=np.int64)
    values = np.zeros((num_samples, len(budgets)))
    kept = np.zeros((num_samples, len(budgets)))
    predictions: list[list[str]] = [[] for _ in budgets] if task_metric else []

    from tqdm.auto import tqdm

    batches = [range(start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)]
    bar = tqdm(total=len(batches) * len(budgets), desc="calibration runs", disable=not progress, leave=False)
    for rows in batches:
        images, questions, answers = zip(*(_unpack(samples[i]) for i in rows))
        if task_metric and answer_instruction:
            questions = [f"{q}\n{answer_instruction}" for q in questions]
        inputs = vlm.process(list(images), list(questions)).to(device)
        with torch.inference_mode():
            features = vlm.image_features(inputs)  # once per batch, for every budget
            full = vlm.prune(inputs, UniformBudget(1.0), features=features)
            for b, i in enumerate(rows):
                if len(full.images[b]) != 1:
                    raise AsymVLMError(f"sample {i} has {len(full.images[b])} images; calibration needs exactly one")
                decision = full.images[b][0].decision
                gaps[i], num_tokens[i] = decision.gap, decision.num_tokens
            reference = None if task_metric else text_hidden_states(vlm.model, full)
            for column, budget in enumerate(budgets):
                if task_metric:
                    prompt = vlm.prune(inputs, budget, features=features)
                    generation = vlm.generate_from(prompt, max_new_tokens)
                    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in generation.tokens]
                    predictions[column].extend(texts)
                    scored = [_ANSWER_METRICS[objective](t, a) for t, a in zip(texts, answers)]
                else:
                    prompt = vlm.prune(inputs, budget, features=features)
                    scored = text_state_discrepancy(text_hidden_states(vlm.model, prompt), reference).tolist()
                for b, i in enumerate(rows):
                    values[i, column] = scored[b]
                    decision = prompt.images[b][0].decision
                    kept[i, column] = decision.num_keep / decision.num_tokens
                bar.update(1)
    bar.close()
    return Evaluation(gaps, num_tokens, values, kept, predictions)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class CalibrationTable:
    """The objective of every sample at every candidate keep ratio (uniform budgets).

    Attributes
    ----------
    objective : str
        A key of :data:`OBJECTIVES`.
    ratios : ndarray, shape (R,), float64
        Strictly increasing keep ratios in (0, 1].
    gaps : ndarray, shape (S,), float64
    num_tokens : ndarray, shape (S,), int64
        Prunable vision tokens per sample.
    values : ndarray, shape (S, R), float64
        Objective per sample at each ratio.
    min_keep : int
        The floor on kept tokens the model was run with.
    """

    objective: str
    ratios: np.ndarray
    gaps: np.ndarray
    num_tokens: np.ndarray
    values: np.ndarray
    min_keep: int = 1

    def __post_init__(self):
        _check_objective(self.objective)
        s, r = len(self.gaps), len(self.ratios)
        if s < 1 or r < 1:
            raise ValueError(f"a calibration table needs samples and ratios, got {s} × {r}")
        if self.values.shape != (s, r) or self.num_tokens.shape != (s,):
            raise ValueError(f"values must be ({s}, {r}) and num_tokens ({s},), got {self.values.shape}, {self.num_tokens.shape}")
        if not np.all(np.diff(self.ratios) > 0):
            raise ValueError(f"ratios must be strictly increasing, got {self.ratios.tolist()}")

    @property
    def higher_is_better(self) -> bool:
        return OBJECTIVES[self.objective][1]

    @property
    def num_samples(self) -> int:
        return len(self.gaps)

    def kept_fraction(self, ratios) -> np.ndarray:
        """``num_tokens_to_keep(N_s, ratio_s, min_keep) / N_s`` per sample: (S,) float64."""
        ratios = np.broadcast_to(np.asarray(ratios, dtype=np.float64), self.gaps.shape)
        return np.array([num_tokens_to_keep(int(n), float(r), self.min_keep) / n for n, r in zip(self.num_tokens, ratios)])

    def kept_table(self) -> np.ndarray:
        """Kept fraction per sample at each table ratio: (S, R) float64."""
        return np.stack([self.kept_fraction(r) for r in self.ratios], axis=1)

    def column(self, ratio: float) -> int | None:
        """Index of ``ratio`` among the table's ratios, or None."""
        hits = np.flatnonzero(np.abs(self.ratios - ratio) <= _EPS)
        return int(hits[0]) if hits.size else None

    def lookup(self, sample_ratios) -> np.ndarray:
        """The objective of each sample at its own ratio, each of which must be a table ratio: (S,)."""
        columns = [self.column(float(r)) for r in sample_ratios]
        if any(c is None for c in columns):
            missing = sorted({float(r) for r, c in zip(sample_ratios, columns) if c is None})
            raise ValueError(f"ratios {missing} are not in the table's ratios {self.ratios.tolist()}")
        return self.values[np.arange(self.num_samples), columns]

    def interpolate(self, sample_ratios) -> np.ndarray:
        """The objective of each sample at its ratio, linear in the kept fraction between the
        table's ratios: (S,)."""
        kept_at = self.kept_table()
        wanted = self.kept_fraction(sample_ratios)
        out = np.empty(self.num_samples)
        for s in range(self.num_samples):
            # Ratios that keep the same count are the same prompt: one of them is enough.
            xp, first = np.unique(kept_at[s], return_index=True)
            out[s] = np.interp(wanted[s], xp, self.values[s, first])
        return out

    def better(self, a: float, b: float) -> bool:
        """Whether objective value ``a`` is at least as good as ``b`` (ties count as good)."""
        a, b = round(a, _OBJECTIVE_DECIMALS), round(b, _OBJECTIVE_DECIMALS)
        return a >= b if self.higher_is_better else a <= b


def measure_table(
    vlm,
    samples: Sequence,
    ratios: Sequence[float],
    objective: str,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    answer_instruction: str = "",
    progress: bool = False,
) -> CalibrationTable:
    """Run the model once per ratio (a uniform budget) over all samples.

    Parameters are those of :func:`evaluate_budgets`; ``ratios`` are keep ratios in (0, 1]
    (sorted and deduplicated here).

    Returns
    -------
    CalibrationTable with ``values`` (S, R).
    """
    ratios = sorted({float(r) for r in ratios})
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise AsymVLMError(f"the ratio grid must hold keep ratios in (0, 1], got {ratios}")
    evaluation = evaluate_budgets(vlm, samples, [UniformBudget(r) for r in ratios], objective,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  answer_instruction=answer_instruction, progress=progress)
    return CalibrationTable(objective, np.array(ratios), evaluation.gaps, evaluation.num_tokens,
                            evaluation.values, vlm.vision_config.min_keep)


# --------------------------------------------------------------------------- the fits


@dataclass(frozen=True)
class FittedRule:
    """A budget rule scored on a calibration table.

    Attributes
    ----------
    rule : BudgetRule
    average_keep : float
        Mean over samples of the kept fraction (``num_tokens_to_keep(N, ratio) / N``).
    objective : float
        Mean objective over samples: exact table lookups for rules whose ratios are table
        ratios, interpolated between them otherwise (``interpolated``).
    sample_ratios : ndarray, shape (S,)
        The keep ratio the rule gives each sample.
    interpolated : bool
    """

    rule: BudgetRule
    average_keep: float
    objective: float
    sample_ratios: np.ndarray
    interpolated: bool = False


def score_rule(table: CalibrationTable, rule: BudgetRule) -> FittedRule:
    """Apply ``rule`` to the table's gaps and score it (lookup, or interpolation off the grid)."""
    ratios = np.array([rule.keep_ratio(g) for g in table.gaps])
    on_grid = all(table.column(float(r)) is not None for r in ratios)
    values = table.lookup(ratios) if on_grid else table.interpolate(ratios)
    return FittedRule(rule, float(table.kept_fraction(ratios).mean()), float(values.mean()), ratios, not on_grid)


def best_uniform(table: CalibrationTable, target: float, grid: Sequence[float] | None = None) -> FittedRule | None:
    """The best uniform rule on the grid whose average keep ratio is ≤ ``target`` (None if none is)."""
    fits = [score_rule(table, UniformBudget(float(r))) for r in (grid if grid is not None else table.ratios)]
    feasible = [fit for fit in fits if fit.average_keep <= target + _EPS]
    if not feasible:
        return None
    sign = -1.0 if table.higher_is_better else 1.0
    return min(feasible, key=lambda fit: (sign * round(fit.objective, _OBJECTIVE_DECIMALS), -fit.average_keep))


def threshold_candidates(gaps: np.ndarray, levels: Sequence[float] = QUANTILE_LEVELS) -> list[tuple[float, float]]:
    """Candidate (gap_low, gap_high) pairs of Method A: distinct quantiles of the gaps, low < high.

    With fewer than two distinct quantiles (all gaps equal) the one pair is (q, q).
    """
    quantiles = np.unique(np.quantile(np.asarray(gaps, dtype=np.float64), levels))
    quantiles = np.maximum(quantiles, 0.0)
    if len(quantiles) < 2:
        return [(float(quantiles[0]), float(quantiles[0]))]
    return [(float(lo), float(hi)) for i, lo in enumerate(quantiles) for hi in quantiles[i + 1 :]]


def _grid_columns(table: CalibrationTable, grid: Sequence[float] | None) -> np.ndarray:
    if grid is None:
        return np.arange(len(table.ratios))
    columns = [table.column(float(r)) for r in sorted(set(grid))]
    if any(c is None for c in columns):
        raise ValueError(f"grid ratios {sorted(set(grid))} must all be table ratios {table.ratios.tolist()}")
    return np.array(columns)


def _check_reachable(table: CalibrationTable, target: float, smallest: float) -> None:
    lowest = float(table.kept_fraction(smallest).mean())
    if lowest > target + _EPS:
        raise AsymVLMError(
            f"no rule reaches an average keep ratio of {target:g}: the smallest ratio, {smallest:g}, keeps "
            f"{lowest:.4f} on average; lower the smallest ratio (--ratio-grid / --min-ratio) or raise the target"
        )


def fit_threshold(
    table: CalibrationTable,
    target: float,
    grid: Sequence[float] | None = None,
    levels: Sequence[float] = QUANTILE_LEVELS,
) -> FittedRule:
    """Method A: the best :class:`ThresholdBudget` whose average keep ratio is ≤ ``target``.

    Searches every (gap_low, gap_high) of :func:`threshold_candidates` and every
    ``ratio_aggressive ≤ ratio_moderate ≤ ratio_conservative`` from ``grid`` (default: the
    table's ratios). Uniform rules are the case of three equal ratios, so the result is never
    worse than the best uniform ratio of the grid that meets the target.

    Ties, in order: the better objective; the larger average keep ratio (using the budget the
    target allows); the earlier threshold pair (smaller gap_low, then gap_high); the larger
    conservative, moderate, aggressive ratio.

    Parameters
    ----------
    table : CalibrationTable, values (S, R)
    target : float in (0, 1]
    grid : subset of the table's ratios, optional
    levels : quantile levels of the candidate thresholds

    Returns
    -------
    FittedRule with a ThresholdBudget; ``objective`` is an exact table lookup.
    """
    _check_target(target)
    columns = _grid_columns(table, grid)
    _check_reachable(table, target, float(table.ratios[columns[0]]))
    values = table.values[:, columns]  # (S, G)
    kept = table.kept_table()[:, columns]  # (S, G)
    size = len(columns)
    # Index grids over (conservative, moderate, aggressive) columns, each (G, G, G).
    c_idx, m_idx, a_idx = np.meshgrid(np.arange(size), np.arange(size), np.arange(size), indexing="ij")
    ordered = (c_idx >= m_idx) & (m_idx >= a_idx)
    c_idx, m_idx, a_idx = c_idx[ordered], m_idx[ordered], a_idx[ordered]  # (K,) each, ascending ratios = columns

    pairs = threshold_candidates(table.gaps, levels)
    num_samples = table.num_samples
    objectives, averages = [], []
    for low, high in pairs:
        tiers = np.where(table.gaps < low, 0, np.where(table.gaps < high, 1, 2))  # conservative/moderate/aggressive
        value_sums = np.stack([values[tiers == t].sum(axis=0) for t in range(3)])  # (3, G)
        kept_sums = np.stack([kept[tiers == t].sum(axis=0) for t in range(3)])
        objectives.append((value_sums[0, c_idx] + value_sums[1, m_idx] + value_sums[2, a_idx]) / num_samples)
        averages.append((kept_sums[0, c_idx] + kept_sums[1, m_idx] + kept_sums[2, a_idx]) / num_samples)
    objective = np.round(np.stack(objectives), _OBJECTIVE_DECIMALS)  # (P, K)
    average = np.stack(averages)
    feasible = average <= target + _EPS
    pair_idx, rule_idx = np.nonzero(feasible)
    sign = -1.0 if table.higher_is_better else 1.0
    # np.lexsort sorts by the last key first; every key is "smaller is preferred".
    order = np.lexsort((
        -a_idx[rule_idx], -m_idx[rule_idx], -c_idx[rule_idx], pair_idx,
        -average[pair_idx, rule_idx], sign * objective[pair_idx, rule_idx],
    ))
    best_pair, best_rule = pair_idx[order[0]], rule_idx[order[0]]
    low, high = pairs[best_pair]
    ratios = table.ratios[columns]
    rule = ThresholdBudget(
        gap_low=low, gap_high=high,
        ratio_conservative=float(ratios[c_idx[best_rule]]),
        ratio_moderate=float(ratios[m_idx[best_rule]]),
        ratio_aggressive=float(ratios[a_idx[best_rule]]),
    )
    return score_rule(table, rule)


def _linear_rule(intercept: float, slope: float, gap_mean: float, min_ratio: float, max_ratio: float) -> LinearBudget:
    return LinearBudget(target_ratio=intercept, slope=slope, gap_mean=gap_mean, min_ratio=min_ratio, max_ratio=max_ratio)


def _fit_intercept(table: CalibrationTable, target: float, slope: float, gap_mean: float,
                   min_ratio: float, max_ratio: float, iterations: int = 60) -> float | None:
    """An intercept in [min_ratio, max_ratio] giving the largest average keep ratio ≤ target, or
    None when even min_ratio keeps too much.

    The average is a step function of the intercept (token counts are integers), never
    decreasing. Bisection finds the top of the step at or below the target; of the intercepts
    on that step, the one with the fewest decimals is returned (0.5 rather than 0.515624…).
    """

    def average(intercept: float) -> float:
        rule = _linear_rule(intercept, slope, gap_mean, min_ratio, max_ratio)
        return float(table.kept_fraction([rule.keep_ratio(g) for g in table.gaps]).mean())

    def bisect(low: float, high: float, inside: Callable[[float], bool]) -> tuple[float, float]:
        """(last point known inside, first known outside); ``inside`` holds at low, not at high."""
        for _ in range(iterations):
            middle = 0.5 * (low + high)
            if inside(middle):
                low = middle
            else:
                high = middle
        return low, high

    if average(min_ratio) > target + _EPS:
        return None
    if average(max_ratio) <= target + _EPS:
        top = max_ratio
    else:
        top, _ = bisect(min_ratio, max_ratio, lambda c: average(c) <= target + _EPS)
    step = average(top)
    if average(min_ratio) >= step - _EPS:
        bottom = min_ratio
    else:
        _, bottom = bisect(min_ratio, top, lambda c: average(c) < step - _EPS)
    for decimals in range(1, 13):
        scale = 10.0**decimals
        candidate = min(max(math.ceil(bottom * scale - _EPS) / scale, min_ratio), max_ratio)
        if candidate <= top and abs(average(candidate) - step) <= _EPS:
            return candidate
    return top


def fit_linear(
    table: CalibrationTable,
    target: float,
    min_ratio: float | None = None,
    max_ratio: float = 1.0,
    tolerance: float = 0.01,
    slopes_per_std: Sequence[float] = LINEAR_SLOPES_PER_STD,
) -> FittedRule:
    """Method B: a :class:`LinearBudget` whose average keep ratio is within ``tolerance`` below ``target``.

    ``gap_mean`` is the mean gap. Without clamping, ``target + slope · (gap − gap_mean)``
    averages to the target for every slope, so the target does not determine the slope. For
    each candidate ``slope = −k / std(gaps)`` (``k`` in ``slopes_per_std``: the keep ratio moves
    by ``k`` per standard deviation), the intercept (``target_ratio``) is fitted by bisection so
    that the average kept fraction, after the ``[min_ratio, max_ratio]`` clamp and the token
    floor, is the largest not above ``target``; candidates that end more than ``tolerance``
    below the target are dropped. Of the rest, the best objective wins (interpolated between
    the table's ratios), ties going to the gentler slope.

    Parameters
    ----------
    table : CalibrationTable, values (S, R)
    target : float, ``min_ratio ≤ target ≤ max_ratio``
    min_ratio, max_ratio : the clamp; ``min_ratio`` defaults to the table's smallest ratio and
        must not be below it (the objective is unknown there).
    tolerance : float > 0
    slopes_per_std : candidate slopes, ≥ 0 each (0 is the uniform rule).

    Returns
    -------
    FittedRule with a LinearBudget.
    """
    _check_target(target)
    smallest = float(table.ratios[0])
    min_ratio = smallest if min_ratio is None else float(min_ratio)
    if min_ratio < smallest - _EPS:
        raise AsymVLMError(
            f"--min-ratio {min_ratio:g} is below the smallest ratio of the grid, {smallest:g}: "
            "the objective was not measured there; add it to --ratio-grid"
        )
    if not (0.0 < min_ratio <= max_ratio <= 1.0):
        raise AsymVLMError(f"the clamp must satisfy 0 < --min-ratio <= --max-ratio <= 1, got {min_ratio:g}, {max_ratio:g}")
    if not (min_ratio <= target <= max_ratio):
        raise AsymVLMError(
            f"the target average keep ratio {target:g} must lie within the clamp [--min-ratio, --max-ratio] = "
            f"[{min_ratio:g}, {max_ratio:g}]"
        )
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a number > 0, got {tolerance}")
    _check_reachable(table, target, min_ratio)
    gap_mean = float(table.gaps.mean())
    spread = float(table.gaps.std())
    candidates = sorted({float(k) for k in slopes_per_std}) if spread > 0 else [0.0]
    if candidates[0] < 0:
        raise ValueError(f"slopes_per_std must be >= 0, got {candidates}")
    best: FittedRule | None = None
    closest = None
    for k in candidates:
        slope = -float(f"{k / spread:.3g}") if k > 0 else 0.0  # three digits: the candidates are coarse anyway
        intercept = _fit_intercept(table, target, slope, gap_mean, min_ratio, max_ratio)
        if intercept is None:
            continue
        fit = score_rule(table, _linear_rule(intercept, slope, gap_mean, min_ratio, max_ratio))
        closest = fit.average_keep if closest is None else max(closest, fit.average_keep)
        if fit.average_keep < target - tolerance:
            continue
        if best is None or not table.better(best.objective, fit.objective):
            best = fit
    if best is None:
        if closest is None:
            reason = (f"with every candidate slope even the intercept --min-ratio {min_ratio:g} keeps more "
                      "(the clamp lifts too many images); lower --min-ratio")
        else:
            reason = (f"the closest average is {closest:.4f}: images of {int(table.num_tokens.min())} tokens keep "
                      f"multiples of 1/{int(table.num_tokens.min())}; raise --tolerance or use more samples")
        raise AsymVLMError(
            f"no linear rule keeps an average within {tolerance:g} below the target {target:g}: {reason}"
        )
    return best


# --------------------------------------------------------------------------- end to end


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate` chose and how it compares.

    Attributes
    ----------
    method : ``"threshold"`` or ``"linear"``
    objective : key of :data:`OBJECTIVES`
    target : float
    table : CalibrationTable
    fitted : FittedRule
        The chosen rule as scored on the table (interpolated for off-grid ratios).
    chosen : FittedRule
        The chosen rule with its measured objective (the model run with it when it is off the
        grid; the table lookup otherwise).
    keep_all : FittedRule
        Uniform 1.0.
    uniform_same_average : FittedRule
        A uniform rule at the chosen rule's average keep ratio (measured).
    best_grid_uniform : FittedRule
        The best uniform grid ratio meeting the target.
    """

    method: str
    objective: str
    target: float
    table: CalibrationTable
    fitted: FittedRule
    chosen: FittedRule
    keep_all: FittedRule
    uniform_same_average: FittedRule
    best_grid_uniform: FittedRule | None

    def format(self) -> str:
        """The comparison as a text table."""
        label, higher = OBJECTIVES[self.objective]
        direction = "higher" if higher else "lower"
        rows = [
            ("calibrated " + self.chosen.rule.describe(), self.chosen),
            ("keep-all (uniform 1.0)", self.keep_all),
            (f"uniform {self.uniform_same_average.rule.ratio:.4g} (ratio = the calibrated average)",
             self.uniform_same_average),
        ]
        if self.best_grid_uniform is not None:
            rows.append((f"uniform {self.best_grid_uniform.rule.ratio:g} (best grid ratio within target)",
                         self.best_grid_uniform))
        width = max(len(name) for name, _ in rows)
        lines = [
            f"{self.table.num_samples} samples, target average keep ratio {self.target:g}, "
            f"objective {label} ({direction} is better)",
            f"{'rule':<{width}}  avg keep  {label}",
        ]
        lines += [f"{name:<{width}}  {fit.average_keep:8.4f}  {fit.objective:.6g}" for name, fit in rows]
        if self.fitted.interpolated:
            lines.append(f"(the fit estimated {self.fitted.objective:.6g} by interpolating between grid ratios; "
                         "the row above is measured)")
        return "\n".join(lines)

def _measured(table: CalibrationTable, rule: BudgetRule, evaluate: Callable[[BudgetRule], Evaluation]) -> FittedRule:
    """``rule`` scored by lookup when its ratios are all on the table, else by running the model."""
    fit = score_rule(table, rule)
    if not fit.interpolated:
        return fit
    evaluation = evaluate(rule)
    return FittedRule(rule, float(evaluation.kept[:, 0].mean()), float(evaluation.values[:, 0].mean()),
                      fit.sample_ratios, interpolated=False)


def calibrate(
    vlm,
    samples: Sequence,
    *,
    method: str,
    objective: str,
    target: float,
    ratio_grid: Sequence[float] = DEFAULT_RATIO_GRID,
    min_ratio: float | None = None,
    max_ratio: float = 1.0,
    tolerance: float = 0.01,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    answer_instruction: str = "",
    progress: bool = False,
    table: CalibrationTable | None = None,
) -> CalibrationReport:
    """Measure the table (unless given), fit Method A or B, and measure the comparisons.

    Parameters
    ----------
    vlm : PrunedVLM
    samples : S samples (see :func:`evaluate_budgets`)
    method : ``"threshold"`` (Method A) or ``"linear"`` (Method B)
    objective : key of :data:`OBJECTIVES`
    target : target average keep ratio in (0, 1]
    ratio_grid : candidate keep ratios (1.0 is always measured, as the keep-all reference)
    min_ratio, max_ratio, tolerance : Method B's clamp and tolerance (:func:`fit_linear`)
    table : a table already measured on these samples (skips the model runs)

    Returns
    -------
    CalibrationReport
    """
    _check_objective(objective)
    _check_target(target)
    if method not in ("threshold", "linear"):
        raise AsymVLMError(f"unknown method {method!r}; choose threshold or linear")
    grid = sorted({float(r) for r in ratio_grid})
    if not grid:
        raise AsymVLMError("the ratio grid is empty")
    run = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, answer_instruction=answer_instruction)
    if table is None:
        table = measure_table(vlm, samples, [*grid, 1.0], objective, progress=progress, **run)
    if method == "threshold":
        fitted = fit_threshold(table, target, grid)
    else:
        fitted = fit_linear(table, target, min_ratio, max_ratio, tolerance)

    def evaluate(rule: BudgetRule) -> Evaluation:
        return evaluate_budgets(vlm, samples, [rule], objective, **run)

    chosen = _measured(table, fitted.rule, evaluate)
    keep_all = _measured(table, UniformBudget(1.0), evaluate)
    same = _measured(table, UniformBudget(min(1.0, round(chosen.average_keep, 6))), evaluate)
    return CalibrationReport(method, objective, target, table, fitted, chosen, keep_all, same,
                             best_uniform(table, target, grid))
