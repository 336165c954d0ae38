"""The runner's decision function, ``decide_requests``, on its two paths: the core's torch
functions image by image, and one packed launch of the fused ``select_vision_tokens`` kernel
(under Triton's interpreter here; compiled on CUDA, ``gpu``-marked).

The engine-level check (every family's real engine, keep sets identical on both paths and
against the float64 oracle) is ``test_decision_oracle``; this module covers what a real engine
does not produce on demand: many requests and images in one step with different rules, images
without prunable rows, non-finite encoder output, prompts without text, missing cache entries,
and the choice of path.
"""

from __future__ import annotations

import math

import pytest
import torch

from asymvlm_vllm.core import AsymVLMConfig
from asymvlm_vllm.core.errors import AsymVLMError
from asymvlm_vllm.core.rankers import CosineRanker, LearnedRanker
from asymvlm_vllm.core.request_options import request_options_from_extra_args
from asymvlm_vllm.engine.families import VisionFamily
from asymvlm_vllm.engine.runner import Probe, decide_requests, decides_with_kernel
from tests.kernels.conftest import DEVICES

IMAGE_TOKEN = 7
HIDDEN = 48


class TextEmbedding(torch.nn.Module):
    """What ``decide_requests`` uses of a vLLM model: ``embed_input_ids``."""

    def __init__(self, vocab: int = 64, dim: int = HIDDEN) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, dim)

    def embed_input_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)


def _feature(identifier: str, offset: int, length: int):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def _request(name: str, image_rows: list[int], text_ids: list[int], generator: torch.Generator,
             device, extra: dict | None = None):
    """A prompt ``text image text image ...`` and its encoder outputs."""
    ids, features, outputs = list(text_ids), [], {}
    for i, rows in enumerate(image_rows):
        features.append(_feature(f"{name}-{i}", len(ids), rows))
        ids += [IMAGE_TOKEN] * rows + text_ids[: 1 + i]
        outputs[f"{name}-{i}"] = torch.randn(rows, HIDDEN, generator=generator).to(device)
    options = request_options_from_extra_args(extra or {})
    return Probe(name, ids, features, list(range(len(image_rows))), options), outputs


CONFIG = AsymVLMConfig.from_dict({"vision": {"ranker": "cosine", "budget": {
    "rule": "threshold", "gap_low": 0.13, "gap_high": 0.17,
    "ratio_conservative": 0.6, "ratio_moderate": 0.45, "ratio_aggressive": 0.3}}})


def _step(device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probes, outputs = [], {}
    shapes = [
        ("one", [64], [3, 4, 5, 9], None),
        ("odd_sizes", [1, 37, 130], [11, 12], None),  # 1-row image, and rows past one 64-row tile
        ("ratio", [50], [20, 21, 22], {"asymvlm_keep_ratio": 0.2}),
        ("budget", [64, 64], [30, 31], {"asymvlm_budget": "aggressive"}),
        ("min_keep", [40], [40, 41, 42, 43], {"asymvlm_min_keep": 33}),
    ]
    for name, rows, text, extra in shapes:
        probe, out = _request(name, rows, text, g, device, extra)
        probes.append(probe)
        outputs.update(out)
    return probes, outputs


def _keep_sets(decisions, fields=("feature", "num_rows", "num_prunable", "keep_rows")):
    return {r: (d.error, [tuple(getattr(i, f) for f in fields) for i in d.images]) for r, d in decisions.items()}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.mark.parametrize("weighted", [False, True], ids=["cosine", "learned"])
def test_one_packed_launch_keeps_what_the_torch_path_keeps(device, weighted):
    torch.manual_seed(0)
    model = TextEmbedding().to(device)
    ranker = LearnedRanker(torch.rand(HIDDEN) + 0.5) if weighted else CosineRanker()
    family = VisionFamily("LlavaForConditionalGeneration")
    probes, outputs = _step(device)
    with torch.inference_mode():
        torch_path = decide_requests(model, family, CONFIG, ranker, probes, outputs, device, kernel=False)
        kernel_path = decide_requests(model, family, CONFIG, ranker, probes, outputs, device, kernel=True)
    expected, got = _keep_sets(torch_path.result()), _keep_sets(kernel_path.result())
    assert got == expected
    # The step met every rule branch it claims: tiers, a per-request ratio, a binding floor.
    ratios = {i.budget_ratio for d in kernel_path.result().values() for i in d.images}
    assert {0.6, 0.45, 0.3, 0.2} <= ratios, ratios
    (floor,) = kernel_path.result()["min_keep"].images
    assert floor.num_kept == 33 > math.floor(40 * floor.budget_ratio)
    for request, decision in kernel_path.result().items():
        for image, reference in zip(decision.images, torch_path.result()[request].images, strict=True):
            assert image.gap == pytest.approx(reference.gap, abs=1e-5)


def test_structural_rows_are_kept_and_not_counted(device):
    """LLaVA-NeXT's separator rows (found by value on the rows' device) stay, outside the packed
    rows; an image of separators only is kept whole without a segment."""
    model = TextEmbedding().to(device)
    model.image_newline = torch.nn.Parameter(torch.full((HIDDEN,), 0.25, device=device))
    family = VisionFamily("LlavaNextForConditionalGeneration")
    g = torch.Generator().manual_seed(1)
    probe, outputs = _request("next", [48, 6], [3, 4, 5], g, device)
    outputs["next-0"][5::8] = model.image_newline.detach()
    outputs["next-1"][:] = model.image_newline.detach()
    with torch.inference_mode():
        results = [decide_requests(model, family, CONFIG, CosineRanker(), [probe], outputs, device, kernel=k).result()
                   for k in (False, True)]
    assert _keep_sets(results[0]) == _keep_sets(results[1])
    first, separators_only = results[1]["next"].images
    assert first.num_prunable == 42 and set(range(5, 48, 8)) <= set(first.keep_rows)
    assert separators_only.num_prunable == 0 and separators_only.keep_rows == list(range(6))


def test_a_bad_request_fails_alone(device):
    """Non-finite encoder rows, a prompt of image tokens only, a missing cache entry: each of
    those requests gets its error, and the others of the same launch are decided."""
    model = TextEmbedding().to(device)
    family = VisionFamily("LlavaForConditionalGeneration")
    probes, outputs = _step(device)
    g = torch.Generator().manual_seed(2)
    nan, out = _request("nan", [32, 16], [5, 6], g, device)
    out["nan-1"][3, 7] = float("nan")
    outputs.update(out)
    no_text = Probe("no_text", [IMAGE_TOKEN] * 16, [_feature("no_text-0", 0, 16)], [0], nan.options)
    outputs["no_text-0"] = torch.randn(16, HIDDEN, generator=g).to(device)
    missing = Probe("missing", [3] + [IMAGE_TOKEN] * 16, [_feature("missing-0", 1, 16)], [0], nan.options)
    batch = [probes[0], nan, no_text, missing, probes[1]]
    with torch.inference_mode():
        for kernel in (False, True):
            decisions = decide_requests(model, family, CONFIG, CosineRanker(), batch, outputs, device, kernel=kernel).result()
            assert decisions["nan"].error == "image 1: scores are not finite"
            assert decisions["no_text"].error == "the prompt has no text tokens to score its images against"
            assert decisions["missing"].error == "image 0's encoder output is not in the encoder cache"
            assert decisions["one"].error is None and decisions["odd_sizes"].error is None
            assert [i.num_prunable for i in decisions["odd_sizes"].images] == [1, 37, 130]


def test_the_path_is_chosen_by_config_and_device(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = AsymVLMConfig()
    assert decides_with_kernel(auto, cuda) and not decides_with_kernel(auto, cpu)
    spiral = AsymVLMConfig.from_dict({"vision": {"ranker": "spiral"}})
    assert not decides_with_kernel(spiral, cuda)  # position-only rankers have no kernel
    torch_only = AsymVLMConfig.from_dict({"vision": {"decide_with": "torch"}})
    assert not decides_with_kernel(torch_only, cuda)
    triton = AsymVLMConfig.from_dict({"vision": {"decide_with": "triton"}})
    assert decides_with_kernel(triton, cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert decides_with_kernel(triton, cpu)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(AsymVLMError, match="vision.decide_with 'triton' needs a CUDA device"):
        decides_with_kernel(triton, cpu)


def test_the_kernel_needs_a_ranker_it_computes():
    from asymvlm_vllm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="decide_with 'triton' scores with the cosine or learned ranker, not 'random'"):
        AsymVLMConfig.from_dict({"vision": {"ranker": "random", "decide_with": "triton"}})
    with pytest.raises(ConfigError, match="decide_with"):
        AsymVLMConfig.from_dict({"vision": {"decide_with": "cuda"}})
