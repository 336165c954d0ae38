# Written by asymvlm-vllm for its tiny offline Phi-3.5-Vision checkpoints. It mirrors the
# interface of the processor that ships with microsoft/Phi-3.5-vision-instruct, which is what
# vLLM's ``phi3v.py`` and AsymVLM's transformers path call: ``img_tokens``,
# ``calc_num_image_tokens_from_image_size``, and a call on ONE prompt whose ``<|image_k|>``
# tags become ``-k`` repeated once per image token.
"""Processor class for Phi-3-V."""

import re
from collections.abc import Sequence

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import TensorType

from .image_processing_phi3_v import Phi3VImageProcessor  # noqa: F401  (registers the class for auto loading)

IMAGE_TAG = r"<\|image_\d+\|>"


class _ImageTags(Sequence):
    """``<|image_1|>``, ``<|image_2|>``, ...: the tag of each image by index, without building a list."""

    def __len__(self):
        return 1000000

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return f"<|image_{index + 1}|>"


class Phi3VProcessor(ProcessorMixin):
    """Phi-3-V processor: the image processor and the tokenizer of one prompt."""

    # transformers 5 finds the image processor through preprocessor_config.json's auto_map
    special_image_token = "<|image|>"

    def __init__(self, image_processor, tokenizer):
        super().__init__(image_processor, tokenizer)
        self.img_tokens = _ImageTags()

    def __call__(self, text, images=None, padding=False, truncation=None, max_length=None,
                 return_tensors=TensorType.PYTORCH, **kwargs):
        image_inputs = self.image_processor(images, return_tensors=return_tensors) if images is not None else {}
        return self._convert_images_texts_to_inputs(image_inputs, text, padding=padding, truncation=truncation,
                                                    max_length=max_length, return_tensors=return_tensors)

    def calc_num_image_tokens(self, images):
        return self.image_processor.calc_num_image_tokens(images)

    def calc_num_image_tokens_from_image_size(self, width, height):
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    @property
    def special_image_token_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.special_image_token)

    def get_special_image_token_id(self):
        return self.tokenizer.convert_tokens_to_ids(self.special_image_token)

    def _convert_images_texts_to_inputs(self, images, texts, padding=False, truncation=None, max_length=None,
                                        return_tensors=None):
        if not len(images):
            model_inputs = self.tokenizer(texts, return_tensors=return_tensors, padding=padding,
                                          truncation=truncation, max_length=max_length)
            return BatchFeature(data={**model_inputs})
        if not isinstance(texts, str):
            raise ValueError("Phi3VProcessor processes one prompt with images at a time; got a batch")

        prompt_chunks = [self.tokenizer(chunk).input_ids for chunk in re.split(IMAGE_TAG, texts)]
        num_img_tokens = images["num_img_tokens"]
        pixel_values, image_sizes = images["pixel_values"], images["image_sizes"]

        image_tags = re.findall(IMAGE_TAG, texts)
        image_ids = [int(s.split("|")[1].split("_")[-1]) for s in image_tags]
        unique_image_ids = sorted(set(image_ids))
        if unique_image_ids != list(range(1, len(unique_image_ids) + 1)):
            raise ValueError(f"image ids must be continuous integers starting from 1, got {unique_image_ids}")
        if len(unique_image_ids) != len(pixel_values):
            raise ValueError(f"{len(unique_image_ids)} image tags for {len(pixel_values)} images")

        image_ids_pad = [[-iid] * int(num_img_tokens[iid - 1]) for iid in image_ids]
        if len(prompt_chunks) > len(image_ids_pad):
            image_ids_pad.append([])
        input_ids = []
        offset = 0
        if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == self.tokenizer.bos_token_id:
            offset = 1
            input_ids.append(prompt_chunks[0][0])
        for chunk, pad in zip(prompt_chunks, image_ids_pad):
            input_ids.extend(chunk[offset:])
            input_ids.extend(pad)

        input_ids = torch.tensor(input_ids, dtype=torch.long).unsqueeze(0)
        attention_mask = (input_ids > -1000000).to(torch.long)
        return BatchFeature(data={"input_ids": input_ids, "attention_mask": attention_mask,
                                  "pixel_values": pixel_values, "image_sizes": image_sizes})

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))
