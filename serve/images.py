"""Image bytes for a request: base64 data URLs, or http(s) URLs fetched with SSRF guards and one deadline.

Fetching a URL (`fetch_url`):
- the host is resolved once, and every address it resolves to must be public (`is_public`: a global
  unicast address, and none of the IPv6 prefixes that embed or translate an IPv4 address, such as
  `::/96`, `::ffff:0:0/96`, `64:ff9b::/96`, `2002::/16`) or be on `image_fetch.allow`;
- the connection goes to an address that was checked (no second lookup, so DNS rebinding cannot
  swap it), with the URL's host in the `Host` header and as the TLS server name (certificate checked);
- one deadline (`image_fetch.timeout_s`) covers the lookup, connecting, the headers and the body:
  a host that drips bytes is cut off at the deadline;
- redirects are followed by hand, each hop checked the same way (at most `max_redirects`);
  the body is capped at `max_image_bytes` and must match its `Content-Length`; the response must
  say it is an image, and the bytes must be one of `IMAGE_FORMATS`.
Every refusal is an `APIError` (400) naming the URL; it never echoes a resolved address or a socket
error (those go to the server log).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from serve.config import ImageFetchConfig
from serve.protocol import APIError

log = logging.getLogger("ray.serve")

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what PIL may decode (JPEG includes MPO, as many cameras write)
MAX_URL_CHARS = 4096
_CHUNK = 1 << 16
_REDIRECTS = (301, 302, 303, 307, 308)
# IPv6 prefixes that carry an IPv4 address (compatible, mapped, NAT64, 6to4, Teredo) or are deprecated site-local:
# a "global" IPv6 address in them may reach a private IPv4 host.
_NOT_PUBLIC_V6 = tuple(
    ipaddress.ip_network(n)
    for n in ("::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "fec0::/10")
)
_resolver = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="image-dns")  # lookups, bounded


def _error(code: str, message: str) -> APIError:
    return APIError(400, message, param="messages", code=code)


# ---- data URLs --------------------------------------------------------------------------------------------------------


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    media = header[len("data:") :].split(";")[0]
    if not media.startswith("image/") or ";base64" not in header:
        raise _error("invalid_image_url", f"a data URL must be data:image/...;base64,..., got {header[:60]!r}")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise _error(
            "image_too_large", f"a data-URL image is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes}"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _error("invalid_image", f"the data URL's base64 payload does not decode: {exc}") from exc
    if len(data) > max_bytes:
        raise _error("image_too_large", f"a data-URL image is {len(data)} bytes; the limit is {max_bytes}")
    return data


# ---- where a URL may go -----------------------------------------------------------------------------------------------


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address that does not embed or translate an IPv4 address."""
    if address.version == 6 and any(address in network for network in _NOT_PUBLIC_V6):
        return False
    return address.is_global and not address.is_multicast


def _allowed(host: str, address, allow: list[str]) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name entry that is not this host
    return False


@dataclass
class Target:
    """An http(s) URL taken apart: where to connect and what to send."""

    url: str
    https: bool
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    port: int
    path: str  # path and query
    host_header: str


def parse_url(url: str) -> Target:
    """Raises a 400 for anything that is not a plain http(s) URL with a host."""
    shown = url[:100]
    if len(url) > MAX_URL_CHARS:
        raise _error("invalid_image_url", f"image URLs may be at most {MAX_URL_CHARS} characters, got {len(url)}")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise _error("invalid_image_url", f"the image URL {shown!r} contains spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port, host = parts.port, parts.hostname
    except ValueError as exc:  # a bad port (http://a:99999/) or bracket (http://[::1/)
        raise _error("invalid_image_url", f"{shown!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise _error("invalid_image_url", f"image URLs must be http(s) or data URLs, got {shown!r}")
    if parts.username is not None or parts.password is not None:
        raise _error("invalid_image_url", f"image URLs must not carry credentials: {parts.hostname!r}")
    try:
        ipaddress.ip_address(host)
        ascii_host = host
    except ValueError:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise _error("invalid_image_url", f"the host of {shown!r} is not a valid host name") from exc
    https = parts.scheme == "https"
    port = port if port is not None else (443 if https else 80)
    if port == 0:
        raise _error("invalid_image_url", f"{shown!r} has port 0")
    bracketed = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    host_header = bracketed if parts.port is None else f"{bracketed}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, https, ascii_host, port, path, host_header)


def _remaining(deadline: float, timeout_s: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _error("image_fetch_timeout", f"fetching {url[:100]!r} took longer than {timeout_s:g} s")
    return left


def resolve_checked(target: Target, config: ImageFetchConfig, deadline: float | None = None) -> list[tuple]:
    """The (family, sockaddr) pairs to connect to; refuses the URL if any of them is not public and not allowed."""
    deadline = deadline if deadline is not None else time.monotonic() + config.timeout_s
    lookup = _resolver.submit(socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=_remaining(deadline, config.timeout_s, target.url))
    except concurrent.futures.TimeoutError as exc:
        raise _error(
            "image_fetch_timeout",
            f"fetching {target.url[:100]!r} took longer than {config.timeout_s:g} s (looking up its host)",
        ) from exc
    except (OSError, UnicodeError) as exc:
        log.info("image URL %r: lookup failed: %s", target.url[:100], exc)
        raise _error("image_fetch_failed", f"the host of {target.url[:100]!r} could not be resolved") from exc
    addresses = []
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not is_public(address) and not _allowed(target.host, address, config.allow):
            log.info("image URL %r refused: %s is not public", target.url[:100], address)
            raise _error(
                "image_url_forbidden",
                f"the image URL {target.url[:100]!r} is not allowed: its host is not a "
                "public address (an operator can list it in image_fetch.allow)",
            )
        addresses.append((family, sockaddr))
    if not addresses:
        raise _error("image_fetch_failed", f"the host of {target.url[:100]!r} could not be resolved")
    return addresses


def check_destination(url: str, config: ImageFetchConfig) -> None:
    """Refuse URLs that are not http(s) or whose host resolves to a non-public address (unless allowed)."""
    resolve_checked(parse_url(url), config)


# ---- fetching ---------------------------------------------------------------------------------------------------------


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP over a socket that is already connected (to a checked address, TLS already set up)."""

    def __init__(self, target: Target, sock: socket.socket):
        super().__init__(target.host, target.port)
        self.sock = sock

    def connect(self):  # never reconnect (that would look the host up again)
        raise http.client.HTTPException("the pinned connection is closed")


def _connect(target: Target, addresses: list[tuple], deadline: float, timeout_s: float) -> socket.socket:
    last: OSError | None = None
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline, timeout_s, target.url))
            sock.connect(sockaddr)
            if target.https:
                context = ssl.create_default_context()  # certificate and host name checked against target.host
                sock = context.wrap_socket(sock, server_hostname=target.host)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    log.info("image URL %r: could not connect: %s", target.url[:100], last)
    raise _error("image_fetch_failed", f"could not connect to the host of {target.url[:100]!r}")


def _read_image(
    response: http.client.HTTPResponse, target: Target, max_bytes: int, deadline: float, timeout_s: float
) -> bytes:
    shown = target.url[:100]
    kind = response.getheader("Content-Type", "")
    if not kind.startswith("image/"):
        raise _error("invalid_image_content_type", f"{shown!r} is {kind[:60] or 'untyped'}, not an image")
    length = response.getheader("Content-Length")
    if length is not None and not length.strip().isdigit():
        raise _error("image_fetch_failed", f"{shown!r} answered with an invalid Content-Length")
    declared = response.length  # None when chunked or not given
    if declared is not None and declared > max_bytes:
        raise _error("image_too_large", f"{shown!r} is {declared} bytes; the limit is {max_bytes}")
    data = bytearray()
    while True:
        _remaining(deadline, timeout_s, target.url)
        chunk = response.read1(_CHUNK)  # at most one read from the socket: a drip cannot outlast the deadline
        if not chunk:
            break
        data += chunk
        if len(data) > max_bytes:
            raise _error("image_too_large", f"{shown!r} is over the limit of {max_bytes} bytes")
    _remaining(deadline, timeout_s, target.url)  # the watchdog ends a read at the deadline with an empty chunk
    if declared is not None and len(data) != declared:
        raise _error("image_fetch_failed", f"{shown!r} sent {len(data)} bytes but announced {declared}")
    return bytes(data)


def _fetch_once(target: Target, config: ImageFetchConfig, max_bytes: int, deadline: float) -> bytes | str:
    """The image bytes, or the next URL when the answer is a redirect."""
    addresses = resolve_checked(target, config, deadline)
    sock = _connect(target, addresses, deadline, config.timeout_s)
    # At the deadline the socket is shut: whatever read is waiting returns at once.
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, args=(sock,))
    watchdog.daemon = True
    watchdog.start()
    connection = _PinnedConnection(target, sock)
    try:
        connection.request(
            "GET", target.path, headers={"Host": target.host_header, "User-Agent": "llava-ray", "Accept": "image/*"}
        )
        response = connection.getresponse()
        if response.status in _REDIRECTS and response.getheader("Location"):
            return urllib.parse.urljoin(target.url, response.getheader("Location"))
        if response.status != 200:
            raise _error("image_fetch_failed", f"fetching {target.url[:100]!r} answered HTTP {response.status}")
        return _read_image(response, target, max_bytes, deadline, config.timeout_s)
    except APIError:
        raise
    except Exception as exc:  # a socket error, a malformed or cut-off response, the watchdog's shutdown
        _remaining(deadline, config.timeout_s, target.url)  # past the deadline: say so
        log.info("image URL %r: fetch failed: %r", target.url[:100], exc)
        raise _error(
            "image_fetch_failed",
            f"fetching {target.url[:100]!r} failed: the host's answer was cut off or is not valid HTTP",
        ) from exc
    finally:
        watchdog.cancel()
        connection.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def fetch_url(url: str, config: ImageFetchConfig, max_bytes: int, deadline: float | None = None) -> bytes:
    """The bytes at `url` (see the module docstring for the guards). `deadline`: a time.monotonic() value."""
    deadline = deadline if deadline is not None else time.monotonic() + config.timeout_s
    for _ in range(config.max_redirects + 1):
        result = _fetch_once(parse_url(url), config, max_bytes, deadline)
        if isinstance(result, bytes):
            return result
        url = result
    raise _error("image_fetch_failed", f"more than {config.max_redirects} redirects")


# ---- the bytes must be an image format we decode ----------------------------------------------------------------------


def check_format(data: bytes, index: int) -> None:
    """Refuse bytes that are not one of IMAGE_FORMATS (a header parse only; nothing is decoded)."""
    from PIL import Image

    Image.init()  # registers every plugin (WEBP is not among the ones PIL loads up front)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS):
            pass
    except Image.DecompressionBombError as exc:
        raise _error("image_too_large", f"image {index + 1} of the request has too many pixels") from exc
    except Exception as exc:  # UnidentifiedImageError, or whatever a malformed header makes a plugin raise
        raise _error(
            "invalid_image",
            f"image {index + 1} of the request is not a {', '.join(IMAGE_FORMATS[:-1])} "
            f"or {IMAGE_FORMATS[-1]} image (starts with {bytes(data[:8])!r})",
        ) from exc


def load_image_bytes(url: str, config: ImageFetchConfig, max_bytes: int, deadline: float | None = None) -> bytes:
    if url.startswith("data:"):
        return _decode_data_url(url, max_bytes)
    if not config.enabled:
        raise _error("image_url_fetch_disabled", "this server does not fetch image URLs; send images as data URLs")
    return fetch_url(url, config, max_bytes, deadline)
