"""The Ray Serve application: an OpenAI-compatible chat API with images, and a web chat page at `/`.

One autoscaled deployment (`LlavaChat`) is both the HTTP ingress (FastAPI) and the model
replica. Requests pass the ingress checks (serve.ingress: API key, body limits, JSON off the
event loop, image downloads on their own pool under one deadline), are validated and prepared
on their own (serve.protocol, serve.images, serve.engine.prepare on a small decode pool), then
join the replica's decode loop (serve.scheduler: continuous batching in its own thread; a request
joins the running rows at the next step and leaves as soon as it is done). A row that fails inside
the decode loop fails only its own request.

    serve run serve/config.yaml          # the Serve config file; `args` are ServeConfig fields
    llava-ray serve --model URI          # the same app on a local Ray
"""

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncGenerator
from importlib import resources

import torch
from fastapi import Request
from fastapi.responses import HTMLResponse, StreamingResponse
from ray import serve

from llava.config import config_from_dict, config_to_dict
from llava.decoding import StepOutput
from serve.config import ServeConfig
from serve.engine import LlavaEngine, PreparedRequest
from serve.ingress import Gate, make_api, page_csp
from serve.metrics import RequestMetrics, observe_batch, stream_error, timed_image_fetch, track_generation
from serve.protocol import APIError, ChatRequest, chunk_body, completion_body, parse_chat_request, sse, usage

log = logging.getLogger("ray.serve")

app = make_api("llava-ray")
app.add_middleware(RequestMetrics)  # Prometheus metrics through Ray Serve (serve/metrics.py)


def _row_failed(error: str) -> APIError:
    """A request whose row failed inside the decode loop (the other rows decoding with it are unaffected)."""
    log.error("a request failed while decoding: %s", error)
    return APIError(500, "internal error while generating the answer", type="server_error")


@serve.deployment(name="LlavaChat")
@serve.ingress(app)
class LlavaChat:
    def __init__(self, config: dict):
        self.config = config_from_dict(ServeConfig, config)
        self.gate = Gate(self.config)
        if self.config.replica.torch_threads:
            torch.set_num_threads(self.config.replica.torch_threads)
        self.engine = LlavaEngine(
            self.config.model, self.config.limits, self.config.template, self.config.batching, on_step=observe_batch
        )
        # tokenising and image decoding, a few at once: bounds the replica's decoding memory (serve/README.md)
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(
            self.config.limits.decode_workers, thread_name_prefix="prepare"
        )
        self.created = int(time.time())
        log.info(
            "serving %s as %r (context %d tokens, api key %s)",
            self.config.model,
            self.config.model_name,
            self.engine.context,
            "required" if self.gate.api_key else "not required",
        )
        if self.gate.api_key is None:
            log.warning(
                "no API key (%s is not set): anyone who can reach this endpoint can use it", self.config.api_key_env
            )

    # ---- plumbing ------------------------------------------------------------------------------------------------
    async def _decode(self, prepared: PreparedRequest, stream: bool) -> AsyncGenerator[StepOutput, None]:
        """The request's outputs from the decode loop (every step when `stream`, else the first token, then the
        rest at the end). If the
        caller stops early (the client went away), the row leaves the loop at its next step."""
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        row = self.engine.submit(prepared, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out), stream)
        try:
            while True:
                out = await outputs.get()
                yield out
                if out.finish_reason:
                    return
        finally:
            row.cancelled = True  # no effect once the row has finished

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    async def _prepare(self, request: Request) -> tuple[ChatRequest, PreparedRequest]:
        self.gate.authorize(request)
        data = await self.gate.read_json(request)
        chat = await self.gate.run(parse_chat_request, data, self.config.model_name, self.config.limits)
        images = await timed_image_fetch(self.gate.images(chat.image_urls), len(chat.image_urls))
        prepared = await self.gate.run(self.engine.prepare, chat, images, pool=self._prepare_pool)
        return chat, prepared

    async def _stream(self, chat: ChatRequest, prepared: PreparedRequest) -> AsyncGenerator[str, None]:
        yield sse(chunk_body(chat, {"role": "assistant", "content": ""}))
        completion_tokens = 0
        try:
            async for out in track_generation(self._decode(prepared, stream=True)):
                if out.finish_reason == "error":
                    raise _row_failed(out.error)
                completion_tokens = out.completion_tokens
                if out.delta or out.finish_reason:
                    yield sse(chunk_body(chat, {"content": out.delta} if out.delta else {}, out.finish_reason))
            if chat.include_usage:
                yield sse(chunk_body(chat, {}, usage_counts=usage(prepared.prompt_tokens, completion_tokens)))
        except Exception as exc:  # the status line is sent already: report in the stream
            if not isinstance(exc, APIError):
                log.exception("streaming %s failed", chat.id)
                exc = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
            stream_error(exc.code)
            yield sse(exc.body())
        yield sse("[DONE]")

    # ---- endpoints --------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_name}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self.gate.authorize(request)
        return {
            "object": "list",
            "data": [
                {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "llava-ray"}
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        chat, prepared = await self._prepare(request)
        if chat.stream:
            return StreamingResponse(self._stream(chat, prepared), media_type="text/event-stream")
        text, finish_reason, completion_tokens = "", "stop", 0
        async for out in track_generation(self._decode(prepared, stream=False)):
            if out.finish_reason == "error":
                raise _row_failed(out.error)
            text += out.delta
            finish_reason, completion_tokens = out.finish_reason or finish_reason, out.completion_tokens
        return completion_body(chat, text, finish_reason, prepared.prompt_tokens, completion_tokens)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page(self) -> HTMLResponse:
        """The web chat page (static; it sends the API key the user types, if the server needs one)."""
        html = resources.files("serve").joinpath("static/chat.html").read_text()
        return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html)})


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
    return LlavaChat.options(**deployment_options(config)).bind(config_to_dict(config))


def deployment_options(config: ServeConfig) -> dict:
    """The `LlavaChat.options(...)` for `config`: autoscaling, queue limit, drain time, resources."""
    return {
        "autoscaling_config": config_to_dict(config.autoscaling),
        "max_ongoing_requests": config.replica.max_ongoing_requests,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,  # in-flight requests finish when the app is deleted
        "graceful_shutdown_wait_loop_s": 0.5,
        "ray_actor_options": {"num_cpus": config.replica.num_cpus, "num_gpus": _replica_gpus(config)},
    }


def build_app(args: dict) -> serve.Application:
    """Serve config files' `import_path: serve.app:build_app`; `args` are ServeConfig fields."""
    return build(config_from_dict(ServeConfig, args))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may be reachable from anywhere


def check_exposure(config: ServeConfig) -> None:
    """Refuse to serve on a non-loopback address without an API key, unless `allow_unauthenticated` says so."""
    if _loopback(config.host) or os.environ.get(config.api_key_env) or config.allow_unauthenticated:
        return
    raise ValueError(
        f"refusing to serve on {config.host} without an API key: anyone who can reach it could use the "
        f"model. Set {config.api_key_env} to a secret, serve on 127.0.0.1, or pass "
        "--allow-unauthenticated (allow_unauthenticated: true) to accept that"
    )


def run_local(config: ServeConfig, name: str = "llava") -> str:
    """Deploy on the connected Ray (HTTP on config.host:config.port) and return the base URL."""
    check_exposure(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build(config), name=name, route_prefix="/", blocking=False)
    url = f"http://{config.host}:{config.port}"
    log.info("llava-ray is serving %s at %s/v1 (chat page: %s/)", config.model, url, url)
    return url


def wait_until_interrupted(name: str = "llava") -> None:
    """Keep the driver (and so a local Ray and its Serve app) alive until Ctrl-C or SIGTERM, then drain.

    Draining: the app is deleted, so Serve routes no new request to it while its replicas finish the
    requests in flight (up to `drain_timeout_s`, the deployment's graceful shutdown timeout); then
    Serve shuts down. SIGTERM is what Kubernetes and systemd send (with systemd, use KillMode=mixed so
    that only this process gets it and Ray's own processes live until the drain is done).
    """
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM during the drain changes nothing
    log.info("draining: no new requests; waiting for the ones in flight")
    try:
        serve.delete(name)
    finally:
        log.info("shutting down Serve")
        serve.shutdown()
        signal.signal(signal.SIGTERM, previous)
