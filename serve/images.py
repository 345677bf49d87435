"""Image bytes for a request: base64 data URLs, or http(s) URLs fetched with SSRF guards.

A URL is fetched only if every address its host resolves to is public, or the host /
network is on the `image_fetch.allow` list; redirects are followed by hand (each hop checked
the same way, at most `max_redirects`), the body is capped at `max_image_bytes`, and the
response must say it is an image. Every refusal is an `APIError` (400) naming the URL.
Known gap: the host is resolved for the check and again by the HTTP client (DNS rebinding).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request

from serve.config import ImageFetchConfig
from serve.protocol import APIError

_CHUNK = 1 << 16


def _error(code: str, message: str) -> APIError:
    return APIError(400, message, param="messages", code=code)


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    media = header[len("data:"):].split(";")[0]
    if not media.startswith("image/") or ";base64" not in header:
        raise _error("invalid_image_url", f"a data URL must be data:image/...;base64,..., got {header[:60]!r}")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise _error("image_too_large", f"a data-URL image is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _error("invalid_image", f"the data URL's base64 payload does not decode: {exc}") from exc
    if len(data) > max_bytes:
        raise _error("image_too_large", f"a data-URL image is {len(data)} bytes; the limit is {max_bytes}")
    return data


def _allowed(host: str, address: ipaddress._BaseAddress, allow: list[str]) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry that is not this host
    return False


def check_destination(url: str, config: ImageFetchConfig) -> None:
    """Refuse URLs that are not http(s) or whose host resolves to a non-public address (unless allowed)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _error("invalid_image_url", f"image URLs must be http(s) or data URLs, got {url[:100]!r}")
    host = parts.hostname
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _error("image_fetch_failed", f"cannot resolve the host of {url[:100]!r}: {exc}") from exc
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        public = address.is_global and not address.is_multicast
        if not public and not _allowed(host, address, config.allow):
            raise _error("image_url_forbidden",
                         f"{url[:100]!r} resolves to {address}, a non-public address; image_fetch.allow must list it")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # 30x comes back as an HTTPError; fetch_url follows it after checking the new host


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def fetch_url(url: str, config: ImageFetchConfig, max_bytes: int) -> bytes:
    for _ in range(config.max_redirects + 1):
        check_destination(url, config)
        try:
            with _opener.open(urllib.request.Request(url, headers={"User-Agent": "llava-ray"}),
                              timeout=config.timeout_s) as response:
                kind = response.headers.get("Content-Type", "")
                if not kind.startswith("image/"):
                    raise _error("invalid_image_content_type", f"{url[:100]!r} is {kind or 'untyped'}, not an image")
                declared = int(response.headers.get("Content-Length") or 0)
                if declared > max_bytes:
                    raise _error("image_too_large", f"{url[:100]!r} is {declared} bytes; the limit is {max_bytes}")
                data = bytearray()
                while chunk := response.read(_CHUNK):
                    data += chunk
                    if len(data) > max_bytes:
                        raise _error("image_too_large", f"{url[:100]!r} is over the limit of {max_bytes} bytes")
                return bytes(data)
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location") if 300 <= exc.code < 400 else None
            if not location:
                raise _error("image_fetch_failed", f"fetching {url[:100]!r} answered HTTP {exc.code}") from exc
            url = urllib.parse.urljoin(url, location)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise _error("image_fetch_failed", f"fetching {url[:100]!r} failed: {getattr(exc, 'reason', exc)}") from exc
    raise _error("image_fetch_failed", f"more than {config.max_redirects} redirects")


def load_image_bytes(url: str, config: ImageFetchConfig, max_bytes: int) -> bytes:
    if url.startswith("data:"):
        return _decode_data_url(url, max_bytes)
    if not config.enabled:
        raise _error("image_url_fetch_disabled", "this server does not fetch image URLs; send images as data URLs")
    return fetch_url(url, config, max_bytes)
