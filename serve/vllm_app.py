"""The GPU serving path: Ray Serve LLM (vLLM) on the HF export, behind the same ingress checks as our engine.

Selected with `engine: vllm` in the serve config. Needs a GPU and `pip install "ray[llm]"` (vLLM),
and a model exported with `llava-ray export` (a `LlavaForConditionalGeneration` directory, which
vLLM serves natively). Ray Serve LLM's OpenAI app is built with our ingress class
(`LLMServingArgs.ingress_cls_config`): every chat request passes `serve.ingress.Gate` (API key,
body limits, JSON off the event loop) and `serve.protocol` (the same limits and 4xx errors as
`engine: llava`), and image URLs are fetched by our guarded fetcher and handed to vLLM as data
URLs (`vllm_chat_body`), so vLLM never fetches a URL itself. Its other endpoints (completions,
embeddings, ...) are not served. Not exercised on CPU-only machines: `vllm_llm_config` and
`vllm_chat_body` (what is deployed and what vLLM is sent) are tested there.
"""

from __future__ import annotations

import base64
import copy
import io

from llava import storage
from llava.config import config_to_dict
from serve.config import ServeConfig
from serve.protocol import ChatRequest

_MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def vllm_llm_config(config: ServeConfig) -> dict:
    """The `ray.serve.llm.LLMConfig` fields for `config`."""
    source = {"bucket_uri": config.model} if storage.is_s3(config.model) else config.model
    return {
        "model_loading_config": {"model_id": config.model_name, "model_source": source},
        "deployment_config": {
            "autoscaling_config": config_to_dict(config.autoscaling),
            "max_ongoing_requests": config.replica.max_ongoing_requests,
        },
        "engine_kwargs": {
            "limit_mm_per_prompt": {"image": config.limits.max_images},
            "max_num_seqs": config.batching.max_batch_size * 8,  # vLLM batches continuously
        },
    }


def data_url(image: bytes) -> str:
    """A base64 data URL for image bytes already checked by serve.images.check_format."""
    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        media = _MEDIA_TYPES[opened.format]
    return f"data:{media};base64,{base64.b64encode(image).decode()}"


def vllm_chat_body(data: dict, chat: ChatRequest, images: list[bytes]) -> dict:
    """The chat request vLLM gets: the client's messages with every image as a data URL of the bytes our
    fetcher got (in the order serve.protocol found them), and the validated sampling fields only."""
    messages = copy.deepcopy(data["messages"])
    urls = iter(data_url(image) for image in images)
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                part["image_url"] = {"url": next(urls)}
    sampling = chat.sampling
    body = {
        "model": chat.model,
        "messages": messages,
        "stream": chat.stream,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "stop": sampling.stop or None,
        "seed": sampling.seed,
        "max_tokens": sampling.max_tokens if chat.max_tokens_given else None,
        "stream_options": {"include_usage": True} if chat.stream and chat.include_usage else None,
    }
    return {key: value for key, value in body.items() if value is not None}


def guarded_ingress_class():
    """Ray Serve LLM's `OpenAiIngress` with our checks in front (imports vLLM: GPU machines only)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from ray.serve.llm.ingress import OpenAiIngress
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from llava.config import config_from_dict
    from serve.ingress import Gate
    from serve.protocol import APIError, parse_chat_request

    class GuardedIngress(OpenAiIngress):
        def __init__(self, llm_deployments, model_cards, lora_paths=None, *, serve_config: dict, **kwargs):
            super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
            self.config = config_from_dict(ServeConfig, serve_config)
            self.gate = Gate(self.config)

        async def models(self, request: Request):
            try:
                self.gate.authorize(request)
            except APIError as error:
                return JSONResponse(error.body(), status_code=error.status)
            return await super().models()

        async def model_data(self, model: str, request: Request):
            try:
                self.gate.authorize(request)
            except APIError as error:
                return JSONResponse(error.body(), status_code=error.status)
            return await super().model_data(model)

        async def chat(self, request: Request):
            try:
                self.gate.authorize(request)
                data = await self.gate.read_json(request)
                chat = await self.gate.run(parse_chat_request, data, self.config.model_name, self.config.limits)
                images = await self.gate.images(chat.image_urls)
                body = ChatCompletionRequest(**await self.gate.run(vllm_chat_body, data, chat, images))
            except APIError as error:
                return JSONResponse(error.body(), status_code=error.status)
            return await super().chat(body, request)

        async def _not_served(self, request: Request):
            error = APIError(
                404, f"{request.url.path[:100]} is not served here; use /v1/chat/completions", code="not_found"
            )
            return JSONResponse(error.body(), status_code=404)

        completions = embeddings = transcriptions = score = tokenize = detokenize = _not_served

    return GuardedIngress


def build_vllm_app(config: ServeConfig):
    try:
        from ray.serve.llm import LLMConfig, build_openai_app

        ingress = guarded_ingress_class()
    except ImportError as exc:
        raise ImportError(
            f"engine=vllm needs Ray Serve LLM with vLLM on a GPU machine: pip install 'ray[llm]' ({exc})"
        ) from exc
    return build_openai_app(
        {
            "llm_configs": [LLMConfig(**vllm_llm_config(config))],
            "ingress_cls_config": {
                "ingress_cls": ingress,
                "ingress_extra_kwargs": {"serve_config": config_to_dict(config)},
            },
        }
    )
