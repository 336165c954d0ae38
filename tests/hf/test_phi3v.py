"""The project's Phi-3.5-Vision implementation (``asymvlm_vllm.hf.phi3v``) on the tiny checkpoint.

Row positions are worked by hand from the layout the model card describes (crops' rows of
``12·w_crop`` patches each followed by a newline, one global separator, the global view's 12
rows of 12 patches and a newline each), not taken from ``core.layouts``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from asymvlm_vllm.core import AsymVLMError, UniformBudget
from asymvlm_vllm.core.layouts import hd_image_layout
from asymvlm_vllm.hf.phi3v import IMAGE_TOKEN_ID, clip_vit_l_336_config, hd_transformed_picture, hub_state_dict, load_phi3v

from .conftest import random_image, remote_hd_transform

WIDE, TALL = random_image(11, 64, 128), random_image(12, 128, 64)  # 1 x 2 and 2 x 1 crops


def _separator_rows(h_crop: int, w_crop: int) -> tuple[list[int], int, int]:
    """(newline rows, the global separator's row, total rows) of an image of h_crop x w_crop crops."""
    rows, cols = 12 * h_crop, 12 * w_crop
    newlines = [r * (cols + 1) + cols for r in range(rows)]
    glb = rows * (cols + 1)
    newlines += [glb + 1 + r * 13 + 12 for r in range(12)]
    return newlines, glb, glb + 1 + 12 * 13


@pytest.fixture(scope="module")
def phi(tiny_vlm):
    return tiny_vlm("phi3_v")


@pytest.fixture(scope="module")
def two_images(phi):
    """One prompt with a wide and a tall image, as the processor gives it (image k marked -k)."""
    text = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat differs between the two pictures?<|end|>\n<|assistant|>\n"
    return phi.processor(text, images=[WIDE, TALL], return_tensors="pt")


def test_hub_names_round_trip_the_checkpoint(tiny_model_dirs, phi):
    """Every tensor of the checkpoint (hub names) lands in the model and comes back unchanged."""
    stored = load_file(tiny_model_dirs("phi3_v") / "model.safetensors")
    assert "model.embed_tokens.weight" in stored and "model.vision_embed_tokens.glb_GN" in stored
    assert "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight" in stored
    ours = hub_state_dict(phi.model)
    assert ours.keys() == stored.keys()
    assert all(torch.equal(ours[k], stored[k]) for k in stored)


def test_negative_image_ids_and_the_image_token_give_the_same_logits(phi, two_images):
    ids = two_images["input_ids"]
    assert int((ids == -1).sum()) == 457 and int((ids == -2).sum()) == 469 and not (ids == IMAGE_TOKEN_ID).any()
    rewritten = ids.masked_fill(ids < 0, IMAGE_TOKEN_ID)
    with torch.inference_mode():
        processor_style = phi.model(input_ids=ids, pixel_values=two_images["pixel_values"],
                                    image_sizes=two_images["image_sizes"]).logits
        vllm_style = phi.model(input_ids=rewritten, pixel_values=two_images["pixel_values"],
                               image_sizes=two_images["image_sizes"]).logits
    assert torch.equal(processor_style, vllm_style)
    with pytest.raises(AsymVLMError, match="image tokens for"):
        phi.model(input_ids=rewritten[:, 5:], pixel_values=two_images["pixel_values"],
                  image_sizes=two_images["image_sizes"])


def test_features_follow_the_hd_layout_and_the_separators_are_the_learned_vectors(phi, two_images):
    sizes = two_images["image_sizes"]
    assert sizes.tolist() == [[336, 672], [672, 336]]
    with torch.inference_mode():
        features = phi.model.get_image_features(two_images["pixel_values"], sizes)
        newline, glb = phi.model.model.vision_embed_tokens.separator_embeddings()
    structural = phi.adapter.prunable_rows(phi.model, two_images, features)
    for f, (h, w), crops, prunable in zip(features, sizes.tolist(), [(1, 2), (2, 1)], structural):
        newlines, glb_row, total = _separator_rows(*crops)
        assert f.shape == (total, 128) and total == hd_image_layout(h, w).num_rows
        torch.testing.assert_close(f[newlines], newline.expand(len(newlines), -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f[glb_row], glb, atol=1e-5, rtol=1e-5)
        patches = torch.ones(total, dtype=torch.bool)
        patches[newlines + [glb_row]] = False
        for separator in (newline, glb):  # no image patch looks like a separator
            assert (f[patches] - separator).abs().amax(-1).min() > 1e-3
        assert torch.equal(prunable, patches)  # the adapter's structural rows are exactly the separators
    # Pruning never drops them.
    prompt = phi.prune(phi.process([WIDE], ["What is shown?"]), UniformBudget(0.1))
    (decision,) = prompt.images[0]
    newlines, glb_row, _ = _separator_rows(1, 2)
    structural = torch.zeros(457, dtype=torch.bool)
    structural[newlines + [glb_row]] = True
    assert torch.equal(~decision.prunable, structural) and decision.kept_rows[structural].all()
    assert decision.decision.num_keep == 43  # floor(432 x 0.1)


# (picture height, width), the region changed (rows, columns of the picture), the crops' grid
# and the cells of the changed crop. The regions stay 2 px clear of a crop border: the HD
# resize blends neighbouring pixels. Square: 2 x 2 crops, which tells row-major crop order
# from column-major (1 x 2 and 2 x 1 cannot).
CROP_CASES = {
    "wide": ((64, 128), (slice(None), slice(66, None)), (12, 24), (slice(None), slice(12, None))),
    "tall": ((128, 64), (slice(66, None), slice(None)), (24, 12), (slice(12, None), slice(None))),
    "square": ((64, 64), (slice(None, 30), slice(34, None)), (24, 24), (slice(None, 12), slice(12, None))),
}


@pytest.mark.parametrize("case", list(CROP_CASES))
def test_crop_patches_tile_the_hd_image_row_major(phi, case):
    """What the heatmap relies on: the first prunable rows are the (12·h_crop, 12·w_crop) grid
    of the HD image, row-major, crop by crop. Changing the picture inside one crop changes
    exactly that crop's cells (CLIP runs per crop)."""
    size, region, grid, cells = CROP_CASES[case]
    picture = np.asarray(random_image(13, *size)).copy()
    changed = picture.copy()
    changed[region] = 255 - changed[region]
    inputs = phi.process([Image.fromarray(picture), Image.fromarray(changed)], ["What?", "What?"])
    with torch.inference_mode():
        features = phi.adapter.image_features(phi.model, inputs)
    prunable = phi.adapter.prunable_rows(phi.model, inputs, features)
    count = grid[0] * grid[1]
    before, after = (f[m][:count].reshape(*grid, -1) for f, m in zip(features, prunable))
    differs = (before - after).abs().amax(-1) > 1e-5
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[cells] = True
    assert torch.equal(differs, expected)


@pytest.mark.parametrize(("width", "height", "crops"),
                         [(128, 64, 4), (64, 128, 4), (160, 64, 4), (37, 100, 4), (64, 64, 4), (333, 200, 16),
                          (50, 801, 4)])
def test_the_heatmap_picture_is_the_processors_hd_image(width, height, crops):
    picture = Image.fromarray((np.random.RandomState(width + height).rand(height, width, 3) * 255).astype("uint8"))
    expected = remote_hd_transform()(picture, hd_num=crops)
    ours = hd_transformed_picture(picture, expected.size[1], expected.size[0])
    assert ours.size == expected.size and np.array_equal(np.asarray(ours), np.asarray(expected.convert("RGB")))


def test_hd_picture_refuses_a_canvas_of_another_image():
    with pytest.raises(ValueError, match="whole 336-px crops"):
        hd_transformed_picture(WIDE, 300, 672)
    with pytest.raises(AsymVLMError, match="does not fit the HD canvas"):
        hd_transformed_picture(Image.new("RGB", (64, 64)), 336, 672)  # a square picture needs a square canvas


def test_bad_directories_give_clear_errors(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs("phi3_v")
    raw = json.loads((source / "config.json").read_text())

    def directory(name, config, weights=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        if weights is not None:
            weights(folder)
        return folder

    def link_weights(folder):
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")

    with pytest.raises(AsymVLMError, match="selects no layer of CLIP ViT-L/14's 24"):
        load_phi3v(directory("layer", {**raw, "img_processor": {**raw["img_processor"], "layer_idx": -25}}, link_weights))
    with pytest.raises(AsymVLMError, match="selects no layer"):
        clip_vit_l_336_config(24)
    assert clip_vit_l_336_config(-2).num_hidden_layers == 23 and clip_vit_l_336_config(0).num_hidden_layers == 1
    with pytest.raises(AsymVLMError, match="has no safetensors weights; AsymVLM never loads pickled checkpoints"):
        load_phi3v(directory("pickled", raw, lambda f: (f / "pytorch_model.bin").write_bytes(b"\x80\x02")))
    with pytest.raises(AsymVLMError, match=r"is not a model directory \(no config.json\)"):
        load_phi3v(tmp_path)
    with pytest.raises(AsymVLMError, match="is not a Phi-3-V checkpoint"):
        load_phi3v(directory("llava", {"architectures": ["LlavaForConditionalGeneration"]}, link_weights))

    # A checkpoint under other names must not load with uninitialised weights.
    def without_separator(folder):
        state = load_file(source / "model.safetensors")
        del state["model.vision_embed_tokens.glb_GN"]
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(AsymVLMError, match=r"lacks 1 weight\(s\) of Phi3VForCausalLM: model.vision_embed_tokens.glb_GN"):
        load_phi3v(directory("missing", raw, without_separator))


def test_the_library_never_trusts_remote_code_by_default(tiny_model_dirs):
    from asymvlm_vllm.hf import PrunedVLM

    with pytest.raises(AsymVLMError, match=r"remote code .* trust_remote_code=True \(--trust-remote-code\)"):
        PrunedVLM.from_pretrained(tiny_model_dirs("phi3_v"))
