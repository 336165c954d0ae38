"""Per-request AsymVLM knobs, as sent in the OpenAI API's ``vllm_xargs``.

vLLM copies ``vllm_xargs`` into ``SamplingParams.extra_args``; every key that starts with
``asymvlm`` belongs to this model. A misspelt key or a value out of range is an error with a
message naming the key (the server answers HTTP 400), never silently ignored.

==========================  ===============================================================
key                         value
==========================  ===============================================================
``asymvlm``                 the string ``"on"`` (default) or ``"off"``: prune this request or not
``asymvlm_keep_ratio``      a JSON number in (0, 1]: keep this fraction of every image's tokens
``asymvlm_budget``          ``"adaptive"`` (the configured rule, default) or a fixed tier of
                            it: ``"conservative"``, ``"moderate"``, ``"aggressive"``
``asymvlm_min_keep``        a JSON integer in [1, 2**20]: never keep fewer tokens per image
``asymvlm_text_eviction``   ``"on"`` or ``"off"``: evict generated tokens' KV blocks once they
                            exceed the budget (default: the server's ``text.enabled``)
``asymvlm_text_budget``     a JSON integer in [1, 2**20]: generated tokens kept before eviction
                            starts (default: the server's ``text.budget_tokens``); implies
                            ``asymvlm_text_eviction`` ``"on"`` unless that says ``"off"``
==========================  ===============================================================

``"asymvlm": "off"`` turns both halves off for the request and allows no other key.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .budget import BudgetRule, LinearBudget, ThresholdBudget, UniformBudget
from .errors import AsymVLMError, format_validation_error

if TYPE_CHECKING:
    from .config import TextEvictionConfig

__all__ = ["RequestOptions", "RequestOptionsError", "request_options_from_extra_args"]

PREFIX = "asymvlm"
MAX_MIN_KEEP = 1 << 20
"""Largest ``asymvlm_min_keep``: far above any image's token count, far below integer overflow."""
_KEYS = {
    "asymvlm": "enabled",
    "asymvlm_keep_ratio": "keep_ratio",
    "asymvlm_budget": "budget",
    "asymvlm_min_keep": "min_keep",
    "asymvlm_text_eviction": "text_eviction",
    "asymvlm_text_budget": "text_budget",
}


class RequestOptionsError(AsymVLMError):
    """A request's ``asymvlm*`` extra arguments are invalid."""


class RequestOptions(BaseModel):
    """What one request asks of AsymVLM; ``None`` fields fall back to the server's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    keep_ratio: float | None = Field(default=None, description="fixed keep ratio in (0, 1]")
    budget: Literal["adaptive", "conservative", "moderate", "aggressive"] = "adaptive"
    min_keep: int | None = Field(default=None, ge=1)
    text_eviction: bool | None = None
    text_budget: int | None = Field(default=None, ge=1)

    @field_validator("enabled", "text_eviction", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> bool | None:
        # Strict: a JSON client that sends true, 1 or "yes" may mean something else; say so.
        if value in ("on", "off") and isinstance(value, str):
            return value == "on"
        raise ValueError(f"must be the string 'on' or 'off', got {value!r}")

    @field_validator("keep_ratio", mode="before")
    @classmethod
    def _ratio(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a JSON number in (0, 1], got {value!r}")
        ratio = float(value)
        if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
            raise ValueError(f"must be a number in (0, 1], got {value!r}")
        return ratio

    @field_validator("min_keep", "text_budget", mode="before")
    @classmethod
    def _integer(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a JSON integer in [1, {MAX_MIN_KEEP}], got {value!r}")
        if not 1 <= value <= MAX_MIN_KEEP:
            raise ValueError(f"must be an integer in [1, {MAX_MIN_KEEP}], got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RequestOptions:
        given = self.model_fields_set
        if not self.enabled and given - {"enabled"}:
            raise ValueError("asymvlm is 'off' for this request but other asymvlm_* options are set")
        if self.keep_ratio is not None and "budget" in given:
            raise ValueError("set either asymvlm_keep_ratio or asymvlm_budget, not both")
        if self.text_eviction is False and self.text_budget is not None:
            raise ValueError("asymvlm_text_eviction is 'off' but asymvlm_text_budget is set")
        return self

    def text_eviction_budget(self, configured: TextEvictionConfig) -> int | None:
        """Generated tokens this request keeps before eviction starts; None: no eviction."""
        if not self.enabled or self.text_eviction is False:
            return None
        if self.text_eviction is None and self.text_budget is None and not configured.enabled:
            return None
        return self.text_budget if self.text_budget is not None else configured.budget_tokens

    def budget_rule(self, configured: BudgetRule) -> BudgetRule:
        """The rule this request uses, given the server's configured rule."""
        if self.keep_ratio is not None:
            return UniformBudget(ratio=self.keep_ratio)
        if self.budget == "adaptive":
            return configured
        if isinstance(configured, ThresholdBudget):
            ratio = {"conservative": configured.ratio_conservative, "moderate": configured.ratio_moderate,
                     "aggressive": configured.ratio_aggressive}[self.budget]
        elif isinstance(configured, LinearBudget):
            ratio = {"conservative": configured.max_ratio, "moderate": configured.target_ratio,
                     "aggressive": configured.min_ratio}[self.budget]
        else:
            ratio = configured.keep_ratio(0.0)
        return UniformBudget(ratio=ratio)

    def to_extra_args(self) -> dict[str, Any]:
        """The ``vllm_xargs`` that reproduce these options (defaults left out)."""
        out: dict[str, Any] = {}
        for key, name in _KEYS.items():
            value = getattr(self, name)
            if value != type(self).model_fields[name].default:
                out[key] = ("on" if value else "off") if name in ("enabled", "text_eviction") else value
        return out


def request_options_from_extra_args(extra_args: dict[str, Any] | None) -> RequestOptions:
    """Validate the ``asymvlm*`` keys of ``SamplingParams.extra_args``; other keys are ignored.

    Raises
    ------
    RequestOptionsError
        With a message naming the offending key, for unknown ``asymvlm*`` keys and bad values.
    """
    if not extra_args:
        return RequestOptions()
    given = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.lower().startswith(PREFIX)}
    unknown = sorted(k for k in given if k not in _KEYS)
    if unknown:
        raise RequestOptionsError(
            f"unknown AsymVLM request option(s) {', '.join(unknown)}; valid keys: {', '.join(_KEYS)}"
        )
    try:
        return RequestOptions.model_validate({_KEYS[k]: v for k, v in given.items()})
    except ValidationError as e:
        by_field = {v: k for k, v in _KEYS.items()}
        message = format_validation_error(e, "invalid AsymVLM request options (vllm_xargs)")
        for name, key in by_field.items():
            message = re.sub(rf"(?<![\w]){name}:", f"{key}:", message)
        raise RequestOptionsError(message) from None
