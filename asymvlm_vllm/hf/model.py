"""``PrunedVLM``: a transformers VLM that prefills only the vision tokens AsymVLM keeps."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.budget import BudgetRule, UniformBudget
from ..core.config import AsymVLMConfig, VisionPruningConfig
from ..core.errors import AsymVLMError
from ..core.eviction import EvictionPolicy, MultiTurnEviction
from ..core.rankers import VisionTokenRanker
from .attention import AttentionTap
from .families import adapter_for
from .generation import Generation, generate_from_prompt
from .multiturn import ChatGeneration
from .multiturn import chat as chat_turn
from .pruning import PrunedPrompt, prune_prompt

__all__ = ["PrunedVLM", "load_image"]


def load_image(path: str | os.PathLike):
    """Open an image file as RGB, with a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise AsymVLMError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise AsymVLMError(f"cannot read {path} as an image: {exc}") from None


class PrunedVLM:
    """A transformers VLM with AsymVLM's vision pruning and text eviction: the reference path.

    Parameters
    ----------
    model : a supported ``*ForConditionalGeneration`` (see :data:`~.families.SUPPORTED_ARCHITECTURES`)
    processor : its processor
    config : AsymVLMConfig or VisionPruningConfig, optional
        Budget rule, ranker and scorer; the default keeps everything (keep ratio 1.0).
    ranker : VisionTokenRanker, optional
        Overrides the config's ranker.
    """

    def __init__(self, model, processor, config: AsymVLMConfig | VisionPruningConfig | None = None,
                 ranker: VisionTokenRanker | None = None):
        self.model = model.requires_grad_(False)  # frozen: only a scorer's weight is ever trained
        self.processor = processor
        self.adapter = adapter_for(model)
        vision = config.vision if isinstance(config, AsymVLMConfig) else config
        if vision is None:
            vision = VisionPruningConfig(budget=UniformBudget(1.0), ranker="cosine")
        self.vision_config = vision
        self.budget: BudgetRule = vision.budget if vision.enabled else UniformBudget(1.0)
        hidden = model.get_input_embeddings().weight.shape[-1]
        self.ranker = ranker if ranker is not None else vision.make_ranker(expected_hidden_size=hidden)
        self._tap: AttentionTap | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, config: AsymVLMConfig | VisionPruningConfig | str | None = None,
                        *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                        ranker: VisionTokenRanker | None = None) -> PrunedVLM:
        """Load a local model directory (no hub access) with SDPA attention.

        Phi-3.5-Vision runs on :mod:`.phi3v` (no remote model code); its processor *is* remote
        code in the directory, so it needs ``trust_remote_code=True``.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise AsymVLMError(f"{model_dir} is not a model directory (no config.json)")
        if isinstance(config, (str, os.PathLike)):
            config = AsymVLMConfig.load(config)
        kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
        phi3v = "Phi3VForCausalLM" in (json.loads((model_dir / "config.json").read_text()).get("architectures") or [])
        if phi3v and not trust_remote_code:
            raise AsymVLMError(f"{model_dir}: Phi-3.5-Vision's processor is remote code in the model directory "
                               "(processing_phi3_v.py); load it with trust_remote_code=True (--trust-remote-code) "
                               "if you trust that directory")
        processor = AutoProcessor.from_pretrained(model_dir, **kwargs)
        if phi3v:
            from .phi3v import load_phi3v

            model = load_phi3v(model_dir, dtype=dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                                **kwargs)
        return cls(model.eval(), processor, config, ranker)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[-1])

    @property
    def tap(self) -> AttentionTap:
        """The attention tap (installed on first use; outputs stay identical to SDPA)."""
        if self._tap is None:
            self._tap = AttentionTap(self.model)
        return self._tap

    def process(self, images: Sequence, questions: Sequence[str]):
        """Processor batch for one image and one question per sample (left padding)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        texts = []
        for q in questions:
            if not isinstance(q, str) or not q.strip():
                raise AsymVLMError("the question is empty; AsymVLM scores image tokens against the question's text")
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            texts.append(self.adapter.render(self.processor, msgs, add_generation_prompt=True))
        return self.adapter.tokenise(self.processor, texts, [[img] for img in images])

    def image_features(self, inputs) -> list:
        """Projector outputs per image of a processor batch, list of (P_i, D): run the vision
        tower once and pass the result to several :meth:`prune` calls on the same inputs."""
        with torch.inference_mode():
            return self.adapter.image_features(self.model, inputs)

    def prune(self, inputs, budget: BudgetRule | Sequence[BudgetRule] | None = None,
              drop: Sequence | None = None, features: Sequence | None = None) -> PrunedPrompt:
        """The pruned language-model input for a processor batch (see :func:`.pruning.prune_prompt`)."""
        with torch.inference_mode():
            return prune_prompt(self.model, self.adapter, inputs, self.ranker,
                                budget if budget is not None else self.budget,
                                self.vision_config.min_keep, drop, features)

    def generate(self, inputs, max_new_tokens: int = 32, budget: BudgetRule | Sequence[BudgetRule] | None = None,
                 eviction: EvictionPolicy | None = None) -> Generation:
        """Prune, prefill the shorter prompt, and decode greedily (optionally evicting text)."""
        prompt = self.prune(inputs, budget)
        return self.generate_from(prompt, max_new_tokens, eviction)

    def generate_from(self, prompt: PrunedPrompt, max_new_tokens: int = 32,
                      eviction: EvictionPolicy | None = None) -> Generation:
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {tok.eos_token_id}
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return generate_from_prompt(self.model, prompt, max_new_tokens, frozenset(eos), pad, eviction,
                                    self.tap if eviction is not None else None, self.adapter.uses_mrope)

    def chat(self, messages: Sequence[dict], images: Sequence = (), max_new_tokens: int = 32,
             budget: BudgetRule | None = None, multi_turn: MultiTurnEviction | None = None,
             eviction: EvictionPolicy | None = None) -> ChatGeneration:
        """Answer the last user turn of a multi-turn conversation.

        Parameters
        ----------
        messages : list of dict
            Chat messages ``{"role": "system" | "user" | "assistant", "content": str or
            list of parts}`` (parts ``{"type": "text", "text": ...}`` or ``{"type": "image"}``),
            ending with the user turn to answer; previous answers are assistant messages.
        images : list of PIL images
            One per image part, in conversation order.
        max_new_tokens : int
        budget : BudgetRule, optional
            Vision budget (default: the configured one).
        multi_turn : MultiTurnEviction, optional
            Drops whole previous answers before prefill, least similar to the current turn's
            images first (all the conversation's images if the current turn has none).
        eviction : EvictionPolicy, optional
            Text eviction while generating.

        Returns
        -------
        ChatGeneration
            With the previous answers' token spans and the indices of the dropped ones.
        """
        return chat_turn(self, messages, list(images), max_new_tokens, budget, multi_turn, eviction)
