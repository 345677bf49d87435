"""The chat API's own metrics, through Ray Serve's metrics API (`ray.serve.metrics`), exported by Ray to Prometheus.

Ray exports every metric on each node's metrics port (`ray start --metrics-export-port`, or the
node's `MetricsExportPort` in `ray.nodes()`) as `ray_<name>`, with the tags `deployment`,
`replica` and `application` added by Serve; counters get a `_total` suffix, histograms the usual
`_bucket` / `_sum` / `_count`. cluster/grafana/llava-serve-dashboard.json charts all of them.

| metric (Prometheus name)                            | kind      | tags          | what                                       |
|-----------------------------------------------------|-----------|---------------|--------------------------------------------|
| ray_llava_serve_requests_total                      | counter   | route, status, code | responses by HTTP status and error code ("" when none) |
| ray_llava_serve_rejected_requests_total             | counter   | reason        | requests refused (4xx) by error code       |
| ray_llava_serve_stream_errors_total                 | counter   | code          | streamed answers that failed after their 200 |
| ray_llava_serve_time_to_first_token_seconds         | histogram |               | request arrival -> first generated token   |
| ray_llava_serve_generated_tokens_total              | counter   |               | completion tokens                          |
| ray_llava_serve_tokens_per_second                   | histogram |               | decode speed of each request after its first token |
| ray_llava_serve_batch_size                          | histogram |               | rows (requests) in each decode step        |
| ray_llava_serve_queued_requests                     | gauge     |               | requests of a replica waiting for their first token |
| ray_llava_serve_image_fetch_seconds                 | histogram |               | fetching + checking a request's images     |

Metrics objects are made in the replica on first use (`serve_metrics()`): Serve adds its tags
only there. The app hooks in at four places: the `RequestMetrics` ASGI middleware (status, code,
arrival time), `track_generation` around a request's decode steps, `observe_batch` at every decode
step (called on the decode loop's thread), `timed_image_fetch` around the image download.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Optional, TypeVar

T = TypeVar("T")

PREFIX = "llava_serve_"
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/")  # any other path is tagged "other"
# name -> (kind, description); the dashboard test checks its queries against this
METRICS = {
    "requests": ("counter", "Responses of the chat API by route, HTTP status and error code"),
    "rejected_requests": ("counter", "Requests refused with a 4xx status, by reason (the error code)"),
    "stream_errors": ("counter", "Streamed answers that failed after the 200 status was sent, by error code"),
    "time_to_first_token_seconds": ("histogram", "Seconds from a request's arrival to its first generated token"),
    "generated_tokens": ("counter", "Completion tokens generated"),
    "tokens_per_second": ("histogram", "Decode speed of each request after its first token (tokens/s)"),
    "batch_size": ("histogram", "Rows (requests) in each decode step of the continuous-batching loop"),
    "queued_requests": ("gauge", "Requests of this replica waiting for their first token"),
    "image_fetch_seconds": ("histogram", "Seconds to fetch and check a request's images"),
}
SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

_arrival: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("llava_request_arrival", default=None)


def prometheus_name(name: str) -> str:
    """The name Ray exports `name` under (counters get `_total`)."""
    return f"ray_{PREFIX}{name}" + ("_total" if METRICS[name][0] == "counter" else "")


class ServeMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        def make(name: str, tags: tuple[str, ...] = (), boundaries: Optional[list[float]] = None):
            kind, description = METRICS[name]
            if kind == "histogram":
                return Histogram(PREFIX + name, description, boundaries=boundaries, tag_keys=tags)
            return (Counter if kind == "counter" else Gauge)(PREFIX + name, description, tag_keys=tags)

        self.requests = make("requests", ("route", "status", "code"))
        self.rejected = make("rejected_requests", ("reason",))
        self.stream_errors = make("stream_errors", ("code",))
        self.ttft = make("time_to_first_token_seconds", boundaries=SECONDS)
        self.tokens = make("generated_tokens")
        self.tokens_per_s = make("tokens_per_second", boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000])
        self.batch_size = make("batch_size", boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64])
        self.queued = make("queued_requests")
        self.image_fetch = make("image_fetch_seconds", boundaries=SECONDS)
        self.waiting = 0
        self.queued.set(0)

    def response(self, path: str, status: int, code: str) -> None:
        route = path if path in ROUTES else "other"
        self.requests.inc(1, tags={"route": route, "status": str(status), "code": code or "none"})
        if 400 <= status < 500:
            self.rejected.inc(1, tags={"reason": code or f"http_{status}"})

    def wait(self, delta: int) -> None:
        self.waiting += delta
        self.queued.set(self.waiting)


_metrics: Optional[ServeMetrics] = None


def serve_metrics() -> ServeMetrics:
    """This replica's metrics (made on first use, inside the replica)."""
    global _metrics
    if _metrics is None:
        _metrics = ServeMetrics()
    return _metrics


class RequestMetrics:
    """ASGI middleware: notes each request's arrival (for time to first token) and counts its response by
    status and error code (read from the OpenAI-shaped error body, `{"error": {"code": ...}}`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        _arrival.set(time.monotonic())
        response = {"status": 500, "body": b""}

        async def watch(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body" and response["status"] >= 400:
                response["body"] += message.get("body", b"")[:4096]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            serve_metrics().response(scope.get("path", ""), response["status"], _error_code(response["body"]))


def _error_code(body: bytes) -> str:
    try:
        error = json.loads(body).get("error") or {}
        return str(error.get("code") or error.get("type") or "")[:64]
    except (ValueError, AttributeError):
        return ""


async def track_generation(outputs: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pass a request's decode outputs (objects with `completion_tokens`) through, measuring time to first
    token (from the request's arrival), tokens generated and decode speed, and the replica's queue."""
    metrics = serve_metrics()
    arrival = _arrival.get() or time.monotonic()
    first_at, tokens = None, 0
    metrics.wait(+1)
    try:
        async for out in outputs:
            if first_at is None:
                first_at = time.monotonic()
                metrics.wait(-1)
                metrics.ttft.observe(first_at - arrival)
            tokens = getattr(out, "completion_tokens", tokens)
            yield out
    finally:
        if first_at is None:
            metrics.wait(-1)
        elif tokens:
            metrics.tokens.inc(tokens)
            elapsed = time.monotonic() - first_at
            if tokens > 1 and elapsed > 0:
                metrics.tokens_per_s.observe((tokens - 1) / elapsed)


def observe_batch(size: int) -> None:
    serve_metrics().batch_size.observe(size)


async def timed_image_fetch(fetch: Awaitable[T], count: int) -> T:
    """Await a request's image fetch, timing it when the request has images."""
    started = time.monotonic()
    try:
        return await fetch
    finally:
        if count:
            serve_metrics().image_fetch.observe(time.monotonic() - started)


def stream_error(code: str) -> None:
    serve_metrics().stream_errors.inc(1, tags={"code": code or "internal"})
