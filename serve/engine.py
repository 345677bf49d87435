"""The engine behind the chat API: our LlavaModel in the replica, continuously batched decoding.

`prepare` does everything that can fail because of the request (template, image decoding,
context length) before the request joins the decode loop, so one bad request never reaches it;
`submit` hands a prepared request to the replica's decode loop (serve.scheduler.Scheduler), where
it joins the running rows at the next step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from llava.decoding import SamplingParams, StepOutput
from llava.generation import EncodedPrompt
from llava.image_processing import ImageError, load_pixel_values
from llava.model_loading import load_model
from llava.templates import SampleRejected
from llava.tokenization import tokenize_prompt
from serve.config import BatchingConfig, LimitsConfig
from serve.protocol import APIError, ChatRequest
from serve.scheduler import Row, Scheduler, SchedulerConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    encoded: EncodedPrompt
    sampling: SamplingParams
    prompt_tokens: int


class LlavaEngine:
    def __init__(
        self,
        model_uri: str,
        limits: LimitsConfig,
        template: Optional[str] = None,
        batching: Optional[BatchingConfig] = None,
        on_step: Optional[Callable[[int], None]] = None,
    ):
        self.model = load_model(model_uri, template=template)
        self.limits = limits
        self.context = getattr(self.model.llm.config, "max_position_embeddings", None) or self.model.config.max_length
        self.image_config = dataclasses.replace(self.model.config.image, max_pixels=limits.max_image_pixels)
        batching = batching or BatchingConfig()
        self.scheduler = Scheduler(
            self.model,
            SchedulerConfig(max_rows=batching.max_batch_size, prefill_chunk_tokens=batching.prefill_chunk_tokens),
            on_step=on_step,
        )

    def prepare(self, request: ChatRequest, images: list[bytes]) -> PreparedRequest:
        """Prompt ids and pixels for one request; raises APIError (400) naming what is wrong."""
        model = self.model
        try:
            ids, n_images = tokenize_prompt(
                request.messages,
                model.tokenizer,
                model.config.template,
                model.num_image_tokens,
                image_placement=model.config.image_placement,
            )
        except SampleRejected as exc:
            raise APIError(
                400,
                f"messages cannot be rendered with the {model.config.template} template: {exc}",
                param="messages",
                code="invalid_value",
            ) from exc
        if n_images != len(images):  # the protocol puts one <image> per image part; a template may drop some
            raise APIError(
                400,
                f"the prompt renders {n_images} image(s) but {len(images)} were sent",
                param="messages",
                code="invalid_value",
            )
        pixels = []
        for i, data in enumerate(images):
            try:
                pixels.append(load_pixel_values(data, self.image_config))
            except ImageError as exc:
                code = "image_too_large" if exc.reason == "too_many_pixels" else "invalid_image"
                raise APIError(
                    400, f"image {i + 1} of the request cannot be used: {exc}", param="messages", code=code
                ) from exc
        sampling = request.sampling
        room = self.context - len(ids)
        wanted = sampling.max_tokens if request.max_tokens_given else 1
        if wanted > room:
            raise APIError(
                400,
                f"this model's context is {self.context} tokens; the prompt has {len(ids)} "
                f"(images count {model.num_image_tokens} each) and max_tokens asks for {wanted} more",
                param="messages",
                code="context_length_exceeded",
            )
        if not request.max_tokens_given:
            sampling = dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, room))
        return PreparedRequest(EncodedPrompt(ids, pixels), sampling, len(ids))

    def submit(self, prepared: PreparedRequest, emit: Callable[[StepOutput], None], stream: bool) -> Row:
        """Start decoding `prepared`; `emit` gets its outputs on the decode loop's thread (every step when
        `stream`, else the first token and then the rest at the end). Set the returned row's `cancelled` to stop it early."""
        return self.scheduler.submit(prepared.encoded, prepared.sampling, emit, stream)

    def close(self) -> None:
        self.scheduler.close()
