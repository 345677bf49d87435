"""The independent greedy reference the decoder is tested against: HF `generate` (do_sample=False).

One prompt at a time (no padding), on the same LLM inputs as `llava.decoding.BatchDecoder`
(the prompt's ids from `encode_prompt`, image features spliced in by `LlavaModel.generate`),
and cut the way an answer is defined: at the first stop token, then at the first of the
template's stop strings, surrounding whitespace stripped.
"""

import numpy as np
import torch

from llava.generation import Prompt, encode_prompt
from llava.templates import get_template
from llava.tokenization import stop_token_ids


def hf_greedy_answer(model, prompt: Prompt, max_new_tokens: int) -> str:
    template = get_template(model.config.template)
    stops = stop_token_ids(model.tokenizer, template)
    encoded = encode_prompt(model, prompt)
    input_ids = torch.tensor([encoded.input_ids])  # (1, L)
    pixel_values = torch.from_numpy(np.stack(encoded.pixel_values)) if encoded.pixel_values else None  # (n, 3, S, S)
    row = model.generate(
        input_ids, pixel_values=pixel_values, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops
    )[0].tolist()
    cut = next((i for i, token in enumerate(row) if token in stops), len(row))
    text = model.tokenizer.decode(row[:cut], skip_special_tokens=True)
    hits = [text.index(s) for s in template.stop_strings if s and s in text]
    return text[: min(hits, default=len(text))].strip()
