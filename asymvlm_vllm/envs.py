"""Every environment variable asymvlm-vllm reads, in one place.

``ASYMVLM_CACHE_DIR``
    Where ``asymvlm demo`` builds its tiny offline model (default ``~/.cache/asymvlm``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$ASYMVLM_CACHE_DIR`` or ``~/.cache/asymvlm`` (``$XDG_CACHE_HOME/asymvlm`` if set)."""
    explicit = os.environ.get("ASYMVLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asymvlm"
