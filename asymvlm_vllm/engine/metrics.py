"""Prometheus metrics of the API server, from each finished request's AsymVLM outcome.

The scheduler (engine-core process) sends a request's outcome as
``kv_transfer_params["asymvlm"]`` on the request's first output after it is known, and again
on its final output; ``kv_transfer_params`` is the one per-request field vLLM carries from the
engine core to the front end and on to the OpenAI response. The front end may finish a
request itself (a stop string, found while detokenizing) or abort it (a client that
disconnects); then no final output comes from the engine. So :func:`install_output_hook`
wraps vLLM's ``RequestState.make_request_output``, the one place every way of finishing
passes through: it keeps the latest outcome a request was sent, hands it out only with the
finished output (intermediate streaming chunks carry none), and records it in the metrics
once. The hook is installed when the front end loads AsymVLM's request validator (which only
an AsymVLM engine configures, by ``--plugin asymvlm`` or the explicit flags). The metrics live
in the default Prometheus registry, which vLLM's ``/metrics`` serves.

=======================================  =========  ======================================================
name                                     type       meaning
=======================================  =========  ======================================================
``asymvlm_requests_total``               counter    finished image requests, label ``status``
``asymvlm_vision_tokens_total``          counter    vision tokens in (before pruning)
``asymvlm_vision_tokens_kept_total``     counter    vision tokens kept (prefilled)
``asymvlm_keep_ratio``                   histogram  per request, kept / in
``asymvlm_probe_seconds``                histogram  probe step: scheduled → decision applied
``asymvlm_scoring_seconds``              histogram  scoring and budget inside the probe step
``asymvlm_answers_dropped_total``        counter    previous answers dropped by the multi-turn rule
``asymvlm_answer_tokens_dropped_total``  counter    their tokens
``asymvlm_text_requests_total``          counter    finished requests with text eviction, label ``status``
``asymvlm_evictions_total``              counter    eviction steps (one per request and step)
``asymvlm_evicted_blocks_total``         counter    KV blocks freed by eviction
``asymvlm_evicted_tokens_total``         counter    generated tokens evicted
``asymvlm_peak_live_blocks``             histogram  per request, the most KV blocks it held
``asymvlm_eviction_seconds``             histogram  per request, time choosing its evictions
=======================================  =========  ======================================================

Vision metrics count image requests only; text metrics count requests with eviction on.
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
    "asymvlm_text_requests_total",
    "asymvlm_evictions_total",
    "asymvlm_evicted_blocks_total",
    "asymvlm_evicted_tokens_total",
    "asymvlm_peak_live_blocks",
    "asymvlm_eviction_seconds",
    "asymvlm_answers_dropped_total",
    "asymvlm_answer_tokens_dropped_total",
)

_KEY = "asymvlm"
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
                "text_requests": Counter("asymvlm_text_requests", "Finished requests with text eviction", ["status"]),
                "evictions": Counter("asymvlm_evictions", "Eviction steps (one per request and step)"),
                "evicted_blocks": Counter("asymvlm_evicted_blocks", "KV blocks freed by text eviction"),
                "evicted_tokens": Counter("asymvlm_evicted_tokens", "Generated tokens evicted"),
                "peak_blocks": Histogram("asymvlm_peak_live_blocks", "Per request, the most KV blocks it held",
                                         buckets=(4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)),
                "answers_dropped": Counter("asymvlm_answers_dropped", "Previous answers dropped by the multi-turn rule"),
                "answer_tokens_dropped": Counter("asymvlm_answer_tokens_dropped", "Tokens of the dropped answers"),
                "eviction_seconds": Histogram("asymvlm_eviction_seconds", "Per request, time spent choosing evictions",
                                              buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                       1.0)),
            }
        return _metrics


def observe_outcome(outcome: dict[str, Any]) -> None:
    """Record one finished request's outcome dict."""
    metrics = _get_metrics()
    text = outcome.get("text")
    if isinstance(text, dict):
        metrics["text_requests"].labels(status=str(text.get("status", "unknown"))).inc()
        metrics["evictions"].inc(int(text.get("eviction_steps", 0)))
        metrics["evicted_blocks"].inc(int(text.get("evicted_blocks", 0)))
        metrics["evicted_tokens"].inc(int(text.get("evicted_tokens", 0)))
        if text.get("status") == "on":
            metrics["peak_blocks"].observe(int(text.get("peak_live_blocks", 0)))
            metrics["eviction_seconds"].observe(float(text.get("eviction_seconds", 0.0)))
    if "vision_tokens" not in outcome:
        return  # a text-only request
    metrics["answers_dropped"].inc(len(outcome.get("answers_dropped", ())))
    metrics["answer_tokens_dropped"].inc(int(outcome.get("answer_tokens_dropped", 0)))
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
        from vllm.v1.engine.output_processor import RequestState

        original = RequestState.make_request_output

        @functools.wraps(original)
        def make_request_output(self, new_token_ids, pooling_output, finish_reason, stop_reason,
                                kv_transfer_params=None, *args, **kwargs):
            if kv_transfer_params and isinstance(kv_transfer_params.get(_KEY), dict):
                self.asymvlm_outcome = kv_transfer_params[_KEY]
                if finish_reason is None:
                    rest = {k: v for k, v in kv_transfer_params.items() if k != _KEY}
                    kv_transfer_params = rest or None
            outcome = getattr(self, "asymvlm_outcome", None)
            if finish_reason is not None and outcome is not None:
                self.asymvlm_outcome = None  # a request is counted once
                kv_transfer_params = {**(kv_transfer_params or {}), _KEY: outcome}
                observe_outcome(outcome)
            return original(self, new_token_ids, pooling_output, finish_reason, stop_reason,
                            kv_transfer_params, *args, **kwargs)

        RequestState.make_request_output = make_request_output
        _hook_installed = True
