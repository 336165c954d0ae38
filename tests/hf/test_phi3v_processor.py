"""The tiny Phi-3-V's remote-code processor and tokenizer lay prompts out as the real ones do.

Expected counts are worked by hand from the HD transform (resize to at most ``num_crops``
336-px crops keeping the aspect ratio, pad the short side to whole crops) and the token rule
``(h·w + 1)·144 + 1 + (h + 1)·12``; none comes from the code under test.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

# (width, height, num_crops) -> (HD height, HD width, image tokens)
CASES = {
    (128, 64, 4): (336, 672, 457),       # 2:1 -> 1 x 2 crops
    (64, 128, 4): (672, 336, 469),       # 1:2 -> 2 x 1 crops
    (64, 64, 4): (672, 672, 757),        # square -> 2 x 2
    (64, 64, 1): (336, 336, 313),        # one crop
    (1700, 2200, 16): (1344, 1344, 2509),  # a DocVQA-like page at the paper's 16 crops
    (50, 8000, 4): (1344, 336, 781),     # vLLM's profiling image (16:1): 4 x 1
}


@pytest.fixture(scope="module")
def phi(tiny_model_dirs):
    from transformers import AutoProcessor

    path = tiny_model_dirs("phi3_v")
    return path, AutoProcessor.from_pretrained(path, trust_remote_code=True, local_files_only=True)


def test_the_processor_is_remote_code_and_needs_the_users_consent(phi):
    from transformers import AutoProcessor

    path, _ = phi
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoProcessor.from_pretrained(path, trust_remote_code=False, local_files_only=True)


def test_special_tokens_sit_at_the_hub_ids(phi):
    _, processor = phi
    tok = processor.tokenizer
    ids = {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|end|>": 32007, "<|user|>": 32010, "<|image|>": 32044}
    assert {name: tok.convert_tokens_to_ids(name) for name in ids} == ids
    assert len(tok) == 32064
    assert processor.img_tokens[0] == "<|image_1|>" and processor.img_tokens[:3][-1] == "<|image_3|>"
    # Every id the random model can emit decodes.
    assert all(isinstance(tok.decode([i]), str) for i in (0, 399, 400, 20325, 32043, 32063))


@pytest.mark.parametrize(("width", "height", "crops"), list(CASES), ids=[f"{w}x{h}@{c}" for w, h, c in CASES])
def test_image_token_counts_follow_the_hd_transform(phi, width, height, crops):
    _, processor = phi
    hd_h, hd_w, tokens = CASES[(width, height, crops)]
    image_processor = processor.image_processor
    old = image_processor.num_crops
    image_processor.num_crops = crops
    try:
        assert processor.calc_num_image_tokens_from_image_size(width, height) == tokens
        if width * height <= 128 * 128:  # run the full preprocessing on the small ones
            out = processor("<|user|>\n<|image_1|>\nWhat?<|end|>\n", images=[Image.new("RGB", (width, height))],
                            return_tensors="pt")
            assert out["image_sizes"].tolist() == [[hd_h, hd_w]]
            assert int((out["input_ids"] == -1).sum()) == tokens
            assert out["pixel_values"].shape == (1, crops + 1, 3, 336, 336)
            used = 1 + (hd_h // 336) * (hd_w // 336)
            assert bool((out["pixel_values"][0, used:] == 0).all())  # padding crops are zeros
    finally:
        image_processor.num_crops = old


def test_two_images_get_their_own_negative_ids_in_tag_order(phi):
    _, processor = phi
    text = "<|user|>\n<|image_1|>\nfirst\n<|image_2|>\nsecond<|end|>\n<|assistant|>\n"
    out = processor(text, images=[Image.new("RGB", (128, 64)), Image.new("RGB", (64, 128))], return_tensors="pt")
    ids = out["input_ids"][0]
    assert int((ids == -1).sum()) == 457 and int((ids == -2).sum()) == 469
    first, second = (ids == -1).nonzero().flatten(), (ids == -2).nonzero().flatten()
    assert int(first[-1]) < int(second[0])
    text_ids = ids[ids >= 0].tolist()
    assert processor.tokenizer.decode(text_ids) == text.replace("<|image_1|>", "").replace("<|image_2|>", "")
    with pytest.raises(ValueError, match="image"):
        processor("<|image_1|>\n<|image_3|>", images=[Image.new("RGB", (64, 64))] * 2, return_tensors="pt")
    assert torch.equal(out["attention_mask"], torch.ones_like(out["input_ids"]))
