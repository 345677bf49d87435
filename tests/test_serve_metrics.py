"""The chat API's Prometheus metrics (serve/metrics.py), scraped from Ray's metrics endpoint after real HTTP
requests to a real local Ray Serve (the `chat_server` fixture), and the Grafana dashboard that charts them."""

import base64
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from serve.metrics import METRICS, prometheus_name
from tests.conftest import png

DASHBOARD = Path(__file__).resolve().parent.parent / "cluster" / "grafana" / "llava-serve-dashboard.json"
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")


def image_part(image: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}


def scrape(port: int) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every sample on Ray's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def total(samples, name: str, **labels) -> float:
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items()))


def wait_for_metrics(port: int, ready) -> list:
    """Ray exports metrics every few seconds: scrape until `ready(samples)` (at most two minutes)."""
    deadline = time.monotonic() + 120
    while True:
        samples = scrape(port)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(2)


def test_requests_show_up_in_the_prometheus_metrics(chat_server):
    import ray

    client = chat_server.client()
    answer = client.chat.completions.create(
        model="tiny-llava",
        max_tokens=5,
        messages=[{"role": "user", "content": [image_part(png(21)), {"type": "text", "text": "What is it?"}]}],
    )
    streamed = list(
        client.chat.completions.create(
            model="tiny-llava", max_tokens=4, stream=True, messages=[{"role": "user", "content": "Hello"}]
        )
    )
    assert answer.usage.completion_tokens >= 1 and streamed
    assert chat_server.post("/v1/chat/completions", {"model": "tiny-llava", "messages": []}, key="wrong")[0] == 401
    too_long = {"model": "tiny-llava", "max_tokens": 10_000, "messages": [{"role": "user", "content": "Hi"}]}
    status, body = chat_server.post("/v1/chat/completions", too_long)
    assert status == 400
    code = body["error"]["code"]

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    name = {key: prometheus_name(key) for key in METRICS}
    ttft_count = name["time_to_first_token_seconds"] + "_count"
    samples = wait_for_metrics(port, lambda s: total(s, ttft_count) >= 2 and total(s, name["rejected_requests"]) >= 2)

    route = "/v1/chat/completions"
    assert total(samples, name["requests"], route=route, status="200", code="none") == 2
    assert total(samples, name["requests"], route=route, status="401", code="invalid_api_key") == 1
    assert total(samples, name["requests"], route=route, status="400", code=code) == 1
    assert total(samples, name["rejected_requests"], reason="invalid_api_key") == 1
    assert total(samples, name["rejected_requests"], reason=code) == 1
    assert total(samples, ttft_count) == 2 and total(samples, name["time_to_first_token_seconds"] + "_sum") > 0
    streamed_tokens = sum(1 for chunk in streamed if chunk.choices and chunk.choices[0].delta.content)
    assert total(samples, name["generated_tokens"]) >= answer.usage.completion_tokens + streamed_tokens
    assert total(samples, name["batch_size"] + "_count") >= 1  # each request was decoded in some batch
    assert total(samples, name["image_fetch_seconds"] + "_count") == 1  # only the first request had an image
    assert any(n == name["queued_requests"] for n, _, _ in samples)
    assert total(samples, name["queued_requests"]) == 0  # nothing waits once every request is answered
    tagged = [labels for n, labels, _ in samples if n == name["requests"]]
    assert all(labels.get("deployment") == "LlavaChat" for labels in tagged)  # Serve's own tags are added


def dashboard_queries(dashboard: dict) -> list[str]:
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_grafana_dashboard_charts_only_metrics_we_export():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    queries = dashboard_queries(dashboard)
    assert queries
    exported = {
        prometheus_name(key) + suffix
        for key, (kind, _) in METRICS.items()
        for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))
    }
    used = set()
    for query in queries:
        names = set(re.findall(r"\b(ray_[a-z0-9_]+)", query))
        assert names, f"a panel query names no metric: {query}"
        assert names <= exported, f"{query} uses metrics we do not export: {names - exported}"
        used |= {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in names}
    assert used == {prometheus_name(key) for key in METRICS}  # and every metric is charted
    for panel in dashboard["panels"]:
        assert panel["type"] in ("timeseries", "stat", "row") and panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_names_are_prometheus_names(name):
    assert re.fullmatch(r"ray_[a-z0-9_]+", prometheus_name(name))
