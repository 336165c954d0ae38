"""The AsymVLM settings of one engine, read from ``VllmConfig.additional_config["asymvlm"]``.

``additional_config`` reaches every vLLM process (API server, engine core, workers) and is
part of vLLM's config hash. Its ``asymvlm`` entry is either an inline
:class:`~asymvlm_vllm.core.config.AsymVLMConfig` mapping or ``{"config": FILE_OR_PRESET}``.
"""

from __future__ import annotations

from functools import lru_cache
import json
from typing import Any

from ..core.config import AsymVLMConfig
from ..core.errors import ConfigError

__all__ = ["ADDITIONAL_CONFIG_KEY", "asymvlm_config_from", "is_enabled"]

ADDITIONAL_CONFIG_KEY = "asymvlm"


def _entry(vllm_config: Any) -> Any:
    additional = getattr(vllm_config, "additional_config", None) or {}
    return additional.get(ADDITIONAL_CONFIG_KEY) if isinstance(additional, dict) else None


def is_enabled(vllm_config: Any) -> bool:
    """Whether this engine was started with AsymVLM."""
    return _entry(vllm_config) is not None


@lru_cache(maxsize=16)
def _parse(text: str) -> AsymVLMConfig:
    entry = json.loads(text)
    if isinstance(entry, dict) and set(entry) == {"config"}:
        return AsymVLMConfig.load(str(entry["config"]))
    return AsymVLMConfig.from_dict(entry, source='additional_config["asymvlm"]')


def asymvlm_config_from(vllm_config: Any) -> AsymVLMConfig:
    """The engine's :class:`AsymVLMConfig`; :class:`ConfigError` if it is missing or invalid."""
    entry = _entry(vllm_config)
    if entry is None:
        raise ConfigError('AsymVLM is not configured: additional_config has no "asymvlm" entry')
    try:
        text = json.dumps(entry, sort_keys=True, default=str)
    except TypeError as e:
        raise ConfigError(f'additional_config["asymvlm"] is not JSON-like: {e}') from None
    return _parse(text)
