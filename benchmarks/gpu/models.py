"""Weightless model directories at real shapes, for ``vllm ... load_format="dummy"`` on the lent GPU
(benchmark tooling). No hub access: the tokenizer is the project's tiny one, padded with unused
tokens to the real vocabulary so every id decodes; processors and chat templates are local.

    python benchmarks/gpu/models.py OUT_DIR [--text-layers N]

writes ``OUT_DIR/llava-1.5-7b`` (576 image tokens at 336 px) and ``OUT_DIR/qwen2.5-vl-7b``
(M-RoPE; 1,600 image tokens for a 1,120 px square image). ``gemma_3_4b`` (256 soft tokens per
896 px image) is built on demand by ``benchmarks/serve.py --shape gemma-3-4b``.

What random weights do to AsymVLM's decisions: scores are cosine similarities of random
projections, so every image's importance gap is small and alike
(``benchmarks/results/gaps_tiny_phi3v.json``) and an adaptive rule lands on one tier for all of
them. Serving runs therefore fix the keep ratio (``asymvlm_keep_ratio``); compute and memory
depend only on the kept count, which then matches a trained model's at that ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _tokenizer(vocab: int):
    from asymvlm_vllm.hf.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens([f"<pad{i}>" for i in range(vocab - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab
    return tok


def _finish(out: Path, config, processor, hf_tok, template: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    hf_tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": hf_tok.bos_token_id, "eos_token_id": hf_tok.eos_token_id, "pad_token_id": hf_tok.pad_token_id}))


def llava_7b(out: Path, text_layers: int = 32) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from asymvlm_vllm.hf.tiny import LLAVA_TEMPLATE, _hf_tokenizer, _tid

    tok = _tokenizer(32064)
    hf_tok = _hf_tokenizer(tok, LLAVA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                           unk_token="<unk>", image_token="<image>")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, pad_token_id=_tid(tok, "<pad>"), eos_token_id=_tid(tok, "<eos>"),
                       bos_token_id=_tid(tok, "<bos>"))
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=_tid(tok, "<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=576)
    config.architectures = ["LlavaForConditionalGeneration"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           image_mean=[0.48145466, 0.4578275, 0.40821073],
                                           image_std=[0.26862954, 0.26130258, 0.27577711]),
        tokenizer=hf_tok, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    _finish(out, config, processor, hf_tok, LLAVA_TEMPLATE)
    return out


def qwen2_5_vl_7b(out: Path, text_layers: int = 28) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from asymvlm_vllm.hf.tiny import QWEN_TEMPLATE, _hf_tokenizer, _tid

    tok = _tokenizer(152064)
    hf_tok = _hf_tokenizer(tok, QWEN_TEMPLATE, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           unk_token="<unk>", image_token="<|image_pad|>", video_token="<|video_pad|>",
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                eos_token_id=_tid(tok, "<|im_end|>"), pad_token_id=_tid(tok, "<|endoftext|>"),
                bos_token_id=_tid(tok, "<|endoftext|>"), tie_word_embeddings=False)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  in_channels=3)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=_tid(tok, "<|image_pad|>"),
                              video_token_id=_tid(tok, "<|video_pad|>"),
                              vision_start_token_id=_tid(tok, "<|vision_start|>"),
                              vision_end_token_id=_tid(tok, "<|vision_end|>"), tie_word_embeddings=False)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=hf_tok, video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2,
                                                                temporal_patch_size=2),
        chat_template=QWEN_TEMPLATE)
    _finish(out, config, processor, hf_tok, QWEN_TEMPLATE)
    return out


def gemma_3_4b(out: Path, text_layers: int = 34) -> Path:
    """google/gemma-3-4b-it's shapes: SigLIP so400m at 896 px, 256 soft tokens per image, a
    34-layer text model with 5 sliding-window (1,024) layers per global one."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig

    from asymvlm_vllm.hf.tiny import GEMMA3_TEMPLATE, _hf_tokenizer, _tid

    tok = _tokenizer(262208)
    hf_tok = _hf_tokenizer(tok, GEMMA3_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                           unk_token="<unk>", boi_token="<start_of_image>", eoi_token="<end_of_image>",
                           image_token="<image_soft_token>")
    text = Gemma3TextConfig(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=text_layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        max_position_embeddings=131072, sliding_window=1024,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(text_layers)],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        pad_token_id=_tid(tok, "<pad>"), eos_token_id=_tid(tok, "<eos>"), bos_token_id=_tid(tok, "<bos>"))
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=896, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                          boi_token_index=_tid(tok, "<start_of_image>"), eoi_token_index=_tid(tok, "<end_of_image>"),
                          image_token_index=_tid(tok, "<image_soft_token>"))
    config.architectures = ["Gemma3ForConditionalGeneration"]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 896, "width": 896}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, do_pan_and_scan=False),
        tokenizer=hf_tok, image_seq_length=256, chat_template=GEMMA3_TEMPLATE)
    _finish(out, config, processor, hf_tok, GEMMA3_TEMPLATE)
    return out


def llava_mid(out: Path) -> Path:
    """A LLaVA-1.5 layout small enough for the CPU engine yet with a prefill that is real work on
    two cores: 576 image tokens (CLIP at 336 px, 4 layers of 768) and an 8-layer, 1,024-wide
    Llama (``benchmarks/probe_cost.py --cpu-test-engine --model``)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    from asymvlm_vllm.hf.tiny import LLAVA_TEMPLATE, _hf_tokenizer, _tid

    tok = _tokenizer(32064)
    hf_tok = _hf_tokenizer(tok, LLAVA_TEMPLATE, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                           unk_token="<unk>", image_token="<image>")
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                       pad_token_id=_tid(tok, "<pad>"), eos_token_id=_tid(tok, "<eos>"), bos_token_id=_tid(tok, "<bos>"))
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                              image_size=336, patch_size=14, projection_dim=512, hidden_act="quick_gelu")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=_tid(tok, "<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=576)
    config.architectures = ["LlavaForConditionalGeneration"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=hf_tok, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    _finish(out, config, processor, hf_tok, LLAVA_TEMPLATE)
    return out


SHAPES = {"llava-1.5-7b": llava_7b, "gemma-3-4b": gemma_3_4b, "qwen2.5-vl-7b": qwen2_5_vl_7b}
"""Name → builder ``(out, text_layers=real) -> out`` (``benchmarks/serve.py --shape``)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu/models.py", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--text-layers", type=int, default=None, help="fewer language-model layers (default: real)")
    parser.add_argument("--cpu-mid", action="store_true", help="only OUT_DIR/llava-mid (llava_mid), for the CPU engine")
    args = parser.parse_args(argv)
    if args.cpu_mid:
        print(llava_mid(args.out / "llava-mid"))
        return
    layers = {} if args.text_layers is None else {"text_layers": args.text_layers}
    print(llava_7b(args.out / "llava-1.5-7b", **layers))
    try:
        print(qwen2_5_vl_7b(args.out / "qwen2.5-vl-7b", **layers))
    except ImportError as e:  # e.g. no torchvision for Qwen's video processor: the Qwen step will say so
        print(f"qwen2.5-vl-7b not written: {e}".splitlines()[0])


if __name__ == "__main__":
    main()
