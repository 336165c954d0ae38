"""Tiny random-weight VLM checkpoints built offline, for tests and ``asymvlm demo``.

Each builder writes a normal Hugging Face model directory (config, safetensors weights,
tokenizer, processor, chat template) that both transformers and vLLM load without a hub.
The weights are random (seeded), so answers are gibberish; what matters is that the image
token counts are large enough (64–192) for budgets to matter, and that every code path of a
real checkpoint runs. Building one takes about a second.

The vision-tower keys are written in the hub layout (``vision_tower.vision_model.*``) that
vLLM's loaders expect; transformers loads both layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["FAMILIES", "build_tiny_model", "build_tokenizer"]

VOCAB = 512  # == len(tokenizer): every id a random model can emit is decodable

COMMON_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
GEMMA3_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
LLAVA_SPECIALS = ["<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
ALL_SPECIALS = COMMON_SPECIALS + GEMMA3_SPECIALS + LLAVA_SPECIALS + QWEN_SPECIALS

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image in one sentence.",
    "What is shown in this picture? A red square on a blue background.",
    "What is the total amount on this invoice? The total is 42 dollars.",
    "Which colour is the largest shape in the chart?",
    "user: hello there! assistant: hi, how can I help you today?",
    "Vision language models read images and text tokens together.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" \n",
]

# Minimal chat templates; content may be a string or a list of {"type": ...} parts.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}{{ '<start_of_image>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ m['role'].upper() + ': ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_level_bpe(special_tokens: list[str], corpus: list[str] = CORPUS):
    """A byte-level BPE tokenizer trained on ``corpus`` to 400 ids, ``special_tokens`` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tokenizer(corpus: list[str] = CORPUS):
    """A byte-level BPE tokenizer with every family's special tokens, ``VOCAB`` ids in all,
    its merges learned from ``corpus``."""
    from tokenizers import AddedToken

    tok = _byte_level_bpe(ALL_SPECIALS, corpus)
    # vLLM's Gemma 3 processor looks up "\n", "\n\n", ... literally (Gemma's vocabulary has them).
    tok.add_tokens([AddedToken("\n" * k, normalized=False, special=False) for k in (4, 3, 2, 1)])
    n = tok.get_vocab_size()
    if n > VOCAB:
        raise RuntimeError(f"tokenizer has {n} ids, more than the model's {VOCAB}")
    tok.add_tokens([f"<unused{i}>" for i in range(VOCAB - n)])
    return tok


def _tid(tok, s: str) -> int:
    i = tok.token_to_id(s)
    if i is None:
        raise RuntimeError(f"token {s!r} is missing from the tiny tokenizer")
    return i


def _hf_tokenizer(tok, template: str, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, chat_template=template, **special)


def _hub_vision_keys(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    state = load_file(path)
    fixed = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        fixed[key] = value.contiguous()
    save_file(fixed, path, metadata={"format": "pt"})


def _save(out: Path, model, processor, hf_tok, template: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _hub_vision_keys(out)
    processor.save_pretrained(out)
    hf_tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": hf_tok.bos_token_id, "eos_token_id": hf_tok.eos_token_id,
                    "pad_token_id": hf_tok.pad_token_id})
    )


def _text_config(tok, **extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096) | {
        "initializer_range": 0.08, **extra}


def _build_gemma3(out: Path, tok, dtype: torch.dtype) -> None:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    hf_tok = _hf_tokenizer(tok, GEMMA3_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                           unk_token="<unk>", boi_token="<start_of_image>", eoi_token="<end_of_image>",
                           image_token="<image_soft_token>")
    text = Gemma3TextConfig(
        **_text_config(tok, head_dim=32, query_pre_attn_scalar=32,
                       pad_token_id=_tid(tok, "<pad>"), eos_token_id=_tid(tok, "<eos>"), bos_token_id=_tid(tok, "<bos>")),
        # Longer than any test prompt: vLLM skips bidirectional image ranges longer than the window,
        # so a short window would make pruning switch bidirectional attention on.
        sliding_window=1024,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=64, patch_size=8, vision_use_head=False)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=64,
                       boi_token_index=_tid(tok, "<start_of_image>"), eoi_token_index=_tid(tok, "<end_of_image>"),
                       image_token_index=_tid(tok, "<image_soft_token>"))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).to(dtype).eval()
    # transformers initialises the projection to zeros: every image embedding would be 0.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        p = model.model.multi_modal_projector.mm_input_projection_weight
        p.copy_(torch.randn(p.shape, generator=g).mul_(0.15).to(p.dtype))
    ip = Gemma3ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                              do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=hf_tok, image_seq_length=64, chat_template=GEMMA3_TEMPLATE)
    _save(out, model, proc, hf_tok, GEMMA3_TEMPLATE)


def _llama_text(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_config(tok, head_dim=32, pad_token_id=_tid(tok, "<pad>"),
                                      eos_token_id=_tid(tok, "<eos>"), bos_token_id=_tid(tok, "<bos>"), **extra))


def _build_llava(out: Path, tok, dtype: torch.dtype) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    hf_tok = _hf_tokenizer(tok, LLAVA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                           unk_token="<unk>", image_token="<image>")
    # 64 px / 8 px patches = 8 x 8 = 64 image tokens (+ CLS, dropped by the "default" strategy)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=8, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_text(tok), image_token_index=_tid(tok, "<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=64)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=8, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    _save(out, model, proc, hf_tok, LLAVA_TEMPLATE)


def _build_llava_next(out: Path, tok, dtype: torch.dtype) -> None:
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    hf_tok = _hf_tokenizer(tok, LLAVA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                           unk_token="<unk>", image_token="<image>")
    # 32 px tiles of 8 px patches: 16 base tokens + up to 8 x 8 high-res tokens + one newline per row
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=64)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(vision_config=vision, text_config=_llama_text(tok), image_token_index=_tid(tok, "<image>"),
                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", image_grid_pinpoints=pinpoints, image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).to(dtype).eval()
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=hf_tok, patch_size=8,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    _save(out, model, proc, hf_tok, LLAVA_TEMPLATE)


def _build_qwen2_5_vl(out: Path, tok, dtype: torch.dtype) -> None:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    hf_tok = _hf_tokenizer(tok, QWEN_TEMPLATE, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           unk_token="<unk>", image_token="<|image_pad|>", video_token="<|video_pad|>",
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    text = _text_config(
        tok, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        eos_token_id=_tid(tok, "<|im_end|>"), pad_token_id=_tid(tok, "<|endoftext|>"),
        bos_token_id=_tid(tok, "<|endoftext|>"), tie_word_embeddings=True,
    )  # head_dim = 128 / 4 = 32 -> sum(mrope_section) == 16
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1], in_channels=3)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                           image_token_id=_tid(tok, "<|image_pad|>"), video_token_id=_tid(tok, "<|video_pad|>"),
                           vision_start_token_id=_tid(tok, "<|vision_start|>"),
                           vision_end_token_id=_tid(tok, "<|vision_end|>"), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    # 112..280 px per side -> 8..20 patches of 14 px -> 16..100 tokens after the 2 x 2 merge
    size = {"shortest_edge": 112 * 112, "longest_edge": 280 * 280}
    ip = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    vp = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=hf_tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    _save(out, model, proc, hf_tok, QWEN_TEMPLATE)


# Phi-3-V's special tokens sit at the hub vocabulary's ids: vLLM's phi3v.py hard-codes 32044.
PHI3V_VOCAB = 32064
PHI3V_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<|endoftext|>", 32001: "<|assistant|>", 32006: "<|system|>",
    32007: "<|end|>", 32010: "<|user|>", 32044: "<|image|>",
}
# microsoft/Phi-3.5-vision-instruct's template: content is a string, images are "<|image_k|>" tags in it.
PHI3V_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)
PHI3V_REMOTE_FILES = ("configuration_phi3_v.py", "image_processing_phi3_v.py", "processing_phi3_v.py")


def build_phi3v_tokenizer():
    """Byte-level BPE over the hub Phi-3 vocabulary's 32,064 ids: the specials at their hub ids,
    every other id past the learned merges a decodable ``<unusedN>`` token."""
    from tokenizers import Tokenizer

    spec = json.loads(_byte_level_bpe([PHI3V_SPECIALS[i] for i in range(3)]).to_str())
    vocab = spec["model"]["vocab"]
    learned = len(vocab)
    if learned > min(PHI3V_SPECIALS.keys() - {0, 1, 2}):
        raise RuntimeError(f"the tiny Phi-3-V tokenizer learned {learned} ids, into the special range")
    for i in range(learned, PHI3V_VOCAB):
        vocab[PHI3V_SPECIALS.get(i, f"<unused{i}>")] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(PHI3V_SPECIALS.values()))
    for i, name in PHI3V_SPECIALS.items():
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"{name} got id {tok.token_to_id(name)}, not {i}")
    return tok


def _build_phi3_v(out: Path, tok, dtype: torch.dtype) -> None:
    from importlib.resources import files

    from safetensors.torch import save_file

    from .phi3v import Phi3VForCausalLM, hub_state_dict, phi3v_text_config

    hf_tok = _hf_tokenizer(tok, PHI3V_TEMPLATE, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           unk_token="<unk>")
    raw = {
        "architectures": ["Phi3VForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig"},
        "model_type": "phi3_v",
        "vocab_size": PHI3V_VOCAB, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "initializer_range": 0.08, "bos_token_id": 1, "eos_token_id": 32007, "pad_token_id": 32000,
        "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        # CLIP ViT-L/14-336 as in the real model, cut after its first layer (-2 in the real one: 23 layers).
        "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                          "name": "clip_vision_model", "num_img_tokens": 144, "layer_idx": -24},
    }
    torch.manual_seed(0)
    model = Phi3VForCausalLM(phi3v_text_config(raw)).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the separators are trained vectors in the real model, not zeros
        for p in (model.model.vision_embed_tokens.glb_GN, model.model.vision_embed_tokens.sub_GN):
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    out.mkdir(parents=True, exist_ok=True)
    save_file(hub_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for name in PHI3V_REMOTE_FILES:
        (out / name).write_text((files(__package__) / "phi3v_remote" / name).read_text())
    hf_tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(PHI3V_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                     "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"},
        "image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor",
        "num_crops": 4, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000],
                                                           "pad_token_id": 32000}))


# Families whose tokenizer is not :func:`build_tokenizer`'s shared one.
TOKENIZERS = {"phi3_v": build_phi3v_tokenizer}
FAMILIES = {
    "gemma3": _build_gemma3,
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "phi3_v": _build_phi3_v,
    "qwen2_5_vl": _build_qwen2_5_vl,
}


def build_tiny_model(family: str, out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` (one of :data:`FAMILIES`) to ``out``.

    Deterministic: the same family and dtype give the same weights.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(FAMILIES)}")
    out = Path(out)
    FAMILIES[family](out, TOKENIZERS.get(family, build_tokenizer)(), dtype)
    return out
