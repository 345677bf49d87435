"""The chat API's request parsing (serve/protocol.py) without a server: OpenAI's wire format in, LLaVA turns out.

The same rules answered over HTTP, with the status codes and error bodies, are in test_serve.py (slow).
"""

import json

import pytest

from llava.decoding import SamplingParams
from serve.config import LimitsConfig
from serve.protocol import MAX_JSON_DEPTH, APIError, parse_chat_request, parse_json

LIMITS = LimitsConfig(
    max_images=2, max_tokens=512, default_max_tokens=16, max_request_bytes=4096, max_messages=8, max_text_chars=200
)


def user(content, **fields) -> dict:
    return {"model": "tiny-llava", "messages": [{"role": "user", "content": content}], **fields}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_multi_turn_request_becomes_llava_turns_with_images_in_order():
    request = parse_chat_request(
        {
            "model": "tiny-llava",
            "temperature": 0,
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "stop": "###",
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [image("data:a"), {"type": "text", "text": "and"}, image("http://b")]},
                {"role": "assistant", "content": "Two digits."},
                {"role": "user", "content": "Which is larger?"},
            ],
        },
        "tiny-llava",
        LIMITS,
    )
    assert request.messages == [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nand\n<image>"},
        {"from": "gpt", "value": "Two digits."},
        {"from": "human", "value": "Which is larger?"},
    ]
    assert request.image_urls == ["data:a", "http://b"]
    assert request.sampling == SamplingParams(max_tokens=7, temperature=0.0, top_p=1.0, stop=["###"], seed=3)
    assert request.max_tokens_given and request.stream and request.include_usage


def test_defaults_and_a_vanishing_temperature_is_greedy():
    request = parse_chat_request(user("hi", temperature=1e-6), "tiny-llava", LIMITS)
    assert request.sampling == SamplingParams(max_tokens=LIMITS.default_max_tokens, temperature=0.0)
    assert not request.max_tokens_given and not request.stream
    assert parse_chat_request(user("hi"), "tiny-llava", LIMITS).sampling.temperature == 1.0  # OpenAI's default


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "missing_model"),
        (user("hi", model="gpt-4"), 404, "model", "model_not_found"),
        ({"model": "tiny-llava", "messages": []}, 400, "messages", "missing_messages"),
        (
            {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}] * 9},
            400,
            "messages",
            "too_many_messages",
        ),
        (
            {"model": "tiny-llava", "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "messages[0].role",
            "invalid_value",
        ),
        (
            {
                "model": "tiny-llava",
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            },
            400,
            "messages",
            "invalid_value",
        ),
        (user([]), 400, "messages[0].content", "invalid_value"),
        (user([{"type": "audio"}]), 400, "messages[0].content[0]", "invalid_value"),
        (user([image("")]), 400, "messages[0].content[0]", "invalid_value"),
        (
            {
                "model": "tiny-llava",
                "messages": [{"role": "assistant", "content": [image("data:a")]}, {"role": "user", "content": "hi"}],
            },
            400,
            "messages[0].content[0]",
            "invalid_value",
        ),
        (user("look: <image>"), 400, "messages[0].content", "invalid_value"),
        (user("x" * 201), 400, "messages", "string_above_max_length"),
        (user([image("data:a")] * 3), 400, "messages", "too_many_images"),
        (user("hi", max_tokens=513), 400, "max_tokens", "invalid_value"),
        (user("hi", max_tokens=0), 400, "max_tokens", "invalid_value"),
        (user("hi", temperature=2.5), 400, "temperature", "invalid_value"),
        (user("hi", temperature=True), 400, "temperature", "invalid_value"),
        (user("hi", top_p=0), 400, "top_p", "invalid_value"),
        (user("hi", n=2), 400, "n", "invalid_value"),
        (user("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
        (user("hi", stop=[""]), 400, "stop", "invalid_value"),
        (user("hi", seed=-1), 400, "seed", "invalid_value"),
        (user("hi", seed=2**63), 400, "seed", "invalid_value"),
        (user("hi", stream="yes"), 400, "stream", "invalid_value"),
    ],
)
def test_a_bad_request_is_refused_naming_the_parameter(body, status, param, code):
    with pytest.raises(APIError) as refused:
        parse_chat_request(body, "tiny-llava", LIMITS)
    assert (refused.value.status, refused.value.param, refused.value.code) == (status, param, code)
    error = refused.value.body()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{" + b" " * 5000 + b"}", 413, "request_too_large"),
        (b"{not json", 400, "invalid_json"),
        (b'{"temperature": NaN}', 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (
            json.dumps({"a": [[[]]]}).replace("[[[]]]", "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode(),
            400,
            "invalid_json",
        ),
    ],
)
def test_a_body_that_is_not_a_json_object_within_the_limits_is_refused(body, status, code):
    with pytest.raises(APIError) as refused:
        parse_json(body, LIMITS)
    assert (refused.value.status, refused.value.code) == (status, code)


def test_a_json_object_within_the_limits_parses():
    assert parse_json(json.dumps(user("hi")).encode(), LIMITS) == user("hi")
