"""AsymVLM on the real vLLM engine (in-process, CPU, tiny random models): probe → decide → rewrite.

What is checked, per family where it applies:

1. keep ratio 1.0 (config) is token-identical to vLLM without the plugin;
2. pruning (uniform 0.5) is token-identical to the transformers reference path
   (:func:`~asymvlm_vllm.hf.pruning.prune_prompt` + :func:`~asymvlm_vllm.hf.generation.generate_from_prompt`)
   given the same keep set;
3. the prompt and the KV blocks shrink by exactly the pruned count, and every block comes back;
4. two images in one prompt are both pruned;
5. Gemma 3's bidirectional image ranges follow the pruned span;
6. per-request options (off, a keep ratio, an invalid value);
7. an image at offset 0;
8. Phi-3.5-Vision (``trust_remote_code``): its separator rows (the ``sub_GN`` newlines and the
   ``glb_GN`` row between the crops and the global view), found here by value in the engine's
   own encoder output, are all kept; two images of different HD crop grids (1 x 2 and 2 x 2) in
   one prompt; a repeated pruned request is a prefix-cache hit with the same answer.

Cost: every engine is built once per module (lazily) and all of them are shut down together at
the end; each builds in a few seconds but every ``free_llm`` costs full garbage collections, so
the module frees once. KV caches are made small (see :class:`_Engines`) so that the thirteen
engines fit in memory side by side.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from .helpers import EnginePool, chat_prompt, engine_image, greedy_params, model_runner, num_free_blocks, scheduler

pytestmark = pytest.mark.slow

BLOCK_SIZE = 32  # make_llm's default
MAX_TOKENS = 6
LOGPROBS = 5
# vLLM's CPU engine (float32, pure-torch attention in the test shim) vs transformers (SDPA, float32).
# Observed differences are ~1e-6; another keep set moves them by ~1 (Gemma 3: 0.8).
LOGPROB_ATOL = 1e-4
KV_CACHE_BYTES = 96 * 2**20
KEEP_ALL = {"vision": {"budget": {"rule": "uniform", "ratio": 1.0}}}
PRUNE_HALF = {"vision": {"budget": {"rule": "uniform", "ratio": 0.5}, "min_keep": 1}}
CONFIGS = {"keep_all": KEEP_ALL, "prune": PRUNE_HALF}
QUESTION = "What is shown in this picture?"
TEXT_ONLY_QUESTION = "Describe the image in one sentence."


# ---------------------------------------------------------------- requests and their prompts


@dataclass(frozen=True)
class Req:
    """One request: the images (by ``engine_image`` seed), the question, AsymVLM ``extra_args``."""

    name: str
    images: tuple[int, ...] = (0,)
    question: str = QUESTION
    extra: tuple[tuple[str, Any], ...] = ()
    image_first: bool = False  # a raw prompt that starts with the image token (no chat template)
    sizes: tuple[tuple[int, int], ...] = ()  # (height, width) per image; none: 224 x 224 each


MAIN = Req("main", (0,))
TEXT = Req("text", (), TEXT_ONLY_QUESTION)
TWO_IMAGES = Req("two_images", (1, 2), "Which colour is the largest shape in the chart?")
OFF = Req("off", (3,), extra=(("asymvlm", "off"),))
OFF_PLAIN = Req("off", (3,))  # the same prompt, for the engine without the plugin
QUARTER = Req("quarter", (4,), extra=(("asymvlm_keep_ratio", 0.25),))
IMAGE_FIRST = Req("image_first", (5,), image_first=True)
# Phi-3.5-Vision: small non-square images keep the CLIP ViT-L/14-336 work down (one crop per
# 336 px); the second image of TWO_GRIDS is square, 2 x 2 crops.
PHI_MAIN = Req("main", (0,), sizes=((128, 64),))  # 2 x 1 crops: 469 rows, 37 of them separators
PHI_TWO_GRIDS = Req("two_images", (1, 2), "Which colour is the largest shape in the chart?",
                    sizes=((64, 128), (224, 224)))  # 1 x 2 crops (457 rows) and 2 x 2 (757)
# Rows of a Phi-3-V image of h x w crops and how many of them are separators, by the formula of
# the HD transform (12·h rows of 12·w merged patches, then the 12 x 12 global view, each row
# ended by a newline; one glb_GN between the two parts): written out here, not from core.
PHI_GRIDS = {(128, 64): (2, 1), (64, 128): (1, 2), (224, 224): (2, 2)}


def phi_rows(h: int, w: int) -> int:
    return 12 * h * (12 * w + 1) + 1 + 12 * 13


def phi_separators(h: int, w: int) -> int:
    return 12 * h + 1 + 12


# Every image request of one engine has its own image: a later request must not hit the prefix
# cache of an earlier, unpruned one (it would then run unpruned with status "prefix_cached").
RUNS: dict[tuple[str, str], tuple[Req, ...]] = {
    ("llava", "plain"): (MAIN, TEXT, OFF_PLAIN),
    ("llava", "keep_all"): (MAIN, TEXT),
    ("llava", "prune"): (MAIN, TEXT, TWO_IMAGES, OFF, QUARTER, IMAGE_FIRST),
    ("gemma3", "plain"): (MAIN, TEXT),
    ("gemma3", "keep_all"): (MAIN, TEXT),
    ("gemma3", "prune"): (MAIN, TEXT),
    ("qwen2_5_vl", "plain"): (MAIN, TEXT),
    ("qwen2_5_vl", "keep_all"): (MAIN, TEXT),
    ("qwen2_5_vl", "prune"): (MAIN, TEXT),
    ("llava_next", "prune"): (MAIN, TEXT),
    ("phi3_v", "plain"): (PHI_MAIN, TEXT),
    ("phi3_v", "keep_all"): (PHI_MAIN, TEXT),
    ("phi3_v", "prune"): (PHI_MAIN, TEXT, PHI_TWO_GRIDS),
}
# Vision tokens of the MAIN request's image per family (the tiny configs; 64 unless listed).
MAIN_IMAGE_TOKENS = {"phi3_v": phi_rows(2, 1)}


def _prompt_text(processor, req: Req) -> str:
    if req.image_first:
        assert len(req.images) == 1
        return f"{processor.image_token}\nUSER: {req.question}\nASSISTANT:"
    return chat_prompt(processor, len(req.images), req.question)


def _images(req: Req) -> list:
    sizes = req.sizes or ((224, 224),) * len(req.images)
    assert len(sizes) == len(req.images)
    return [engine_image(seed, h, w) for seed, (h, w) in zip(req.images, sizes)]


# ---------------------------------------------------------------- what the engine did, by request tag


@dataclass
class Admission:
    """One appearance of a request in ``SchedulerOutput.scheduled_new_reqs``."""

    req_id: str
    prompt_token_ids: list[int]
    identifiers: list[str]
    positions: list[tuple[int, int, list[bool] | None]]  # (offset, length, is_embed) per image
    num_computed_tokens: int
    num_scheduled_tokens: int
    blocks_held: tuple[int, ...]  # per KV-cache group, right after this step's allocation


@dataclass
class Recorder:
    """Filled by test-only hooks on the scheduler and the runner (installed for this module)."""

    admissions: dict[str, list[Admission]] = field(default_factory=lambda: defaultdict(list))
    decisions: dict[str, Any] = field(default_factory=dict)  # tag -> RequestDecision
    mrope: dict[str, list[tuple[torch.Tensor, int]]] = field(default_factory=lambda: defaultdict(list))
    prefix_ranges: list[tuple[list[list[str]], dict[int, list[tuple[int, int]]]]] = field(default_factory=list)
    encoder_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # identifier -> rows the runner decided on


def _tag(request) -> str | None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get("test_tag")


@pytest.fixture(scope="module")
def recorder():
    import vllm.v1.worker.gpu_model_runner as gpu_model_runner
    from vllm.v1.core.sched.scheduler import Scheduler

    import asymvlm_vllm.engine.runner as runner_module
    from asymvlm_vllm.engine.runner import AsymVLMRunnerMixin
    from asymvlm_vllm.engine.scheduler import AsymVLMScheduler

    rec = Recorder()
    schedule = Scheduler.schedule
    apply_decision = AsymVLMScheduler._apply_decision
    init_mrope = AsymVLMRunnerMixin._init_mrope_positions
    prefix_ranges = gpu_model_runner.compute_mm_prefix_ranges
    decide = runner_module.decide_request

    def schedule_hook(self, *args, **kwargs):  # AsymVLMScheduler.schedule reaches it through super()
        output = schedule(self, *args, **kwargs)
        for new in output.scheduled_new_reqs:
            tag = _tag(self.requests.get(new.req_id))
            if tag is None:
                continue
            positions = []
            for feature in new.mm_features:
                p = feature.mm_position
                positions.append((p.offset, p.length, None if p.is_embed is None else [bool(x) for x in p.is_embed]))
            rec.admissions[tag].append(Admission(
                new.req_id, list(new.prompt_token_ids), [f.identifier for f in new.mm_features], positions,
                new.num_computed_tokens, output.num_scheduled_tokens.get(new.req_id, 0),
                tuple(len(ids) for ids in self.kv_cache_manager.get_block_ids(new.req_id))))
        return output

    def apply_decision_hook(self, request_id, decision):
        tag = _tag(self.requests.get(request_id))
        if tag is not None:
            rec.decisions[tag] = decision
        return apply_decision(self, request_id, decision)

    def init_mrope_hook(self, req_state):
        result = init_mrope(self, req_state)
        tag = _tag(req_state)
        if tag is not None and req_state.mrope_positions is not None:
            n = len(req_state.prompt_token_ids)
            rec.mrope[tag].append((req_state.mrope_positions[:, :n].clone(), int(req_state.mrope_position_delta)))
        return result

    def prefix_ranges_hook(mm_features_per_req, *args, **kwargs):
        result = prefix_ranges(mm_features_per_req, *args, **kwargs)
        rec.prefix_ranges.append(([[f.identifier for f in feats] for feats in mm_features_per_req],
                                  {k: [tuple(r) for r in v] for k, v in result.items()}))
        return result

    def decide_hook(model, family, config, ranker, prompt_token_ids, mm_features, feature_indices, encoder_outputs,
                    *args, **kwargs):
        for index in feature_indices:
            identifier = mm_features[index].identifier
            rows = encoder_outputs.get(identifier)
            if rows is not None:
                rec.encoder_rows[identifier] = rows.detach().reshape(-1, rows.shape[-1]).cpu().clone()
        return decide(model, family, config, ranker, prompt_token_ids, mm_features, feature_indices, encoder_outputs,
                      *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_module, "decide_request", decide_hook)
        mp.setattr(Scheduler, "schedule", schedule_hook)
        mp.setattr(AsymVLMScheduler, "_apply_decision", apply_decision_hook)
        mp.setattr(AsymVLMRunnerMixin, "_init_mrope_positions", init_mrope_hook)
        mp.setattr(gpu_model_runner, "compute_mm_prefix_ranges", prefix_ranges_hook)
        yield rec


# ---------------------------------------------------------------- engines and runs


@dataclass
class Run:
    """The outputs of one engine's batch, by request name, and its block pool around it."""

    family: str
    kind: str
    outputs: dict[str, Any]
    prompts: dict[str, str]
    free_blocks_before: int
    free_blocks_after: int

    def tag(self, name: str) -> str:
        return f"{self.family}/{self.kind}/{name}"

    def tokens(self, name: str) -> list[int]:
        return list(self.outputs[name].outputs[0].token_ids)

    def first_logprobs(self, name: str) -> dict[int, float]:
        """The first generated token's top-``LOGPROBS`` log-probabilities (the prefill's output)."""
        return {tid: lp.logprob for tid, lp in self.outputs[name].outputs[0].logprobs[0].items()}

    def outcome(self, name: str) -> dict | None:
        params = self.outputs[name].kv_transfer_params
        return None if params is None else params.get("asymvlm")


class _Engines(EnginePool):
    """Engines built on first use and all kept until the module ends.

    ``kind``: ``plain`` (vLLM without the plugin), ``keep_all`` / ``prune`` (AsymVLM with
    :data:`KEEP_ALL` / :data:`PRUNE_HALF`). The KV cache is ``KV_CACHE_BYTES`` instead of the
    1 GiB of ``VLLM_CPU_KVCACHE_SPACE`` (unset while this module builds engines, since vLLM's CPU
    platform lets it override ``kv_cache_memory_bytes``): still thousands of 32-token blocks."""

    def __init__(self, model_dirs, recorder: Recorder):
        super().__init__(model_dirs)
        self.recorder = recorder
        self.runs: dict[tuple[str, str], Run] = {}

    def llm(self, family: str, kind: str):
        key = (family, kind)
        if key not in self.llms:
            llm = self.build(key, family, CONFIGS.get(kind), KV_CACHE_BYTES)
            kv_bytes = sum(t.size for t in scheduler(llm).kv_cache_config.kv_cache_tensors)
            # (Gemma 3's hybrid sliding/full layout allocates twice the requested bytes.)
            assert kv_bytes <= 2 * KV_CACHE_BYTES, f"{family}/{kind}: {kv_bytes} bytes of KV cache, not the 1 GiB default"
        return self.llms[key]

    def run(self, family: str, kind: str) -> Run:
        key = (family, kind)
        if key not in self.runs:
            llm = self.llm(family, kind)
            processor = self.processor(family)
            reqs = RUNS[key]
            prompts, params = [], []
            for req in reqs:
                prompt = {"prompt": _prompt_text(processor, req)}
                if req.images:
                    images = _images(req)
                    prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
                prompts.append(prompt)
                params.append(greedy_params(MAX_TOKENS, logprobs=LOGPROBS, extra_args={"test_tag": f"{family}/{kind}/{req.name}",
                                                                    **dict(req.extra)}))
            before = num_free_blocks(llm)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            self.runs[key] = Run(family, kind, {r.name: o for r, o in zip(reqs, outputs)},
                                 {r.name: p["prompt"] for r, p in zip(reqs, prompts)}, before, num_free_blocks(llm))
        return self.runs[key]



@pytest.fixture(scope="module")
def engines(engine_models, recorder):
    with _Engines(engine_models, recorder) as pool:
        yield pool


# ---------------------------------------------------------------- the transformers reference


class FixedKeepRanker:
    """Scores 1.0 at the prunable rows vLLM kept, 0.0 elsewhere: with ``UniformBudget(k / N)``
    the core's top-k selects exactly those ``k`` rows (one keep set per image, in prompt order)."""

    def __init__(self, keep_sets: list[list[int]]):
        self.keep_sets = keep_sets
        self.calls: list[int] = []

    def score(self, vision, text, grid_shape=None):
        keep = self.keep_sets[len(self.calls)]
        self.calls.append(int(vision.shape[0]))
        scores = torch.zeros(vision.shape[0], dtype=torch.float32)
        scores[keep] = 1.0
        return scores


@dataclass
class Reference:
    inputs: Any
    prompt: Any  # PrunedPrompt
    tokens: list[int]
    first_logprobs: torch.Tensor  # (vocab,) log-softmax of the prefill's last logits
    generation: Any = None  # the transformers path's Generation


def hf_reference(vlm, prompt_text: str, images: list, decision, causal: bool = False, max_tokens: int = MAX_TOKENS,
                 eviction=None, drop_spans=()) -> Reference:
    """Greedy ``max_tokens`` tokens of the transformers path, pruned to vLLM's keep set, with
    the text ``eviction`` policy if given (``Reference.generation`` then has its trace).

    ``decision.images[i].keep_rows`` index image ``i``'s encoder-output rows, structural rows
    (LLaVA-NeXT newlines) included; the reference ranker scores only the prunable rows, so the
    kept rows are mapped to indices among the prunable ones (for LLaVA, Gemma 3 and Qwen2.5-VL
    every row is prunable and the mapping is the identity)."""
    from asymvlm_vllm.core.budget import UniformBudget, num_tokens_to_keep
    from asymvlm_vllm.hf.generation import generate_from_prompt
    from asymvlm_vllm.hf.pruning import prune_prompt

    inputs = vlm.adapter.tokenise(vlm.processor, [prompt_text], [images])  # Phi-3-V: image tokens as vLLM writes them
    features = vlm.image_features(inputs)
    with torch.inference_mode():
        prunable = vlm.adapter.prunable_rows(vlm.model, inputs, features)
    assert len(decision.images) == len(features) == len(images)
    keep_sets, ratios = [], set()
    for image, rows, mask in zip(decision.images, features, prunable):
        assert image.num_rows == rows.shape[0] == mask.shape[0]
        assert image.num_prunable == int(mask.sum()), "vLLM and transformers disagree on the structural rows"
        structural = set((~mask).nonzero().flatten().tolist())
        assert structural <= set(image.keep_rows), "a structural row was pruned"
        index = {row: i for i, row in enumerate(mask.nonzero().flatten().tolist())}
        keep = [index[row] for row in image.keep_rows if row in index]
        keep_sets.append(keep)
        ratios.add(len(keep) / len(index))
        assert num_tokens_to_keep(len(index), len(keep) / len(index), 1) == len(keep)
    assert len(ratios) == 1, f"images of one prompt kept different fractions {ratios}: one budget cannot express it"
    ranker = FixedKeepRanker(keep_sets)
    drop = None
    if drop_spans:  # the multi-turn rule's dropped answers, as token ranges of the prompt
        mask = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
        for start, end in drop_spans:
            mask[start:end] = True
        drop = [mask]
    with torch.inference_mode():
        prompt = prune_prompt(vlm.model, vlm.adapter, inputs, ranker, UniformBudget(ratios.pop()), 1,
                              features=features, drop=drop)
    for image, keep in zip(prompt.images[0], keep_sets):
        assert image.decision.keep_indices.tolist() == keep
    if causal and prompt.token_type_ids is not None:
        # Gemma 3: transformers attends bidirectionally within an image wherever token_type_ids
        # is 1 (the kept image span). vLLM's CPU attention backend does not apply the
        # bidirectional ranges it computes (see cpu_shim's docstring), so CPU vLLM is causal
        # over images; all-zero token types make the reference causal too. (It matters: on the
        # tiny Gemma 3 the two attentions move the first-token logprobs by ~0.3.)
        prompt.token_type_ids = torch.zeros_like(prompt.token_type_ids)
    generation = generate_from_prompt(vlm.model, prompt, max_tokens, frozenset(), 0, eviction=eviction,
                                      tap=vlm.tap if eviction is not None else None, mrope=vlm.adapter.uses_mrope,
                                      trace=eviction is not None)
    with torch.inference_mode():
        logits = vlm.model(**prompt.model_inputs()).logits[0, -1]
    return Reference(inputs, prompt, generation.tokens[0], logits.float().log_softmax(-1), generation)


def _assert_logprobs_close(ours: dict[int, float], expected, what: str) -> None:
    """``ours``: token id -> logprob (vLLM's top ones); ``expected``: a (vocab,) tensor or such a dict.
    Random tiny models can repeat one argmax whatever the input (Gemma 3 here), so the
    distribution is compared as well as the tokens."""
    ids = [tid for tid in ours if not isinstance(expected, dict) or tid in expected]
    assert len(ids) >= LOGPROBS - 1, f"{what}: top tokens {sorted(ours)} vs {sorted(expected)}"  # a tie at the cut may differ
    diffs = {tid: abs(ours[tid] - float(expected[tid])) for tid in ids}
    assert max(diffs.values()) <= LOGPROB_ATOL, f"{what}: first-token logprob differences {diffs}"


def _check_against_reference(engines, hf_models, family: str, name: str, causal: bool = False) -> Reference:
    run = engines.run(family, "prune")
    tag = run.tag(name)
    decision = engines.recorder.decisions[tag]
    assert decision.error is None, decision.error
    req = next(r for r in RUNS[(family, "prune")] if r.name == name)
    ref = hf_reference(hf_models(family), run.prompts[name], _images(req), decision, causal=causal)
    out = run.outputs[name]
    # Same prompt on both sides (vLLM's RequestOutput keeps the unpruned prompt).
    assert ref.inputs["input_ids"][0].tolist() == list(out.prompt_token_ids)
    # The re-admitted (rewritten) prompt is exactly the reference's pruned prompt.
    readmitted = engines.recorder.admissions[tag][-1]
    assert readmitted.prompt_token_ids == ref.prompt.kept_token_ids[0].tolist()
    assert run.outcome(name)["prompt_tokens_prefilled"] == ref.prompt.lm_lengths[0]
    assert run.tokens(name) == ref.tokens, f"{family}/{name}: vLLM {run.tokens(name)} != transformers {ref.tokens}"
    _assert_logprobs_close(run.first_logprobs(name), ref.first_logprobs, f"{family}/{name}")
    return ref


def _assert_pruned(outcome: dict, num_images: int = 1) -> None:
    assert outcome["status"] == "pruned", outcome
    assert len(outcome["images"]) == num_images
    for image in outcome["images"]:
        assert 0 < image["kept"] < image["tokens"], outcome
    assert outcome["vision_tokens_kept"] == sum(i["kept"] for i in outcome["images"])
    assert outcome["vision_tokens"] == sum(i["tokens"] for i in outcome["images"])


# ---------------------------------------------------------------- 1. keep ratio 1.0 == no plugin


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_5_vl", "phi3_v"])
def test_keep_ratio_one_is_token_identical_to_vllm_without_the_plugin(engines, family):
    plain = engines.run(family, "plain")
    keep_all = engines.run(family, "keep_all")
    for name in ("main", "text"):
        assert keep_all.tokens(name) == plain.tokens(name), name
        _assert_logprobs_close(keep_all.first_logprobs(name), plain.first_logprobs(name), f"{family}/{name}")
        assert list(keep_all.outputs[name].prompt_token_ids) == list(plain.outputs[name].prompt_token_ids)
    outcome = keep_all.outcome("main")
    tokens = MAIN_IMAGE_TOKENS.get(family, 64)
    assert outcome["status"] == "pruned", outcome
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == tokens
    assert outcome["prompt_tokens_prefilled"] == outcome["prompt_tokens"] == len(plain.outputs["main"].prompt_token_ids)
    assert [(i["tokens"], i["kept"]) for i in outcome["images"]] == [(tokens, tokens)]
    assert keep_all.outcome("text") is None  # text-only requests are not AsymVLM's
    assert keep_all.free_blocks_after == keep_all.free_blocks_before
    # Nothing was rewritten: the request was admitted once, with its whole prompt.
    admissions = engines.recorder.admissions[keep_all.tag("main")]
    assert len(admissions) == 1 and len(admissions[0].prompt_token_ids) == outcome["prompt_tokens"]


# ---------------------------------------------------------------- 2. pruned == transformers reference


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_next", "gemma3", "phi3_v"])
def test_pruned_generation_matches_the_transformers_reference(engines, hf_models, family):
    run = engines.run(family, "prune")
    outcome = run.outcome("main")
    _assert_pruned(outcome)
    image = outcome["images"][0]
    decision = engines.recorder.decisions[run.tag("main")]
    (vllm_image,) = decision.images
    assert image["kept"] == len(vllm_image.keep_rows)
    structural = vllm_image.num_rows - vllm_image.num_prunable
    assert image["kept"] == structural + vllm_image.num_prunable // 2  # uniform 0.5 over the prunable rows
    if family == "llava_next":
        assert structural > 0  # the newline rows exist and are all kept (checked in hf_reference)
    elif family == "phi3_v":
        assert (vllm_image.num_rows, structural) == (phi_rows(2, 1), phi_separators(2, 1))
    else:
        assert structural == 0
    _check_against_reference(engines, hf_models, family, "main", causal=family == "gemma3")
    # The text-only request of the batch is untouched.
    assert run.outcome("text") is None


def test_qwen_pruned_request_keeps_its_original_mrope_positions(engines, hf_models):
    run = engines.run("qwen2_5_vl", "prune")
    ref = _check_against_reference(engines, hf_models, "qwen2_5_vl", "main")
    tag = run.tag("main")
    probe_positions, _ = engines.recorder.mrope[tag][0]  # computed by vLLM for the unpruned prompt
    readmitted, delta = engines.recorder.mrope[tag][-1]
    keep = ref.prompt.keep_masks[0]
    assert len(engines.recorder.mrope[tag]) == 2
    assert torch.equal(readmitted, probe_positions[:, keep])
    assert torch.equal(readmitted, ref.prompt.position_ids[:, 0])  # the reference's positions, kept-token gaps and all
    # The first generated token sits where it would after the unpruned prompt.
    assert readmitted.shape[1] + delta == int(ref.prompt.next_positions[0]) == int(probe_positions.max()) + 1


# ---------------------------------------------------------------- 3. prompt and KV blocks shrink


@pytest.mark.parametrize("family", ["llava", "gemma3", "qwen2_5_vl", "phi3_v"])
def test_prompt_and_kv_blocks_shrink_by_exactly_the_pruned_tokens(engines, family):
    plain = engines.run(family, "plain")
    run = engines.run(family, "prune")
    outcome = run.outcome("main")
    _assert_pruned(outcome)
    pruned = outcome["vision_tokens"] - outcome["vision_tokens_kept"]
    assert outcome["prompt_tokens"] - outcome["prompt_tokens_prefilled"] == pruned > 0
    assert outcome["prompt_tokens"] == len(run.outputs["main"].prompt_token_ids)
    text_tokens = outcome["prompt_tokens"] - outcome["vision_tokens"]
    assert outcome["prompt_tokens_prefilled"] == outcome["vision_tokens_kept"] + text_tokens

    probe, readmitted = engines.recorder.admissions[run.tag("main")]
    assert len(probe.prompt_token_ids) == outcome["prompt_tokens"]
    assert probe.num_scheduled_tokens < outcome["prompt_tokens"]  # the probe step does not prefill the image
    assert len(readmitted.prompt_token_ids) == outcome["prompt_tokens_prefilled"]
    # Its first full prefill: the whole pruned prompt in one step, KV for exactly those tokens.
    assert readmitted.num_computed_tokens + readmitted.num_scheduled_tokens == outcome["prompt_tokens_prefilled"]
    pruned_blocks = math.ceil(outcome["prompt_tokens_prefilled"] / BLOCK_SIZE)
    assert set(readmitted.blocks_held) == {pruned_blocks}

    (plain_admission,) = engines.recorder.admissions[plain.tag("main")]
    assert plain_admission.num_scheduled_tokens == outcome["prompt_tokens"]
    plain_blocks = math.ceil(outcome["prompt_tokens"] / BLOCK_SIZE)
    assert set(plain_admission.blocks_held) == {plain_blocks}
    assert pruned_blocks < plain_blocks
    # Every block is back in the pool once the batch is done.
    assert run.free_blocks_after == run.free_blocks_before
    assert plain.free_blocks_after == plain.free_blocks_before


# ---------------------------------------------------------------- 4. two images in one prompt


def test_two_images_in_one_prompt_are_both_pruned(engines, hf_models):
    run = engines.run("llava", "prune")
    outcome = run.outcome("two_images")
    _assert_pruned(outcome, num_images=2)
    assert [(i["tokens"], i["kept"]) for i in outcome["images"]] == [(64, 32), (64, 32)]
    assert outcome["prompt_tokens"] - outcome["prompt_tokens_prefilled"] == 64
    readmitted = engines.recorder.admissions[run.tag("two_images")][-1]
    assert [length for _, length, _ in readmitted.positions] == [32, 32]
    assert all("#asymvlm32of64-" in identifier for identifier in readmitted.identifiers)
    assert readmitted.identifiers[0] != readmitted.identifiers[1]
    _check_against_reference(engines, hf_models, "llava", "two_images")
    assert run.free_blocks_after == run.free_blocks_before


# ---------------------------------------------------------------- 5. Gemma 3 bidirectional ranges


def test_gemma3_bidirectional_ranges_follow_the_pruned_span(engines):
    run = engines.run("gemma3", "prune")
    outcome = run.outcome("main")
    _assert_pruned(outcome)
    tag = run.tag("main")
    probe, readmitted = engines.recorder.admissions[tag]
    (image,) = outcome["images"]
    (offset, length, is_embed), = probe.positions
    (new_offset, new_length, new_is_embed), = readmitted.positions
    assert is_embed is not None and sum(is_embed) == image["tokens"]
    lead = is_embed.index(True)  # "\n\n<start_of_image>" before the soft tokens
    original_range = (offset + lead, offset + lead + image["tokens"] - 1)
    pruned_range = (new_offset + lead, new_offset + lead + image["kept"] - 1)
    # The rewritten placeholder: same start, the pruned soft tokens gone, one contiguous embed run.
    assert new_offset == offset and new_length == length - (image["tokens"] - image["kept"])
    assert new_is_embed == [False] * lead + [True] * image["kept"] + [False] * (new_length - lead - image["kept"])

    (identifier,) = readmitted.identifiers
    seen = []
    for identifiers, ranges in engines.recorder.prefix_ranges:
        for index, ids in enumerate(identifiers):
            if ids == [identifier]:
                seen.append(ranges[index])
    assert seen, "compute_mm_prefix_ranges never saw the pruned request"
    assert all(ranges == [pruned_range] for ranges in seen), (seen, pruned_range, original_range)
    assert pruned_range != original_range

    # The same from the runner's request state, as the attention metadata builder computes it.
    from vllm.v1.attention.backends.utils import compute_mm_prefix_ranges

    assert engines.recorder.prefix_ranges  # Gemma 3 is a PrefixLM model for vLLM
    assert compute_mm_prefix_ranges([[_feature_stub(new_offset, new_length, new_is_embed)]]) == {0: [pruned_range]}


def _feature_stub(offset: int, length: int, is_embed: list[bool]):
    from types import SimpleNamespace

    from vllm.multimodal.inputs import PlaceholderRange

    return SimpleNamespace(modality="image", mm_position=PlaceholderRange(
        offset=offset, length=length, is_embed=torch.tensor(is_embed, dtype=torch.bool)))


# ---------------------------------------------------------------- 6. per-request options


def test_request_off_runs_unpruned_and_matches_vllm_without_the_plugin(engines):
    plain = engines.run("llava", "plain")
    run = engines.run("llava", "prune")
    outcome = run.outcome("off")
    assert outcome["status"] == "off", outcome
    assert outcome["vision_tokens_kept"] == outcome["vision_tokens"] == 64
    assert "images" not in outcome and "prompt_tokens_prefilled" not in outcome
    assert run.tag("off") not in engines.recorder.decisions  # never probed
    (admission,) = engines.recorder.admissions[run.tag("off")]
    assert admission.num_scheduled_tokens == outcome["prompt_tokens"]
    assert run.tokens("off") == plain.tokens("off")
    _assert_logprobs_close(run.first_logprobs("off"), plain.first_logprobs("off"), "llava/off")


def test_request_keep_ratio_overrides_the_config(engines, hf_models):
    run = engines.run("llava", "prune")
    outcome = run.outcome("quarter")
    _assert_pruned(outcome)
    assert [(i["tokens"], i["kept"], i["keep_ratio"]) for i in outcome["images"]] == [(64, 16, 0.25)]
    assert outcome["prompt_tokens"] - outcome["prompt_tokens_prefilled"] == 48
    _check_against_reference(engines, hf_models, "llava", "quarter")


def test_invalid_request_option_is_rejected_naming_the_key(engines):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = engines.llm("llava", "prune")
    processor = engines.processor("llava")
    free = num_free_blocks(llm)
    # The validator raises ValueError; vLLM 0.33 re-raises it from validate_params as
    # VLLMValidationError (a client error, HTTP 400 in the API server; not a ValueError subclass).
    with pytest.raises((ValueError, VLLMValidationError), match="asymvlm_keep_ratio") as raised:
        llm.generate({"prompt": _prompt_text(processor, MAIN), "multi_modal_data": {"image": engine_image(6)}},
                     SamplingParams(max_tokens=2, extra_args={"asymvlm_keep_ratio": 2}), use_tqdm=False)
    assert "(0, 1]" in str(raised.value)
    assert isinstance(raised.value, ValueError) or isinstance(raised.value.__cause__, ValueError)
    assert num_free_blocks(llm) == free
    assert not scheduler(llm).requests and not scheduler(llm).has_unfinished_requests()


# ---------------------------------------------------------------- 7. image at offset 0


def test_image_at_the_start_of_the_prompt_is_pruned(engines, hf_models):
    run = engines.run("llava", "prune")
    out = run.outputs["image_first"]
    image_token = hf_models("llava").model.config.image_token_id
    assert out.prompt_token_ids[0] == image_token
    outcome = run.outcome("image_first")
    _assert_pruned(outcome)
    probe, readmitted = engines.recorder.admissions[run.tag("image_first")]
    assert probe.positions[0][0] == 0 and readmitted.positions[0][0] == 0
    assert probe.num_scheduled_tokens == 1  # the probe runs one (image) token with the encoder
    assert readmitted.num_computed_tokens == 0
    assert len(run.tokens("image_first")) == MAX_TOKENS
    _check_against_reference(engines, hf_models, "llava", "image_first")


# ---------------------------------------------------------------- 8. Phi-3.5-Vision


def _phi_separators(llm) -> tuple[torch.Tensor, torch.Tensor]:
    """The vLLM model's ``sub_GN`` and ``glb_GN``, each through the projector on its own: (D,) each."""
    vision = model_runner(llm).model.vision_embed_tokens
    with torch.inference_mode():
        sub = vision.img_projection(vision.sub_GN.reshape(1, -1)).reshape(-1).float().cpu()
        glb = vision.img_projection(vision.glb_GN.reshape(1, -1)).reshape(-1).float().cpu()
    return sub, glb


@pytest.mark.parametrize("name", ["main", "two_images"])
def test_phi3v_separator_rows_are_never_pruned(engines, name):
    """The engine's own encoder rows that *are* a projected separator (within float32 rounding:
    the projector ran on the whole image there) sit exactly where the HD layout puts them, are
    exactly the decision's structural rows, and are all kept; found by value, not by layout."""
    run = engines.run("phi3_v", "prune")
    sub, glb = _phi_separators(engines.llm("phi3_v", "prune"))
    assert not torch.allclose(sub, glb, rtol=1e-4, atol=1e-4)
    req = next(r for r in RUNS[("phi3_v", "prune")] if r.name == name)
    decision = engines.recorder.decisions[run.tag(name)]
    assert decision.error is None, decision.error
    probe = engines.recorder.admissions[run.tag(name)][0]
    for image, identifier, size in zip(decision.images, probe.identifiers, req.sizes, strict=True):
        h, w = PHI_GRIDS[size]
        rows = engines.recorder.encoder_rows[identifier]
        assert rows.shape[0] == image.num_rows == phi_rows(h, w)
        is_sub = torch.isclose(rows, sub, rtol=1e-4, atol=1e-5).all(-1)
        is_glb = torch.isclose(rows, glb, rtol=1e-4, atol=1e-5).all(-1)
        assert not bool((is_sub & is_glb).any())
        width = 12 * w + 1  # a row of the crops' grid and its newline
        crops_end = 12 * h * width
        expected_sub = [r * width + width - 1 for r in range(12 * h)]
        expected_sub += [crops_end + 1 + r * 13 + 12 for r in range(12)]
        assert is_sub.nonzero().flatten().tolist() == expected_sub
        assert is_glb.nonzero().flatten().tolist() == [crops_end]
        separators = set(expected_sub) | {crops_end}
        assert len(separators) == phi_separators(h, w) == image.num_rows - image.num_prunable
        assert separators <= set(image.keep_rows), f"separator rows {sorted(separators - set(image.keep_rows))} pruned"
        # Uniform 0.5 over the image rows, the separators on top.
        assert len(image.keep_rows) == len(separators) + image.num_prunable // 2
    _assert_pruned(run.outcome(name), num_images=len(req.images))


def test_phi3v_two_images_of_different_crop_grids_are_both_pruned(engines, hf_models):
    run = engines.run("phi3_v", "prune")
    outcome = run.outcome("two_images")
    _assert_pruned(outcome, num_images=2)
    grids = [PHI_GRIDS[size] for size in PHI_TWO_GRIDS.sizes]
    expected = [(phi_rows(h, w), phi_separators(h, w) + (phi_rows(h, w) - phi_separators(h, w)) // 2) for h, w in grids]
    assert [(i["tokens"], i["kept"]) for i in outcome["images"]] == expected == [(457, 241), (757, 397)]
    readmitted = engines.recorder.admissions[run.tag("two_images")][-1]
    assert [length for _, length, _ in readmitted.positions] == [kept for _, kept in expected]
    ref = _check_against_reference(engines, hf_models, "phi3_v", "two_images")
    assert readmitted.prompt_token_ids == ref.prompt.kept_token_ids[0].tolist()
    assert run.free_blocks_after == run.free_blocks_before


def test_phi3v_repeated_pruned_request_hits_the_prefix_cache(engines):
    """The same pruned request again: the same decision and answer, and its pruned prompt's full
    blocks come from the prefix cache (its pruned identifier hashes them as the first run did)."""
    run = engines.run("phi3_v", "prune")
    llm = engines.llm("phi3_v", "prune")
    tag = run.tag("main-again")
    before = num_free_blocks(llm)
    prompt = {"prompt": run.prompts["main"], "multi_modal_data": {"image": _images(PHI_MAIN)[0]}}
    (again,) = llm.generate([prompt], [greedy_params(MAX_TOKENS, logprobs=LOGPROBS, extra_args={"test_tag": tag})],
                            use_tqdm=False)
    assert list(again.outputs[0].token_ids) == run.tokens("main")
    _assert_logprobs_close({tid: lp.logprob for tid, lp in again.outputs[0].logprobs[0].items()},
                           run.first_logprobs("main"), "phi3_v/main-again")
    outcome = again.kv_transfer_params["asymvlm"]
    timing = ("probe_seconds", "scoring_seconds")
    assert {k: v for k, v in outcome.items() if k not in timing} == \
        {k: v for k, v in run.outcome("main").items() if k not in timing}
    assert engines.recorder.decisions[tag].images[0].keep_rows == \
        engines.recorder.decisions[run.tag("main")].images[0].keep_rows
    first = engines.recorder.admissions[run.tag("main")][-1]
    probe, readmitted = engines.recorder.admissions[tag]
    assert readmitted.identifiers == first.identifiers and "#asymvlm" in readmitted.identifiers[0]
    assert first.num_computed_tokens == 0
    prefilled = outcome["prompt_tokens_prefilled"]
    # Every full block but the one holding the last prompt token (always recomputed).
    cached = BLOCK_SIZE * ((prefilled - 1) // BLOCK_SIZE)
    assert again.num_cached_tokens == readmitted.num_computed_tokens == cached > BLOCK_SIZE
    assert readmitted.num_computed_tokens + readmitted.num_scheduled_tokens == prefilled
    assert probe.num_computed_tokens == 0  # the unpruned prompt's image blocks were never cached
    assert num_free_blocks(llm) == before


# ---------------------------------------------------------------- nothing left behind


def test_no_asymvlm_state_is_left_after_the_batches(engines):
    for family, kind in RUNS:  # every engine's batch, whichever tests were selected
        engines.run(family, kind)
    for (family, kind), llm in engines.llms.items():
        sched = scheduler(llm)
        assert not sched.requests and not sched.has_unfinished_requests(), (family, kind)
        assert num_free_blocks(llm) == engines.runs[(family, kind)].free_blocks_after, (family, kind)
        if kind == "plain":
            continue
        for req in RUNS[(family, kind)]:
            for admission in engines.recorder.admissions[f"{family}/{kind}/{req.name}"]:
                assert sched.asymvlm_state(admission.req_id) is None, (family, kind, req.name)
        assert not model_runner(llm)._asymvlm_pending, (family, kind)  # every decision went back
