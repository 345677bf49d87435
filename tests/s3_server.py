"""A real S3 server for tests: moto's HTTP server on 127.0.0.1 (pytest plugin: ``pytest_plugins = ["tests.s3_server"]``).

``s3_server`` (session): starts ``moto_server``, points the AWS environment (``AWS_ENDPOINT_URL``,
test credentials, region) at it for the session, and yields a :class:`MotoServer` with ``.endpoint``
and ``.make_bucket(name) -> "s3://name"``. ``s3_bucket`` (function): a fresh, uniquely named bucket URI.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that could send requests elsewhere or pick other credentials; cleared for the session.
_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto_server`` as a subprocess; ``auth=True`` makes it reject unknown credentials."""

    def __init__(self, auth: bool = False, timeout_s: float = 20.0):
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        if not os.path.exists(exe):
            raise RuntimeError(f"{exe} not found: install moto[server] into this environment")
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else {}))
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._names = itertools.count()
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                self._fail(f"moto_server exited with code {self._proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/", timeout=1).close()
                return
            except urllib.error.HTTPError:  # any HTTP answer means it is up
                return
            except OSError:
                if time.monotonic() > deadline:
                    self._fail(f"moto_server did not answer on {self.endpoint} within {timeout_s:.0f} s")
                time.sleep(0.1)

    def _fail(self, message: str):
        self._log.seek(0)
        output = self._log.read().decode(errors="replace")[-4000:]
        self.stop()
        raise RuntimeError(f"{message}; its output:\n{output}")

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (default: a unique name) and return ``"s3://name"``."""
        name = name or f"test-{uuid.uuid4().hex[:8]}-{next(self._names)}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self):
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def s3_server():
    server = MotoServer()
    saved = {k: os.environ.get(k) for k in (*_ENV, *_CLEARED, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=server.endpoint)
    for k in _CLEARED:
        os.environ.pop(k, None)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, uniquely named bucket: ``"s3://test-...``"."""
    return s3_server.make_bucket()
