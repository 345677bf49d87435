"""The chat API on a real Ray Serve, through real HTTP and the real `openai` client (fixture: tests/serve_fixtures.py)."""

import base64
import concurrent.futures
import http.server
import io
import threading
import time

import pytest

from tests.conftest import png


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_part(image: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """The same model in this process: the answers the server must give at temperature 0."""
    from llava.model import LlavaModel

    return LlavaModel.from_pretrained(tiny_checkpoint).eval()


def greedy(reference, messages: list[dict], images: list[bytes], max_tokens: int) -> str:
    from llava.generation import Prompt
    from tests.hf_greedy import hf_greedy_answer

    return hf_greedy_answer(reference, Prompt(messages, images), max_new_tokens=max_tokens)


# ---- the API -----------------------------------------------------------------------------------------------------


def test_health_needs_no_key_but_everything_else_does(chat_server):
    assert chat_server.get("/health", key=None) == (200, {"status": "ok", "model": "tiny-llava"})
    status, body = chat_server.get("/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = chat_server.post("/v1/chat/completions", {"model": "tiny-llava", "messages": []}, key="wrong")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    models = chat_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]


def test_completion_with_an_image_matches_local_greedy_and_counts_tokens(chat_server, reference):
    from llava.tokenization import tokenize_prompt

    image = png(11)
    response = chat_server.client().chat.completions.create(
        model="tiny-llava",
        temperature=0,
        max_tokens=12,
        messages=[{"role": "user", "content": [image_part(image), {"type": "text", "text": "What is shown?"}]}],
    )
    llava_messages = [{"from": "human", "value": "<image>\nWhat is shown?"}]
    assert response.choices[0].message.content == greedy(reference, llava_messages, [image], 12)
    prompt_ids, _ = tokenize_prompt(
        llava_messages, reference.tokenizer, reference.config.template, reference.num_image_tokens
    )
    assert response.usage.prompt_tokens == len(prompt_ids)
    choice = response.choices[0]
    if choice.finish_reason == "length":
        assert response.usage.completion_tokens == 12
    else:
        assert choice.finish_reason == "stop" and 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_sends_the_same_answer_in_chunks_then_done(chat_server):
    messages = [{"role": "user", "content": [image_part(png(12)), {"type": "text", "text": "Describe it."}]}]
    client = chat_server.client()
    whole = client.chat.completions.create(model="tiny-llava", temperature=0, max_tokens=16, messages=messages)
    chunks = list(
        client.chat.completions.create(
            model="tiny-llava",
            temperature=0,
            max_tokens=16,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1, "the answer should arrive in several chunks"
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    status, raw = chat_server.post(
        "/v1/chat/completions", {"model": "tiny-llava", "messages": messages, "max_tokens": 3, "stream": True}
    )
    events = [e for e in raw.split("\n\n") if e]
    assert status == 200 and all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_two_images_and_a_multi_turn_history(chat_server, reference):
    first, second = png(13), png(14)
    messages = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": [image_part(first), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A square of noise."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(second)]},
    ]
    response = chat_server.client().chat.completions.create(
        model="tiny-llava", temperature=0, max_tokens=10, messages=messages
    )
    llava_messages = [
        {"from": "system", "value": "You are a careful assistant."},
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A square of noise."},
        {"from": "human", "value": "And this one?\n<image>"},
    ]
    assert response.choices[0].message.content == greedy(reference, llava_messages, [first, second], 10)


def test_seed_makes_sampling_reproducible_and_stop_cuts_the_answer(chat_server):
    client = chat_server.client()
    ask = dict(model="tiny-llava", max_tokens=12, messages=[{"role": "user", "content": "Say something."}])
    sampled = [
        client.chat.completions.create(temperature=1.3, top_p=0.9, seed=5, **ask).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    full = client.chat.completions.create(temperature=0, **ask).choices[0].message.content
    stop = next(full[i : i + 2] for i in range(1, len(full) - 1) if full[i : i + 2].isalpha())
    cut = client.chat.completions.create(temperature=0, stop=[stop], **ask)
    assert cut.choices[0].message.content == full[: full.index(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(chat_server, reference):
    prompts = [f"Question number {i}?" for i in range(6)]
    client = chat_server.client()

    def ask(text):
        return (
            client.chat.completions.create(
                model="tiny-llava", temperature=0, max_tokens=8, messages=[{"role": "user", "content": text}]
            )
            .choices[0]
            .message.content
        )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [greedy(reference, [{"from": "human", "value": p}], [], 8) for p in prompts]


def test_a_long_request_does_not_hold_up_a_short_one(chat_server):
    """A short request sent while a long one is decoding is answered while the long one still streams."""
    client = chat_server.client()
    decoding, long_chunks = threading.Event(), []

    def long_request():
        stream = client.chat.completions.create(
            model="tiny-llava",
            temperature=0,
            max_tokens=512,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "long request"}],
        )
        for chunk in stream:
            long_chunks.append((time.monotonic(), chunk))
            if len(long_chunks) >= 5:
                decoding.set()

    long = threading.Thread(target=long_request)
    long.start()
    assert decoding.wait(120), "the long request never started streaming"
    client.chat.completions.create(
        model="tiny-llava", temperature=0, max_tokens=2, messages=[{"role": "user", "content": "short request"}]
    )
    short_done = time.monotonic()
    long.join()
    assert long_chunks[-1][1].usage.completion_tokens == 512, "the long request must really decode for long"
    after_short = [chunk for t, chunk in long_chunks if t > short_done and chunk.choices]
    assert after_short, "the short answer should come back while the long one is still streaming"


# ---- bad input ---------------------------------------------------------------------------------------------------


def _big_png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, format="PNG")  # one colour: few bytes, many pixels
    return buffer.getvalue()


def _user(*parts) -> dict:
    return {"model": "tiny-llava", "max_tokens": 4, "messages": [{"role": "user", "content": list(parts)}]}


TEXT = {"type": "text", "text": "hi"}
BAD_REQUESTS = {
    "invalid JSON": (b'{"model": "tiny-llava", "messages": [', 400, "invalid_json", None),
    "not an object": (b'["a list"]', 400, "invalid_json", None),
    "unknown model": (
        {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model_not_found",
        "model",
    ),
    "missing messages": ({"model": "tiny-llava"}, 400, "missing_messages", "messages"),
    "bad role": (
        {"model": "tiny-llava", "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "invalid_value",
        "messages[0].role",
    ),
    "ends with the assistant": (
        {"model": "tiny-llava", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        "invalid_value",
        "messages",
    ),
    "image marker in text": (
        _user({"type": "text", "text": "look <image> here"}),
        400,
        "invalid_value",
        "messages[0].content",
    ),
    "unknown content part": (_user({"type": "audio", "audio": "..."}), 400, "invalid_value", "messages[0].content[0]"),
    "image does not decode": (
        _user({"type": "image_url", "image_url": {"url": data_url(b"not a png at all")}}, TEXT),
        400,
        "invalid_image",
        "messages",
    ),
    "bad base64": (
        _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, TEXT),
        400,
        "invalid_image",
        "messages",
    ),
    "too many images": (
        _user(image_part(png(1)), image_part(png(2)), image_part(png(3)), TEXT),
        400,
        "too_many_images",
        "messages",
    ),
    "image over the byte limit": (_user(image_part(png(4, size=400)), TEXT), 400, "image_too_large", "messages"),
    "image over the pixel limit": (_user(image_part(_big_png(1100)), TEXT), 400, "image_too_large", "messages"),
    "prompt over the context": (
        _user({"type": "text", "text": "word " * 3000}),
        400,
        "context_length_exceeded",
        "messages",
    ),
    "max_tokens past the context": (
        {**_user(TEXT), "max_tokens": 500, "messages": [{"role": "user", "content": "word " * 1700}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
    "temperature out of range": ({**_user(TEXT), "temperature": 3}, 400, "invalid_value", "temperature"),
    "top_p out of range": ({**_user(TEXT), "top_p": 0}, 400, "invalid_value", "top_p"),
    "max_tokens over the cap": ({**_user(TEXT), "max_tokens": 100000}, 400, "invalid_value", "max_tokens"),
    "max_tokens not an int": ({**_user(TEXT), "max_tokens": "ten"}, 400, "invalid_value", "max_tokens"),
    "n > 1": ({**_user(TEXT), "n": 2}, 400, "invalid_value", "n"),
    "stop not strings": ({**_user(TEXT), "stop": [1, 2]}, 400, "invalid_value", "stop"),
    "non-http image URL": (
        _user({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, TEXT),
        400,
        "invalid_image_url",
        "messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_in_openai_shape_and_the_server_keeps_answering(chat_server, case):
    body, status, code, param = BAD_REQUESTS[case]
    got_status, got = chat_server.post("/v1/chat/completions", body)
    assert (got_status, got["error"]["code"], got["error"]["param"]) == (status, code, param), got
    assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["message"]
    ok_status, ok = chat_server.post("/v1/chat/completions", _user(TEXT))
    assert ok_status == 200 and ok["choices"][0]["message"]["role"] == "assistant"


def test_the_openai_client_raises_its_typed_errors(chat_server):
    import openai

    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        chat_server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="too_many_images|limit is 2"):
        chat_server.client().chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": [image_part(png(i)) for i in range(3)]}]
        )


# ---- image URLs (SSRF guard) ---------------------------------------------------------------------------------------


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    images = {"/small.png": png(21), "/huge.png": png(22, size=400)}

    def do_GET(self):
        if self.path == "/to-loopback":  # a redirect from an allowed host to a forbidden one
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/small.png")
            self.end_headers()
            return
        if self.path == "/page.html":
            body, kind = b"<html></html>", "text/html"
        elif self.path in self.images:
            body, kind = self.images[self.path], "image/png"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    """An image server on 127.0.0.2 (allowed by the fixture's image_fetch.allow) and 127.0.0.1 (not allowed)."""
    servers = [http.server.ThreadingHTTPServer((host, 0), _ImageHandler) for host in ("127.0.0.2", "127.0.0.1")]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {host: f"http://{host}:{s.server_port}" for host, s in zip(("127.0.0.2", "127.0.0.1"), servers)}
    for server in servers:
        server.shutdown()


def test_an_allowlisted_image_url_is_fetched(chat_server, reference, image_host):
    url = image_host["127.0.0.2"] + "/small.png"
    response = chat_server.client().chat.completions.create(
        model="tiny-llava",
        temperature=0,
        max_tokens=6,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, TEXT]}],
    )
    assert response.choices[0].message.content == greedy(
        reference, [{"from": "human", "value": "<image>\nhi"}], [png(21)], 6
    )


@pytest.mark.parametrize(
    "host, path, code",
    [
        ("127.0.0.1", "/small.png", "image_url_forbidden"),  # loopback, not on the allow list
        ("127.0.0.2", "/to-loopback", "image_url_forbidden"),  # redirect to a forbidden address
        ("127.0.0.2", "/huge.png", "image_too_large"),
        ("127.0.0.2", "/page.html", "invalid_image_content_type"),
        ("127.0.0.2", "/missing.png", "image_fetch_failed"),
    ],
)
def test_image_urls_that_are_refused(chat_server, image_host, host, path, code):
    status, body = chat_server.post(
        "/v1/chat/completions", _user({"type": "image_url", "image_url": {"url": image_host[host] + path}}, TEXT)
    )
    assert (status, body["error"]["code"]) == (400, code), body


def test_private_and_link_local_addresses_are_refused_without_an_allow_list():
    from serve.config import ImageFetchConfig
    from serve.images import check_destination
    from serve.protocol import APIError

    for url in (
        "http://10.1.2.3/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a.png",
        "http://192.168.0.1/a.png",
        "http://localhost/a.png",
        "http://100.64.0.1/a.png",
        # IPv6 forms that embed an IPv4 address: compatible, mapped, NAT64, 6to4, Teredo
        "http://[::a00:1]/a.png",
        "http://[::ffff:a00:1]/a.png",
        "http://[64:ff9b::a00:1]/a.png",
        "http://[2002:a00:1::1]/a.png",
        "http://[2001:0:a00:1::1]/a.png",
        "http://[fe80::1]/a.png",
    ):
        with pytest.raises(APIError, match="is not allowed") as refused:
            check_destination(url, ImageFetchConfig())
        assert refused.value.code == "image_url_forbidden"
        assert "127.0.0.1" not in refused.value.message and "::1 " not in refused.value.message  # no resolved address
    check_destination("http://127.0.0.5/a.png", ImageFetchConfig(allow=["127.0.0.0/8"]))  # allowed: no error


# ---- our endpoint as a teacher (issue 6: the generation job's wire format end to end) -------------------------------


def test_generate_job_uses_this_server_as_its_teacher(chat_server, tmp_path):
    """The tiny model's answers are noise: each request must end as kept rows or a counted parse failure."""
    import json

    from llava.instruct.generate import GenerateConfig, generate
    from tests.serve_fixtures import KEY_ENV

    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 40} for i in (1, 2)]
    captions = {
        "images": images,
        "annotations": [{"image_id": 1, "caption": "A cat on a mat."}, {"image_id": 2, "caption": "A dog in a park."}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "images").mkdir()
    for i in (1, 2):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(i))
    config = GenerateConfig(
        captions=str(tmp_path / "captions.json"), images=str(tmp_path / "images"), out=str(tmp_path / "out"), actors=1
    )
    config.endpoint.url, config.endpoint.model, config.endpoint.api_key_env = (
        f"{chat_server.url}/v1",
        "tiny-llava",
        KEY_ENV,
    )
    config.endpoint.max_tokens, config.endpoint.max_retries, config.endpoint.concurrency = 32, 0, 3
    summary = generate(config)
    assert summary["planned"] == 6 and summary["not_done"] == 0
    assert not any(reason.startswith("request_failed") for reason in summary["failures"]), summary
    assert summary["kept"] + sum(summary["failures"].values()) == 6
    assert all(reason.startswith("unparsable_") for reason in summary["failures"])


def test_url_fetching_can_be_switched_off_and_times_out():
    from serve.config import ImageFetchConfig
    from serve.images import load_image_bytes
    from serve.protocol import APIError

    with pytest.raises(APIError) as refused:
        load_image_bytes("http://example.com/a.png", ImageFetchConfig(enabled=False), 1000)
    assert refused.value.code == "image_url_fetch_disabled"

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(2)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(APIError) as slow:
            load_image_bytes(
                f"http://127.0.0.1:{server.server_port}/a.png",
                ImageFetchConfig(timeout_s=0.5, allow=["127.0.0.1"]),
                1000,
            )
        assert slow.value.code == "image_fetch_timeout" and "longer than 0.5 s" in slow.value.message
    finally:
        server.shutdown()


# ---- autoscaling (last: it loads the server) -------------------------------------------------------------------


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["llava"].deployments["LlavaChat"]
    return deployment.replica_states.get("RUNNING", 0)


def test_replicas_scale_up_under_load_and_back_down_after(chat_server):
    assert _running_replicas() == 1
    client = chat_server.client(timeout=120)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            client.chat.completions.create(
                model="tiny-llava",
                temperature=0,
                max_tokens=200,
                messages=[{"role": "user", "content": "keep talking"}],
            )

    peak, deadline = 1, time.monotonic() + 90
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(load) for _ in range(12)]
        while time.monotonic() < deadline and peak < 2:
            time.sleep(1)
            peak = max(peak, _running_replicas())
        stop.set()
        for future in futures:
            future.result()
    assert peak == 2, "the autoscaler never added a replica under 12 concurrent clients"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _running_replicas() > 1:
        time.sleep(1)
    assert _running_replicas() == 1, "the autoscaler did not scale back down after the load stopped"


# ---- building the app (no deployment) ----------------------------------------------------------------------------


def test_build_app_from_serve_config_args_sets_autoscaling_and_resources(tiny_checkpoint):
    from pathlib import Path

    import yaml
    from ray import serve

    from llava.config import config_from_dict
    from serve.app import LlavaChat, build_app, deployment_options
    from serve.config import ServeConfig

    args = yaml.safe_load((Path(__file__).parent.parent / "serve" / "config.yaml").read_text())["applications"][0][
        "args"
    ]
    args = {**args, "model": tiny_checkpoint, "autoscaling": {**args["autoscaling"], "max_replicas": 3}}
    assert isinstance(build_app(args), serve.Application)
    options = deployment_options(config_from_dict(ServeConfig, args))
    assert options["autoscaling_config"]["max_replicas"] == 3
    deployment = LlavaChat.options(**options)  # Ray validates the options; public Deployment properties below
    assert deployment.name == "LlavaChat"
    assert deployment.max_ongoing_requests == args["replica"]["max_ongoing_requests"]
    assert deployment.ray_actor_options["num_gpus"] == args["replica"]["num_gpus"]
    assert deployment.ray_actor_options["num_cpus"] == args["replica"]["num_cpus"]
    with pytest.raises(ValueError, match="engine must be llava or vllm"):
        build_app({"model": tiny_checkpoint, "engine": "tgi"})
    with pytest.raises(ValueError, match="serve needs model"):
        build_app({})


def test_vllm_engine_gets_the_same_limits_and_a_clear_error_without_vllm():
    from serve.config import ServeConfig
    from serve.vllm_app import vllm_llm_config

    config = ServeConfig(model="s3://bucket/export", model_name="llava-7b", engine="vllm")
    config.limits.max_images = 3
    llm = vllm_llm_config(config)
    assert llm["model_loading_config"] == {"model_id": "llava-7b", "model_source": {"bucket_uri": "s3://bucket/export"}}
    assert llm["engine_kwargs"]["limit_mm_per_prompt"] == {"image": 3}
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == config.autoscaling.max_replicas
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from serve.app import build

        with pytest.raises(ImportError, match=r"ray\[llm\]"):
            build(config)
