"""Decoding a batch of prompts, each with its own sampling settings: the one decoding path.

`BatchDecoder` prefills the left-padded batch once, then adds one token per row per step
using the KV cache, and reports per step the new text of every row (holding back text
that may be the start of a stop string or a half-decoded character). A row ends at a stop
token, a stop string or its `max_tokens`; the batch ends when every row has. The serving
engine streams its steps; `greedy_decode` (batch inference, evaluation, the demo) runs it at
temperature 0 to the end.

An answer is the decoded text up to the first stop token, cut at the first stop string
(searched in the text as decoded, so a stop string inside leading whitespace ends the
answer, as in the official LLaVA `KeywordsStoppingCriteria`), with surrounding whitespace
stripped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

from llava.generation import EncodedPrompt, left_padded_batch
from llava.templates import get_template
from llava.tokenization import stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # stop strings, besides the template's own
    seed: Optional[int] = None  # same seed + same prompt = same sample


@dataclass
class RowState:
    params: SamplingParams
    stops: tuple[str, ...]
    generator: Optional[torch.Generator]
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far, cut at a stop string once one is seen
    sent: int = 0  # characters of `text` already reported
    finish_reason: Optional[str] = None  # "stop" | "length"


@dataclass
class StepOutput:
    delta: str  # text new since the last step ("" when it is held back)
    finish_reason: Optional[str]  # set on the row's last step; "error" when the row failed (see `error`)
    completion_tokens: int
    error: Optional[str] = None  # why the row failed (its request fails; the batch's other rows go on)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Trailing characters to withhold: whitespace (dropped if the answer ends there), a partial character,
    or a possible stop-string start."""
    if text.endswith("\ufffd"):
        return 1
    stop_start = max((_stop_prefix_at_end(text, stop) for stop in stops), default=0)
    return max(stop_start, len(text) - len(text.rstrip()))


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """The longest k < len(stop) with text.endswith(stop[:k]), in O(len(stop)) (Knuth-Morris-Pratt over the
    last len(stop) - 1 characters), so the cost per token grows linearly with the stop string's length."""
    if len(stop) < 2:
        return 0
    fail = [0] * len(stop)  # fail[i]: the longest proper prefix of stop[:i + 1] that is also its suffix
    for i in range(1, len(stop)):
        k = fail[i - 1]
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        fail[i] = k + (stop[i] == stop[k])
    matched = 0
    for char in text[-(len(stop) - 1) :]:
        while matched and (matched == len(stop) or char != stop[matched]):
            matched = fail[matched - 1]
        matched += char == stop[matched]
    return matched if matched < len(stop) else fail[-1]


def _sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """One token id from (V,) logits by temperature (> 0) + nucleus (top-p) sampling."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (V,)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def new_row(params: SamplingParams, template_stops: tuple[str, ...]) -> RowState:
    """A row's decoding state: its sampling settings, its stop strings (the template's and its own), and
    its own random generator when it samples (seeded by `params.seed`, else from torch's seed)."""
    generator = None
    if params.temperature > 0:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else int(torch.seed() % 2**63))
    return RowState(params, tuple(s for s in (*template_stops, *params.stop) if s), generator)


def next_token(logits: torch.Tensor, greedy: int, row: RowState) -> int:
    """The row's next token: `greedy` (the argmax of its (V,) `logits`, computed batch-wide) at temperature 0,
    else a sample."""
    return greedy if row.params.temperature <= 0 else _sample(logits, row.params, row.generator)


def advance(row: RowState, token: int, tokenizer, stop_ids: set[int]) -> StepOutput:
    """Take one sampled token into the row's state; report what can be sent."""
    row.tokens.append(token)
    if token in stop_ids:
        row.finish_reason = "stop"
    else:
        text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        hits = [text.index(s) for s in row.stops if s in text]
        if hits:
            text, row.finish_reason = text[: min(hits)], "stop"
        elif len(row.tokens) >= row.params.max_tokens:
            row.finish_reason = "length"
        row.text = text.lstrip()  # answers are stripped: leading space never sent, trailing space held back
    if row.finish_reason:
        row.text = row.text.rstrip()
    end = len(row.text) if row.finish_reason else len(row.text) - _held_back(row.text, row.stops)
    delta = row.text[row.sent : end] if end > row.sent else ""
    row.sent = max(row.sent, end)
    return StepOutput(delta, row.finish_reason, len(row.tokens))


class BatchDecoder:
    def __init__(self, model, prompts: list[EncodedPrompt], params: list[SamplingParams]):
        template = get_template(model.config.template)
        self.model = model
        self.stop_ids = set(stop_token_ids(model.tokenizer, template))
        self.rows = [new_row(p, tuple(template.stop_strings)) for p in params]
        self.prompts = prompts

    def _prefill(self):
        model = self.model
        input_ids, attention, pixel_values = left_padded_batch(
            self.prompts, model.tokenizer.pad_token_id, next(model.parameters()).device
        )
        embeds = model.embed(input_ids, pixel_values)  # (B, L, D)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, L): padding does not shift positions
        out = model.llm(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=True)
        return out.logits[:, -1], out.past_key_values, attention, positions[:, -1:]

    @torch.no_grad()
    def steps(self) -> Iterator[list[Optional[StepOutput]]]:
        """Per step, one entry per row: its StepOutput, or None once the row finished at an earlier step."""
        self.model.eval()
        logits, cache, attention, positions = self._prefill()  # logits: (B, V)
        embedding = self.model.llm.get_input_embeddings()
        while True:
            outputs: list[Optional[StepOutput]] = []
            next_tokens = []
            greedy = logits.argmax(dim=-1).tolist()  # (B,): one device sync per step for all greedy rows
            for i, row in enumerate(self.rows):
                if row.finish_reason:
                    outputs.append(None)
                    next_tokens.append(self.model.tokenizer.pad_token_id)
                    continue
                try:
                    token = next_token(logits[i], greedy[i], row)
                    outputs.append(advance(row, token, self.model.tokenizer, self.stop_ids))
                except Exception as exc:  # one row's failure ends that row only; the others keep decoding
                    log.exception("decoding row %d failed", i)
                    token, row.finish_reason = self.model.tokenizer.pad_token_id, "error"
                    outputs.append(StepOutput("", "error", len(row.tokens), error=f"{type(exc).__name__}: {exc}"))
                next_tokens.append(token)
            yield outputs
            if all(row.finish_reason for row in self.rows):
                return
            tokens = torch.tensor(next_tokens, device=attention.device).unsqueeze(1)  # (B, 1)
            attention = torch.cat([attention, torch.ones_like(tokens)], dim=1)  # (B, L + t)
            positions = positions + 1  # (B, 1)
            out = self.model.llm(
                inputs_embeds=embedding(tokens),
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            logits, cache = out.logits[:, -1], out.past_key_values

    def run(self) -> list[str]:
        """Decode to the end; every row's answer."""
        for _ in self.steps():
            pass
        return [row.text for row in self.rows]


def greedy_decode(model, encoded: list[EncodedPrompt], max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """One greedy (deterministic) answer per encoded prompt: `BatchDecoder` at temperature 0, `batch_size`
    prompts per batch."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        answers += BatchDecoder(model, batch, [params] * len(batch)).run()
    return answers
