"""The OpenAI chat-completions wire format: request validation into our types, and response bodies.

Every problem with a request raises `APIError` naming the parameter at fault; the app turns
it into OpenAI's error body `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from llava.config import IMAGE_TOKEN
from llava.decoding import SamplingParams
from serve.config import LimitsConfig

ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # LLaVA-format turns ({"from", "value"}), `<image>` where each image goes
    image_urls: list[str]  # in `<image>` order
    sampling: SamplingParams
    max_tokens_given: bool  # False: the server picks max_tokens from its default and the context left
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


MAX_JSON_DEPTH = 32  # nesting of arrays and objects; a chat request needs 6
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 64
MAX_PARTS_PER_MESSAGE = 32
MIN_TEMPERATURE = 1e-4  # a smaller positive temperature is greedy decoding (its limit), not a division by ~0
MAX_SEED = 2**63  # seeds are in [0, 2^63)


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _depth(data) -> int:
    """The nesting depth of arrays and objects (iterative: a deep body cannot exhaust the stack here)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(body: bytes, limits: LimitsConfig) -> dict:
    """The request body as a JSON object; 413 over `max_request_bytes`, 400 for anything else wrong.
    CPU-bound on large bodies: the app runs it off the event loop."""
    if len(body) > limits.max_request_bytes:
        raise APIError(
            413,
            f"the request body is {len(body)} bytes; the limit is {limits.max_request_bytes}",
            code="request_too_large",
        )
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except RecursionError as exc:
        raise APIError(
            400, f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if _depth(data) > MAX_JSON_DEPTH:
        raise APIError(
            400, f"the request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        )
    return data


def _number(data: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = data.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise APIError(
            400, f"{name} must be {what} in [{low}, {high}], got {str(value)[:40]}", param=name, code="invalid_value"
        )
    return value


def _content_parts(content: Any, index: int, role: str) -> list[dict]:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise APIError(
            400, f"{param} must be a string or a non-empty list of content parts", param=param, code="invalid_value"
        )
    if len(content) > MAX_PARTS_PER_MESSAGE:
        raise APIError(
            400,
            f"{param} has {len(content)} parts; the limit is {MAX_PARTS_PER_MESSAGE}",
            param=param,
            code="invalid_value",
        )
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image_url" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url  # {"url": ...} or a bare string
            if isinstance(url, str) and url:
                continue
            raise APIError(
                400,
                f"{param}[{j}].image_url.url must be a non-empty string",
                param=f"{param}[{j}]",
                code="invalid_value",
            )
        if kind == "image_url":
            raise APIError(
                400,
                f"{param}[{j}]: images are only accepted in user messages",
                param=f"{param}[{j}]",
                code="invalid_value",
            )
        raise APIError(
            400,
            f"{param}[{j}] must be {{'type': 'text', 'text': ...}} or "
            f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}",
            param=f"{param}[{j}]",
            code="invalid_value",
        )
    return content


def _messages(data: dict, limits: LimitsConfig) -> tuple[list[dict], list[str]]:
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", param="messages", code="missing_messages")
    if len(raw) > limits.max_messages:
        raise APIError(
            400,
            f"the request has {len(raw)} messages; the limit is {limits.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    turns, urls, chars = [], [], 0
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:  # a list or dict role is not hashable
            raise APIError(
                400,
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {str(role)[:40]!r}",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        pieces = []
        for part in _content_parts(message.get("content"), i, role):
            if part["type"] == "text":
                if IMAGE_TOKEN in part["text"]:
                    raise APIError(
                        400,
                        f"messages[{i}] contains the reserved marker {IMAGE_TOKEN}: send images as "
                        "image_url content parts",
                        param=f"messages[{i}].content",
                        code="invalid_value",
                    )
                if not part["text"].isascii():
                    try:
                        part["text"].encode("utf-8")
                    except UnicodeEncodeError as exc:  # JSON "\ud800" escapes give lone surrogates: not text
                        raise APIError(
                            400,
                            f"messages[{i}] contains invalid Unicode (a lone surrogate)",
                            param=f"messages[{i}].content",
                            code="invalid_value",
                        ) from exc
                chars += len(part["text"])
                if chars > limits.max_text_chars:
                    raise APIError(
                        400,
                        f"the messages have more than {limits.max_text_chars} characters of text",
                        param="messages",
                        code="string_above_max_length",
                    )
                pieces.append(part["text"])
            else:
                url = part["image_url"]
                urls.append(url["url"] if isinstance(url, dict) else url)
                pieces.append(IMAGE_TOKEN)
        turns.append({"from": ROLES[role], "value": "\n".join(pieces)})
    if turns[-1]["from"] != "human":
        raise APIError(400, "the last message must have role 'user'", param="messages", code="invalid_value")
    if len(urls) > limits.max_images:
        raise APIError(
            400,
            f"the request has {len(urls)} images; the limit is {limits.max_images}",
            param="messages",
            code="too_many_images",
        )
    return turns, urls


def parse_chat_request(data: dict, model_name: str, limits: LimitsConfig) -> ChatRequest:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required", param="model", code="missing_model")
    if model != model_name:
        raise APIError(
            404,
            f"the model {model[:100]!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )
    messages, urls = _messages(data, limits)
    if _number(data, "n", 1, 1, 1, integer=True) != 1:
        raise APIError(400, "n must be 1", param="n", code="invalid_value")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, limits.max_tokens, integer=True)
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stop, list)
        and len(stop) <= MAX_STOP_STRINGS
        and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise APIError(
            400,
            f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, each of 1 to "
            f"{MAX_STOP_CHARS} characters",
            param="stop",
            code="invalid_value",
        )
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED):
        raise APIError(
            400, f"seed must be an integer in [0, 2^63), got {str(seed)[:40]}", param="seed", code="invalid_value"
        )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream", code="invalid_value")
    options = data.get("stream_options") or {}
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    sampling = SamplingParams(
        max_tokens=max_tokens or limits.default_max_tokens,
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=_number(data, "top_p", 1.0, 1e-9, 1.0),
        stop=list(stop or []),
        seed=seed,
    )
    return ChatRequest(
        model,
        messages,
        urls,
        sampling,
        max_tokens is not None,
        stream,
        bool(isinstance(options, dict) and options.get("include_usage")),
    )


# ---- responses --------------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request: ChatRequest, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": request.id,
        "object": "chat.completion",
        "created": request.created,
        "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(
    request: ChatRequest, delta: dict, finish_reason: Optional[str] = None, usage_counts: Optional[dict] = None
) -> dict:
    choices = [] if usage_counts else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    body = {
        "id": request.id,
        "object": "chat.completion.chunk",
        "created": request.created,
        "model": request.model,
        "choices": choices,
    }
    if usage_counts:
        body["usage"] = usage_counts
    return body


def sse(body: dict | str) -> str:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
