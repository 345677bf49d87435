"""The chat API on a real local Ray Serve (pytest plugin: ``pytest_plugins = ["tests.serve_fixtures"]``).

``chat_server`` (module): the tiny checkpoint deployed with `serve.app.run_local` on a local Ray
(min 1 / max 2 replicas, quick autoscaling delays, an API key, small limits, image URLs
allowed from 127.0.0.2 only). Yields a :class:`ChatServer` with ``.url``, ``.key``, ``.config``,
``.client()`` (the real `openai` client) and ``.post(path, body)`` (raw HTTP).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

API_KEY = "test-key-123"
KEY_ENV = "LLAVA_RAY_TEST_API_KEY"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ChatServer:
    url: str
    key: str
    config: object  # serve.config.ServeConfig

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, **kwargs)

    def post(self, path: str, body, key: str | None = "default", timeout: float = 120) -> tuple[int, dict | str]:
        """(status, parsed JSON or text) of a POST with a raw body (bytes) or a JSON-able body."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {self.key if key == 'default' else key}"
        return _send(urllib.request.Request(self.url + path, data=data, headers=headers), timeout)

    def get(self, path: str, key: str | None = "default") -> tuple[int, dict | str]:
        headers = {"Authorization": f"Bearer {self.key if key == 'default' else key}"} if key else {}
        return _send(urllib.request.Request(self.url + path, headers=headers), 60)


def _send(request, timeout) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def chat_server(tiny_checkpoint):
    import ray
    from ray import serve

    from llava.ray_runtime import init_ray
    from serve.app import run_local
    from serve.config import AutoscalingConfig, ImageFetchConfig, LimitsConfig, ReplicaConfig, ServeConfig

    # A Ray of its own, not the session's `ray_local`: the replicas read the API key from the environment,
    # and Ray workers get the environment their cluster was started with, so it must start after this.
    ray.shutdown()
    os.environ[KEY_ENV] = API_KEY  # Ray workers started below inherit it
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")  # a busy 2-core machine starts slowly
    init_ray(num_cpus=4)
    config = ServeConfig(
        model=tiny_checkpoint,
        model_name="tiny-llava",
        port=free_port(),
        api_key_env=KEY_ENV,
        autoscaling=AutoscalingConfig(
            min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=5
        ),
        replica=ReplicaConfig(num_cpus=0.5, num_gpus=0),
        limits=LimitsConfig(
            max_images=2,
            max_image_bytes=300_000,
            max_image_pixels=1_000_000,
            max_tokens=512,
            default_max_tokens=16,
            max_request_bytes=2**21,
            max_messages=16,
            max_text_chars=20_000,
        ),
        image_fetch=ImageFetchConfig(timeout_s=5, allow=["127.0.0.2/32"]),
    )
    url = run_local(config)
    yield ChatServer(url, API_KEY, config)
    serve.shutdown()
    ray.shutdown()
    os.environ.pop(KEY_ENV, None)
