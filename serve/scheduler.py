"""Continuous batching: one decode loop per replica, rows joining and leaving at every step.

A request becomes a *row*. One thread (`Scheduler`, not the asyncio thread pool) owns every row
and loops; each iteration ("step") does at most two forward passes of the LLM:

1. **prefill** one chunk of the *joining group* (the rows that arrived since the last group was
   formed): their prompts, embedded row by row (images included) and left-padded into one
   (G, L) batch, are run `prefill_chunk_tokens` positions at a time into the group's own KV cache,
   so a long prompt delays the running rows by one chunk per step, never by its whole prefill.
   After the last chunk every row of the group samples its first token and the group *joins*.
2. **decode** one token for every running row: the running rows' last tokens, (B, 1), against
   their merged KV cache.

The running rows share one left-padded KV cache, (B, H, T, Dh) per layer, with a (B, T) attention
mask and a (B, 1) position per row (padding never shifts positions), so a decode step is one
batched forward pass. A joining group is padded on the left to the running cache's length T (only
the group is copied; the running rows are padded only in the rare case that the group's prompt is
longer than T) and concatenated along the batch. A row leaves as soon as it finishes (stop token,
stop string, `max_tokens`, error, or its client went away): it is dropped from the batch and any
leading columns that were padding for every remaining row are cut. Each layer's cache keeps spare
room along the sequence (`GrowingLayer`), so appending a token writes one column instead of
copying the whole cache as transformers' `DynamicLayer` does.

Every row keeps its own sampling settings, random generator (seed), stop strings and text state
(llava.decoding's `RowState`); greedy rows take the batch-wide argmax. Anything that goes wrong
with one row (its sampling, its image features) ends that row alone with finish_reason "error";
a forward pass that raises fails only the rows that were in it, and the loop goes on.

Results come back through each row's `emit` callback, called on the loop thread (the serving app
hands them to its event loop); non-streaming rows emit twice: their first token and, at the end, the rest. `Scheduler.step`,
`Row.joined_step` / `first_token_step` / `finished_step` and `Row.prefill_chunks` count what the
loop did (tests assert on them; they are cheap).

Models with sliding-window or other non-plain cache layers are refused (serve them with vLLM).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from llava.decoding import RowState, SamplingParams, StepOutput, advance, new_row, next_token
from llava.generation import EncodedPrompt
from llava.templates import get_template
from llava.tokenization import stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_rows: int = 16  # rows decoded together (running + joining); more requests wait in the queue
    prefill_chunk_tokens: int = 256  # prompt positions per row prefilled per step


class GrowingLayer(DynamicLayer):
    """A full-attention KV cache layer whose keys/values, (B, H, T, Dh), are views into a buffer with spare
    room along T: appending a token writes one column. When something else replaced `keys` (the scheduler
    merging, selecting or trimming rows), the next update copies into a fresh buffer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._view = None
        n, new = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        if self.keys is not self._view or n + new > self._key_buffer.shape[-2]:
            batch, heads, _, dim = key_states.shape
            room = n + new + max(32, (n + new) // 2)
            self._key_buffer = key_states.new_empty((batch, heads, room, dim))  # (B, H, room, Dh)
            self._value_buffer = value_states.new_empty((batch, heads, room, value_states.shape[-1]))
            if n:
                self._key_buffer[..., :n, :] = self.keys
                self._value_buffer[..., :n, :] = self.values
        self._key_buffer[..., n : n + new, :] = key_states
        self._value_buffer[..., n : n + new, :] = value_states
        self.keys, self.values = self._key_buffer[..., : n + new, :], self._value_buffer[..., : n + new, :]
        self._view = self.keys
        return self.keys, self.values


def new_cache(llm_config) -> DynamicCache:
    """An empty cache of `GrowingLayer`s; refuses models whose layers need another cache layer type."""
    cache = DynamicCache(config=llm_config)
    other = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if other:
        raise ValueError(
            f"continuous batching needs full-attention KV cache layers; this model uses {sorted(other)} "
            "(sliding-window or hybrid attention): serve it with engine: vllm"
        )
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


@dataclass
class Row:
    """One request in the decode loop."""

    encoded: EncodedPrompt
    state: RowState
    emit: Callable[[StepOutput], None]  # called on the loop thread with each output (or only the last)
    stream: bool = True  # False: emit the first output (time to first token) and then one at the end
    cancelled: bool = False  # set from any thread (the client went away): the row leaves at the next step
    joined_step: Optional[int] = None  # the step whose prefill ended this row's group (it decodes from the next)
    first_token_step: Optional[int] = None
    finished_step: Optional[int] = None
    prefill_chunks: int = 0
    _text: list[str] = field(default_factory=list)  # non-streaming: the deltas so far

    def output(self, out: StepOutput, step: int) -> None:
        if self.first_token_step is None:
            self.first_token_step = step
        if out.finish_reason:
            self.finished_step = step
        if self.stream or out.completion_tokens <= 1 or out.error:
            self.emit(out)
            return
        self._text.append(out.delta)
        if out.finish_reason:
            self.emit(StepOutput("".join(self._text), out.finish_reason, out.completion_tokens, out.error))


@dataclass
class _Group:
    """Rows being prefilled together: embeds (G, L, D), attention (G, L), positions (G, L), all left-padded."""

    rows: list[Row]
    embeds: torch.Tensor
    attention: torch.Tensor
    positions: torch.Tensor
    cache: DynamicCache
    done: int = 0  # positions prefilled so far


@dataclass
class _Batch:
    """The running rows: their merged cache (B, H, T, Dh per layer), attention (B, T), the position (B, 1) and
    id of the token each feeds next."""

    rows: list[Row]
    cache: DynamicCache
    attention: torch.Tensor
    positions: torch.Tensor
    tokens: list[int]


def _left_pad(x: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """`x` with `columns` zero columns prepended along `dim` (dim counted from the end, as F.pad does)."""
    if columns == 0:
        return x
    return F.pad(x, (0, 0) * (-dim - 1) + (columns, 0))


class Scheduler:
    def __init__(
        self,
        model,
        config: Optional[SchedulerConfig] = None,
        start: bool = True,
        on_step: Optional[Callable[[int], None]] = None,
    ):
        """`start=False`: the loop starts at `start()` (requests submitted before then form its first group).
        `on_step` is called on the loop thread with the number of rows of every decode step (metrics)."""
        config = config or SchedulerConfig()
        if config.max_rows < 1 or config.prefill_chunk_tokens < 1:
            raise ValueError(
                f"max_rows and prefill_chunk_tokens must be >= 1, got {config.max_rows} and "
                f"{config.prefill_chunk_tokens}"
            )
        template = get_template(model.config.template)
        self.model, self.config = model.eval(), config
        self.template_stops = tuple(template.stop_strings)
        self.stop_ids = set(stop_token_ids(model.tokenizer, template))
        self.device = next(model.parameters()).device
        new_cache(model.llm.config)  # refuses unsupported cache layouts now, not at the first request
        self.step = 0  # loop iterations that did any work
        self.on_step = on_step
        self._queue: deque[Row] = deque()
        self._wake = threading.Condition()
        self._group: Optional[_Group] = None
        self._batch: Optional[_Batch] = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    # ---- the public side (any thread) -----------------------------------------------------------------------------
    def submit(
        self, encoded: EncodedPrompt, params: SamplingParams, emit: Callable[[StepOutput], None], stream: bool = True
    ) -> Row:
        """Queue a request; it joins the running rows at a coming step. Raises what `new_row` raises."""
        row = Row(encoded, new_row(params, self.template_stops), emit, stream)
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._queue.append(row)
            self._wake.notify()
        return row

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def running(self) -> int:
        batch = self._batch
        return len(batch.rows) if batch else 0

    # ---- the loop (its own thread) --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._queue or self._group or self._batch):
                    self._wake.wait()
                if self._closed:
                    break
            self.step += 1
            with torch.no_grad():
                try:
                    self._admit()
                    self._prefill_chunk()
                    self._decode()
                except Exception:  # a bug in the loop itself: fail the rows it held, keep serving
                    log.exception("the decode loop failed; failing its rows")
                    for row in [*(self._group.rows if self._group else ()), *(self._batch.rows if self._batch else ())]:
                        self._fail(row, "decode loop failure")
                    self._group = self._batch = None
        for row in [
            *self._queue,
            *(self._group.rows if self._group else ()),
            *(self._batch.rows if self._batch else ()),
        ]:
            self._fail(row, "the server is shutting down")

    def _forward_or_fail(self, what: str, rows: list[Row], **inputs):
        """One LLM forward pass keeping only the last position's logits; on an exception every row in
        it fails (and no other row) and None is returned."""
        try:
            return self.model.llm(**inputs, use_cache=True, logits_to_keep=1)
        except Exception as exc:
            log.exception("a %s forward pass failed", what)
            for row in rows:
                self._fail(row, f"{type(exc).__name__}: {exc}")
            return None

    def _fail(self, row: Row, error: str) -> None:
        row.state.finish_reason = "error"
        try:
            row.output(StepOutput("", "error", len(row.state.tokens), error=error), self.step)
        except Exception:
            log.exception("reporting a failed row failed")

    def _admit(self) -> None:
        """Start prefilling the queued rows (as many as there is room for) when no group is in progress."""
        if self._group is not None:
            return
        room = self.config.max_rows - self.running
        with self._wake:
            rows = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
        rows = [row for row in rows if not row.cancelled]
        embedded = []
        for row in rows:
            try:
                embedded.append((row, self._embed(row.encoded)))
            except Exception as exc:  # e.g. image features that do not fit the prompt: this row only
                log.exception("embedding a prompt failed")
                self._fail(row, f"{type(exc).__name__}: {exc}")
        if not embedded:
            return
        length = max(e.shape[0] for _, e in embedded)
        embeds = torch.stack([_left_pad(e, length - e.shape[0], -2) for _, e in embedded])  # (G, L, D)
        attention = torch.zeros((len(embedded), length), dtype=torch.long, device=self.device)  # (G, L)
        for i, (_, e) in enumerate(embedded):
            attention[i, length - e.shape[0] :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (G, L): padding does not shift positions
        self._group = _Group(
            [row for row, _ in embedded], embeds, attention, positions, new_cache(self.model.llm.config)
        )

    def _embed(self, encoded: EncodedPrompt) -> torch.Tensor:
        """(L, D): the prompt's token embeddings with its image features in place."""
        ids = torch.tensor([encoded.input_ids], device=self.device)  # (1, L)
        pixels = (
            torch.from_numpy(np.stack(encoded.pixel_values)).to(self.device)  # (n_images, 3, S, S)
            if encoded.pixel_values
            else None
        )
        return self.model.embed(ids, pixels)[0]

    def _prefill_chunk(self) -> None:
        group = self._group
        if group is None:
            return
        start, end = group.done, min(group.done + self.config.prefill_chunk_tokens, group.embeds.shape[1])
        out = self._forward_or_fail(
            "prefill",
            group.rows,
            inputs_embeds=group.embeds[:, start:end],
            attention_mask=group.attention[:, :end],
            position_ids=group.positions[:, start:end],
            past_key_values=group.cache,
        )
        if out is None:
            self._group = None
            return
        group.done = end
        for row in group.rows:
            row.prefill_chunks += 1
        if end < group.embeds.shape[1]:
            return
        self._group = None
        tokens = self._sample(group.rows, out.logits[:, -1])  # logits: (G, V)
        for row in group.rows:
            row.joined_step = self.step
        keep = [i for i, row in enumerate(group.rows) if not row.state.finish_reason]
        if len(keep) < len(group.rows) and keep:
            group.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        if keep:
            self._join(
                _Batch(
                    [group.rows[i] for i in keep],
                    group.cache,
                    group.attention[keep],
                    group.positions[keep, -1:] + 1,
                    [tokens[i] for i in keep],
                )
            )

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its (V,) logits, taken into its state and emitted; a row that fails here
        ends with an error, alone."""
        greedy = logits.argmax(dim=-1).tolist()  # (B,): one device sync for all greedy rows
        tokens = []
        for i, row in enumerate(rows):
            try:
                token = next_token(logits[i], greedy[i], row.state)
                row.output(advance(row.state, token, self.model.tokenizer, self.stop_ids), self.step)
            except Exception as exc:
                log.exception("decoding a row failed")
                token = self.model.tokenizer.pad_token_id
                self._fail(row, f"{type(exc).__name__}: {exc}")
            tokens.append(token)
        return tokens

    def _join(self, group: _Batch) -> None:
        """Merge a prefilled group (its rows that go on decoding) into the running batch."""
        batch = self._batch
        if batch is None:
            self._batch = group
            return
        pad = batch.attention.shape[1] - group.attention.shape[1]  # > 0: the usual case, only the group is padded
        for mine, theirs in zip(batch.cache.layers, group.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, max(0, -pad), -2), _left_pad(theirs.keys, max(0, pad), -2)])
            mine.values = torch.cat(
                [_left_pad(mine.values, max(0, -pad), -2), _left_pad(theirs.values, max(0, pad), -2)]
            )
        batch.attention = torch.cat(
            [_left_pad(batch.attention, max(0, -pad), -1), _left_pad(group.attention, max(0, pad), -1)]
        )  # (B + G, T')
        batch.positions = torch.cat([batch.positions, group.positions])  # (B + G, 1)
        batch.rows += group.rows
        batch.tokens += group.tokens

    def _decode(self) -> None:
        batch = self._batch
        if batch is None:
            return
        live = [i for i, row in enumerate(batch.rows) if not row.cancelled]
        if len(live) < len(batch.rows) and not self._drop(live):
            return
        if self.on_step:
            try:
                self.on_step(len(batch.rows))
            except Exception:  # metrics must never fail the rows
                log.exception("the on_step hook failed")
        tokens = torch.tensor(batch.tokens, device=self.device).unsqueeze(1)  # (B, 1)
        batch.attention = torch.cat([batch.attention, torch.ones_like(tokens)], dim=1)  # (B, T + 1)
        out = self._forward_or_fail(
            "decode",
            batch.rows,
            inputs_embeds=self.model.llm.get_input_embeddings()(tokens),
            attention_mask=batch.attention,
            position_ids=batch.positions,
            past_key_values=batch.cache,
        )
        if out is None:
            self._batch = None
            return
        batch.positions = batch.positions + 1
        batch.tokens = self._sample(batch.rows, out.logits[:, -1])  # logits: (B, V)
        self._drop([i for i, row in enumerate(batch.rows) if not row.state.finish_reason])

    def _drop(self, keep: list[int]) -> bool:
        """Keep only the running rows `keep`; cut leading columns that are padding for all of them. False: none left."""
        batch = self._batch
        if len(keep) == len(batch.rows):
            return True
        if not keep:
            self._batch = None
            return False
        index = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(index)
        batch.attention, batch.positions = batch.attention[index], batch.positions[index]
        batch.rows, batch.tokens = [batch.rows[i] for i in keep], [batch.tokens[i] for i in keep]
        lead = int((batch.attention.sum(0) == 0).long().cumprod(0).sum())  # all-padding columns at the start
        if lead:
            batch.attention = batch.attention[:, lead:]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
        return True
