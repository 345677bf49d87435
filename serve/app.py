"""The Ray Serve application: an OpenAI-compatible chat API with images, and a web chat page at `/`.

One autoscaled deployment (`LlavaChat`) is both the HTTP ingress (FastAPI) and the model
replica. Requests are validated and prepared on their own (serve.protocol, serve.images,
serve.engine.prepare), then share forward passes through Serve's dynamic batching
(`@serve.batch`, streamed step by step; a second batch may start while a long one decodes).

    serve run serve/config.yaml          # the Serve config file; `args` are ServeConfig fields
    llava-ray serve --model URI          # the same app on a local Ray
"""

import asyncio
import hmac
import logging
import os
import time
from importlib import resources
from typing import AsyncGenerator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve

from llava.config import config_from_dict, config_to_dict
from serve.config import ServeConfig
from serve.engine import LlavaEngine, PreparedRequest
from serve.images import load_image_bytes
from serve.protocol import APIError, ChatRequest, chunk_body, completion_body, parse_chat_request, parse_json, sse, usage

log = logging.getLogger("ray.serve")

MAX_CONCURRENT_BATCHES = 2  # a batch of short requests may start while a long batch is still decoding

app = FastAPI(title="llava-ray", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@app.exception_handler(Exception)
async def _server_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("request %s %s failed", request.method, request.url.path)
    return JSONResponse(APIError(500, f"internal error: {type(error).__name__}", type="server_error").body(),
                        status_code=500)


@serve.deployment(name="LlavaChat")
@serve.ingress(app)
class LlavaChat:
    def __init__(self, config: dict):
        self.config = config_from_dict(ServeConfig, config)
        self.engine = LlavaEngine(self.config.model, self.config.limits)
        self.api_key = os.environ.get(self.config.api_key_env) or None
        self.created = int(time.time())
        self._batch.set_max_batch_size(self.config.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s)
        log.info("serving %s as %r (context %d tokens, api key %s)", self.config.model, self.config.model_name,
                 self.engine.context, "required" if self.api_key else "not required")

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type="authentication_error")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def _batch(self, batch: list[PreparedRequest]) -> AsyncGenerator[list, None]:
        """Decode the batch step by step; a request whose answer is complete gets StopIteration."""
        steps = self.engine.decode(batch)
        while (outputs := await asyncio.to_thread(next, steps, None)) is not None:
            yield [StopIteration if out is None else out for out in outputs]

    async def _prepare(self, request: Request) -> tuple[ChatRequest, PreparedRequest]:
        self._authorize(request)
        limits = self.config.limits
        chat = parse_chat_request(parse_json(await request.body(), limits), self.config.model_name, limits)
        images = await asyncio.gather(*[
            asyncio.to_thread(load_image_bytes, url, self.config.image_fetch, limits.max_image_bytes)
            for url in chat.image_urls])
        return chat, await asyncio.to_thread(self.engine.prepare, chat, list(images))

    async def _stream(self, chat: ChatRequest, prepared: PreparedRequest) -> AsyncGenerator[str, None]:
        yield sse(chunk_body(chat, {"role": "assistant", "content": ""}))
        completion_tokens = 0
        try:
            async for out in self._batch(prepared):
                completion_tokens = out.completion_tokens
                if out.delta or out.finish_reason:
                    yield sse(chunk_body(chat, {"content": out.delta} if out.delta else {}, out.finish_reason))
            if chat.include_usage:
                yield sse(chunk_body(chat, {}, usage_counts=usage(prepared.prompt_tokens, completion_tokens)))
        except Exception as exc:  # the status line is sent already: report in the stream
            log.exception("streaming %s failed", chat.id)
            yield sse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body())
        yield sse("[DONE]")

    # ---- endpoints --------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_name}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": self.created,
                                            "owned_by": "llava-ray"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        chat, prepared = await self._prepare(request)
        if chat.stream:
            return StreamingResponse(self._stream(chat, prepared), media_type="text/event-stream")
        text, finish_reason, completion_tokens = "", "stop", 0
        async for out in self._batch(prepared):
            text += out.delta
            finish_reason, completion_tokens = out.finish_reason or finish_reason, out.completion_tokens
        return completion_body(chat, text, finish_reason, prepared.prompt_tokens, completion_tokens)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page(self) -> str:
        """The web chat page (static; it sends the API key the user types, if the server needs one)."""
        return resources.files("serve").joinpath("static/chat.html").read_text()


def _replica_gpus(config: ServeConfig) -> float:
    if config.replica.num_gpus is not None:  # None: auto
        return config.replica.num_gpus
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build(config: ServeConfig) -> serve.Application:
    """The application for `config`: our engine, or Ray Serve LLM (vLLM) when `engine: vllm`."""
    if not config.model:
        raise ValueError("serve needs model: a llava-ray checkpoint, run dir or HF export (local or s3://)")
    if config.engine == "vllm":
        from serve.vllm_app import build_vllm_app

        return build_vllm_app(config)
    if config.engine != "llava":
        raise ValueError(f"engine must be llava or vllm, got {config.engine!r}")
    return LlavaChat.options(
        autoscaling_config=config_to_dict(config.autoscaling),
        max_ongoing_requests=config.replica.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica.num_cpus, "num_gpus": _replica_gpus(config)},
    ).bind(config_to_dict(config))


def build_app(args: dict) -> serve.Application:
    """Serve config files' `import_path: serve.app:build_app`; `args` are ServeConfig fields."""
    return build(config_from_dict(ServeConfig, args))


def run_local(config: ServeConfig, name: str = "llava") -> str:
    """Deploy on the connected Ray (HTTP on config.host:config.port) and return the base URL."""
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build(config), name=name, route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}"
    log.info("llava-ray is serving %s at %s/v1 (chat page: %s/)", config.model, url, url)
    return url


def wait_until_interrupted() -> None:
    """Keep the driver (and so a local Ray and its Serve app) alive until Ctrl-C."""
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("shutting down Serve")
        serve.shutdown()
