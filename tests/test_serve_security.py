"""No single request can stall or poison the replica (issue 14).

Each bad request is sent while normal requests run (`NormalTraffic`), and every normal request must
succeed. Real Ray Serve, real HTTP (fixture: tests/serve_fixtures.py), real local image hosts that drip,
lie or cut off. The fixture allows image URLs from 127.0.0.2 only and fetches under a 5 s deadline.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import http.server
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import png

TEXT = {"type": "text", "text": "hi"}


def data_url(image: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(image).decode()


def user(*parts, **fields) -> dict:
    return {"model": "tiny-llava", "max_tokens": 2, "messages": [{"role": "user", "content": list(parts)}], **fields}


class NormalTraffic:
    """`clients` threads sending normal requests (text, or text and an image) until the block ends;
    on exit every one of them must have been answered 200 with an assistant message."""

    def __init__(self, server, clients: int = 2):
        self.server, self.clients = server, clients
        self.stop, self.answered = threading.Event(), threading.Event()
        self.results: list[tuple[int, object]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            parts = [{"type": "image_url", "image_url": {"url": data_url(png(i))}}, TEXT] if n % 2 else [TEXT]
            self.results.append(self.server.post("/v1/chat/completions", user(*parts, temperature=0), timeout=300))
            self.answered.set()
            n += 1

    def completed(self) -> int:
        return len(self.results)

    def __enter__(self) -> NormalTraffic:
        for thread in self.threads:
            thread.start()
        assert self.answered.wait(300), "no normal request was answered"
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(300)
        bad = [
            (status, body)
            for status, body in self.results
            if status != 200 or body["choices"][0]["message"]["role"] != "assistant"
        ]
        assert not bad, f"normal requests failed while a bad one ran: {bad[:3]}"


def assert_openai_error(status: int, body, expected_status: int, code: str | None = None) -> None:
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code:
        assert body["error"]["code"] == code, body


# ---- image hosts that misbehave ---------------------------------------------------------------------------------------


class _BadImageHost(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    image = png(31)

    def do_GET(self):
        if self.path == "/drip.png":  # 200 image/png, then one byte every second
            self._head(len(self.image))
            for byte in self.image:
                time.sleep(1)
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
        elif self.path == "/lying-length.png":  # announces more than it sends, then closes
            self._head(len(self.image) + 5000)
            self.wfile.write(self.image)
            self.close_connection = True
        elif self.path == "/truncated.png":  # a PNG cut in half, with the matching length
            half = self.image[: len(self.image) // 2]
            self._head(len(half))
            self.wfile.write(half)
        elif self.path == "/html-as-png.png":  # says image/png, is HTML
            body = b"<html><body>not an image</body></html>"
            self._head(len(body))
            self.wfile.write(body)
        elif self.path == "/bmp.png":  # a real image in a format that is not allowed
            buffer = io.BytesIO()
            __import__("PIL.Image").Image.new("RGB", (8, 8)).save(buffer, format="BMP")
            self._head(len(buffer.getvalue()))
            self.wfile.write(buffer.getvalue())
        elif self.path == "/good.png":
            self._head(len(self.image))
            self.wfile.write(self.image)
        elif self.path == "/bad-length.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "lots")
            self.end_headers()
            self.close_connection = True
        else:
            self.send_error(404)

    def _head(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def bad_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _BadImageHost)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.2:{server.server_port}"
    server.shutdown()


@pytest.mark.slow
def test_a_dripping_image_host_gets_a_4xx_at_the_deadline_while_others_are_served(chat_server, bad_host):
    with NormalTraffic(chat_server) as traffic:
        before = traffic.completed()
        status, body = chat_server.post(
            "/v1/chat/completions", user({"type": "image_url", "image_url": {"url": bad_host + "/drip.png"}}, TEXT)
        )
        served_meanwhile = traffic.completed() - before
    assert_openai_error(status, body, 400, "image_fetch_timeout")
    assert "longer than 5 s" in body["error"]["message"]
    assert served_meanwhile > 0, "normal requests must be answered while the dripping download waits"


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, code",
    [
        ("/lying-length.png", "image_fetch_failed"),  # Content-Length larger than the body
        ("/truncated.png", "invalid_image"),
        ("/html-as-png.png", "invalid_image"),  # the format is checked, not the header's word
        ("/bmp.png", "invalid_image"),  # not in the allowed formats
        ("/bad-length.png", "image_fetch_failed"),
    ],
)
def test_lying_or_truncated_image_responses_are_4xx(chat_server, bad_host, path, code):
    with NormalTraffic(chat_server, clients=1):
        status, body = chat_server.post(
            "/v1/chat/completions", user({"type": "image_url", "image_url": {"url": bad_host + path}}, TEXT)
        )
    assert_openai_error(status, body, 400, code)


# ---- malformed input: 4xx in OpenAI's shape, never 5xx ----------------------------------------------------------------


def _image_url_request(url: str) -> dict:
    return user({"type": "image_url", "image_url": {"url": url}}, TEXT)


MALFORMED = {
    "port out of range": (_image_url_request("http://a:99999/x.png"), 400, "invalid_image_url"),
    "unclosed IPv6 bracket": (_image_url_request("http://[::1/x.png"), 400, "invalid_image_url"),
    "credentials in the URL": (_image_url_request("http://u:p@example.com/x.png"), 400, "invalid_image_url"),
    "loopback image host": (_image_url_request("http://127.0.0.1:9/x.png"), 400, "image_url_forbidden"),
    "IPv4-compatible IPv6": (_image_url_request("http://[::7f00:1]/x.png"), 400, "image_url_forbidden"),
    "NAT64": (_image_url_request("http://[64:ff9b::a00:1]/x.png"), 400, "image_url_forbidden"),
    "6to4": (_image_url_request("http://[2002:7f00:1::1]/x.png"), 400, "image_url_forbidden"),
    "five stop strings": (user(TEXT, stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    "a 65-character stop string": (user(TEXT, stop=["x" * 65]), 400, "invalid_value"),
    "negative seed": (user(TEXT, seed=-1), 400, "invalid_value"),
    "seed of 2^63": (user(TEXT, seed=2**63), 400, "invalid_value"),
    "seed far too large": (user(TEXT, seed=10**40), 400, "invalid_value"),
    "too many messages": (
        {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}] * 17},
        400,
        "too_many_messages",
    ),
    "too much text": (user({"type": "text", "text": "x" * 20_001}), 400, "string_above_max_length"),
    "too many content parts": (user(*[TEXT] * 33), 400, "invalid_value"),
    "deep nesting": (b'{"model": "tiny-llava", "x": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "invalid_json"),
    "very deep nesting": (
        b'{"model": "tiny-llava", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        "invalid_json",
    ),
    "a lone surrogate": (
        b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
        400,
        "invalid_value",
    ),
    "NaN": (b'{"model": "tiny-llava", "temperature": NaN, "messages": []}', 400, "invalid_json"),
    "not UTF-8": (b'{"model": "\xff\xfe"}', 400, "invalid_json"),
    "a TIFF image": (
        user({"type": "image_url", "image_url": {"url": data_url(b"II*\x00" + b"\x00" * 64)}}, TEXT),
        400,
        "invalid_image",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_openai_shaped_4xx_while_normal_requests_run(chat_server, case):
    body, expected, code = MALFORMED[case]
    with NormalTraffic(chat_server, clients=1):
        status, answer = chat_server.post("/v1/chat/completions", body)
    assert_openai_error(status, answer, expected, code)


@pytest.mark.slow
def test_the_largest_accepted_stop_strings_and_seed_still_answer(chat_server):
    with NormalTraffic(chat_server, clients=1):
        status, body = chat_server.post("/v1/chat/completions", user(TEXT, stop=["ab" * 32] * 4, seed=2**63 - 1))
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body


@pytest.mark.slow
def test_unknown_routes_wrong_methods_and_the_schema_are_openai_shaped(chat_server):
    with NormalTraffic(chat_server, clients=1):
        for path in ("/v1/nope", "/openapi.json", "/docs", "/redoc"):
            assert_openai_error(*chat_server.get(path), 404, "not_found")
        status, body = chat_server.post("/health", {})
        assert_openai_error(status, body, 405, "method_not_allowed")
        headers = {"Authorization": f"Bearer {chat_server.key}", "Content-Type": "text/plain"}
        status, body = _request(chat_server.url + "/v1/chat/completions", b"{}", headers)
        assert_openai_error(status, body, 415, "unsupported_media_type")


@pytest.mark.slow
def test_responses_carry_a_csp_and_the_page_keeps_the_key_for_the_session_only(chat_server):
    import urllib.request

    with urllib.request.urlopen(chat_server.url + "/", timeout=60) as page:
        csp, html = page.headers["Content-Security-Policy"], page.read().decode()
    assert "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    assert "sessionStorage" in html and "localStorage" not in html
    with urllib.request.urlopen(chat_server.url + "/health", timeout=60) as health:
        assert health.headers["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert health.headers["X-Content-Type-Options"] == "nosniff"


def _request(url: str, data: bytes, headers: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---- body limits ------------------------------------------------------------------------------------------------------


def _raw_http(url: str, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send `head` (request line and headers) and `body` on a raw socket; the status and JSON body of the answer."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=120) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


@pytest.mark.slow
def test_a_body_over_the_limit_is_refused_on_content_length_before_it_is_sent(chat_server):
    """Content-Length says 1 GB and no byte of the body is ever sent: the answer must still come (413)."""
    with NormalTraffic(chat_server):
        status, body = _raw_http(
            chat_server.url,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {chat_server.key}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000000\r\nConnection: close\r\n",
        )
    assert_openai_error(status, body, 413, "request_too_large")


@pytest.mark.slow
def test_a_chunked_body_is_capped_while_it_is_read(chat_server):
    limit = chat_server.config.limits.max_request_bytes
    chunks = [b'{"model": "tiny-llava", "pad": "'] + [b"x" * 65536] * (limit // 65536 + 4) + [b'"}']
    with NormalTraffic(chat_server):
        parts = urllib.parse.urlsplit(chat_server.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=iter(chunks),
                encode_chunked=True,
                headers={
                    "Authorization": f"Bearer {chat_server.key}",
                    "Content-Type": "application/json",
                    "Transfer-Encoding": "chunked",
                },
            )
        except OSError:
            pass  # the server may answer and close before the last chunk is sent
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
        connection.close()
    assert_openai_error(status, body, 413, "request_too_large")


# ---- a row that fails inside the decode loop fails only its own request ------------------------------------------------


def _poisoning_class():
    from serve.app import LlavaChat

    class PoisoningChat(LlavaChat.func_or_class):
        """Our replica, except that a request saying exactly "poison" gets NaN as its temperature after
        validation: its row then fails inside the decode loop (torch.multinomial refuses NaN probabilities)."""

        async def _prepare(self, request):
            chat, prepared = await super()._prepare(request)
            if chat.messages[-1]["value"] == "poison":
                prepared.sampling = dataclasses.replace(prepared.sampling, temperature=float("nan"))
            return chat, prepared

    return PoisoningChat


@pytest.mark.slow
def test_a_row_failing_inside_the_decode_loop_fails_only_its_own_request(chat_server):
    from ray import serve

    from llava.config import config_to_dict
    from serve.app import deployment_options
    from serve.config import BatchingConfig

    # The poisoned request and 3 normal ones are sent together and decode side by side in the one decode loop.
    config = dataclasses.replace(chat_server.config, batching=BatchingConfig(max_batch_size=4))
    options = {**deployment_options(config), "autoscaling_config": None, "num_replicas": 1}
    deployment = serve.deployment(_poisoning_class(), name="PoisoningChat").options(**options)
    serve.run(deployment.bind(config_to_dict(config)), name="poisoning", route_prefix="/poisoning", blocking=False)
    try:
        prompts = ["first question", "second question", "poison", "third question"]
        expected = {
            p: chat_server.post("/v1/chat/completions", _text_request(p))[1]["choices"][0]["message"]["content"]
            for p in prompts
            if p != "poison"
        }
        _wait_until_up(chat_server, "/poisoning/health")
        results: dict[str, tuple[int, dict]] = {}
        threads = [
            threading.Thread(
                target=lambda p=p: results.__setitem__(
                    p, chat_server.post("/poisoning/v1/chat/completions", _text_request(p), timeout=300)
                )
            )
            for p in prompts
        ]
        with NormalTraffic(chat_server, clients=1):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
        assert_openai_error(*results["poison"], 500)
        assert results["poison"][1]["error"]["type"] == "server_error"
        for prompt, answer in expected.items():
            status, body = results[prompt]
            assert status == 200 and body["choices"][0]["message"]["content"] == answer, (prompt, body)
        status, body = chat_server.post("/poisoning/v1/chat/completions", _text_request("after the poison"))
        assert status == 200, body
    finally:
        serve.delete("poisoning")


def _text_request(text: str) -> dict:
    return {"model": "tiny-llava", "temperature": 0, "max_tokens": 6, "messages": [{"role": "user", "content": text}]}


def _wait_until_up(server, path: str) -> None:
    for _ in range(240):
        if server.get(path, key=None)[0] == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} never came up")


def test_a_failing_row_ends_alone_and_the_other_rows_decode_as_they_would_without_it(tiny_checkpoint):
    from llava.decoding import BatchDecoder, SamplingParams, greedy_decode
    from llava.generation import Prompt, encode_prompt
    from llava.model import LlavaModel

    model = LlavaModel.from_pretrained(tiny_checkpoint).eval()
    prompts = [
        encode_prompt(model, Prompt([{"from": "human", "value": text}], images))
        for text, images in (("<image>\nWhat is it?", [png(1)]), ("poison", []), ("Tell me more.", []))
    ]
    greedy, poisoned = (
        SamplingParams(max_tokens=8, temperature=0),
        SamplingParams(max_tokens=8, temperature=float("nan")),
    )
    texts, finals, errors = [""] * 3, [None] * 3, [None] * 3
    for step in BatchDecoder(model, prompts, [greedy, poisoned, greedy]).steps():
        for i, out in enumerate(step):
            if out is not None:
                texts[i] += out.delta
                finals[i], errors[i] = out.finish_reason, out.error
    assert finals[1] == "error" and "RuntimeError" in errors[1] and texts[1] == ""
    alone = greedy_decode(model, [prompts[0], prompts[2]], max_new_tokens=8)
    assert [texts[0], texts[2]] == alone and finals[0] in ("stop", "length") and errors[0] is None


# ---- image URLs: the address that was checked is the one connected to -------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits.append(self.headers.get("Host"))
        body = png(41)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _recording_server(host: str, tls: ssl.SSLContext | None = None) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((host, 0), _Recorder)
    server.hits = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_fetch_connects_to_the_checked_address_not_a_second_lookup(monkeypatch):
    """DNS rebinding: the host resolves to an allowed address once, then to a forbidden one. One lookup is
    made, the connection goes to the allowed address, and the Host header is the URL's host."""
    from serve.config import ImageFetchConfig
    from serve.images import fetch_url

    allowed, forbidden = _recording_server("127.0.0.2"), _recording_server("127.0.0.1")
    real, lookups = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.2" if len(lookups) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = allowed.server_port
    forbidden.server_close()  # the forbidden address must not even be reachable on that port by accident
    try:
        image = fetch_url(f"http://rebind.test:{port}/a.png", ImageFetchConfig(allow=["127.0.0.2/32"]), 10**6)
    finally:
        allowed.shutdown()
        forbidden.shutdown()
    assert image == png(41) and lookups == ["rebind.test"]
    assert allowed.hits == [f"rebind.test:{port}"] and forbidden.hits == []


@pytest.fixture()
def localhost_certificate(tmp_path, monkeypatch) -> tuple[str, str]:
    """A self-signed certificate for the name `localhost` (no IP address), trusted by this process."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return str(cert), str(key)


def test_https_fetch_keeps_the_host_name_for_sni_and_the_certificate(localhost_certificate):
    from serve.config import ImageFetchConfig
    from serve.images import fetch_url
    from serve.protocol import APIError

    cert, key = localhost_certificate
    names = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.sni_callback = lambda sock, name, context: names.append(name)
    server = _recording_server("127.0.0.1", tls)
    config = ImageFetchConfig(allow=["127.0.0.1/32", "::1/128"])
    try:
        url = f"https://localhost:{server.server_port}/a.png"
        assert fetch_url(url, config, 10**6) == png(41)
        assert names == ["localhost"] and server.hits == [f"localhost:{server.server_port}"]
        with pytest.raises(APIError) as by_address:  # the certificate names localhost, not 127.0.0.1
            fetch_url(f"https://127.0.0.1:{server.server_port}/a.png", config, 10**6)
        assert by_address.value.code == "image_fetch_failed"
        assert "certificate" not in by_address.value.message  # no socket/TLS reasons echoed to the client
    finally:
        server.shutdown()


# ---- image decoding ---------------------------------------------------------------------------------------------------


def test_a_16_bit_image_is_converted_without_float64_copies():
    """A 16-bit greyscale image needs 2 bytes a pixel; converting it must not cost 8 (float64) or more."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from llava.image_processing import decode_image

    side = 1500
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 65535, (side, side), dtype=np.uint16)).save(buffer, "PNG")
    data = buffer.getvalue()
    tracemalloc.start()
    try:
        image = decode_image(data, max_pixels=side * side)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.mode == "RGB" and image.size == (side, side)
    assert peak < 8 * side * side, f"peak {peak / side / side:.1f} bytes a pixel"


def test_image_format_allowlist_and_pixel_limit_defaults():
    from PIL import Image

    from serve.config import LimitsConfig
    from serve.images import IMAGE_FORMATS, check_format
    from serve.protocol import APIError

    assert LimitsConfig().max_image_pixels <= 4096 * 4096
    for name in ("PNG", "JPEG", "WEBP", "GIF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=name)
        check_format(buffer.getvalue(), 0)
    for name in ("BMP", "TIFF", "PPM", "ICO"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=name)
        with pytest.raises(APIError, match="is not a PNG, JPEG, WEBP or GIF image"):
            check_format(buffer.getvalue(), 0)
    assert IMAGE_FORMATS == ("PNG", "JPEG", "WEBP", "GIF")


# ---- stop strings: per-token cost linear in their length --------------------------------------------------------------


def test_stop_prefix_matching_agrees_with_the_definition():
    from hypothesis import given, settings, strategies as st

    from llava.decoding import _stop_prefix_at_end

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.text("ab\u00e9", max_size=20), st.text("ab\u00e9", min_size=1, max_size=10))
    def agrees(text, stop):
        slow = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        assert _stop_prefix_at_end(text, stop) == slow

    agrees()


def test_stop_prefix_matching_work_is_linear_in_the_stop_length():
    """The KMP scan touches each character of the stop string and of the text's tail a bounded number of times:
    counted with a string type that records every character comparison."""
    from llava.decoding import _stop_prefix_at_end

    comparisons = Counter()

    class Counted(str):
        def __getitem__(self, index):
            comparisons["get"] += 1
            return Counted(str.__getitem__(self, index)) if isinstance(index, slice) else str.__getitem__(self, index)

    for length in (16, 64, 256):
        comparisons.clear()
        stop = Counted("a" * (length - 1) + "b")  # the worst case for naive prefix matching
        _stop_prefix_at_end(Counted("a" * 1000), stop)
        assert comparisons["get"] <= 8 * length, (length, comparisons["get"])


# ---- the vLLM engine gets the same checks ------------------------------------------------------------------------------


def test_vllm_gets_checked_fields_and_images_as_data_urls():
    from serve.config import LimitsConfig
    from serve.protocol import parse_chat_request
    from serve.vllm_app import vllm_chat_body

    image = png(5)
    data = {
        "model": "llava-7b",
        "temperature": 0.5,
        "seed": 3,
        "stop": "END",
        "max_tokens": 20,
        "logit_bias": {"1": 100},
        "tools": [{"type": "function"}],  # not ours to pass on
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                    {"type": "text", "text": "What is it?"},
                ],
            },
        ],
    }
    chat = parse_chat_request(data, "llava-7b", LimitsConfig())
    body = vllm_chat_body(data, chat, [image])
    assert set(body) == {"model", "messages", "stream", "temperature", "top_p", "stop", "seed", "max_tokens"}
    assert (body["temperature"], body["seed"], body["stop"], body["max_tokens"]) == (0.5, 3, ["END"], 20)
    assert body["messages"][1]["content"][0] == {"type": "image_url", "image_url": {"url": data_url(image)}}
    assert data["messages"][1]["content"][0]["image_url"]["url"] == "http://x/a.png"  # the client's dict is untouched


# ---- no API key on a public address needs an explicit flag --------------------------------------------------------------


def test_serving_beyond_loopback_without_a_key_needs_the_explicit_flag(monkeypatch):
    from serve.app import check_exposure
    from serve.config import ServeConfig

    monkeypatch.delenv("LLAVA_RAY_API_KEY", raising=False)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(ServeConfig(host=host))
    for host in ("0.0.0.0", "::", "10.0.0.5", "my-host.example"):
        with pytest.raises(ValueError, match="--allow-unauthenticated"):
            check_exposure(ServeConfig(host=host))
        check_exposure(ServeConfig(host=host, allow_unauthenticated=True))
    monkeypatch.setenv("LLAVA_RAY_API_KEY", "secret")
    check_exposure(ServeConfig(host="0.0.0.0"))


def test_the_serve_command_refuses_a_public_host_without_a_key_before_starting_anything(tmp_path):
    exe = Path(sys.executable).parent / "llava-ray"
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_RAY_API_KEY"}
    result = subprocess.run(
        [str(exe), "serve", "--model", str(tmp_path), "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--allow-unauthenticated" in result.stderr and "Traceback" not in result.stderr


# ---- SIGTERM drains --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits_0(tiny_checkpoint, tmp_path):
    import openai

    from tests.serve_fixtures import free_port

    exe = Path(sys.executable).parent / "llava-ray"
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_RAY_API_KEY"}
    server = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--model",
            tiny_checkpoint,
            "--port",
            str(free_port()),
            "replica.num_gpus=0",
            "replica.num_cpus=0.5",
            "autoscaling.max_replicas=1",
            "model_name=tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        ready = json.loads(server.stdout.readline())
        client = openai.OpenAI(base_url=ready["openai_base_url"], api_key="unused", max_retries=0, timeout=300)
        stream = client.chat.completions.create(
            model="tiny",
            temperature=0,
            max_tokens=400,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "a long answer"}],
        )
        chunks = [next(stream) for _ in range(3)]  # decoding has started
        server.send_signal(signal.SIGTERM)
        chunks += list(stream)
        with pytest.raises((openai.APIConnectionError, openai.NotFoundError, openai.APIStatusError)):
            client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "late"}])
        _, stderr = server.communicate(timeout=180)
    finally:
        if server.poll() is None:
            server.kill()
    assert chunks[-1].usage.completion_tokens == 400, "the request in flight must be finished, not cut"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert server.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


# ---- a replica killed under load ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_only_requests_in_flight_and_is_replaced(chat_server):
    """2 replicas, 8 streaming clients, `ray.kill` of one replica: only requests in flight at the kill may fail,
    Serve brings the replica count back to 2, and no request started after that fails."""
    import openai
    import ray
    from ray import serve

    from llava.config import config_to_dict
    from serve.app import LlavaChat, deployment_options

    options = {**deployment_options(chat_server.config), "autoscaling_config": None, "num_replicas": 2}
    serve.run(
        LlavaChat.options(**options).bind(config_to_dict(chat_server.config)),
        name="killed",
        route_prefix="/killed",
        blocking=False,
    )
    prefix = "SERVE_REPLICA::killed#LlavaChat#"

    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}

    def running() -> int:
        return serve.status().applications["killed"].deployments["LlavaChat"].replica_states.get("RUNNING", 0)

    try:
        _wait_for(lambda: running() == 2, "2 replicas running")
        _wait_until_up(chat_server, "/killed/health")
        client = openai.OpenAI(
            base_url=f"{chat_server.url}/killed/v1", api_key=chat_server.key, max_retries=0, timeout=300
        )
        stop, records, lock = threading.Event(), [], threading.Lock()  # (started, ended, ok, error)

        def stream_forever(i: int) -> None:
            while not stop.is_set():
                started, ok, error = time.monotonic(), False, None
                try:
                    chunks = list(
                        client.chat.completions.create(
                            model="tiny-llava",
                            temperature=0,
                            max_tokens=48,
                            stream=True,
                            messages=[{"role": "user", "content": f"client {i} keeps asking"}],
                        )
                    )
                    ok = any(c.choices and c.choices[0].finish_reason for c in chunks)
                except Exception as exc:  # what a killed replica does to a request in flight
                    error = type(exc).__name__
                with lock:
                    records.append((started, time.monotonic(), ok, error))

        threads = [threading.Thread(target=stream_forever, args=(i,), daemon=True) for i in range(8)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(records) >= 16, "the clients' first answers")
        before = replicas()
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(sorted(before)[0], namespace="serve"), no_restart=True)
        _wait_for(lambda: running() == 2 and len(replicas() - before) == 1, "Serve to replace the killed replica")
        recovered_at = time.monotonic()
        _wait_for(lambda: sum(1 for r in records if r[0] > recovered_at) >= 24, "answers after the recovery")
        stop.set()
        for thread in threads:
            thread.join(300)
    finally:
        serve.delete("killed")
    failed = [r for r in records if not r[2]]
    in_flight_at_kill = [r for r in records if r[0] < killed_at < r[1]]
    after = [r for r in records if r[0] > recovered_at]
    print(
        f"replica kill: {len(records)} requests, {len(in_flight_at_kill)} in flight at the kill, {len(failed)} failed "
        f"({Counter(r[3] for r in failed)}), replaced in {recovered_at - killed_at:.1f} s, "
        f"{len(after)} after recovery, all ok: {all(r[2] for r in after)}"
    )
    assert all(r in in_flight_at_kill for r in failed), "only requests in flight at the kill may fail"
    assert all(r[2] for r in after), "no request started after the recovery may fail"


def _wait_for(condition, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        time.sleep(0.5)


# ---- fuzzing ------------------------------------------------------------------------------------------------------------

FUZZ_EXAMPLES = 500


def _fuzz_strategy(image_host: str):
    """Request bodies: valid chat requests, valid ones with one field replaced by junk, schema-shaped junk, raw bytes."""
    from hypothesis import strategies as st

    leaf = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=30)
    )
    junk = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )
    good_urls = st.sampled_from([data_url(png(1)), data_url(png(2)), f"{image_host}/good.png"])
    bad_urls = st.sampled_from(
        [
            data_url(b"not an image"),
            "data:image/png;base64,@@@",
            "data:text/plain;base64,aGk=",
            "http://a:99999/x.png",
            "http://[::1/x.png",
            "http://127.0.0.1:1/x.png",
            "http://[::ffff:127.0.0.1]/x.png",
            "file:///etc/passwd",
            "ftp://example.com/a.png",
            "",
            "http://",
            f"{image_host}/truncated.png",
            f"{image_host}/bmp.png",
            f"{image_host}/missing.png",
            "http://a b/x.png",
            "http://x/\r\nHost: evil",
        ]
    ) | st.text(max_size=40)

    def image(urls):
        return st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": urls})})

    any_text = st.text(max_size=60) | st.text(st.characters(categories=["Cs", "Cc", "Zs", "Lo"]), max_size=8)
    text_part = st.fixed_dictionaries({"type": st.just("text"), "text": any_text})
    user_content = st.text(max_size=80) | st.lists(text_part | image(good_urls), min_size=1, max_size=3)
    valid_message = st.fixed_dictionaries({"role": st.just("user"), "content": user_content}) | st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "assistant"]), "content": st.text(max_size=60)}
    )
    last = st.fixed_dictionaries({"role": st.just("user"), "content": user_content})
    valid = st.fixed_dictionaries(
        {
            "model": st.just("tiny-llava"),
            "messages": st.tuples(st.lists(valid_message, max_size=2), last).map(lambda t: [*t[0], t[1]]),
            "max_tokens": st.integers(1, 4),
        },
        optional={
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.01, 1),
            "seed": st.integers(0, 2**63 - 1),
            "stop": st.lists(st.text(min_size=1, max_size=64), max_size=4),
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        },
    )
    bad_values = {
        "model": st.just("gpt-9") | junk,
        "max_tokens": st.integers(-(2**70), 0) | st.integers(513, 2**70) | junk,
        "temperature": st.floats(2.001, 1e308) | st.floats(-1e308, -0.001) | junk,
        "top_p": st.floats(-1, 0) | st.floats(1.001, 10) | junk,
        "seed": st.integers(-(2**70), -1) | st.integers(2**63, 2**70) | junk,
        "stop": st.lists(st.text(max_size=80), min_size=5, max_size=8) | st.just([""]) | st.text(min_size=65) | junk,
        "stream": junk,
        "n": st.integers(2, 5) | junk,
        "messages": junk
        | st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["tool", "robot", "assistant"]) | junk, "content": junk}),
            max_size=3,
        )
        | st.lists(
            st.fixed_dictionaries(
                {"role": st.just("user"), "content": st.lists(image(bad_urls) | junk, min_size=1, max_size=3)}
            ),
            min_size=1,
            max_size=2,
        ),
    }
    one_bad_field = st.tuples(valid, st.sampled_from(sorted(bad_values)), st.data()).map(
        lambda t: {**t[0], t[1]: t[2].draw(bad_values[t[1]])}
    )
    encode = json.dumps
    return st.one_of(
        valid.map(encode),
        one_bad_field.map(encode),
        one_bad_field.map(encode),
        junk.map(encode),
        st.binary(max_size=120),
    ).map(lambda b: b if isinstance(b, bytes) else b.encode())


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx_and_the_server_answers_afterwards(chat_server, bad_host):
    from hypothesis import HealthCheck, given, settings

    statuses: Counter = Counter()

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(_fuzz_strategy(bad_host))
    def request(body: bytes):
        status, answer = chat_server.post("/v1/chat/completions", body, timeout=300)
        statuses[status] += 1
        assert status < 500, (body[:300], answer)
        if status == 200 and isinstance(answer, str):  # a stream: no error event inside it either
            assert "server_error" not in answer and answer.rstrip().endswith("data: [DONE]"), answer[-300:]
        elif status >= 400:
            assert set(answer["error"]) == {"message", "type", "param", "code"}, answer

    with NormalTraffic(chat_server, clients=1):
        request()
    total = sum(statuses.values())
    print(f"fuzzed requests: {total}, statuses: {dict(statuses)}")
    assert total >= FUZZ_EXAMPLES and not any(s >= 500 for s in statuses)
    status, body = chat_server.post("/v1/chat/completions", user(TEXT))
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
