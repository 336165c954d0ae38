# Written by asymvlm-vllm for its tiny offline Phi-3.5-Vision checkpoints. It mirrors the
# interface and the arithmetic of the image processor that ships with
# microsoft/Phi-3.5-vision-instruct: the HD transform (resize to a grid of at most
# ``num_crops`` 336-px crops, pad to whole crops), a bicubic 336-px global view first, crops
# padded to ``num_crops + 1``, and ``(h*w + 1) * 144 + 1 + (h + 1) * 12`` image tokens.
"""Image processor class for Phi-3-V."""

import numpy as np
import torch
import torchvision
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, make_list_of_images
from transformers.image_transforms import convert_to_rgb

CROP = 336


def padding_336(b):
    width, height = b.size
    tar = int(np.ceil(height / CROP) * CROP)
    top_padding = int((tar - height) / 2)
    bottom_padding = tar - height - top_padding
    return torchvision.transforms.functional.pad(b, [0, top_padding, 0, bottom_padding], fill=[255, 255, 255])


def calc_padded_size(width, height, padding_unit=CROP):
    target_height = int(np.ceil(height / padding_unit) * padding_unit)
    return width, target_height


def _hd_scale(ratio, hd_num):
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    return scale - 1


def HD_transform(img, hd_num=16):
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.TRANSPOSE)
        trans = True
        width, height = img.size
    ratio = width / height
    scale = _hd_scale(ratio, hd_num)
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    img = torchvision.transforms.functional.resize(img, [new_h, new_w])
    img = padding_336(img)
    if trans:
        img = img.transpose(Image.TRANSPOSE)
    return img


def calc_hd_transform_size(width, height, hd_num=16):
    transposed = False
    if width < height:
        width, height = height, width
        transposed = True
    ratio = width / height
    scale = _hd_scale(ratio, hd_num)
    new_width = int(scale * CROP)
    new_height = int(new_width / ratio)
    padded_width, padded_height = calc_padded_size(new_width, new_height)
    if transposed:
        padded_width, padded_height = padded_height, padded_width
    return padded_width, padded_height


def pad_to_max_num_crops_tensor(images, max_crops=5):
    b, _, h, w = images.shape
    if b < max_crops:
        pad = torch.zeros(max_crops - b, 3, h, w, dtype=images.dtype, device=images.device)
        images = torch.cat([images, pad], dim=0)
    return images


def _num_tokens(h, w):
    return int((h // CROP * (w // CROP) + 1) * 144 + 1 + (h // CROP + 1) * 12)


class Phi3VImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, num_crops=1, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.image_mean = image_mean
        self.image_std = image_std
        self.do_convert_rgb = do_convert_rgb

    def calc_num_image_tokens(self, images):
        if not isinstance(images, list):
            images = [images]
        sizes = [calc_hd_transform_size(im.size[0], im.size[1], hd_num=self.num_crops) for im in images]
        return [_num_tokens(h, w) for w, h in sizes]

    def calc_num_image_tokens_from_image_size(self, width, height):
        new_width, new_height = calc_hd_transform_size(width, height, hd_num=self.num_crops)
        return _num_tokens(new_height, new_width)

    def preprocess(self, images, image_mean=None, image_std=None, do_convert_rgb=None, return_tensors=None,
                   **kwargs):
        image_mean = image_mean if image_mean is not None else self.image_mean
        image_std = image_std if image_std is not None else self.image_std
        do_convert_rgb = do_convert_rgb if do_convert_rgb is not None else self.do_convert_rgb
        images = make_list_of_images(images)
        if do_convert_rgb:
            images = [convert_to_rgb(image) for image in images]
        to_tensor = torchvision.transforms.Compose([
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(image_mean, image_std),
        ])
        hd_images = [to_tensor(HD_transform(im, hd_num=self.num_crops)) for im in images]
        global_image = [
            torch.nn.functional.interpolate(im.unsqueeze(0).float(), size=(CROP, CROP), mode="bicubic").to(im.dtype)
            for im in hd_images
        ]
        shapes = [[im.size(1), im.size(2)] for im in hd_images]
        num_img_tokens = [_num_tokens(h, w) for h, w in shapes]
        crops = [
            im.reshape(1, 3, h // CROP, CROP, w // CROP, CROP).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, CROP, CROP)
            .contiguous()
            for im, (h, w) in zip(hd_images, shapes)
        ]
        crops = [torch.cat([g, c], dim=0) for g, c in zip(global_image, crops)]
        pixel_values = torch.stack([pad_to_max_num_crops_tensor(c, self.num_crops + 1) for c in crops], dim=0)
        data = {"pixel_values": pixel_values, "image_sizes": shapes, "num_img_tokens": num_img_tokens}
        return BatchFeature(data=data, tensor_type=return_tensors)


