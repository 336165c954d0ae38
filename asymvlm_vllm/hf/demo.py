"""``asymvlm demo``: one pruned generation, explained with measured numbers and two figures.

With no model it runs the shapes VLM that ships in the package (a tiny LLaVA trained here on
the shapes task, :mod:`.shapes_vlm`) with its learned scorer and calibrated budget, on the
bundled task image and question: offline on any machine, with an answer that can be checked. It
then shows what a position-only ranker does to the same question (spiral at keep 0.25). With
``model_dir`` it does the same pruning and measuring for a local checkpoint of any supported
family, by default on the bundled sample chart.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..core.budget import BudgetRule, LinearBudget, ThresholdBudget, UniformBudget, num_tokens_to_keep
from ..core.config import AsymVLMConfig, VisionPruningConfig, list_presets
from ..core.errors import AsymVLMError
from ..core.flops import prefill_flops
from ..core.rankers import SpiralRanker
from .families import SUPPORTED_ARCHITECTURES, HeatmapLayout
from .model import PrunedVLM, load_image
from .pruning import ImageDecision, PrunedPrompt
from .shapes import is_correct

__all__ = ["CONTRAST_KEEP_RATIO", "DEFAULT_OUTPUT_DIR", "DemoReport", "ImageReport", "format_report", "run_demo",
           "sample_question", "shapes_sample"]

DEFAULT_OUTPUT_DIR = Path("asymvlm-demo")
DEFAULT_PRESET = "llava-1.5"
SHIPPED_ARCHITECTURE = "LlavaForConditionalGeneration"
SAMPLE_IMAGE = "<bundled sample.png>"
SHAPES_IMAGE = "<bundled shapes.png>"
CONTRAST_KEEP_RATIO = 0.25
"""The default demo also answers with the spiral ranker at this keep ratio: what a bad ranker does."""
# Architectures whose model directory carries remote (processor) code: they load only when
# the user passes --trust-remote-code; the demo never turns it on by itself.
_NEEDS_REMOTE_CODE = frozenset({"Phi3VForCausalLM"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ImageReport:
    """What AsymVLM decided for one image."""

    vision_tokens: int  # placeholder rows of the image in the prompt
    prunable_tokens: int  # rows that may be pruned (structural rows are always kept)
    importance_gap: float
    keep_ratio: float
    ratio_reason: str
    num_keep: int  # decision.num_keep, kept prunable rows
    kept_rows: int  # rows the language model receives (num_keep + structural rows)
    grid_shape: list[int] | None


@dataclass
class DemoReport:
    """Every number ``asymvlm demo`` prints (and writes as JSON)."""

    model_dir: str
    architecture: str
    shipped_model: bool  # the trained shapes VLM of the package
    image: str
    image_size: list[int]  # (width, height)
    question: str
    config_source: str
    budget: str
    ranker: str
    min_keep: int
    images: list[ImageReport]
    vision_tokens_in: int
    vision_tokens_kept: int
    lm_tokens_unpruned: int
    lm_tokens_pruned: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    flops_unpruned: int
    flops_pruned: int
    flops_saved_fraction: float
    prefill_seconds_unpruned: float
    prefill_seconds_pruned: float
    prefill_repetitions: int
    answer: str
    answer_token_ids: list[int]
    max_new_tokens: int
    expected_answer: str | None = None  # the bundled shapes question's answer
    correct: bool | None = None
    answer_cell_kept: bool | None = None
    contrast: dict | None = None  # the spiral ranker at CONTRAST_KEEP_RATIO on the same prompt
    heatmap_path: str | None = None
    mask_path: str | None = None
    json_path: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        """Pruned over unpruned prefill FLOPs."""
        return self.flops_pruned / self.flops_unpruned

    @property
    def prefill_time_ratio(self) -> float:
        """Pruned over unpruned median CPU prefill time."""
        return self.prefill_seconds_pruned / self.prefill_seconds_unpruned

    def to_dict(self) -> dict:
        data = asdict(self)
        data["flops_ratio"] = self.flops_ratio
        data["prefill_time_ratio"] = self.prefill_time_ratio
        return data


def sample_question() -> str:
    """The bundled question about the bundled sample image."""
    return json.loads((resources.files("asymvlm_vllm.assets") / "sample.json").read_text())["question"]


def shapes_sample() -> tuple[object, str, str, int]:
    """The bundled shapes-task image, its question, its answer and the answer's cell."""
    from PIL import Image

    meta = json.loads((resources.files("asymvlm_vllm.assets") / "shapes.json").read_text())
    with resources.as_file(resources.files("asymvlm_vllm.assets") / "shapes.png") as path:
        with Image.open(path) as img:
            picture = img.convert("RGB")
    return picture, meta["question"], meta["answer"], int(meta["answer_cell"])


def _sample_image():
    from PIL import Image

    with resources.as_file(resources.files("asymvlm_vllm.assets") / "sample.png") as path:
        with Image.open(path) as img:
            return img.convert("RGB")


def _architecture(model_dir: Path, trust_remote_code: bool = False) -> str:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise AsymVLMError(f"{model_dir} is not a model directory (no config.json)")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise AsymVLMError(f"cannot read {config_file}: {exc}") from None
    supported = sorted(SUPPORTED_ARCHITECTURES)
    if not architectures or architectures[0] not in supported:
        found = architectures[0] if architectures else "no architectures entry"
        raise AsymVLMError(f"{config_file}: {found} is not supported by asymvlm demo; supported: {', '.join(supported)}")
    if architectures[0] in _NEEDS_REMOTE_CODE and not trust_remote_code:
        raise AsymVLMError(f"{model_dir}: {architectures[0]}'s processor is remote code in the model directory; "
                           "pass --trust-remote-code to run it, if you trust that directory")
    return architectures[0]


def _preset_for(architecture: str) -> str:
    for name in list_presets():
        if architecture in AsymVLMConfig.from_preset(name).architectures:
            return name
    return DEFAULT_PRESET


def ratio_reason(budget: BudgetRule, gap: float) -> str:
    """Why ``budget`` gives its keep ratio at ``gap`` (the tier of a threshold rule)."""
    if isinstance(budget, ThresholdBudget):
        if gap < budget.gap_low:
            return f"gap < gap_low {budget.gap_low:g}: conservative tier"
        if gap < budget.gap_high:
            return f"gap_low {budget.gap_low:g} <= gap < gap_high {budget.gap_high:g}: moderate tier"
        return f"gap >= gap_high {budget.gap_high:g}: aggressive tier"
    if isinstance(budget, LinearBudget):
        return "linear rule"
    if isinstance(budget, UniformBudget):
        return "uniform rule"
    return type(budget).__name__


def _resolve_config(config: AsymVLMConfig | str | os.PathLike | None, keep_ratio: float | None,
                    architecture: str, shipped: bool) -> tuple[VisionPruningConfig, str]:
    if config is None and shipped:
        from .shapes_vlm import shipped_config

        path = shipped_config()
        resolved, source = AsymVLMConfig.load(path), f"shipped {path.name} (learned scorer, calibrated budget)"
    elif config is None:
        name = _preset_for(architecture)
        resolved, source = AsymVLMConfig.from_preset(name), f"preset {name}"
    elif isinstance(config, AsymVLMConfig):
        resolved, source = config, "given config"
    else:
        resolved = AsymVLMConfig.load(config)
        source = f"file {config}" if Path(str(config)).is_file() else f"preset {config}"
    vision = resolved.vision
    if not vision.enabled:
        source += " (vision pruning disabled: keeps everything)"
    if keep_ratio is not None:
        # A forced ratio means exactly floor(N * R) tokens: the config's min_keep floor would hide it.
        vision = vision.model_copy(update={"budget": UniformBudget(keep_ratio), "min_keep": 1, "enabled": True})
        source += f", overridden by --keep-ratio {keep_ratio:g}"
    return vision, source


def _check_keep_ratio(keep_ratio: float | None) -> None:
    if keep_ratio is not None and not (math.isfinite(keep_ratio) and 0.0 < keep_ratio <= 1.0):
        raise AsymVLMError(f"--keep-ratio must be in (0, 1], got {keep_ratio}")


def _prefill(model, prompt: PrunedPrompt) -> None:
    model(**prompt.model_inputs(), use_cache=False, logits_to_keep=1)


def _median_prefill_seconds(model, unpruned: PrunedPrompt, pruned: PrunedPrompt, repetitions: int) -> tuple[float, float]:
    """Median wall time of the language-model prefill (vision encoder excluded, it runs once for both)."""
    times: dict[str, list[float]] = {"unpruned": [], "pruned": []}
    with torch.inference_mode():
        _prefill(model, unpruned)  # warm-up: first calls allocate and pick kernels
        _prefill(model, pruned)
        for i in range(repetitions):
            # Alternate the order so drift (thermal, other processes) hits both alike.
            order = (("unpruned", unpruned), ("pruned", pruned)) if i % 2 == 0 else (("pruned", pruned), ("unpruned", unpruned))
            for name, prompt in order:
                start = time.perf_counter()
                _prefill(model, prompt)
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["unpruned"]), statistics.median(times["pruned"])


def _image_grids(decision: ImageDecision, layout: HeatmapLayout | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(h, w) scores and kept mask of the image's rows that ``layout`` draws, or None when its
    tokens form no grid."""
    if layout is None or not 2 <= len(layout.grid) <= 3:
        return None
    grid = layout.grid
    drawn = math.prod(grid)
    if drawn > decision.decision.num_tokens or (layout.undrawn is None and drawn != decision.decision.num_tokens):
        return None
    scores = decision.scores.float().cpu()[:drawn].reshape(grid)
    kept = decision.kept_prunable[:drawn].reshape(grid)
    if len(grid) == 3:  # (t, h, w): average over time for the picture
        scores, kept = scores.mean(0), kept.any(0)
    return scores, kept


def run_demo(
    model_dir: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    question: str | None = None,
    config: AsymVLMConfig | str | os.PathLike | None = None,
    keep_ratio: float | None = None,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    max_new_tokens: int = 24,
    repetitions: int = 5,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> DemoReport:
    """Prune one image prompt, generate, measure, and write the figures and a JSON report.

    Parameters
    ----------
    model_dir : local model directory; None uses the shapes VLM shipped in the package
    image : image file; None uses the bundled image: the shapes-task image for the shipped
        model, the sample chart for ``model_dir`` (then ``question`` may be None too)
    question : the question; None uses the bundled one, which is only valid for the bundled image
    config : AsymVLMConfig, YAML file or preset name; None picks the shipped model's config
        (learned scorer, calibrated budget) or the preset of ``model_dir``'s architecture
    keep_ratio : forces ``UniformBudget(keep_ratio)`` with ``min_keep = 1``
    output_dir : where ``heatmap.png``, ``mask.png`` and ``report.json`` go
    max_new_tokens : greedy decoding length limit
    repetitions : prefill timings per prompt; the medians are reported
    dtype : ``float32``, ``bfloat16`` or ``float16`` weights (the demo runs on CPU)
    trust_remote_code : run the processor code shipped in ``model_dir`` (Phi-3.5-Vision needs it);
        off unless the user turns it on

    Returns
    -------
    DemoReport
    """
    from ..plots import save_importance_heatmap, save_keep_mask

    if question is not None and not question.strip():
        raise AsymVLMError("the question is empty; AsymVLM scores image tokens against the question's text")
    if image is not None and question is None:
        raise AsymVLMError("--image needs --question: the bundled question is about the bundled sample image")
    _check_keep_ratio(keep_ratio)
    if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise AsymVLMError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if repetitions < 1:
        raise AsymVLMError(f"--repeats must be >= 1, got {repetitions}")
    if dtype not in _DTYPES:
        raise AsymVLMError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    shipped = model_dir is None
    expected = answer_cell = None
    if image is not None:
        picture = load_image(image)
    elif shipped:
        picture, bundled_question, bundled_answer, bundled_cell = shapes_sample()
        if question is None:
            question, expected, answer_cell = bundled_question, bundled_answer, bundled_cell
    else:
        picture = _sample_image()
    question = question if question is not None else sample_question()

    # Every input is checked before a checkpoint is loaded.
    architecture = SHIPPED_ARCHITECTURE if shipped else _architecture(Path(model_dir), trust_remote_code)
    vision, config_source = _resolve_config(config, keep_ratio, architecture, shipped)
    if shipped:
        from .shapes_vlm import shipped_model_dir

        model_path = shipped_model_dir()
    else:
        model_path = Path(model_dir)
    vlm = PrunedVLM.from_pretrained(model_path, vision, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)

    inputs = vlm.process([picture], [question])
    features = vlm.image_features(inputs)  # one vision-tower pass for both prompts
    pruned = vlm.prune(inputs, features=features)
    unpruned = vlm.prune(inputs, budget=UniformBudget(1.0), features=features)
    if unpruned.lm_lengths != pruned.prompt_lengths:
        raise RuntimeError(f"keep-all prompt has {unpruned.lm_lengths} tokens, the original {pruned.prompt_lengths}")
    generation = vlm.generate_from(pruned, max_new_tokens)
    answer_ids = generation.tokens[0]
    answer = vlm.processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()

    text = vlm.model.config.get_text_config()
    dims = dict(hidden_size=int(text.hidden_size), intermediate_size=int(text.intermediate_size),
                num_layers=int(text.num_hidden_layers))
    lm_unpruned, lm_pruned = pruned.prompt_lengths[0], pruned.lm_lengths[0]
    flops_unpruned = prefill_flops(lm_unpruned, dims["hidden_size"], dims["intermediate_size"], dims["num_layers"])
    flops_pruned = prefill_flops(lm_pruned, dims["hidden_size"], dims["intermediate_size"], dims["num_layers"])
    seconds_unpruned, seconds_pruned = _median_prefill_seconds(vlm.model, unpruned, pruned, repetitions)

    decisions = pruned.images[0]
    images = [
        ImageReport(
            vision_tokens=int(d.positions.shape[0]), prunable_tokens=int(d.prunable.sum()),
            importance_gap=float(d.decision.gap), keep_ratio=float(d.decision.keep_ratio),
            ratio_reason=ratio_reason(vlm.budget, float(d.decision.gap)),
            num_keep=d.decision.num_keep, kept_rows=int(d.kept_rows.sum()),
            grid_shape=list(d.grid_shape) if d.grid_shape is not None else None,
        )
        for d in decisions
    ]
    report = DemoReport(
        model_dir=str(model_path), architecture=architecture, shipped_model=shipped,
        image=str(image) if image is not None else (SHAPES_IMAGE if shipped else SAMPLE_IMAGE), image_size=list(picture.size), question=question,
        config_source=config_source, budget=vlm.budget.describe(), ranker=str(vision.ranker),
        min_keep=int(vision.min_keep), images=images,
        vision_tokens_in=pruned.vision_tokens[0], vision_tokens_kept=pruned.vision_tokens_kept[0],
        lm_tokens_unpruned=lm_unpruned, lm_tokens_pruned=lm_pruned, **dims,
        flops_unpruned=flops_unpruned, flops_pruned=flops_pruned,
        flops_saved_fraction=1.0 - flops_pruned / flops_unpruned,
        prefill_seconds_unpruned=seconds_unpruned, prefill_seconds_pruned=seconds_pruned,
        prefill_repetitions=repetitions, answer=answer, answer_token_ids=list(answer_ids),
        max_new_tokens=max_new_tokens,
    )
    if shipped:
        report.notes.append("a 2-layer, 128-wide model's prefill time is mostly per-call overhead, so its time "
                            "ratio lags the FLOPs ratio; a real model's prefill follows the FLOPs more closely")
    if expected is not None:
        report.expected_answer = expected
        report.correct = is_correct(answer, expected)
        report.answer_cell_kept = bool(decisions[0].kept_prunable[answer_cell])
        report.contrast = _contrast(vlm, inputs, features, max_new_tokens, expected, answer_cell)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = vlm.adapter.heatmap_layouts(vlm.model, inputs, features)[0] if len(decisions) == 1 else None
    grids = _image_grids(decisions[0], layout) if layout is not None else None
    if grids is None:
        report.notes.append(f"no heatmap: {architecture} image tokens form no single patch grid")
    else:
        scores, kept = grids
        drawn_picture = vlm.adapter.heatmap_picture(picture, layout)
        if max(drawn_picture.size) < 256:  # a 64-px task image: draw the figures at a size one can see
            from PIL import Image

            factor = -(-256 // max(drawn_picture.size))
            drawn_picture = drawn_picture.resize((drawn_picture.width * factor, drawn_picture.height * factor),
                                                 Image.Resampling.NEAREST)
        if layout.canvas is not None:  # the grid tiles the resized and padded picture
            report.notes.append(f"heatmap: the {scores.shape[0]} x {scores.shape[1]} patch grid of the "
                                f"{layout.canvas[1]} x {layout.canvas[0]} px image the processor made of the "
                                "picture (resized, then padded with white to whole crops), drawn over that image")
        report.heatmap_path = str(save_importance_heatmap(drawn_picture, scores, kept, out / "heatmap.png"))
        report.mask_path = str(save_keep_mask(kept, out / "mask.png", image=drawn_picture))
        if layout.undrawn is not None:
            rest = decisions[0].kept_prunable[math.prod(layout.grid):]
            report.notes.append(f"not in the heatmap: {layout.undrawn}; {int(rest.sum())} of {rest.numel()} kept")
    json_path = out / "report.json"
    report.json_path = str(json_path)
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _contrast(vlm, inputs, features, max_new_tokens: int, expected: str, answer_cell: int) -> dict:
    """The same prompt pruned by the spiral ranker at :data:`CONTRAST_KEEP_RATIO`: what a
    position-only ranker keeps, and what the model answers from it."""
    from .pruning import prune_prompt

    with torch.inference_mode():
        prompt = prune_prompt(vlm.model, vlm.adapter, inputs, SpiralRanker(), UniformBudget(CONTRAST_KEEP_RATIO), 1,
                              features=features)
    tokens = vlm.generate_from(prompt, max_new_tokens).tokens[0]
    answer = vlm.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    decision = prompt.images[0][0]
    return {"ranker": "spiral", "keep_ratio": CONTRAST_KEEP_RATIO, "vision_tokens_kept": decision.decision.num_keep,
            "answer_cell_kept": bool(decision.kept_prunable[answer_cell]), "answer": answer,
            "correct": is_correct(answer, expected)}


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def format_report(report: DemoReport) -> str:
    """The human-readable account of a :class:`DemoReport` that ``asymvlm demo`` prints."""
    if report.shipped_model:
        model = f"the shapes VLM trained for this package ({report.architecture}, {report.model_dir})"
    else:
        model = f"{report.architecture} from {report.model_dir}"
    width, height = report.image_size
    lines = [
        "AsymVLM demo",
        f"  model          {model}",
        f"  image          {report.image} ({width}x{height})",
        f"  question       {report.question}",
        f"  config         {report.config_source}",
        f"  budget         {report.budget}; min_keep {report.min_keep}; {report.ranker} ranker",
        "",
        "Vision pruning",
    ]
    for i, img in enumerate(report.images):
        prefix = f"  image {i}: " if len(report.images) > 1 else "  "
        grid = " x ".join(map(str, img.grid_shape)) + " grid" if img.grid_shape else "no single grid"
        structural = img.vision_tokens - img.prunable_tokens
        extra = f", {structural} structural always kept" if structural else ""
        lines.append(f"{prefix}vision tokens in   {img.vision_tokens} ({grid}{extra})")
        lines.append(f"{prefix}importance gap     {img.importance_gap:.4f}")
        floor = num_tokens_to_keep(img.prunable_tokens, img.keep_ratio, 0)
        count = f"floor({img.prunable_tokens} x {img.keep_ratio:g}) = {floor}"
        if img.num_keep > floor:
            count += (f", raised to min_keep {report.min_keep}" if img.num_keep == report.min_keep
                      else f", all {img.num_keep} kept (min_keep {report.min_keep})")
        lines.append(f"{prefix}keep ratio         {img.keep_ratio:g} ({img.ratio_reason}): {count}")
    kept_pct = 100.0 * report.vision_tokens_kept / max(report.vision_tokens_in, 1)
    lines += [
        f"  vision tokens kept {report.vision_tokens_kept} of {report.vision_tokens_in} ({kept_pct:.1f}%)",
        "",
        f"Language-model prefill (hidden {report.hidden_size}, MLP {report.intermediate_size}, "
        f"{report.num_layers} layers)",
        f"  LM input tokens    {report.lm_tokens_unpruned} unpruned -> {report.lm_tokens_pruned} pruned "
        f"({100.0 * (1 - report.lm_tokens_pruned / report.lm_tokens_unpruned):.1f}% fewer)",
        f"  prefill FLOPs      {_si(report.flops_unpruned)} -> {_si(report.flops_pruned)} "
        f"(ratio {report.flops_ratio:.3f}, {100.0 * report.flops_saved_fraction:.1f}% saved)",
        f"  CPU prefill time   {report.prefill_seconds_unpruned * 1e3:.2f} ms -> {report.prefill_seconds_pruned * 1e3:.2f} ms "
        f"(ratio {report.prefill_time_ratio:.3f}, median of {report.prefill_repetitions})",
        "",
        f"Answer (greedy, at most {report.max_new_tokens} new tokens, {len(report.answer_token_ids)} generated)",
        f"  {json.dumps(report.answer, ensure_ascii=False)}"
        + (f"  ({'right' if report.correct else 'WRONG'}: the answer is {json.dumps(report.expected_answer)}; "
           f"answer cell {'kept' if report.answer_cell_kept else 'dropped'})" if report.expected_answer else ""),
    ]
    if report.contrast is not None:
        c = report.contrast
        lines += ["", f"With a position-only ranker instead ({c['ranker']} at keep {c['keep_ratio']:g}, "
                      f"{c['vision_tokens_kept']} tokens kept)",
                  f"  {json.dumps(c['answer'], ensure_ascii=False)}  ({'right' if c['correct'] else 'wrong'}: "
                  f"answer cell {'kept' if c['answer_cell_kept'] else 'dropped'})"]
    if report.notes:
        lines += ["", "Notes"] + [f"  - {note}" for note in report.notes]
    lines += ["", "Files"]
    for name, path in (("heatmap", report.heatmap_path), ("mask", report.mask_path), ("report", report.json_path)):
        if path is not None:
            lines.append(f"  {name:8s} {path}")
    return "\n".join(lines)
