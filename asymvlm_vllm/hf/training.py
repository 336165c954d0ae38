"""Offline scorer training (the paper's Appendix C/D) on the transformers reference path.

The model is frozen; the only trainable tensor is the scorer's per-dimension weight ``w``
(D,), initialised to 1 (plain cosine). For each sample the language model runs twice on the
full, unpruned prompt followed by the teacher-forced answer:

(a) baseline, without gradients;
(b) with the soft score mask of Appendix C added to the attention logits of every LM layer at
    the image's prunable vision positions: ``s = score_vision_tokens(v, t, w)``,
    ``m = soft_score_mask(s, keep_ratio, C, τ)``.

The loss is the mean over text positions (prompt and answer, every non-vision token) of the
squared l2 distance (summed over the D hidden dims) between the last-layer hidden states of
(b) and (a), plus ``λ‖w − 1‖²``. AdamW (no weight decay: the ``λ`` term already pulls ``w``
toward 1) updates ``w`` one sample at a time (batch size 1), then ``w`` is clamped to
[0, 3]. The sample order of each epoch is a permutation drawn from ``(seed, epoch)``, so a
run is a pure function of its seed, and a checkpoint (``w``, AdamW's moments, the position
in the schedule) resumes it exactly.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.budget import UniformBudget
from ..core.errors import AsymVLMError
from ..core.positions import text_query_mask
from ..core.rankers import CosineRanker, LearnedRanker
from ..core.scorer_file import SCORER_WEIGHT_RANGE, ScorerMetadata, ScorerTraining
from ..core.scoring import score_vision_tokens
from ..core.selection import soft_score_mask
from .data import Sample, samples_fingerprint
from .fidelity import hidden_state_discrepancy
from .pruning import language_model_inputs, prune_prompt

__all__ = [
    "COMPARED_STATES",
    "MAX_ANSWER_TOKENS",
    "TrainingCheckpoint",
    "TrainingPrompt",
    "TrainingResult",
    "TrainingSettings",
    "answer_text",
    "epoch_order",
    "heldout_discrepancy",
    "load_checkpoint",
    "prepare_training_prompt",
    "sample_loss",
    "save_checkpoint",
    "scorer_metadata",
    "soft_mask_bias",
    "train_scorer",
    "training_objective",
]

COMPARED_STATES = ("text", "answer")
"""Which hidden states the training loss compares (:attr:`TrainingSettings.compared`)."""

MAX_ANSWER_TOKENS = 64
"""Longer answers are cut to this many tokens (VQA answers are a few words)."""

CHECKPOINT_FORMAT = "asymvlm-scorer-checkpoint"
_CHECKPOINT_KEY = "asymvlm_checkpoint"


@dataclass(frozen=True)
class TrainingSettings:
    """The knobs of a training run; defaults are Appendix D's (keep ratio is ours to choose).

    Attributes
    ----------
    epochs : int ≥ 1
    learning_rate : float > 0
        AdamW's, on ``w``.
    keep_ratio : float in (0, 1]
        Fraction of vision tokens the soft mask keeps (its threshold ``θ``).
    mask_strength : float > 0
        ``C``: a masked-out token gets up to ``−C`` added to its attention logits.
    mask_temperature : float > 0
        ``τ`` of the mask's sigmoid.
    weight_regularization : float ≥ 0
        ``λ`` of ``λ‖w − 1‖²``.
    seed : int ≥ 0
        Decides every epoch's sample order.
    compared : ``"text"`` or ``"answer"``
        Which last-layer hidden states the loss compares: every text position, prompt and
        answer (Appendix C, the default), or only the positions that predict the answer (the
        prompt's last token and the answer's tokens but the last).
    """

    epochs: int = 3
    learning_rate: float = 1e-3
    keep_ratio: float = 0.5
    mask_strength: float = 5.0
    mask_temperature: float = 1.0
    weight_regularization: float = 1e-3
    seed: int = 0
    compared: str = "text"

    def __post_init__(self):
        checks = [
            ("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "an integer >= 1"),
            ("learning_rate", _finite(self.learning_rate) and self.learning_rate > 0, "a number > 0"),
            ("keep_ratio", _finite(self.keep_ratio) and 0 < self.keep_ratio <= 1, "in (0, 1]"),
            ("mask_strength", _finite(self.mask_strength) and self.mask_strength > 0, "a number > 0"),
            ("mask_temperature", _finite(self.mask_temperature) and self.mask_temperature > 0, "a number > 0"),
            ("weight_regularization", _finite(self.weight_regularization) and self.weight_regularization >= 0,
             "a number >= 0"),
            ("seed", isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
            ("compared", self.compared in COMPARED_STATES, f"one of {', '.join(COMPARED_STATES)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise AsymVLMError(f"training setting {name} must be {expected}, got {getattr(self, name)!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TrainingPrompt:
    """One sample as the language model sees it during training: full prompt + answer, batch 1.

    Attributes
    ----------
    inputs_embeds : Tensor, shape (1, T, D)
        Unpruned prompt (vision rows = projector outputs) followed by the answer's embeddings.
    attention_mask : Tensor, shape (1, T)
    position_ids : Tensor, shape (1, T) or (3, 1, T) for M-RoPE
    token_type_ids : Tensor or None, shape (1, T)
    vision_positions : list of Tensor, shape (N_i,)
        Per image, the positions of its prunable rows (where the soft mask goes).
    vision : list of Tensor, shape (N_i, D)
        Those rows (``v`` of Eq. 1).
    text_query : Tensor, shape (L, D)
        The prompt's text-query embeddings (``t`` of Eq. 1; the answer is not part of it).
    text_positions : Tensor, shape (T_text,)
        Every non-vision position, prompt and answer: where the default loss is measured.
    answer_positions : Tensor, shape (A,)
        The positions that predict the answer's A tokens: the prompt's last, then the
        answer's but its last.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    token_type_ids: Tensor | None
    vision_positions: list[Tensor]
    vision: list[Tensor]
    text_query: Tensor
    text_positions: Tensor
    answer_positions: Tensor

    def forward_kwargs(self) -> dict:
        return dict(language_model_inputs(self.inputs_embeds, self.attention_mask, self.position_ids,
                                          self.token_type_ids), use_cache=False)


def prepare_training_prompt(vlm, sample: Sample) -> TrainingPrompt:
    """Process one sample, run the vision tower, and append the teacher-forced answer.

    Parameters
    ----------
    vlm : PrunedVLM
    sample : Sample

    Returns
    -------
    TrainingPrompt
    """
    model, device = vlm.model, vlm.model.device
    inputs = vlm.process([sample.load_image()], [sample.question]).to(device)
    with torch.no_grad():
        # Keep-all: the prompt's embeddings, positions and image placement, unpruned.
        prompt = prune_prompt(model, vlm.adapter, inputs, CosineRanker(), UniformBudget(1.0), 1)
        # Tokenized on its own and appended right after the generation prompt, as generated.
        answer_ids = vlm.processor.tokenizer(answer_text(vlm, sample.question, sample.answer),
                                             add_special_tokens=False)["input_ids"][:MAX_ANSWER_TOKENS]
        if not answer_ids:
            raise AsymVLMError(f"{sample.source}: the answer {sample.answer!r} tokenizes to nothing")
        answer_ids = torch.tensor([answer_ids], dtype=torch.long, device=device)
        answer_embeds = model.get_input_embeddings()(answer_ids).to(prompt.inputs_embeds.dtype)
    ids = prompt.input_ids[0]
    length, answer_len = int(ids.shape[0]), int(answer_ids.shape[1])
    embeds = prompt.inputs_embeds[:, -length:]  # batch 1: no left padding, but be exact
    placeholders = prompt.vision_mask(0)
    vision_positions, vision_rows = [], []
    for image in prompt.images[0]:
        pos = image.positions[image.prunable.to(image.positions.device)]
        vision_positions.append(pos)
        vision_rows.append(embeds[0, pos].clone())
    text = text_query_mask(ids, placeholders, vlm.adapter.structure_token_ids(model))
    answer_pos = prompt.next_positions[0] + torch.arange(answer_len, device=device)
    if prompt.position_ids.ndim == 3:  # M-RoPE: the answer continues on all three axes
        position_ids = torch.cat([prompt.position_ids[:, :, -length:], answer_pos.expand(3, 1, answer_len)], dim=-1)
    else:
        position_ids = torch.cat([prompt.position_ids[:, -length:], answer_pos[None]], dim=-1)
    token_types = None
    if prompt.token_type_ids is not None:
        token_types = torch.cat([prompt.token_type_ids[:, -length:], torch.zeros_like(answer_ids)], dim=-1)
    not_vision = torch.cat([~placeholders, torch.ones(answer_len, dtype=torch.bool, device=device)])
    return TrainingPrompt(
        inputs_embeds=torch.cat([embeds, answer_embeds], dim=1).clone(),
        attention_mask=torch.ones(1, length + answer_len, dtype=torch.long, device=device),
        position_ids=position_ids.clone(),
        token_type_ids=token_types,
        vision_positions=vision_positions,
        vision=vision_rows,
        text_query=embeds[0, text].clone(),
        text_positions=not_vision.nonzero().flatten(),
        answer_positions=torch.arange(length - 1, length + answer_len - 1, device=device),
    )


def answer_text(vlm, question: str, answer: str) -> str:
    """``answer`` as the chat template writes it after the generation prompt.

    Some templates put a space before the answer (LLaVA's ``ASSISTANT: blue``): for a
    byte-level BPE tokenizer `` blue`` and ``blue`` are different tokens, and the model
    generates the first. The template renders the conversation with the answer as the
    assistant's turn; what follows the generation prompt, up to the answer's end, is the text to
    teacher-force. A template that does not render it so gets the bare answer.
    """
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    try:
        prompt = vlm.adapter.render(vlm.processor, user, add_generation_prompt=True)
        full = vlm.adapter.render(vlm.processor, user + [{"role": "assistant", "content": answer}],
                                  add_generation_prompt=False)
    except Exception:  # templates differ; the bare answer is the safe fallback
        return answer
    rest = full[len(prompt):] if full.startswith(prompt) else ""
    end = rest.find(answer)
    return rest[:end + len(answer)] if end >= 0 and not rest[:end].strip() else answer


def soft_mask_bias(prompt: TrainingPrompt, weight: Tensor, settings: TrainingSettings) -> Tensor:
    """The attention-logit bias of pass (b): zero except the soft mask at vision positions.

    Parameters
    ----------
    prompt : TrainingPrompt
    weight : Tensor, shape (D,), float32 (gradients flow back to it)
    settings : TrainingSettings

    Returns
    -------
    Tensor, shape (1, T), float32, values in [−C, 0].
    """
    length = prompt.inputs_embeds.shape[1]
    bias = torch.zeros(1, length, dtype=torch.float32, device=prompt.inputs_embeds.device)
    for positions, vision in zip(prompt.vision_positions, prompt.vision):
        if positions.numel() == 0:
            continue
        scores = score_vision_tokens(vision, prompt.text_query, weight)
        mask = soft_score_mask(scores, settings.keep_ratio, settings.mask_strength, settings.mask_temperature)
        bias = bias.index_put((torch.zeros_like(positions), positions), mask)
    return bias


def _text_hidden(vlm, prompt: TrainingPrompt, compared: str = "text") -> Tensor:
    hidden = vlm.model.model(**prompt.forward_kwargs()).last_hidden_state
    positions = prompt.answer_positions if compared == "answer" else prompt.text_positions
    return hidden[0, positions].float()


def sample_loss(vlm, prompt: TrainingPrompt, weight: Tensor, settings: TrainingSettings) -> tuple[Tensor, Tensor]:
    """The training loss of one sample (differentiable in ``weight`` only).

    Returns
    -------
    loss : Tensor, shape (), float32
        ``discrepancy + λ‖w − 1‖²``.
    discrepancy : Tensor, shape (), float32, detached
        Mean over the compared positions (:attr:`TrainingSettings.compared`) of
        ``‖h_masked − h_baseline‖²`` (last layer, summed over D).
    """
    with torch.no_grad():
        baseline = _text_hidden(vlm, prompt, settings.compared)
    with vlm.tap.bias(soft_mask_bias(prompt, weight, settings)):
        masked = _text_hidden(vlm, prompt, settings.compared)
    discrepancy = (masked - baseline).pow(2).sum(-1).mean()
    loss = discrepancy + settings.weight_regularization * (weight - 1).pow(2).sum()
    return loss, discrepancy.detach()


class _FrozenModel:
    """Turns off gradients of every model parameter inside the block, then restores them."""

    def __init__(self, model):
        self.flags = [(p, p.requires_grad) for p in model.parameters()]

    def __enter__(self):
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)


def training_objective(vlm, samples: Sequence[Sample], weight: Tensor | None, settings: TrainingSettings) -> float:
    """The training loss of ``weight`` (``None``: w = 1) averaged over ``samples``, no update.

    Used for the loss before/after training; the soft mask makes it an optimistic stand-in
    for real pruning, see :func:`heldout_discrepancy` for that.
    """
    w = _weight_on(vlm, weight)
    losses = []
    with _FrozenModel(vlm.model), torch.no_grad():
        for sample in samples:
            loss, _ = sample_loss(vlm, prepare_training_prompt(vlm, sample), w, settings)
            losses.append(float(loss))
    return float(np.mean(losses)) if losses else float("nan")


def _weight_on(vlm, weight: Tensor | None) -> Tensor:
    if weight is None:
        return torch.ones(vlm.hidden_size, dtype=torch.float32, device=vlm.model.device)
    if weight.shape != (vlm.hidden_size,):
        raise AsymVLMError(f"weight has shape {tuple(weight.shape)}, the model's hidden size is {vlm.hidden_size}")
    return weight.detach().to(device=vlm.model.device, dtype=torch.float32)


def heldout_discrepancy(vlm, samples: Sequence[Sample], weight: Tensor | None, keep_ratio: float) -> float:
    """The held-out objective: hidden-state discrepancy under REAL (hard) pruning.

    For each sample (batch 1, prompt without answer), the mean over text tokens and hidden
    dims of ``(h_pruned − h_full)²`` (:func:`.fidelity.hidden_state_discrepancy`), pruning with
    a :class:`~asymvlm_vllm.core.LearnedRanker` of ``weight`` and ``UniformBudget(keep_ratio)``;
    averaged over the samples.

    Parameters
    ----------
    vlm : PrunedVLM (its own ranker is not used: ``weight`` ranks the tokens)
    samples : held-out samples
    weight : Tensor, shape (D,), or None for w = 1 (cosine)
    keep_ratio : float in (0, 1]

    Returns
    -------
    float
    """
    if not samples:
        raise AsymVLMError("heldout_discrepancy needs at least one sample")
    ranker = LearnedRanker(_weight_on(vlm, weight))
    values = []
    for sample in samples:
        inputs = vlm.process([sample.load_image()], [sample.question]).to(vlm.model.device)
        values.append(float(hidden_state_discrepancy(vlm, inputs, UniformBudget(keep_ratio), ranker)[0]))
    return float(np.mean(values))


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation (num_samples,) drawn from ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


@dataclass
class TrainingCheckpoint:
    """Everything a run needs to continue exactly where it stopped.

    Attributes
    ----------
    weight, exp_avg, exp_avg_sq : Tensor, shape (D,), float32
        ``w`` and AdamW's first and second moments.
    step : int
        Optimizer steps taken.
    epoch, position : int
        The next sample is ``epoch_order(..., epoch)[position]``.
    settings : TrainingSettings
    num_samples : int
    data_fingerprint : str
        :func:`~.data.samples_fingerprint` of the training samples.
    architecture : str
    hidden_size : int
    loss_history : list of float
        Per step, the loss of that step's sample.
    dataset : str or None
    """

    weight: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: int
    epoch: int
    position: int
    settings: TrainingSettings
    num_samples: int
    data_fingerprint: str
    architecture: str
    hidden_size: int
    loss_history: list[float] = field(default_factory=list)
    dataset: str | None = None


def save_checkpoint(path: str | os.PathLike, checkpoint: TrainingCheckpoint) -> Path:
    """Write a checkpoint as safetensors (tensors + JSON metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {k: v for k, v in asdict(checkpoint).items() if k not in ("weight", "exp_avg", "exp_avg_sq")}
    meta["format"] = CHECKPOINT_FORMAT
    tensors = {name: getattr(checkpoint, name).detach().float().cpu().contiguous()
               for name in ("weight", "exp_avg", "exp_avg_sq")}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_CHECKPOINT_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> TrainingCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`AsymVLMError` if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AsymVLMError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise AsymVLMError(f"{path} is not a safetensors checkpoint: {exc}") from None
    try:
        meta = json.loads(header[_CHECKPOINT_KEY])
        if meta.pop("format") != CHECKPOINT_FORMAT:
            raise KeyError("format")
        meta["settings"] = TrainingSettings(**meta["settings"])
        return TrainingCheckpoint(weight=tensors["weight"], exp_avg=tensors["exp_avg"],
                                  exp_avg_sq=tensors["exp_avg_sq"], **meta)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise AsymVLMError(f"{path} is not an asymvlm train-scorer checkpoint (bad or missing {exc})") from None


@dataclass
class TrainingResult:
    """What a run produced.

    Attributes
    ----------
    weight : Tensor, shape (D,), float32, on the CPU, within [0, 3]
    loss_history : list of float
        Per optimizer step (of the whole run, resumed part included).
    steps : int
    final_loss : float
        Mean loss of the last epoch's steps.
    checkpoints : list of Path
        Checkpoints written by this call.
    """

    weight: Tensor
    loss_history: list[float]
    steps: int
    final_loss: float
    checkpoints: list[Path] = field(default_factory=list)


def _check_resume(checkpoint: TrainingCheckpoint, settings: TrainingSettings, fingerprint: str,
                  num_samples: int, architecture: str, hidden_size: int) -> None:
    problems = []
    for name, ours in asdict(settings).items():
        theirs = getattr(checkpoint.settings, name)
        if theirs != ours:
            problems.append(f"{name} {theirs!r} (this run: {ours!r})")
    if checkpoint.architecture != architecture or checkpoint.hidden_size != hidden_size:
        problems.append(f"model {checkpoint.architecture} with hidden size {checkpoint.hidden_size} "
                        f"(this run: {architecture}, {hidden_size})")
    if checkpoint.num_samples != num_samples or checkpoint.data_fingerprint != fingerprint:
        problems.append(f"other training data ({checkpoint.num_samples} samples, this run has {num_samples} "
                        "or differs in content)")
    if problems:
        raise AsymVLMError("cannot resume: the checkpoint was made with " + "; ".join(problems))


def train_scorer(
    vlm,
    samples: Sequence[Sample],
    settings: TrainingSettings = TrainingSettings(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: TrainingCheckpoint | str | os.PathLike | None = None,
    dataset: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train the scorer weight ``w`` (see the module docstring for the procedure).

    Parameters
    ----------
    vlm : PrunedVLM
        Frozen during the call (its parameters' ``requires_grad`` are restored after).
    samples : the training samples (batch size 1: one optimizer step per sample).
    settings : TrainingSettings
    checkpoint_dir : folder for checkpoints ``step-XXXXXXX.safetensors``; none are written without it.
    checkpoint_every : int, optional
        Also checkpoint every this many steps (one is always written at the end of each epoch).
    resume : a checkpoint (or its path) of a run with the same settings, model and data.
    dataset : recorded in checkpoints.
    progress : show a tqdm bar with the running loss.
    on_step : called as ``on_step(step, loss)`` after every step.

    Returns
    -------
    TrainingResult
    """
    from tqdm import tqdm

    if not samples:
        raise AsymVLMError("no training samples")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise AsymVLMError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    device = vlm.model.device
    architecture, hidden = type(vlm.model).__name__, vlm.hidden_size
    fingerprint = samples_fingerprint(list(samples))
    num = len(samples)

    weight = torch.ones(hidden, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([weight], lr=settings.learning_rate, weight_decay=0.0)
    step, epoch, position, history = 0, 0, 0, []
    if resume is not None:
        ckpt = resume if isinstance(resume, TrainingCheckpoint) else load_checkpoint(resume)
        _check_resume(ckpt, settings, fingerprint, num, architecture, hidden)
        with torch.no_grad():
            weight.copy_(ckpt.weight.to(device))
        state = optimizer.state_dict()
        state["state"] = {0: {"step": torch.tensor(float(ckpt.step)), "exp_avg": ckpt.exp_avg.clone(),
                              "exp_avg_sq": ckpt.exp_avg_sq.clone()}}
        optimizer.load_state_dict(state)
        step, epoch, position, history = ckpt.step, ckpt.epoch, ckpt.position, list(ckpt.loss_history)

    written: list[Path] = []

    def checkpoint(next_epoch: int, next_position: int) -> None:
        if checkpoint_dir is None:
            return
        moments = optimizer.state.get(weight, {})
        zeros = torch.zeros_like(weight)
        ckpt = TrainingCheckpoint(
            weight=weight.detach(), exp_avg=moments.get("exp_avg", zeros), exp_avg_sq=moments.get("exp_avg_sq", zeros),
            step=step, epoch=next_epoch, position=next_position, settings=settings, num_samples=num,
            data_fingerprint=fingerprint, architecture=architecture, hidden_size=hidden,
            loss_history=history, dataset=dataset,
        )
        try:
            written.append(save_checkpoint(Path(checkpoint_dir) / f"step-{step:07d}.safetensors", ckpt))
        except OSError as exc:
            raise AsymVLMError(f"cannot write a checkpoint to {checkpoint_dir}: {exc}") from None

    lo, hi = SCORER_WEIGHT_RANGE
    bar = tqdm(total=settings.epochs * num, initial=step, desc="train-scorer", unit="sample",
               disable=not progress, dynamic_ncols=True)
    try:
        with _FrozenModel(vlm.model):
            for e in range(epoch, settings.epochs):
                order = epoch_order(num, settings.seed, e)
                for p in range(position if e == epoch else 0, num):
                    prompt = prepare_training_prompt(vlm, samples[int(order[p])])
                    loss, _ = sample_loss(vlm, prompt, weight, settings)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        weight.clamp_(lo, hi)
                    step += 1
                    history.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(epoch=e + 1, loss=f"{np.mean(history[-50:]):.4g}")
                    if on_step is not None:
                        on_step(step, history[-1])
                    if checkpoint_every is not None and step % checkpoint_every == 0 and p + 1 < num:
                        checkpoint(e, p + 1)
                checkpoint(e + 1, 0)
    finally:
        bar.close()
    last_epoch = history[-num:] if history else []
    return TrainingResult(
        weight=weight.detach().cpu().clone(),
        loss_history=history,
        steps=step,
        final_loss=float(np.mean(last_epoch)) if last_epoch else float("nan"),
        checkpoints=written,
    )


def scorer_metadata(vlm, settings: TrainingSettings, num_samples: int, final_loss: float | None,
                    dataset: str | None) -> ScorerMetadata:
    """The metadata of a trained scorer file for ``vlm``."""
    return ScorerMetadata(
        architecture=type(vlm.model).__name__,
        hidden_size=vlm.hidden_size,
        training=ScorerTraining(
            samples=num_samples, epochs=settings.epochs, learning_rate=settings.learning_rate,
            keep_ratio=settings.keep_ratio, mask_strength=settings.mask_strength,
            mask_temperature=settings.mask_temperature, weight_regularization=settings.weight_regularization,
            seed=settings.seed, dataset=dataset, compared=settings.compared, objective="soft-mask hidden states",
            final_loss=final_loss if final_loss is not None and math.isfinite(final_loss) else None,
        ),
    )
