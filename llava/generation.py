"""Greedy batched answers from a LlavaModel: the one decoding path shared by evaluation and batch inference.

Prompts are rendered with the model's conversation template (llava.tokenization.tokenize_prompt),
left-padded into a batch, and decoded greedily until each row hits a stop token or
`max_new_tokens`; answers are cut at the template's stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llava.image_processing import load_pixel_values
from llava.templates import get_template
from llava.tokenization import stop_token_ids, tokenize_prompt


@dataclass
class Prompt:
    messages: list[dict]  # LLaVA-format turns ending with a user turn; `<image>` marks where images go
    images: list[bytes] = field(default_factory=list)  # encoded images, in `<image>` order


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


@torch.no_grad()
def greedy_answers(model, prompts: list[Prompt], max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """One answer per prompt (greedy, deterministic); raises SampleRejected / ImageError / PromptTooLong on bad input."""
    model.eval()
    template = get_template(model.config.template)
    stops = stop_token_ids(model.tokenizer, template)
    pad = model.tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        encoded, pixels = [], []
        for prompt in chunk:
            ids, n_images = tokenize_prompt(prompt.messages, model.tokenizer, template, model.num_image_tokens,
                                            model.config.max_length)
            encoded.append(ids)
            pixels += [load_pixel_values(data, model.config.image) for data in prompt.images[:n_images]]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)  # (B, L), left-padded
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, length - len(ids):] = torch.tensor(ids)
            attention[i, length - len(ids):] = 1
        pixel_values = torch.from_numpy(np.stack(pixels)) if pixels else None  # (n_images, 3, S, S)
        new_tokens = model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention,
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops)
        for row in new_tokens.tolist():
            cut = next((i for i, token in enumerate(row) if token in stops), len(row))
            answers.append(_cut(model.tokenizer.decode(row[:cut], skip_special_tokens=True), template.stop_strings))
    return answers
