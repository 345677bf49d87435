"""Greedy batched answers from a LlavaModel: the one decoding path shared by evaluation and batch inference.

A `Prompt` is first encoded on its own (`encode_prompt`: the model's conversation template,
`<image>` expanded, images preprocessed), which is where bad input is found, one prompt at a
time. Encoded prompts are then left-padded into batches and decoded greedily until each row
hits a stop token or `max_new_tokens`; answers are cut at the template's stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llava.image_processing import load_pixel_values
from llava.templates import SampleRejected, get_template
from llava.tokenization import stop_token_ids, tokenize_prompt


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
    ids, n_images = tokenize_prompt(prompt.messages, model.tokenizer, model.config.template,
                                    model.num_image_tokens, model.config.max_length)
    if n_images != len(prompt.images):
        raise SampleRejected("image_count_mismatch",
                             f"the prompt has {n_images} <image> marker(s) but {len(prompt.images)} image(s)")
    return EncodedPrompt(ids, [load_pixel_values(data, model.config.image) for data in prompt.images])


def left_padded_batch(encoded: list[EncodedPrompt], pad_id: int, device) -> tuple:
    """(input_ids, attention_mask, pixel_values) on `device`: ids left-padded to the longest prompt."""
    length = max(len(e.input_ids) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)  # (B, L), left-padded
    attention = torch.zeros((len(encoded), length), dtype=torch.long)  # (B, L)
    for i, e in enumerate(encoded):
        input_ids[i, length - len(e.input_ids):] = torch.tensor(e.input_ids)
        attention[i, length - len(e.input_ids):] = 1
    pixels = [p for e in encoded for p in e.pixel_values]
    pixel_values = torch.from_numpy(np.stack(pixels)).to(device) if pixels else None  # (n_images, 3, S, S)
    return input_ids.to(device), attention.to(device), pixel_values


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


@torch.no_grad()
def greedy_decode(model, encoded: list[EncodedPrompt], max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """One greedy (deterministic) answer per encoded prompt, `batch_size` prompts per forward pass."""
    model.eval()
    template = get_template(model.config.template)
    stops = stop_token_ids(model.tokenizer, template)
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        input_ids, attention, pixel_values = left_padded_batch(encoded[start : start + batch_size],
                                                               model.tokenizer.pad_token_id, device)
        new_tokens = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention,
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops)
        for row in new_tokens.tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            answers.append(_cut(model.tokenizer.decode(row[:cut], skip_special_tokens=True), template.stop_strings))
    return answers


def greedy_answers(model, prompts: list[Prompt], max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """One answer per prompt; raises on the first bad prompt (batch inference counts them instead)."""
    return greedy_decode(model, [encode_prompt(model, p) for p in prompts], max_new_tokens, batch_size)
