"""Prefill FLOPs of a decoder-only language model, the paper's per-layer estimate."""

from __future__ import annotations

__all__ = ["prefill_flops"]


def prefill_flops(num_tokens: int, hidden_size: int, intermediate_size: int, num_layers: int) -> int:
    """FLOPs to prefill ``num_tokens`` tokens: ``Σ_layers 4nd² + 2n²d + 3ndm``.

    ``n`` tokens, ``d`` hidden size, ``m`` MLP intermediate size (the paper's Sec. 3 estimate:
    attention projections, attention scores and values, gated MLP). Use the token count the
    language model actually receives, so the saving is measured, not assumed.
    """
    for name, value in (("num_tokens", num_tokens), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    n, d, m = num_tokens, hidden_size, intermediate_size
    return num_layers * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)
