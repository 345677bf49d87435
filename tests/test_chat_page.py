"""The web chat page (`GET /`) driven in headless Chromium (Debian's `chromium` + Playwright for Python).

The page talks to the real chat API on a local Ray Serve (the `chat_server` fixture: tiny model,
API key). What is checked:

- a real answer appears: the key is typed, a PNG uploaded, a question sent; the assistant bubble
  reaches data-state="done"; the request the page sent is exactly the OpenAI request for that image
  (as a data URL of the file's bytes) and text; the bubble shows exactly the concatenation of the
  streamed deltas the server sent to the page (read from a tee of the page's own fetch stream), and
  the stream ended properly. The page sends no temperature, so the server's default (1.0) samples
  and two requests legitimately differ; for an equality with an independent API call the test then
  sends the same turn once more with `temperature: 0` added to the page's request (the only change
  made to it, by request interception) and compares the bubble with a plain non-streaming API answer.
- screenshots: the assistant bubble is not blank (several colours, dark text pixels on it) and the
  full page differs from the one taken before sending;
- a wrong API key: the page shows an error bubble naming the problem; the server still answers (API
  and page, once the right key is typed).

Skipped when Chromium or Playwright is missing, except under CI (env `CI` set), where that fails.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops

from tests.conftest import png

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
TIMEOUT_MS = 120_000  # a first answer on a busy 2-core machine

try:
    _HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright.sync_api") is not None
except ImportError:  # no playwright package at all
    _HAVE_PLAYWRIGHT = False
_MISSING = [
    what
    for what, ok in (
        (f"Chromium at {CHROMIUM} (apt-get install chromium)", Path(CHROMIUM).exists()),
        ("the playwright package (pip install -e '.[test]')", _HAVE_PLAYWRIGHT),
    )
    if not ok
]
if _MISSING and not IN_CI:
    pytest.skip(
        "chat page tests need " + " and ".join(_MISSING) + "; .ci/install installs both", allow_module_level=True
    )

# Runs before the page's own script: wraps fetch so that the test gets a copy (tee) of every chat
# completion response body, byte for byte as the page reads it, without changing what the page sees.
TEE_FETCH = """
window.__chatStreams = [];
const originalFetch = window.fetch.bind(window);
window.fetch = async (input, init) => {
  const response = await originalFetch(input, init);
  if (!String(input).includes("/v1/chat/completions") || !response.body) return response;
  const [forPage, forTest] = response.body.tee();
  const record = {status: response.status, text: "", done: false};
  window.__chatStreams.push(record);
  (async () => {
    const reader = forTest.getReader(), decoder = new TextDecoder();
    while (true) {
      const {value, done} = await reader.read();
      if (done) break;
      record.text += decoder.decode(value, {stream: true});
    }
    record.text += decoder.decode();
    record.done = true;
  })();
  return new Response(forPage, {status: response.status, statusText: response.statusText, headers: response.headers});
};
"""


@pytest.fixture(scope="module")
def browser():
    if _MISSING:  # only under CI: a missing browser is a broken install there, not a reason to skip
        pytest.fail("CI is set but the chat page tests cannot run: missing " + " and ".join(_MISSING), pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, chat_server):
    # fresh sessionStorage per test; the page's CSP stays on (no eval: wait_for_function gets functions, not expressions)
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.add_init_script(TEE_FETCH)
    page.goto(chat_server.url + "/")
    yield page
    context.close()


def enter_key(page, key: str) -> None:
    page.fill("#key", key)
    page.dispatch_event("#key", "change")  # the page stores the key and reloads /v1/models on change


def attach_image(page, path: Path) -> None:
    page.set_input_files("#image", str(path))
    page.wait_for_selector("#preview", state="visible")  # the FileReader has produced the data URL


def send(page, text: str):
    """Type and send; returns the bubble the answer ended in (the assistant's, or an error)."""
    errors, answers = page.locator(".msg.error").count(), page.locator(".msg.assistant[data-state='done']").count()
    page.fill("#text", text)
    page.click("#send")
    page.wait_for_function(  # an answer finished streaming, or an error bubble replaced the failed turn
        f"() => document.querySelectorAll('.msg.error').length > {errors} || "
        f"document.querySelectorAll(\".msg.assistant[data-state='done']\").length > {answers}"
    )
    if page.locator(".msg.error").count() > errors:
        return page.locator(".msg.error").last
    return page.locator(".msg.assistant").last


def streams(page) -> list[dict]:
    page.wait_for_function("() => window.__chatStreams.every(s => s.done)")
    return page.evaluate("window.__chatStreams")


def parse_sse(text: str) -> tuple[str, list[dict]]:
    """(concatenated content deltas, chunks) of a chat completion stream; checks its framing."""
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", text[-200:]
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: "), event
        chunk = json.loads(event[len("data: ") :])
        assert "error" not in chunk, chunk
        chunks.append(chunk)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return content, chunks


def colours(path: Path) -> tuple[int, int]:
    """(distinct colours, dark pixels) of a screenshot."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(np.int32)
    dark = int((pixels.sum(axis=1) < 3 * 100).sum())  # the text is #1d1d1f; the bubble's border #ddd
    return len(np.unique(pixels, axis=0)), dark


def test_page_streams_a_real_answer_about_an_uploaded_image(page, chat_server, tmp_path):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(png(7, 40))
    data_url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    question = "What is shown in the image?"

    enter_key(page, chat_server.key)
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-llava'")
    attach_image(page, image_path)
    page.screenshot(path=str(tmp_path / "before.png"), full_page=True)

    with page.expect_request("**/v1/chat/completions") as sent:
        answer = send(page, question)
    assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").first.text_content()
    assert answer.get_attribute("data-state") == "done" and "assistant" in answer.get_attribute("class")

    # The request is the OpenAI request for this image and question (no temperature: the server default).
    body = sent.value.post_data_json
    assert sent.value.headers["authorization"] == f"Bearer {chat_server.key}"
    assert body == {
        "model": "tiny-llava",
        "stream": True,
        "max_tokens": 128,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": question}],
            }
        ],
    }
    user = page.locator(".msg.user").first
    assert user.text_content() == question and user.locator("img").get_attribute("src") == data_url

    # The bubble shows exactly what the server streamed to the page, and the stream ended properly.
    [record] = streams(page)
    assert record["status"] == 200
    streamed, chunks = parse_sse(record["text"])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert streamed.strip(), "the model streamed no text"
    assert answer.text_content() == streamed

    # Screenshots: the answer is visibly there.
    answer.screenshot(path=str(tmp_path / "answer.png"))
    page.screenshot(path=str(tmp_path / "after.png"), full_page=True)
    n_colours, dark = colours(tmp_path / "answer.png")
    assert n_colours > 1 and dark >= 20, f"the answer bubble looks blank ({n_colours} colours, {dark} dark pixels)"
    before, after = (
        Image.open(tmp_path / "before.png").convert("RGB"),
        Image.open(tmp_path / "after.png").convert("RGB"),
    )
    assert before.size != after.size or ImageChops.difference(before, after).getbbox() is not None

    # Determinism: the same turn again at temperature 0 (added to the page's own request) equals the API's answer.
    sent_by_page = []

    def greedy(route):
        sent_by_page.append(route.request.post_data_json)
        route.continue_(post_data=json.dumps({**sent_by_page[-1], "temperature": 0}))

    page.route("**/v1/chat/completions", greedy)
    page.click("#reset")
    attach_image(page, image_path)
    answer = send(page, question)
    assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").first.text_content()
    assert sent_by_page == [body]  # the page's own request (the route added temperature 0 on the way)
    status, reply = chat_server.post("/v1/chat/completions", {**body, "stream": False, "temperature": 0})
    assert status == 200, reply
    expected = reply["choices"][0]["message"]["content"]
    assert expected.strip() and answer.text_content() == expected
    assert parse_sse(streams(page)[-1]["text"])[0] == expected


def test_wrong_api_key_shows_an_error_and_the_server_still_answers(page, chat_server, tmp_path):
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(png(8, 40))

    enter_key(page, "not-the-key")
    page.wait_for_function("() => document.getElementById('model').textContent.includes('API key')")
    attach_image(page, image_path)
    error = send(page, "Describe the image.")
    assert "error" in error.get_attribute("class") and error.get_attribute("data-state") == "error"
    assert "missing or wrong API key" in error.text_content()
    assert page.locator(".msg.assistant").count() == 0
    assert page.locator(".msg.user").count() == 0  # the failed turn is gone from the page and the history
    error.screenshot(path=str(tmp_path / "error.png"))  # dark red text (#9b1c1c) on a pink bubble
    pixels = np.asarray(Image.open(tmp_path / "error.png").convert("RGB")).astype(np.int32)
    red_text = (pixels[..., 0] > 110) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red_text.sum() >= 20, "the error bubble shows no text"

    # The server still answers: the API with the right key, and the page once the right key is typed.
    status, reply = chat_server.post(
        "/v1/chat/completions",
        {"model": "tiny-llava", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]},
    )
    assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant", reply
    enter_key(page, chat_server.key)
    page.wait_for_function("() => document.getElementById('model').textContent === 'tiny-llava'")
    answer = send(page, "Hello")
    assert page.locator(".msg.error").count() == 1  # only the earlier one
    assert answer.get_attribute("data-state") == "done"
    assert answer.text_content() == parse_sse(streams(page)[-1]["text"])[0]
