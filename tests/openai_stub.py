"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions API with scripted answers.

`script(request_body, attempt)` returns what to do for a request: a reply text (200), an int
status code (an error response in OpenAI's shape), or ("sleep", seconds, text) for a slow
reply. `attempt` counts the requests seen so far with the same messages, so a script
can fail the first attempt and answer the retry. Every request is recorded in `requests`.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedOpenAI:
    def __init__(self, script: Callable[[dict, int], object]):
        self.script = script
        self.requests: list[dict] = []
        self.arrivals: list[float] = []  # time.monotonic() of each request, in order
        self.attempts: Counter = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body["messages"])
                with server._lock:
                    server.requests.append(body)
                    server.arrivals.append(time.monotonic())
                    attempt = server.attempts[key]
                    server.attempts[key] += 1
                action = server.script(body, attempt)
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                    action = action[2]
                if isinstance(action, int):
                    self._send(
                        action,
                        {
                            "error": {
                                "message": f"scripted {action}",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        },
                    )
                    return
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": action}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
