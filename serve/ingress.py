"""What every request passes before it reaches a model, for both engines (`llava` and `vllm`).

`Gate` (one per replica) checks the API key, reads the body within `limits.max_request_bytes`
(refused on `Content-Length` before reading, capped while reading a chunked body), parses the
JSON off the event loop, and turns image URLs into bytes: downloads run on their own bounded
thread pool, each under one deadline, so a slow image host delays only its own request.
`make_api` is the FastAPI app both engines mount: OpenAI-shaped errors for everything
(unknown routes, wrong methods, internal errors), no OpenAPI schema or docs pages, and
security headers (a Content-Security-Policy with `frame-ancestors 'none'`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import ServeConfig
from serve.images import check_format, load_image_bytes
from serve.protocol import APIError, parse_json

log = logging.getLogger("ray.serve")

API_CSP = "default-src 'none'; frame-ancestors 'none'"


# ---- the HTTP app -----------------------------------------------------------------------------------------------------


def page_csp(html: str) -> str:
    """A CSP for a page whose only scripts and styles are inline: each allowed by its sha256 hash."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def make_api(title: str) -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            body = APIError(404, f"there is no route {request.method} {request.url.path[:100]}", code="not_found")
        elif error.status_code == 405:
            body = APIError(
                405, f"{request.url.path[:100]} does not accept {request.method}", code="method_not_allowed"
            )
        else:
            body = APIError(error.status_code, str(error.detail)[:200], code="http_error")
        return JSONResponse(body.body(), status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, "the request is not valid", code="invalid_value").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(
            APIError(500, f"internal error: {type(error).__name__}", type="server_error").body(), status_code=500
        )

    app.add_middleware(_SecurityHeaders)
    return app


class _SecurityHeaders:
    """ASGI middleware: every response gets a CSP (unless the route set its own), nosniff and no-referrer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = API_CSP
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---- per-request checks -----------------------------------------------------------------------------------------------


class Gate:
    """API key, body limits, JSON parsing and image fetching for one replica (see the module docstring)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.api_key = os.environ.get(config.api_key_env) or None
        self._parse_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="parse")
        self._fetch_pool = concurrent.futures.ThreadPoolExecutor(
            config.image_fetch.max_concurrent, thread_name_prefix="image-fetch"
        )

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                type="authentication_error",
            )

    async def read_json(self, request: Request) -> dict:
        """The body as a JSON object: a JSON content type, within the byte limit, parsed on a worker thread."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(
                415,
                f"send the body as application/json, not {kind[:60] or 'no content type'}",
                code="unsupported_media_type",
            )
        limit = self.config.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, "Content-Length is not a number", code="invalid_request")
            if int(declared) > limit:
                raise APIError(
                    413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large"
                )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        return await self.run(parse_json, bytes(body), self.config.limits)

    async def run(self, function: Callable, *args, pool: Optional[concurrent.futures.Executor] = None):
        """`function(*args)` on a worker thread (the parse pool unless `pool` is given)."""
        return await asyncio.get_running_loop().run_in_executor(pool or self._parse_pool, function, *args)

    async def images(self, urls: list[str]) -> list[bytes]:
        """Each URL's bytes (data URLs decoded, http(s) fetched under one deadline), checked to be an allowed format."""
        fetch, limit = self.config.image_fetch, self.config.limits.max_image_bytes
        deadline = time.monotonic() + fetch.timeout_s

        async def one(index: int, url: str) -> bytes:
            if url.startswith("data:"):
                data = await self.run(load_image_bytes, url, fetch, limit)
            else:
                job = self.run(load_image_bytes, url, fetch, limit, deadline, pool=self._fetch_pool)
                try:  # a queued download shares the deadline; the thread itself stops at the deadline too
                    data = await asyncio.wait_for(job, timeout=fetch.timeout_s + 0.5)
                except asyncio.TimeoutError as exc:
                    raise APIError(
                        400,
                        f"fetching {url[:100]!r} took longer than {fetch.timeout_s:g} s",
                        param="messages",
                        code="image_fetch_timeout",
                    ) from exc
            await self.run(check_format, data, index)
            return data

        return list(await asyncio.gather(*[one(i, url) for i, url in enumerate(urls)]))
