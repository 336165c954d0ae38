"""The transformers reference path: pruned generation, text eviction, scorer training,
calibration and the demo. The only part of the package that imports transformers."""

from .model import PrunedVLM, load_image

__all__ = ["PrunedVLM", "load_image", "quiet_progress_bars"]


def quiet_progress_bars() -> None:
    """Turn off transformers' weight-loading progress bars (CLI output is a report)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
