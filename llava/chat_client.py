"""A client for any OpenAI-compatible chat endpoint (the LLaVA-Bench judge, the data-generation teacher).

Built on the `openai` package: its client retries 408/409/429/5xx responses, connection
errors and timeouts with exponential backoff (honouring Retry-After), up to `max_retries`.
On top of that: a requests-per-minute cap shared by the threads of one process, and the API
key read from an environment variable named in the config (never stored in configs or logs).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass
class EndpointConfig:
    url: str = ""  # base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key ("" or unset: no key)
    timeout_s: float = 60.0  # per request attempt
    max_retries: int = 5  # on 429 / 5xx / timeouts, exponential backoff
    requests_per_minute: float = 0.0  # 0 = no cap
    concurrency: int = 4  # requests in flight at once
    temperature: float = 0.2
    max_tokens: int = 1024


class RateLimiter:
    """At most `per_minute` acquisitions per minute, evenly spaced, across threads."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)


class ChatClient:
    def __init__(self, config: EndpointConfig):
        import openai

        if not config.url or not config.model:
            raise ValueError("an OpenAI-compatible endpoint needs a url and a model name")
        self.config = config
        self.client = openai.OpenAI(
            base_url=config.url,
            api_key=os.environ.get(config.api_key_env or "", "") or "EMPTY",
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )
        self.limiter = RateLimiter(config.requests_per_minute)

    def complete(self, messages: list[dict], **params) -> str:
        """The first choice's text. Raises openai.APIError subclasses once retries are exhausted."""
        self.limiter.acquire()
        params = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens, **params}
        response = self.client.chat.completions.create(model=self.config.model, messages=messages, **params)
        return response.choices[0].message.content or ""
