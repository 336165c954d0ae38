"""Subcommands of ``asymvlm`` that need the transformers path. Each module defines
``add_parser(commands)`` and imports heavy packages only inside its ``run`` function.

This module holds the argparse value types they share (stdlib only)."""

from __future__ import annotations

import argparse
import math


def integer_at_least(minimum: int):
    """An argparse type: an integer ``>= minimum``, else a message naming the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def number_in(low: float, high: float = math.inf, low_inclusive: bool = False):
    """An argparse type: a finite number in ``(low, high]`` (``[low, high]`` if ``low_inclusive``)."""
    interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high != math.inf else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        above = value >= low if low_inclusive else value > low
        if not (math.isfinite(value) and above and value <= high):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text}")
        return value

    return parse
