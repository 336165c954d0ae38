"""The engine's pruning decision against an independent float64 oracle.

For every tiny family the real in-process CPU engine (vLLM + the plugin, float32) decides a
batch of requests; a recorder on ``AsymVLMScheduler._apply_decision`` captures each request's
``RequestDecision``. The oracle recomputes every decision from scratch: the *transformers*
model of the same checkpoint loaded in float64 (its own vision tower + projector for the image
rows, LLaVA-NeXT's packed rows with their newline rows included; its input embedding table for
the text) and the loops of :mod:`tests.reference` (text query, cosine-max scores, importance
gap, budget rule, keep count, top-k). Nothing of ``asymvlm_vllm`` computes the expectation.
Phi-3.5-Vision has no transformers model: :class:`Phi3VOracle` computes its image rows in
float64 from the checkpoint's tensors (transformers' CLIP ViT-L/14-336 cut to the configured
layer, the HD layout written out as loops, the two-layer projector), its separator rows known by
construction and cross-checked by value against the separately projected ``sub_GN``/``glb_GN``.

Per image: the keep set (exactly; see :data:`TIE_ATOL` for the one allowed difference), the
gap (within :data:`GAP_ATOL`), the rule's ratio (exactly), the row counts.

Engines, one per family, each with its own rule:

* ``llava``: a threshold rule whose tiers split the tiny model's gaps, so that the batch meets
  all three tiers; two images in one prompt; an image at offset 0; every per-request option;
* ``llava_next``: its bundled preset (threshold; ``min_keep: 64`` binds: 64 > ⌊80 · 0.4⌋);
* ``qwen2_5_vl``: a linear rule, clamped at both ends and in between within the batch;
* ``gemma3``: a uniform rule, plus an image at offset 0 (soft tokens after ``\\n\\n<boi>``);
* ``phi3_v``: its bundled preset (threshold, ``min_keep: 64``) on images of 2 x 1, 1 x 2 and
  2 x 2 HD crops, ``trust_remote_code`` for its processor.

Cost: four engine builds (a few seconds each) and 27 requests, once per module: about 45 s on
two idle cores (70-110 s on a busy machine). In every run so far the keep sets were identical,
near-tie allowance unused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.reference import (
    budget_ratio_reference, decide_reference, keep_count_reference, request_rule_reference, top_k_reference,
)

from .helpers import EnginePool, chat_prompt, engine_image, greedy_params

pytestmark = pytest.mark.slow

KV_CACHE_BYTES = 96 * 2**20
MAX_TOKENS = 2
REPO_ROOT = Path(__file__).resolve().parents[2]

# The engine scores in float32 from vLLM's float32 vision tower; the oracle in float64 from
# transformers' float64 one. Observed score and gap differences are ~1e-7 (float32 rounding).
GAP_ATOL = 1e-5
# Keep sets must be equal, with one exception: float32 may order two rows whose float64 scores
# differ by less than TIE_ATOL the other way. Where such rows straddle the cut (the oracle's
# margin between the last kept and the first dropped score is below TIE_ATOL), the engine's set
# is accepted when it is a top-count set of the oracle scores up to TIE_ATOL: every kept score
# ≥ every dropped score − TIE_ATOL. Any other difference fails.
TIE_ATOL = 1e-5

QUESTION = "What is shown in this picture?"
CHART = "Which colour is the largest shape in the chart?"

# Structure token ids of the text query, by the transformers config attribute that holds them.
STRUCTURE_TOKEN_ATTRS = {
    "llava": (),
    "llava_next": (),
    "qwen2_5_vl": ("vision_start_token_id", "vision_end_token_id"),
    "gemma3": ("boi_token_index", "eoi_token_index"),
    "phi3_v": (),
}

# ---------------------------------------------------------------- rules and requests

# The tiny LLaVA's gaps are 0.03-0.07 (random weights): these tiers split them.
LLAVA_THRESHOLD = {"rule": "threshold", "gap_low": 0.052, "gap_high": 0.062,
                   "ratio_conservative": 0.6, "ratio_moderate": 0.45, "ratio_aggressive": 0.3}
# The tiny Qwen2.5-VL's gaps are 0.05-0.09: 0.5 - 5 (gap - 0.063), clamped to [0.42, 0.56].
QWEN_LINEAR = {"rule": "linear", "target_ratio": 0.5, "slope": -5.0, "gap_mean": 0.063,
               "min_ratio": 0.42, "max_ratio": 0.56}
GEMMA_UNIFORM = {"rule": "uniform", "ratio": 0.3}


@dataclass(frozen=True)
class Req:
    """One request: images by ``engine_image`` seed (unique per engine: no prefix-cache hits),
    the question, the ``asymvlm*`` extra args, and whether the raw prompt starts with the image."""

    name: str
    images: tuple[int, ...]
    question: str = QUESTION
    extra: tuple[tuple[str, Any], ...] = ()
    image_first: bool = False
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width) per image; none: 224 x 224 each

    def pil_images(self) -> list:
        sizes = self.sizes or ((224, 224),) * len(self.images)
        assert len(sizes) == len(self.images)
        return [engine_image(seed, h, w) for seed, (h, w) in zip(self.images, sizes)]


@dataclass(frozen=True)
class EngineSpec:
    config: dict | None  # None: the bundled preset for the architecture (read by the oracle from configs/)
    preset: str | None
    requests: tuple[Req, ...]


ENGINES = {
    "llava": EngineSpec({"vision": {"ranker": "cosine", "budget": LLAVA_THRESHOLD, "min_keep": 1}}, None, (
        Req("main", (20,)),                                               # conservative tier
        Req("two_images", (21, 22), CHART),                               # conservative + aggressive
        Req("moderate", (28,), CHART),                                    # moderate tier
        Req("image_first", (23,), image_first=True),                     # image at offset 0
        Req("keep_ratio", (24,), extra=(("asymvlm_keep_ratio", 0.4),)),  # no tier's ratio: the override shows
        Req("budget", (25,), extra=(("asymvlm_budget", "aggressive"),)),
        Req("min_keep", (26,), extra=(("asymvlm_min_keep", 40),)),        # 40 > ⌊64 · 0.45⌋
        Req("keep_ratio_min_keep", (27,), extra=(("asymvlm_keep_ratio", 0.25), ("asymvlm_min_keep", 20))),
    )),
    "llava_next": EngineSpec(None, "llava-next", (
        Req("main", (30,)),                                               # preset min_keep 64 binds
        Req("two_images", (31, 32), CHART),
        Req("keep_ratio", (33,), extra=(("asymvlm_keep_ratio", 0.9),)),
        Req("budget", (34,), extra=(("asymvlm_budget", "aggressive"),)),
        Req("min_keep", (35,), extra=(("asymvlm_min_keep", 2),)),         # releases the preset's floor
    )),
    "qwen2_5_vl": EngineSpec({"vision": {"ranker": "cosine", "budget": QWEN_LINEAR, "min_keep": 1}}, None, (
        Req("main", (40,)),
        Req("two_images", (41, 42), CHART),
        Req("chart", (47,), CHART),
        Req("budget_conservative", (43,), extra=(("asymvlm_budget", "conservative"),)),
        Req("budget_aggressive", (44,), extra=(("asymvlm_budget", "aggressive"),)),
        Req("min_keep", (45,), extra=(("asymvlm_min_keep", 50),)),
    )),
    "gemma3": EngineSpec({"vision": {"ranker": "cosine", "budget": GEMMA_UNIFORM, "min_keep": 1}}, None, (
        Req("main", (50,)),
        Req("two_images", (51, 52), CHART),
        Req("keep_ratio", (53,), extra=(("asymvlm_keep_ratio", 0.55),)),
        Req("budget", (54,), extra=(("asymvlm_budget", "moderate"),)),
        Req("min_keep", (55,), extra=(("asymvlm_min_keep", 30),)),        # 30 > ⌊64 · 0.3⌋
        Req("image_first", (56,), image_first=True),
        # A short question: here <boi>/<eoi>, if (wrongly) in the query, would move the gap.
        Req("short_question", (57,), "Hi"),
    )),
    # Tiny Phi-3-V gaps are ~0.05, below the preset's gap_low: its conservative ratio 0.5.
    "phi3_v": EngineSpec(None, "phi-3.5-vision", (
        Req("main", (60,), sizes=((128, 64),)),                           # 2 x 1 crops
        Req("two_images", (61, 62), CHART, sizes=((64, 128), (224, 224))),  # 1 x 2 and 2 x 2 crops
        Req("keep_ratio", (63,), extra=(("asymvlm_keep_ratio", 0.1),), sizes=((64, 128),)),  # preset floor 64 binds
        Req("budget", (64,), extra=(("asymvlm_budget", "aggressive"),), sizes=((128, 64),)),
    )),
}

CASES = [(family, req.name) for family, spec in ENGINES.items() for req in spec.requests]


def _configured(family: str) -> tuple[dict, int]:
    """The configured rule (a plain dict) and min_keep, as the oracle reads them."""
    spec = ENGINES[family]
    if spec.preset is not None:
        vision = yaml.safe_load((REPO_ROOT / "configs" / f"{spec.preset}.yaml").read_text())["vision"]
    else:
        vision = spec.config["vision"]
    return dict(vision["budget"]), int(vision["min_keep"])


def _request(family: str, name: str) -> Req:
    return next(r for r in ENGINES[family].requests if r.name == name)


def _prompt_text(processor, family: str, req: Req) -> str:
    if req.image_first:
        assert len(req.images) == 1
        if family == "gemma3":
            # Not "\n" after the image: the expansion ends in "<eoi>\n\n", and "\n\n" + "\n" would
            # tokenize as one "\n\n\n" token, which vLLM's Gemma 3 placeholder search does not find.
            return f"{processor.boi_token} USER: {req.question}\nASSISTANT:"
        return f"{processor.image_token}\nUSER: {req.question}\nASSISTANT:"
    return chat_prompt(processor, len(req.images), req.question)


# ---------------------------------------------------------------- the engine side


def _tag(request) -> str | None:
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
    return extra.get("test_tag")


@pytest.fixture(scope="module")
def decisions():
    """tag → the ``RequestDecision`` the scheduler applied (test-only hook, this module only)."""
    from asymvlm_vllm.engine.scheduler import AsymVLMScheduler

    captured: dict[str, Any] = {}
    apply_decision = AsymVLMScheduler._apply_decision

    def hook(self, request_id, decision):
        tag = _tag(self.requests.get(request_id))
        if tag is not None:
            captured[tag] = decision
        return apply_decision(self, request_id, decision)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AsymVLMScheduler, "_apply_decision", hook)
        yield captured


class _Engines(EnginePool):
    """One engine per family, built on first use, its whole batch run at once; all freed at the
    end of the module (as in ``test_asymvlm_engine``: one process-wide cleanup)."""

    def __init__(self, model_dirs):
        super().__init__(model_dirs)
        self.outputs: dict[str, dict[str, Any]] = {}

    def run(self, family: str, decide_with: str = "auto") -> dict[str, Any]:
        """Request name → ``RequestOutput`` of the family's batch, decided with ``decide_with``
        (``vision.decide_with``; on this CPU engine ``auto`` is the torch path)."""
        key = family if decide_with == "auto" else f"{family}@{decide_with}"
        if key not in self.outputs:
            spec = ENGINES[family]
            config = spec.config or spec.preset
            if decide_with != "auto":
                config = spec.config or yaml.safe_load((REPO_ROOT / "configs" / f"{spec.preset}.yaml").read_text())
                config = {**config, "vision": {**config["vision"], "decide_with": decide_with}}
            llm = self.build(key, family, config, KV_CACHE_BYTES)
            processor = self.processor(family)
            reqs = ENGINES[family].requests
            prompts, params = [], []
            for req in reqs:
                images = req.pil_images()
                prompts.append({"prompt": _prompt_text(processor, family, req),
                                "multi_modal_data": {"image": images[0] if len(images) == 1 else images}})
                tag = f"{family}/{req.name}" if decide_with == "auto" else f"{key}/{req.name}"
                params.append(greedy_params(MAX_TOKENS, extra_args={"test_tag": tag, **dict(req.extra)}))
            outputs = llm.generate(prompts, params, use_tqdm=False)
            self.outputs[key] = {r.name: o for r, o in zip(reqs, outputs)}
        return self.outputs[key]


@pytest.fixture(scope="module")
def engines(engine_models, decisions):
    with _Engines(engine_models) as pool:
        yield pool


# ---------------------------------------------------------------- the oracle side (transformers, float64)


@dataclass
class OracleInputs:
    input_ids: list[int]
    vision_mask: list[bool]
    structure_token_ids: list[int]
    embedding_table: np.ndarray  # (V, D) float64
    images: list[tuple[np.ndarray, list[bool]]]  # per image: (R, D) float64 rows, (R,) structural


@pytest.fixture(scope="module")
def hf_float64(engine_models):
    """family → the transformers model of the tiny checkpoint, in float64 (Phi-3-V: the oracle's
    own :class:`Phi3VOracle`)."""
    from transformers import AutoModelForImageTextToText

    cache: dict[str, Any] = {}

    def get(family: str):
        if family not in cache:
            if family == "phi3_v":
                cache[family] = Phi3VOracle(engine_models(family))
            else:
                cache[family] = AutoModelForImageTextToText.from_pretrained(
                    engine_models(family), dtype=torch.float64, local_files_only=True).eval()
        return cache[family]

    yield get
    cache.clear()


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    runs, start = [], None
    for i, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def _image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def _newline_rows_llava_next(model, inputs) -> list[list[bool]]:
    """Per image, which packed rows are ``image_newline``: transformers' own packing run on a
    one-channel marker (0 = patch feature, 1 = newline), so positions come from the packing,
    not from comparing values."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    markers = [torch.zeros(image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size),
                           side * side, 1, dtype=torch.float64) for size in inputs["image_sizes"]]
    packed, _ = model.model.pack_image_features(markers, inputs["image_sizes"], cfg.vision_feature_select_strategy,
                                                image_newline=torch.ones(1, dtype=torch.float64))
    return [[bool(x) for x in p[:, 0] == 1] for p in packed]


class Phi3VOracle:
    """Phi-3-V's image rows and embedding table in float64, from the checkpoint's tensors.

    In prompt order an image of ``h x w`` HD crops is: ``12·h`` rows of ``12·w`` merged patches
    of the crops (crop ``(i, j)`` covers grid rows ``12i..12i+11``, columns ``12j..12j+11``), each
    row followed by the newline ``sub_GN``; one ``glb_GN``; the 336-px global view's 12 rows of 12
    merged patches, each followed by ``sub_GN``. A merged patch is the CLIP features of a 2 x 2
    patch block, concatenated in the order (top left, top right, bottom left, bottom right). CLIP
    is transformers' ``CLIPVisionModel`` cut after ``img_processor.layer_idx`` (no final norm); the
    class token is dropped. Every row then goes through Linear → GELU → Linear."""

    CLIP_PREFIX = "model.vision_embed_tokens.img_processor.vision_model."

    def __init__(self, model_dir):
        import json

        from safetensors.torch import load_file
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = json.loads((Path(model_dir) / "config.json").read_text())
        weights = {k: v.to(torch.float64) for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
        layer_idx = config["img_processor"].get("layer_idx", -2)
        layers = 24 + layer_idx + 1 if layer_idx < 0 else layer_idx + 1
        self.clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=layers, patch_size=14,
            image_size=336, hidden_act="quick_gelu", layer_norm_eps=1e-5)).to(torch.float64).eval()
        clip_state = {k[len(self.CLIP_PREFIX):]: v for k, v in weights.items() if k.startswith(self.CLIP_PREFIX)}
        clip_state = {k: v for k, v in clip_state.items()
                      if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < layers}
        missing, unexpected = self.clip.load_state_dict(clip_state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        prefix = "model.vision_embed_tokens."
        self.sub_gn = weights[prefix + "sub_GN"].reshape(-1)
        self.glb_gn = weights[prefix + "glb_GN"].reshape(-1)
        self.projection = [(weights[f"{prefix}img_projection.{i}.weight"], weights[f"{prefix}img_projection.{i}.bias"])
                           for i in (0, 2)]
        self.embedding_table = weights["model.embed_tokens.weight"].numpy()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        (w1, b1), (w2, b2) = self.projection
        return torch.nn.functional.gelu(x @ w1.T + b1) @ w2.T + b2

    def image_rows(self, pixel_values: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, list[bool]]:
        """(R, D) float64 rows and (R,) separator flags of one image; ``pixel_values``: the
        processor's (crops, 3, 336, 336), the global view first, then the HD crops, then padding."""
        h, w = height // 336, width // 336
        assert (h * 336, w * 336) == (height, width)
        with torch.inference_mode():
            hidden = self.clip(pixel_values=pixel_values[: 1 + h * w].to(torch.float64)).last_hidden_state
        patches = hidden[:, 1:].reshape(-1, 24, 24, hidden.shape[-1])  # (1 + h·w, 24, 24, 1024)

        def merged(crop: int, r: int, c: int) -> torch.Tensor:
            return torch.cat([patches[crop, 2 * r, 2 * c], patches[crop, 2 * r, 2 * c + 1],
                              patches[crop, 2 * r + 1, 2 * c], patches[crop, 2 * r + 1, 2 * c + 1]])

        rows, separator = [], []
        for r in range(12 * h):
            for c in range(12 * w):
                rows.append(merged(1 + (r // 12) * w + c // 12, r % 12, c % 12))
                separator.append(False)
            rows.append(self.sub_gn)
            separator.append(True)
        rows.append(self.glb_gn)
        separator.append(True)
        for r in range(12):
            for c in range(12):
                rows.append(merged(0, r, c))
                separator.append(False)
            rows.append(self.sub_gn)
            separator.append(True)
        with torch.inference_mode():
            out = self.project(torch.stack(rows))
            # By value too: the separator rows are the separators projected on their own (float64:
            # equal to rounding), and no image row comes close to either.
            alone = self.project(torch.stack([self.sub_gn, self.glb_gn]))
        close = torch.stack([torch.isclose(out, s, rtol=1e-9, atol=1e-12).all(-1) for s in alone]).any(0)
        assert close.tolist() == separator
        return out, separator


def _oracle_inputs_phi3v(oracle: Phi3VOracle, processor, prompt: str, images: list) -> OracleInputs:
    """Phi-3-V: the processor marks image ``k``'s tokens ``-k``; vLLM writes ``<|image|>`` there."""
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    ids = inputs["input_ids"][0]
    vision_mask = ids < 0
    spans = _runs(vision_mask)
    assert len(spans) == len(images), spans
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image|>")
    ids = ids.masked_fill(vision_mask, image_token)
    out = []
    for (start, length), pixels, (height, width) in zip(spans, inputs["pixel_values"], inputs["image_sizes"].tolist(),
                                                       strict=True):
        rows, separator = oracle.image_rows(pixels, int(height), int(width))
        assert rows.shape[0] == length, (rows.shape, length)
        out.append((rows.numpy(), separator))
    return OracleInputs(ids.tolist(), vision_mask.tolist(), [], oracle.embedding_table, out)


def oracle_inputs(model, processor, family: str, prompt: str, images: list) -> OracleInputs:
    """Everything the oracle needs, from transformers only: the processor's prompt ids, the
    float64 vision tower + projector rows of each image, the float64 embedding table."""
    if family == "phi3_v":
        return _oracle_inputs_phi3v(model, processor, prompt, images)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    ids = inputs["input_ids"][0]
    vision_mask = ids == _image_token_id(model.config)  # every placeholder position (newline rows included)
    spans = _runs(vision_mask)
    assert len(spans) == len(images), (family, spans)
    kwargs = {"pixel_values": inputs["pixel_values"].to(torch.float64)}
    for key in ("image_sizes", "image_grid_thw"):
        if key in inputs:
            kwargs[key] = inputs[key]
    with torch.inference_mode():
        features = model.model.get_image_features(**kwargs, return_dict=True).pooler_output
    if isinstance(features, torch.Tensor):
        features = features.reshape(-1, features.shape[-1])
        features = list(torch.split(features, [length for _, length in spans]))
    features = [f.reshape(-1, f.shape[-1]) for f in features]
    assert [f.shape[0] for f in features] == [length for _, length in spans], family
    assert all(f.dtype == torch.float64 for f in features)
    if family == "llava_next":
        structural = _newline_rows_llava_next(model, inputs)
        newline = model.model.image_newline.detach()
        for f, mask in zip(features, structural):
            assert 0 < sum(mask) < len(mask)
            assert torch.equal(f[torch.tensor(mask)], newline.expand(sum(mask), -1))  # the packing put them there
    else:
        structural = [[False] * f.shape[0] for f in features]
    table = model.get_input_embeddings().weight.detach().to(torch.float64).numpy()
    structure = [int(getattr(model.config, attr)) for attr in STRUCTURE_TOKEN_ATTRS[family]]
    return OracleInputs(ids.tolist(), vision_mask.tolist(), structure, table,
                        [(f.numpy(), mask) for f, mask in zip(features, structural)])


# ---------------------------------------------------------------- comparing


@dataclass
class Checked:
    """One request, decided by the engine and by the oracle."""

    family: str
    req: Req
    inputs: OracleInputs
    expected: list[dict]  # decide_reference's per-image dicts
    actual: Any  # the engine's RequestDecision
    rule: dict  # the rule the request used (overrides applied)


def _boundaries(rule: dict) -> list[float]:
    return [rule["gap_low"], rule["gap_high"]] if rule["rule"] == "threshold" else []


def assert_image_matches(image, expected: dict, rule: dict, min_keep: int, what: str) -> None:
    n = len(expected["prunable"])
    assert (image.num_rows, image.num_prunable) == (expected["num_rows"], n), what

    # Gap: float32 engine vs float64 oracle.
    assert abs(image.gap - expected["gap"]) <= GAP_ATOL, f"{what}: gap {image.gap} vs oracle {expected['gap']}"

    # The rule's ratio: exactly the oracle's. A threshold tier may only be compared where the
    # oracle gap is clear of the tier boundaries by more than GAP_ATOL (a fixture property,
    # asserted so that it cannot silently change); a linear ratio moves with the gap itself, so
    # it must equal the rule at the engine's own gap exactly and the oracle's within |slope|·GAP_ATOL.
    assert all(abs(expected["gap"] - b) > GAP_ATOL for b in _boundaries(rule)), \
        f"{what}: oracle gap {expected['gap']} within {GAP_ATOL} of a tier boundary; pick another image"
    assert image.budget_ratio == budget_ratio_reference(rule, image.gap), what
    if rule["rule"] == "linear":
        slack = abs(rule["slope"]) * GAP_ATOL
        assert abs(image.budget_ratio - expected["ratio"]) <= slack, what
        # Likewise the count may only be compared where that slack cannot move ⌊n · ratio⌋.
        assert len({keep_count_reference(n, expected["ratio"] + d, min_keep) for d in (-slack, 0.0, slack)}) == 1, \
            f"{what}: n · ratio within the gap tolerance of an integer; pick another image"
    else:
        assert image.budget_ratio == expected["ratio"], \
            f"{what}: ratio {image.budget_ratio} vs oracle {expected['ratio']}"

    # Structural rows: all kept; never scored.
    structural = [r for r in range(image.num_rows) if r not in set(expected["prunable"])]
    keep = list(image.keep_rows)
    assert keep == sorted(set(keep)), f"{what}: keep_rows not strictly ascending"
    assert all(0 <= r < image.num_rows for r in keep), f"{what}: keep_rows out of range"
    assert set(structural) <= set(keep), f"{what}: structural rows {sorted(set(structural) - set(keep))} pruned"
    position = {row: i for i, row in enumerate(expected["prunable"])}
    chosen = [position[r] for r in keep if r in position]

    # The count: the keep-count rule at the engine's ratio, and the oracle's count.
    assert len(chosen) == keep_count_reference(n, image.budget_ratio, min_keep), what
    assert len(chosen) == expected["count"], f"{what}: kept {len(chosen)} of {n}, oracle {expected['count']}"

    # The set: exactly the oracle's top-count, except for swaps across a near-tie at the cut.
    if keep == expected["keep_rows"]:
        return
    scores = expected["scores"]
    assert top_k_reference(scores, len(chosen)) == [position[r] for r in expected["keep_rows"] if r in position]
    dropped = sorted(set(range(n)) - set(chosen))
    margin = float(scores[chosen].min() - scores[dropped].max())
    assert margin >= -TIE_ATOL, (
        f"{what}: keep set differs from the oracle's beyond a near-tie: engine keeps "
        f"{sorted(set(keep) - set(expected['keep_rows']))}, oracle {sorted(set(expected['keep_rows']) - set(keep))}, "
        f"score margin {margin}")


@pytest.fixture(scope="module")
def checked(engines, decisions, hf_float64):
    """(family, name) → :class:`Checked`, built on first use."""
    cache: dict[tuple[str, str], Checked] = {}

    def get(family: str, name: str) -> Checked:
        key = (family, name)
        if key not in cache:
            outputs = engines.run(family)
            req = _request(family, name)
            processor = engines.processor(family)
            prompt = _prompt_text(processor, family, req)
            inputs = oracle_inputs(hf_float64(family), processor, family, prompt, req.pil_images())
            # Same prompt on both sides (vLLM's RequestOutput keeps the unpruned prompt).
            assert inputs.input_ids == list(outputs[name].prompt_token_ids), f"{family}/{name}: prompt ids differ"
            configured, min_keep = _configured(family)
            extra = dict(req.extra)
            options = dict(keep_ratio=extra.get("asymvlm_keep_ratio"), budget=extra.get("asymvlm_budget"),
                           request_min_keep=extra.get("asymvlm_min_keep"))
            expected = decide_reference(inputs.input_ids, inputs.vision_mask, inputs.structure_token_ids,
                                        inputs.embedding_table, inputs.images, configured, min_keep, **options)
            rule = request_rule_reference(configured, options["keep_ratio"], options["budget"])
            cache[key] = Checked(family, req, inputs, expected, decisions.get(f"{family}/{name}"), rule)
        return cache[key]

    return get


def _min_keep(family: str, req: Req) -> int:
    return dict(req.extra).get("asymvlm_min_keep", _configured(family)[1])


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize(("family", "name"), CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_engine_decision_matches_the_float64_oracle(checked, family, name):
    case = checked(family, name)
    decision = case.actual
    assert decision is not None, f"{family}/{name}: the engine never decided this request"
    assert decision.error is None, decision.error
    assert [image.feature for image in decision.images] == list(range(len(case.req.images)))
    for index, (image, expected) in enumerate(zip(decision.images, case.expected, strict=True)):
        assert_image_matches(image, expected, case.rule, _min_keep(family, case.req), f"{family}/{name} image {index}")


# Gemma 3 spells an image "\n\n<boi> soft tokens <eoi>\n\n"; two images back to back merge the
# newlines between them into one "\n\n\n\n" token, which vLLM puts in both images' placeholder
# spans: gemma3/two_images checks that such a request is rewritten too.
APPLIED_CASES = [pytest.param(f, n, id=f"{f}-{n}") for f, n in CASES]


@pytest.mark.parametrize(("family", "name"), APPLIED_CASES)
def test_the_decision_checked_is_the_one_the_engine_applied(engines, checked, family, name):
    """The request ran pruned with the captured decision's counts (else the comparison above
    would be about a decision nobody used)."""
    case = checked(family, name)
    outcome = (engines.run(family)[name].kv_transfer_params or {}).get("asymvlm")
    assert outcome is not None and outcome["status"] == "pruned", outcome
    assert [image["kept"] for image in outcome["images"]] == [len(image.keep_rows) for image in case.actual.images]
    assert [image["tokens"] for image in outcome["images"]] == [image.num_rows for image in case.actual.images]


@pytest.mark.parametrize("family", list(ENGINES))
def test_the_fused_kernel_in_the_probe_decides_as_the_torch_path(engines, decisions, checked, family):
    """``vision.decide_with: triton`` (the runner's one packed ``select_vision_tokens`` launch per
    step, here under Triton's interpreter) against the torch path of the same checkpoint and batch:
    every image's keep set, gap and ratio identical, every request pruned alike, and the oracle
    holds for the kernel path too."""
    torch_outputs, kernel_outputs = engines.run(family), engines.run(family, "triton")
    for req in ENGINES[family].requests:
        case = checked(family, req.name)
        kernel = decisions.get(f"{family}@triton/{req.name}")
        assert kernel is not None and kernel.error is None, kernel
        assert [(i.feature, i.num_rows, i.num_prunable, i.keep_rows) for i in kernel.images] == \
            [(i.feature, i.num_rows, i.num_prunable, i.keep_rows) for i in case.actual.images], f"{family}/{req.name}"
        # Scores (so gaps, and a linear rule's ratios) differ by float32 rounding: the kernel
        # divides v·t̂ by |v|, torch multiplies v̂ by t̂.
        assert [i.gap for i in kernel.images] == pytest.approx([i.gap for i in case.actual.images], abs=GAP_ATOL)
        assert [i.budget_ratio for i in kernel.images] == pytest.approx(
            [i.budget_ratio for i in case.actual.images], abs=1e-4)
        for index, (image, expected) in enumerate(zip(kernel.images, case.expected, strict=True)):
            assert_image_matches(image, expected, case.rule, _min_keep(family, req), f"{family}/{req.name} image {index}")
        outcomes = [(o[req.name].kv_transfer_params or {}).get("asymvlm") or {} for o in (kernel_outputs, torch_outputs)]
        assert outcomes[0].get("status") == outcomes[1].get("status") == "pruned"
        assert [(i["tokens"], i["kept"]) for i in outcomes[0]["images"]] == \
            [(i["tokens"], i["kept"]) for i in outcomes[1]["images"]]
        assert kernel_outputs[req.name].outputs[0].token_ids == torch_outputs[req.name].outputs[0].token_ids


def test_the_cases_cover_what_they_claim(checked):
    """The fixtures' gaps are properties of random tiny models: fail loudly if a rebuilt model
    moves them so that a rule branch is no longer exercised."""
    def images(family, names=None):
        for req in ENGINES[family].requests:
            if names is None or req.name in names:
                case = checked(family, req.name)
                yield from ((case, e) for e in case.expected)

    adaptive = ("main", "two_images", "moderate", "image_first")
    tiers = {e["ratio"] for _, e in images("llava", adaptive)}
    assert tiers == {0.6, 0.45, 0.3}, f"llava threshold tiers met: {tiers}"

    linear = [e["ratio"] for _, e in images("qwen2_5_vl", ("main", "two_images", "chart", "min_keep"))]
    assert QWEN_LINEAR["min_ratio"] in linear and QWEN_LINEAR["max_ratio"] in linear, linear
    assert any(QWEN_LINEAR["min_ratio"] < r < QWEN_LINEAR["max_ratio"] for r in linear), linear

    # min_keep binds (more than ⌊n · ratio⌋) from the config and from a request, and is released by one.
    for family, name in (("llava_next", "main"), ("llava", "min_keep"), ("llava", "keep_ratio_min_keep"),
                         ("qwen2_5_vl", "min_keep"), ("gemma3", "min_keep"), ("phi3_v", "keep_ratio")):
        for case, e in images(family, (name,)):
            floor = keep_count_reference(len(e["prunable"]), e["ratio"], 0)
            assert e["count"] == _min_keep(family, case.req) > floor, (family, name)
    (case, e), = images("llava_next", ("min_keep",))
    assert e["count"] == keep_count_reference(len(e["prunable"]), e["ratio"], 0) < _configured("llava_next")[1]

    # Phi-3-V: its separator rows are there (the oracle's structural rows), in all three crop
    # grids (2 x 1, 1 x 2 and 2 x 2): (rows, separators) = (12h(12w + 1) + 157, 12h + 13).
    grids = {(e["num_rows"], e["num_rows"] - len(e["prunable"])) for _, e in images("phi3_v")}
    assert grids == {(469, 37), (457, 25), (757, 37)}, grids

    # Per-request rules differ from what the configured rule would have given (uniform aside).
    for family, spec in ENGINES.items():
        configured, _ = _configured(family)
        for req in spec.requests:
            extra = dict(req.extra)
            if configured["rule"] != "uniform" and ("asymvlm_keep_ratio" in extra or "asymvlm_budget" in extra):
                for _, e in images(family, (req.name,)):
                    assert e["ratio"] != budget_ratio_reference(configured, e["gap"]), (family, req.name)

    # Structure tokens in the query would change these decisions (Qwen2.5-VL and Gemma 3 cases).
    for family, name in (("qwen2_5_vl", "main"), ("gemma3", "short_question")):
        case = checked(family, name)
        configured, min_keep = _configured(family)
        (wrong,) = decide_reference(case.inputs.input_ids, case.inputs.vision_mask, [], case.inputs.embedding_table,
                                    case.inputs.images, configured, min_keep)
        (right,) = case.expected
        assert abs(wrong["gap"] - right["gap"]) > GAP_ATOL or wrong["keep_rows"] != right["keep_rows"], (family, name)

    # The image-first prompts really start with the image (LLaVA: its token; Gemma 3: "\n\n<boi>").
    for family in ("llava", "gemma3"):
        case = checked(family, "image_first")
        spans = _runs(torch.tensor(case.inputs.vision_mask))
        assert spans[0][0] == (0 if family == "llava" else 2), (family, spans)


def test_the_oracle_itself():
    """Hand-checked values of the reference functions the oracle is built from."""
    assert keep_count_reference(100, 0.29, 1) == 29  # 100 · 0.29 == 28.999999999999996
    assert keep_count_reference(64, 0.3, 1) == 19 and keep_count_reference(64, 0.3, 30) == 30
    assert keep_count_reference(5, 1.0, 9) == 5
    rule = {"rule": "threshold", "gap_low": 0.1, "gap_high": 0.2,
            "ratio_conservative": 0.5, "ratio_moderate": 0.4, "ratio_aggressive": 0.3}
    assert [budget_ratio_reference(rule, g) for g in (0.0999, 0.1, 0.1999, 0.2, 1.0)] == [0.5, 0.4, 0.4, 0.3, 0.3]
    assert budget_ratio_reference(QWEN_LINEAR, 0.063) == 0.5
    assert budget_ratio_reference(QWEN_LINEAR, 0.073) == pytest.approx(0.45)
    assert budget_ratio_reference(QWEN_LINEAR, 0.0) == 0.56 and budget_ratio_reference(QWEN_LINEAR, 1.0) == 0.42
    assert request_rule_reference(QWEN_LINEAR, budget="aggressive") == {"rule": "uniform", "ratio": 0.42}
    assert request_rule_reference(rule, keep_ratio=0.7) == {"rule": "uniform", "ratio": 0.7}
    # Structure tokens and vision positions are not text; a structural row is kept unscored.
    table = np.eye(4)
    (out,) = decide_reference([0, 1, 2, 3], [False, True, True, False], [3], table,
                              [(np.array([[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0.5, 0.5, 0, 0]]), [False, True, False])],
                              {"rule": "uniform", "ratio": 0.5})
    assert out["prunable"] == [0, 2] and out["scores"].tolist() == pytest.approx([1.0, 2 ** -0.5])
    assert out["keep_rows"] == [0, 1] and out["count"] == 1 and out["gap"] == pytest.approx(1 - 2 ** -0.5)
