"""Exceptions raised for bad user input (configs, scorer files, per-request knobs)."""

from __future__ import annotations

from pydantic import ValidationError

# Discriminator values of the budget rules: pydantic puts the chosen tag into an error's path.
_UNION_TAGS = frozenset({"uniform", "threshold", "linear"})


class AsymVLMError(ValueError):
    """Base class: every error the package raises for bad input derives from it."""


class ConfigError(AsymVLMError):
    """An AsymVLM configuration (YAML, dict or per-request override) is invalid."""


class ScorerFileError(AsymVLMError):
    """A scorer file is missing, not safetensors, or holds a weight that cannot be used."""


def format_validation_error(error: ValidationError, header: str) -> str:
    """``header:`` then one line per problem, ``field.path: what is wrong (got value)``."""
    lines = [f"{header}:"]
    for item in error.errors():
        loc = [str(p) for i, p in enumerate(item["loc"]) if not (i and p in _UNION_TAGS)]
        loc = [p for p in loc if not p.startswith("function-")]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] not in ("value_error", "union_tag_invalid") and "input" in item:
            message += f" (got {item['input']!r})"
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {message}")
    return "\n".join(lines)
