"""Prompts -> model inputs: what both decoding entry points (`llava.decoding`) start from.

A `Prompt` is first encoded on its own (`encode_prompt`: the model's conversation template,
`<image>` expanded, images preprocessed), which is where bad input is found, one prompt at a
time. Encoded prompts are then left-padded into one batch (`left_padded_batch`) for
`llava.decoding.BatchDecoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llava.image_processing import load_pixel_values
from llava.templates import SampleRejected
from llava.tokenization import tokenize_prompt


@dataclass
class Prompt:
    messages: list[dict]  # LLaVA-format turns ending with a user turn; `<image>` marks where images go
    images: list[bytes] = field(default_factory=list)  # encoded images, in `<image>` order


@dataclass
class EncodedPrompt:
    input_ids: list[int]
    pixel_values: list[np.ndarray]  # one (3, S, S) float32 array per image


def encode_prompt(model, prompt: Prompt) -> EncodedPrompt:
    """Raises SampleRejected / ImageError / PromptTooLong, naming what is wrong with this prompt."""
    ids, n_images = tokenize_prompt(
        prompt.messages,
        model.tokenizer,
        model.config.template,
        model.num_image_tokens,
        model.config.max_length,
        model.config.image_placement,
    )
    if n_images != len(prompt.images):
        raise SampleRejected(
            "image_count_mismatch", f"the prompt has {n_images} <image> marker(s) but {len(prompt.images)} image(s)"
        )
    return EncodedPrompt(ids, [load_pixel_values(data, model.config.image) for data in prompt.images])


def left_padded_batch(encoded: list[EncodedPrompt], pad_id: int, device) -> tuple:
    """(input_ids, attention_mask, pixel_values) on `device`: ids left-padded to the longest prompt."""
    length = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)  # (B, L), left-padded
    attention = torch.zeros((len(encoded), length), dtype=torch.long)  # (B, L)
    for i, e in enumerate(encoded):
        input_ids[i, length - len(e.input_ids) :] = torch.tensor(e.input_ids)
        attention[i, length - len(e.input_ids) :] = 1
    pixels = [p for e in encoded for p in e.pixel_values]
    pixel_values = torch.from_numpy(np.stack(pixels)).to(device) if pixels else None  # (n_images, 3, S, S)
    return input_ids.to(device), attention.to(device), pixel_values
