"""Prometheus metrics of the API server, from each finished request's AsymVLM outcome.

The scheduler (engine-core process) attaches the outcome to a request's final output as
``kv_transfer_params["asymvlm"]``; that is the one per-request field vLLM carries from the
engine core to the front end and on to the OpenAI response. The front end reads it where it
processes each engine output: :func:`install_output_hook` wraps vLLM's
``OutputProcessor._update_stats_from_output`` (called for every output, with or without
``--disable-log-stats``) once, when the front end loads AsymVLM's request validator (which only an AsymVLM engine
configures, by ``--plugin asymvlm`` or the explicit flags). The
metrics live in the default Prometheus registry, which vLLM's ``/metrics`` serves.

=====================================  ==========  ==============================================
name                                   type        meaning
=====================================  ==========  ==============================================
``asymvlm_requests_total``             counter     finished image requests, label ``status``
``asymvlm_vision_tokens_total``        counter     vision tokens in (before pruning)
``asymvlm_vision_tokens_kept_total``   counter     vision tokens kept (prefilled)
``asymvlm_keep_ratio``                 histogram   per request, kept / in
``asymvlm_probe_seconds``              histogram   probe step: scheduled → decision applied
``asymvlm_scoring_seconds``            histogram   scoring and budget inside the probe step
=====================================  ==========  ==============================================
"""

from __future__ import annotations

import functools
import threading
from typing import Any

__all__ = ["METRIC_NAMES", "install_output_hook", "observe_outcome"]

METRIC_NAMES = (
    "asymvlm_requests_total",
    "asymvlm_vision_tokens_total",
    "asymvlm_vision_tokens_kept_total",
    "asymvlm_keep_ratio",
    "asymvlm_probe_seconds",
    "asymvlm_scoring_seconds",
)

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None
_hook_installed = False


def _get_metrics() -> dict[str, Any]:
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Histogram

            _metrics = {
                "requests": Counter("asymvlm_requests", "Finished image requests by AsymVLM outcome", ["status"]),
                "tokens": Counter("asymvlm_vision_tokens", "Vision tokens in, before pruning"),
                "kept": Counter("asymvlm_vision_tokens_kept", "Vision tokens kept and prefilled"),
                "ratio": Histogram("asymvlm_keep_ratio", "Per-request kept / total vision tokens",
                                   buckets=(0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.65, 0.75, 0.9, 1.0)),
                "probe": Histogram("asymvlm_probe_seconds", "Probe step: scheduled until the decision is applied",
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)),
                "scoring": Histogram("asymvlm_scoring_seconds", "Scoring and budget inside the probe step",
                                     buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)),
            }
        return _metrics


def observe_outcome(outcome: dict[str, Any]) -> None:
    """Record one finished request's outcome dict."""
    metrics = _get_metrics()
    metrics["requests"].labels(status=str(outcome.get("status", "unknown"))).inc()
    tokens = int(outcome.get("vision_tokens", 0))
    kept = int(outcome.get("vision_tokens_kept", tokens))
    metrics["tokens"].inc(tokens)
    metrics["kept"].inc(kept)
    if tokens:
        metrics["ratio"].observe(kept / tokens)
    if "probe_seconds" in outcome:
        metrics["probe"].observe(float(outcome["probe_seconds"]))
    if "scoring_seconds" in outcome:
        metrics["scoring"].observe(float(outcome["scoring_seconds"]))


def install_output_hook() -> None:
    """Observe outcomes as the front end processes engine outputs (idempotent)."""
    global _hook_installed
    with _lock:
        if _hook_installed:
            return
        from vllm.v1.engine.output_processor import OutputProcessor

        original = OutputProcessor._update_stats_from_output

        @functools.wraps(original)
        def update_stats_from_output(self, req_state, engine_core_output, engine_core_timestamp, iteration_stats):
            params = engine_core_output.kv_transfer_params
            if params and engine_core_output.finish_reason is not None and isinstance(params.get("asymvlm"), dict):
                observe_outcome(params["asymvlm"])
            return original(self, req_state, engine_core_output, engine_core_timestamp, iteration_stats)

        OutputProcessor._update_stats_from_output = update_stats_from_output
        _hook_installed = True
