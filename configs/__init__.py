"""Bundled YAML presets, one per model family, installed as ``asymvlm_vllm.configs``."""
