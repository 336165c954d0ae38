"""The AsymVLM algorithm in plain torch: scoring, budgets, selection, rankers, eviction,
configuration and scorer files. Imports neither vllm nor transformers (a test checks)."""

from .block_importance import block_attention_mass_paged, softmax_lse
from .block_table import compact_block_tables
from .budget import BudgetRule, BudgetRuleConfig, LinearBudget, ThresholdBudget, UniformBudget, num_tokens_to_keep
from .config import AsymVLMConfig, TextEvictionConfig, VisionPruningConfig, list_presets
from .errors import AsymVLMError, ConfigError, ScorerFileError
from .eviction import (
    BlockEviction,
    EvictionPolicy,
    H2OEviction,
    MultiTurnEviction,
    StreamingLLMEviction,
    ThresholdEviction,
    accumulate_attention,
    answer_image_similarity,
    block_attention_mass,
    head_mean_attention,
    keep_mask,
)
from .rankers import CosineRanker, LearnedRanker, RandomRanker, SpiralRanker, VisionTokenRanker, spiral_order
from .scorer_file import SCORER_WEIGHT_RANGE, Scorer, ScorerMetadata, ScorerTraining, load_scorer, save_scorer
from .scoring import importance_gap, importance_gaps_packed, score_vision_tokens, score_vision_tokens_packed
from .selection import PruningDecision, decide_vision_pruning, select_keep_indices, soft_score_mask

__all__ = [
    "SCORER_WEIGHT_RANGE",
    "AsymVLMConfig",
    "AsymVLMError",
    "BlockEviction",
    "BudgetRule",
    "BudgetRuleConfig",
    "ConfigError",
    "CosineRanker",
    "EvictionPolicy",
    "H2OEviction",
    "LearnedRanker",
    "LinearBudget",
    "MultiTurnEviction",
    "PruningDecision",
    "RandomRanker",
    "Scorer",
    "ScorerFileError",
    "ScorerMetadata",
    "ScorerTraining",
    "SpiralRanker",
    "StreamingLLMEviction",
    "TextEvictionConfig",
    "ThresholdBudget",
    "ThresholdEviction",
    "UniformBudget",
    "VisionPruningConfig",
    "VisionTokenRanker",
    "accumulate_attention",
    "answer_image_similarity",
    "block_attention_mass",
    "block_attention_mass_paged",
    "compact_block_tables",
    "decide_vision_pruning",
    "head_mean_attention",
    "importance_gap",
    "importance_gaps_packed",
    "keep_mask",
    "list_presets",
    "load_scorer",
    "num_tokens_to_keep",
    "save_scorer",
    "score_vision_tokens",
    "score_vision_tokens_packed",
    "select_keep_indices",
    "soft_score_mask",
    "softmax_lse",
    "spiral_order",
]
