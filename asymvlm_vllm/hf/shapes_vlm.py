"""A tiny LLaVA trained here on the shapes task (:mod:`.shapes`): the model whose answers can be right.

Architecture: LLaVA-1.5 at toy scale: a CLIP vision tower (hidden 64, 2 layers, 8-px patches of
a 64-px image: 64 vision tokens), a GELU MLP projector, and a Llama language model (hidden 128,
2 layers, 4 heads, 2 KV heads), with a byte-level BPE tokenizer whose merges include the task's
words. It is saved as a standard Hugging Face directory that transformers and
``vllm serve --plugin asymvlm`` load unchanged.

Training (:func:`train_shapes_vlm`) is next-token cross-entropy on the answer tokens (and the
end-of-sequence token) of the chat prompt ``USER: <image>\\n{question}\\nASSISTANT:``, every
parameter trained from scratch, AdamW with a linear warm-up and a cosine decay. Plain
cross-entropy alone sits on a plateau for longer than the 15-minute budget: the language model
cannot learn to look up the asked shape before the vision tower tells shapes apart, and the
tower gets no signal to tell them apart before the lookup works. Three training-only devices
break that (see :func:`_loss`): a curriculum (one shape per image, then two, then the task's
four), a linear probe that reads each cell's shape and colour from the projector's output, and
a loss on where two attention heads look (the first layer's at the question's key word, the last
layer's at the answer's cells). None of them is in the saved model,
a plain LLaVA. Step ``k``'s batch is train items ``k·B … k·B + B − 1``, so a run is a pure
function of its settings (and thread count), and a checkpoint (weights, the probe, AdamW's
moments, the step) resumes it exactly.

The trained checkpoint ships in the package (:func:`shipped_model_dir`); :func:`accuracy`
measures any model on the task through the reference path, pruned or not.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.budget import BudgetRule, UniformBudget
from ..core.errors import AsymVLMError
from ..core.rankers import VisionTokenRanker
from . import shapes

__all__ = [
    "SHIPPED_MODEL",
    "ShapesTrainingSettings",
    "TrainingRun",
    "accuracy",
    "build_shapes_vlm",
    "load_training_checkpoint",
    "pixel_values",
    "shipped_config",
    "shipped_model_dir",
    "shipped_scorer",
    "train_shapes_vlm",
    "write_card",
]

SHIPPED_MODEL = "shapes_vlm"
"""Folder of the trained checkpoint in ``asymvlm_vllm.assets``."""
CARD = "card.json"
CHECKPOINT_FORMAT = "asymvlm-shapes-vlm-checkpoint"


def _shipped(name: str, what: str, marker: str = "") -> Path:
    """``asymvlm_vllm/assets/name``; :class:`AsymVLMError` if it (or ``name/marker``) is missing."""
    path = Path(str(resources.files("asymvlm_vllm.assets") / name))
    if not (path / marker if marker else path).is_file():
        raise AsymVLMError(f"the shipped shapes {what} is missing: {path}; reinstall asymvlm-vllm")
    return path


def shipped_model_dir() -> Path:
    """The trained shapes VLM that ships in the package (a Hugging Face model directory)."""
    return _shipped(SHIPPED_MODEL, "VLM", marker="config.json")


def _corpus() -> list[str]:
    from .tiny import CORPUS

    lines = [f"USER: {q}\nASSISTANT: {a}" for q in shapes.question_vocabulary() for a in shapes.answer_vocabulary()]
    return CORPUS + lines


def build_shapes_vlm(seed: int = 0):
    """The untrained model and its processor, in memory.

    Returns
    -------
    (LlavaForConditionalGeneration, LlavaProcessor)
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from .tiny import LLAVA_TEMPLATE, _hf_tokenizer, _llama_text, _tid, build_tokenizer

    tok = build_tokenizer(_corpus())
    hf_tok = _hf_tokenizer(tok, LLAVA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                           unk_token="<unk>", image_token="<image>")
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=shapes.IMAGE_SIZE, patch_size=shapes.CELL, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_text(tok, initializer_range=0.02),
                      image_token_index=_tid(tok, "<image>"), vision_feature_layer=-1,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=shapes.GRID * shapes.GRID)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": shapes.IMAGE_SIZE},
                            crop_size={"height": shapes.IMAGE_SIZE, "width": shapes.IMAGE_SIZE},
                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=shapes.CELL,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return model, proc


def pixel_values(images: np.ndarray) -> Tensor:
    """What the processor makes of 64-px task images, without it: (B, 3, 64, 64) float32.

    Parameters
    ----------
    images : np.ndarray, shape (B, 64, 64, 3), uint8
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 255.0 - 0.5) / 0.5


@dataclass(frozen=True)
class ShapesTrainingSettings:
    """Knobs of :func:`train_shapes_vlm` (the defaults produced the shipped checkpoint)."""

    steps: int = 4500
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    attention_weight: float = 0.5
    """Weight of the attention term of :func:`_loss`; 0 turns it off."""
    cell_weight: float = 0.5
    """Weight of the per-cell probe term of :func:`_loss`; 0 turns it off."""
    curriculum: tuple[tuple[float, int], ...] = ((0.1, 1), (0.25, 2))
    """``(fraction of the steps, shapes per image)``: until that fraction of the run, images hold
    that many shapes (fewer distractors, so the model first learns to read a shape's colour at
    all, then to pick the asked one); after the last entry, :data:`~.shapes.NUM_OBJECTS`."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "seed", "warmup_steps"):
            value = getattr(self, name)
            low = 0 if name in ("seed", "warmup_steps") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise AsymVLMError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("learning_rate", "weight_decay", "attention_weight", "cell_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise AsymVLMError(f"{name} must be a finite number >= 0, got {value!r}")

        stages = self.curriculum
        if not (isinstance(stages, tuple) and all(
                isinstance(st, tuple) and len(st) == 2 and isinstance(st[0], (int, float)) and 0 < st[0] <= 1
                and isinstance(st[1], int) and 1 <= st[1] <= len(shapes.SHAPES) for st in stages)):
            raise AsymVLMError(f"curriculum must be a tuple of (fraction in (0, 1], shapes 1..{len(shapes.SHAPES)}) "
                               f"pairs, got {stages!r}")

    def objects_at(self, step: int) -> int:
        """Shapes per image of step ``step``'s batch."""
        for fraction, objects in self.curriculum:
            if step < fraction * self.steps:
                return objects
        return shapes.NUM_OBJECTS

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 0."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Prompts:
    """Token ids of every (question, answer) pair of the task, tokenized once."""

    def __init__(self, processor):
        tok = processor.tokenizer
        image = np.zeros((shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), np.uint8)
        self.prompt: dict[str, list[int]] = {}
        for q in shapes.question_vocabulary():
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            self.prompt[q] = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        # Where the question names what to look for (the shape, or the colour of a count question).
        self.key_word: dict[str, int] = {}
        for q, ids in self.prompt.items():
            word = q.rstrip("?").split()[2] if q.startswith("how many") else q.rstrip("?").split()[-1]
            (token,) = tok(" " + word, add_special_tokens=False)["input_ids"]
            self.key_word[q] = max(i for i, t in enumerate(ids) if t == token)
        eos = tok.eos_token_id
        # Generated after "ASSISTANT:" as a chat answer: a leading space, then end of sequence.
        self.answer = {a: tok(" " + a, add_special_tokens=False)["input_ids"] + [eos] for a in shapes.answer_vocabulary()}
        self.pad = tok.pad_token_id

    def batch(self, items: Sequence[shapes.ShapesItem]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` (B, T), and ``labels`` (B, T) with
        the answer's tokens at the positions that predict them, −100 elsewhere."""
        rows = [(self.prompt[it.question], self.answer[it.answer]) for it in items]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for b, (p, a) in enumerate(rows):
            seq = p + a
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            labels[b, len(p) - 1:len(seq) - 1] = torch.tensor(a)
        return ids, mask, labels


def _looked_at(item: shapes.ShapesItem) -> tuple[int, ...]:
    """The cells that hold the answer: the asked shape, or the shapes of the asked colour."""
    if item.kind == "colour" or (item.kind == "exists" and item.answer == "yes"):
        return item.relevant[:1]
    if item.kind == "count":
        return item.relevant[:int(item.answer)]
    return ()


def _cell_labels(items: Sequence[shapes.ShapesItem]) -> Tensor:
    """Per item and cell, the shape (0 = none, 1… = :data:`~.shapes.SHAPES`) and the colour
    (0 = none, 1… = :data:`~.shapes.COLOURS`): (B, 64, 2) int64."""
    labels = torch.zeros(len(items), shapes.GRID * shapes.GRID, 2, dtype=torch.long)
    colours = list(shapes.COLOURS)
    for b, item in enumerate(items):
        for shape, colour, cell in item.objects:
            labels[b, cell, 0] = shapes.SHAPES.index(shape) + 1
            labels[b, cell, 1] = colours.index(colour) + 1
    return labels


CELL_CLASSES = len(shapes.SHAPES) + 1 + len(shapes.COLOURS) + 1


def _loss(model, prompts: _Prompts, items: Sequence[shapes.ShapesItem], settings: ShapesTrainingSettings,
          probe: torch.nn.Linear | None = None) -> tuple[Tensor, Tensor]:
    """The training loss of one batch, and per item whether every answer token is the argmax.

    The loss is the mean cross-entropy over answer tokens, plus two training-only terms that
    break the plateau in which neither the vision features nor the language model's lookup can
    improve without the other:

    * ``cell_weight`` × the cross-entropy of a linear probe (``probe``, discarded after
      training) that reads each cell's shape and colour from the projector's output row;
    * ``attention_weight`` × ``−log`` of the attention that two heads at the position that
      predicts the answer pay to where the answer is: the first layer's first head to the
      question's key word (the shape, or the colour counted), the last layer's first head to
      the answer's cells.
    """
    ids, mask, labels = prompts.batch(items)
    pixels = pixel_values(np.stack([it.image for it in items]))
    features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features  # (B, 64, D)
    image_token = model.config.image_token_index
    embeds = model.get_input_embeddings()(ids.masked_fill(ids == image_token, 0))
    embeds = embeds.masked_scatter((ids == image_token)[..., None], features.to(embeds.dtype))
    supervise_attention = settings.attention_weight > 0
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, output_attentions=supervise_attention)
    hidden = out.last_hidden_state
    where = labels != -100
    logits = model.lm_head(hidden[where])
    target = labels[where]
    loss = torch.nn.functional.cross_entropy(logits.float(), target)
    if probe is not None and settings.cell_weight > 0:
        cells = _cell_labels(items)
        scores = probe(features.float())
        n_shapes = len(shapes.SHAPES) + 1
        shape_loss = torch.nn.functional.cross_entropy(scores[..., :n_shapes].flatten(0, 1), cells[..., 0].flatten())
        colour_loss = torch.nn.functional.cross_entropy(scores[..., n_shapes:].flatten(0, 1), cells[..., 1].flatten())
        loss = loss + settings.cell_weight * (shape_loss + colour_loss)
    if supervise_attention:
        first, last = out.attentions[0][:, 0], out.attentions[-1][:, 0]  # (B, T, T)
        terms = []
        for b, item in enumerate(items):
            query = int((labels[b] != -100).nonzero()[0])
            terms.append(-torch.log(first[b, query, prompts.key_word[item.question]].float() + 1e-6))
            answer_cells = _looked_at(item)
            if answer_cells:
                image_positions = (ids[b] == image_token).nonzero().flatten()
                mass = last[b, query, image_positions[list(answer_cells)]].sum()
                terms.append(-torch.log(mass.float() + 1e-6))
        loss = loss + settings.attention_weight * torch.stack(terms).mean()
    hit = torch.zeros_like(labels, dtype=torch.bool)
    hit[where] = logits.argmax(-1) == target
    return loss, (hit | ~where).all(dim=1)


@dataclass
class TrainingRun:
    """What :func:`train_shapes_vlm` did.

    Attributes
    ----------
    steps : int
        Steps taken in all, resumed ones included.
    seconds : float
        Wall time of this call (a resumed run adds the checkpoint's ``seconds_before``).
    loss_history : list of float
        Per step, the batch's loss.
    checkpoints : list of Path
    """

    steps: int
    seconds: float
    loss_history: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def _save_checkpoint(path: Path, trainable: torch.nn.Module, optimizer, step: int, settings: ShapesTrainingSettings,
                     history: list[float], seconds: float) -> Path:
    from safetensors.torch import save_file

    tensors = {f"weights.{k}": v.detach().contiguous() for k, v in trainable.state_dict().items()}
    names = {id(p): n for n, p in trainable.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.ndim > 0:
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.contiguous()
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "settings": json.dumps(asdict(settings)),
            "loss_history": json.dumps(history), "seconds": repr(seconds)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def load_training_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """The tensors and metadata of a training checkpoint; :class:`AsymVLMError` if it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AsymVLMError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise AsymVLMError(f"cannot read {path} as a safetensors checkpoint: {exc}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise AsymVLMError(f"{path} is not a shapes-VLM training checkpoint")
    return tensors, meta


def train_shapes_vlm(settings: ShapesTrainingSettings = ShapesTrainingSettings(), *,
                     checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 250,
                     resume: str | os.PathLike | None = None, progress: bool = True,
                     on_step: Callable[[int, float], None] | None = None):
    """Train the shapes VLM from scratch on 2 CPU cores or more (see the module docstring).

    Parameters
    ----------
    settings : ShapesTrainingSettings
    checkpoint_dir : where ``step-XXXXXX.safetensors`` go (none without it); the last step
        always gets one.
    checkpoint_every : int
    resume : a checkpoint of a run with the same settings: continue it exactly.
    progress : a tqdm bar with the running loss and batch accuracy.
    on_step : called as ``on_step(step, loss)`` after every step.

    Returns
    -------
    (model, processor, TrainingRun)
    """
    from tqdm import tqdm

    model, processor = build_shapes_vlm(settings.seed)
    prompts = _Prompts(processor)
    probe = torch.nn.Linear(model.config.text_config.hidden_size, CELL_CLASSES)  # training only, not saved
    trainable = torch.nn.ModuleDict({"model": model, "probe": probe})
    named = list(trainable.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.learning_rate,
                                  betas=(0.9, 0.98))
    step, history, seconds_before = 0, [], 0.0
    if resume is not None:
        tensors, meta = load_training_checkpoint(resume)
        stored = json.loads(meta["settings"])
        stored["curriculum"] = tuple(tuple(stage) for stage in stored.get("curriculum", ()))
        theirs = ShapesTrainingSettings(**stored)
        if theirs != settings:
            raise AsymVLMError(f"cannot resume {resume}: it was trained with {theirs}, not {settings}")
        step = int(meta["step"])
        trainable.load_state_dict({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")})
        params = dict(trainable.named_parameters())
        for name, p in params.items():
            state = {key: tensors[f"optim.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq")
                     if f"optim.{name}.{key}" in tensors}
            if state:
                optimizer.state[p] = dict(state, step=torch.tensor(float(step)))
        history, seconds_before = json.loads(meta["loss_history"]), float(meta["seconds"])
    written: list[Path] = []
    if settings.attention_weight > 0:
        model.set_attn_implementation("eager")  # SDPA returns no attention weights
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=settings.steps, initial=step, desc="train-tiny-vlm", unit="step", disable=not progress,
               dynamic_ncols=True)
    recent: list[float] = []
    try:
        while step < settings.steps:
            first = step * settings.batch_size
            objects = settings.objects_at(step)
            items = [shapes.make_item(shapes.SPLIT_SEEDS["train"] + 100 * settings.seed, i, num_objects=objects)
                     for i in range(first, first + settings.batch_size)]
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate_at(step)
            loss, hits = _loss(model, prompts, items, settings, probe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            history.append(float(loss.detach()))
            recent = (recent + [float(hits.float().mean())])[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.3f}", acc=f"{np.mean(recent):.3f}")
            if on_step is not None:
                on_step(step, history[-1])
            elapsed = seconds_before + time.perf_counter() - start
            if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == settings.steps):
                written.append(_save_checkpoint(Path(checkpoint_dir) / f"step-{step:06d}.safetensors", trainable,
                                                optimizer, step, settings, history, elapsed))
    finally:
        bar.close()
    model.eval()
    model.set_attn_implementation("sdpa")
    run = TrainingRun(steps=step, seconds=seconds_before + time.perf_counter() - start, loss_history=history,
                      checkpoints=written)
    return model, processor, run


def save_shapes_vlm(model, processor, out: str | os.PathLike) -> Path:
    """Write a Hugging Face model directory (safetensors weights in the hub layout)."""
    from .tiny import _save

    out = Path(out)
    _save(out, model, processor, processor.tokenizer, processor.chat_template)
    return out


def write_card(out: str | os.PathLike, card: dict) -> Path:
    """Write a model directory's ``card.json`` (how it was trained and how well it answers)."""
    path = Path(out) / CARD
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def accuracy(vlm, items: Sequence[shapes.ShapesItem], budget: BudgetRule | None = None,
             ranker: VisionTokenRanker | Callable[[shapes.ShapesItem], VisionTokenRanker] | None = None,
             min_keep: int = 1, batch_size: int = 32, max_new_tokens: int = 4) -> dict:
    """Greedy answers of ``vlm`` (a :class:`~asymvlm_vllm.hf.PrunedVLM`) on task items, scored.

    Parameters
    ----------
    items : the task items
    budget : the vision budget (default keep everything)
    ranker : a ranker, or a function of the item giving one (the answer-cell oracle), or None
        for ``vlm.ranker``
    min_keep : vision tokens kept at least, per image

    Returns
    -------
    dict
        ``accuracy`` (float), ``answers`` (list of str), ``correct`` (list of bool),
        ``keep_ratios`` and ``gaps`` (per item), ``kept_relevant`` (per item, whether the
        first relevant cell was kept).
    """
    from .pruning import prune_prompt

    budget = budget if budget is not None else UniformBudget(1.0)
    answers, keep_ratios, gaps, kept_first = [], [], [], []
    tok = vlm.processor.tokenizer
    per_item = callable(ranker) and not hasattr(ranker, "score")
    step = 1 if per_item else batch_size
    for i in range(0, len(items), step):
        chunk = items[i:i + step]
        inputs = vlm.process([it.pil_image() for it in chunk], [it.question for it in chunk])
        rank = ranker(chunk[0]) if per_item else (ranker if ranker is not None else vlm.ranker)
        with torch.inference_mode():
            prompt = prune_prompt(vlm.model, vlm.adapter, inputs, rank, budget, min_keep)
        generation = vlm.generate_from(prompt, max_new_tokens)
        for b, it in enumerate(chunk):
            answers.append(tok.decode(generation.tokens[b], skip_special_tokens=True).strip())
            image = prompt.images[b][0]
            keep_ratios.append(float(image.decision.num_keep) / float(image.prunable.sum()))
            gaps.append(float(image.decision.gap))
            kept = image.kept_prunable
            kept_first.append(bool(kept[it.relevant[0]]) if it.relevant else True)
    correct = [shapes.is_correct(a, it.answer) for a, it in zip(answers, items)]
    return {"accuracy": float(np.mean(correct)) if correct else float("nan"), "answers": answers,
            "correct": correct, "keep_ratios": keep_ratios, "gaps": gaps, "kept_relevant": kept_first}


# Beside the model directory, not in it: vLLM loads every *.safetensors file in a model directory
# as weights, and a scorer's "weight" tensor there stops the server from starting.
SHIPPED_SCORER = "shapes_scorer.safetensors"
SHIPPED_CONFIG = "shapes_asymvlm.yaml"


def shipped_scorer() -> Path:
    """The learned scorer file shipped for the shapes VLM (``asymvlm_vllm/assets/shapes_scorer.safetensors``)."""
    return _shipped(SHIPPED_SCORER, "scorer")


def shipped_config() -> Path:
    """The AsymVLM config shipped for the shapes VLM: its learned scorer and calibrated budget."""
    return _shipped(SHIPPED_CONFIG, "config")
