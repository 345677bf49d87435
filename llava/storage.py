"""Address data, checkpoints and exports by URI: a local path or ``s3://bucket/key``.

S3 means any S3-compatible endpoint (AWS, MinIO, Ceph, moto, ...). The endpoint comes from the
``endpoint_url`` argument of :func:`filesystem` or the ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
environment variables (unset: AWS itself); the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``
(default ``us-east-1``); credentials from the usual AWS chain (env vars, ``~/.aws``, instance role),
resolved by pyarrow (reads, listings) and boto3 (writes). :func:`filesystem` hands out the ``pyarrow.fs``
filesystem itself, for ``pyarrow.parquet``, ``ray.data`` and Ray Train's ``storage_filesystem``.

Writes are all-or-nothing: an object appears at its key (or a local file at its path) only once
all of its bytes are written. S3 writes go through boto3's managed upload, which aborts the multipart
upload when anything fails, including an exception raised by the code producing the bytes; pyarrow's
S3 output stream cannot be aborted (closing it, also on an exception, completes the upload and
leaves a truncated object that looks whole).

Every failure is raised as :class:`StorageError` whose message names the URI and the problem, e.g.
``s3://nope/x: bucket 'nope' does not exist (endpoint http://127.0.0.1:9000)``. Timeouts are short
(refused connection: ~1 s; silent host: a few seconds), so a wrong endpoint fails fast.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pyarrow.fs as pafs

CONNECT_TIMEOUT_S = 2.0  # TCP connect
REQUEST_TIMEOUT_S = 5.0  # on Linux (curl) this is a stall timeout: < 1 byte/s for this long
MAX_ATTEMPTS = 3  # AWS standard retry strategy (also retries throttling / 5xx)
_CHUNK = 8 << 20
_PART = 16 << 20  # S3 multipart part size: objects up to 10,000 parts = 160 GiB
_THREADS = 8

_cache: dict[tuple, pafs.FileSystem] = {}
_clients: dict[tuple, object] = {}
_lock = threading.Lock()


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and the problem."""


class TooLargeError(StorageError):
    """A read stopped at its byte limit: the object is larger than the caller allows."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _tmp_name(path: str) -> str:
    return f"{path}.tmp{os.getpid()}.{threading.get_ident()}"


_TMP = re.compile(r"\.tmp\d+\.\d+$")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name in S3 URI")
    return bucket, key.strip("/")


def _endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _describe(endpoint_url: str | None) -> str:
    return _endpoint(endpoint_url) or f"AWS S3 ({_region()})"


def _client_key(endpoint_url: str | None) -> tuple:
    """(endpoint, region, credentials hash): credentials are part of the key so that a changed environment
    gets a fresh filesystem / client."""
    creds = tuple(
        os.environ.get(v) for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    return _endpoint(endpoint_url), _region(), hash(creds)


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for ``uri``; S3 filesystems are cached per endpoint."""
    uri = str(uri)
    if not is_s3(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    bucket, key = _split_s3(uri)
    cache_key = _client_key(endpoint_url)
    endpoint, region = cache_key[0], cache_key[1]
    with _lock:
        fs = _cache.get(cache_key)
        if fs is None:
            options = {}
            if endpoint:
                parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
                options = {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
            fs = pafs.S3FileSystem(
                region=region,
                connect_timeout=CONNECT_TIMEOUT_S,
                request_timeout=REQUEST_TIMEOUT_S,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
                **options,
            )
            _cache[cache_key] = fs
    return fs, f"{bucket}/{key}" if key else bucket


def _problem(uri: str, exc: OSError) -> str:
    """Turn a pyarrow/OS error into ``"<uri>: <what went wrong>"``."""
    text = str(exc)
    if not is_s3(uri):
        if isinstance(exc, FileNotFoundError):
            return f"{uri}: not found"
        if isinstance(exc, PermissionError):
            return f"{uri}: permission denied"
        return f"{uri}: {exc.strerror or text}"
    endpoint = _describe(None)
    bucket, _ = _split_s3(uri)
    if "NETWORK_CONNECTION" in text:
        curl = re.search(r"curlCode: (\d+)", text)
        why = {"6": "cannot resolve host", "7": "connection refused", "28": "timed out"}.get(
            curl and curl.group(1), text
        )
        return f"{uri}: cannot reach S3 endpoint {endpoint}: {why}"
    if any(
        code in text for code in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED", "EXPIRED_TOKEN")
    ):
        code = re.search(r"AWS Error (\w+)", text)
        return f"{uri}: access denied by S3 endpoint {endpoint} ({code.group(1) if code else text}): check credentials"
    if "NO_SUCH_BUCKET" in text:
        return f"{uri}: bucket '{bucket}' does not exist (endpoint {endpoint})"
    if isinstance(exc, FileNotFoundError):
        try:  # a missing bucket also reads as "file not found": say which
            if filesystem(uri)[0].get_file_info(bucket).type == pafs.FileType.NotFound:
                return f"{uri}: bucket '{bucket}' does not exist (endpoint {endpoint})"
        except OSError:
            pass
        return f"{uri}: not found"
    return f"{uri}: {text}"


class _errors:
    """``with _errors(uri): ...`` re-raises any OSError (pyarrow's included) as StorageError."""

    def __init__(self, uri: str):
        self.uri = str(uri)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, OSError):
            raise StorageError(_problem(self.uri, exc)) from exc
        return False


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/runs", "ckpt/", "x.json") == "s3://b/runs/ckpt/x.json"``; same for local paths."""
    out = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out if out.endswith("/") else out + "/"
            out += part
    return out


def exists(uri: str) -> bool:
    with _errors(uri):
        fs, path = filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def open_input(uri: str):
    """A binary, sequential input stream (context manager with ``read(n)``); nothing is decompressed."""
    with _errors(uri):
        fs, path = filesystem(uri)
        return fs.open_input_stream(path, compression=None, buffer_size=_CHUNK if is_s3(uri) else None)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The bytes at ``uri``; with ``max_bytes``, :class:`TooLargeError` once more than that many arrive
    (it never reads more than ``max_bytes + 1``, so ``/dev/zero`` or a huge object cannot exhaust memory)."""
    with _errors(uri), open_input(uri) as f:
        if max_bytes is None:
            return f.read()
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLargeError(f"{uri}: larger than the limit of {max_bytes} bytes")
    return data


def _s3_client():
    """A boto3 S3 client for the current endpoint, region and credentials (cached like the filesystems)."""
    key = _client_key(None)
    with _lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=REQUEST_TIMEOUT_S,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            )
            client = boto3.session.Session().client("s3", endpoint_url=key[0], region_name=key[1], config=config)
            _clients[key] = client
    return client


def _boto_problem(uri: str, exc: Exception) -> str:
    """Turn a botocore error into ``"<uri>: <what went wrong>"``, worded like :func:`_problem`."""
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

    endpoint, (bucket, _) = _describe(None), _split_s3(uri)
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return f"{uri}: cannot reach S3 endpoint {endpoint}: timed out"
    if isinstance(exc, EndpointConnectionError):
        return f"{uri}: cannot reach S3 endpoint {endpoint}: connection refused"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return f"{uri}: bucket '{bucket}' does not exist (endpoint {endpoint})"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return f"{uri}: access denied by S3 endpoint {endpoint} ({code}): check credentials"
    return f"{uri}: {exc}"


class _ChunkReader:
    """A file-like ``read(n)`` over an iterator of byte chunks (what boto3's upload reads from)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def _upload(uri: str, fileobj) -> None:
    """One S3 object from ``fileobj.read``: multipart above 8 MiB, aborted if anything raises (no object)."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split_s3(uri)
    config = TransferConfig(multipart_threshold=_CHUNK, multipart_chunksize=_PART, max_concurrency=_THREADS)
    try:
        _s3_client().upload_fileobj(fileobj, bucket, key, Config=config)
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(_boto_problem(uri, exc)) from exc


def write_stream(uri: str, chunks: Iterable[bytes]) -> None:
    """Write the concatenated ``chunks`` to ``uri``, all or nothing: if producing a chunk raises, the
    exception propagates and nothing appears at ``uri`` (an object already there stays as it was)."""
    if is_s3(uri):
        _upload(uri, _ChunkReader(chunks))
        return
    with _errors(uri):
        path = filesystem(uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, all or nothing (local: temp file + rename; S3: one upload)."""
    write_stream(uri, [data])


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _files(uri: str) -> dict[str, int]:
    """``{path relative to uri: size}`` of every file under ``uri`` (a file URI maps ``""`` to itself)."""
    with _errors(uri):
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return {"": info.size}
        if info.type == pafs.FileType.NotFound and not is_s3(uri):
            raise FileNotFoundError(path)
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))  # S3: raises if no key has this prefix
        return {i.path[len(path) :].lstrip("/"): i.size for i in found if i.type == pafs.FileType.File}


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Every file under ``uri`` (recursive, sorted) as URIs: ``s3://...`` or absolute local paths."""
    base = str(uri) if is_s3(uri) else filesystem(uri)[1]
    found = [join(base, rel) for rel in _files(uri)]  # join(base, "") is base itself
    return sorted(u for u in found if suffix is None or u.endswith(suffix))


def _read_chunks(stream) -> Iterator[bytes]:
    while chunk := stream.read(_CHUNK):
        yield chunk


def _copy(src_uri: str, dst_uri: str) -> None:
    """Stream one file between any two URIs, all or nothing at the destination (see :func:`write_stream`)."""
    with _errors(src_uri):
        src_fs, src = filesystem(src_uri)
        with src_fs.open_input_stream(src, compression=None) as source:
            write_stream(dst_uri, _read_chunks(source))


def _copy_many(pairs: list[tuple[str, str]]) -> None:
    with ThreadPoolExecutor(min(_THREADS, max(1, len(pairs)))) as pool:
        for future in [pool.submit(_copy, src, dst) for src, dst in pairs]:
            future.result()


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path holding ``uri``: a local path is returned as is (absolute); an S3 file or prefix is
    mirrored to ``<cache_dir>/s3/<bucket>/<key>`` (``cache_dir`` default: ``$LLAVA_RAY_CACHE`` or
    ``~/.cache/llava-ray``). A prefix with a checksum manifest (a llava-ray checkpoint or export,
    llava.artifact_manifest) is mirrored as exactly the files it lists, a cached file kept only when its
    sha256 matches the manifest (a re-export of the same size is downloaded again); other prefixes keep
    files whose size matches. Local files the mirror should not hold are removed. Use it to
    ``from_pretrained`` a model stored in S3 (loaders then verify the copy against its manifest)."""
    if not is_s3(uri):
        path = filesystem(uri)[1]
        if not os.path.exists(path):
            raise StorageError(f"{uri}: not found")
        return path
    root = cache_dir or os.environ.get("LLAVA_RAY_CACHE") or "~/.cache/llava-ray"
    bucket, key = _split_s3(uri)
    remote = _files(uri)  # {"": size} when uri is a single object
    if ".." in key.split("/") or any(".." in rel.split("/") for rel in remote):
        raise StorageError(f"{uri}: a key with a '..' segment cannot be mirrored to a local path")
    target = os.path.join(os.path.abspath(os.path.expanduser(root)), "s3", bucket, *filter(None, key.split("/")))
    listed = _listed_files(uri, remote)
    if listed is not None:  # a llava-ray artifact: exactly the files its manifest lists, compared by sha256
        remote = {rel: size for rel, size in remote.items() if rel in listed or _is_manifest(rel)}
    todo = []
    for rel, size in remote.items():
        local = os.path.join(target, rel) if rel else target
        if not (os.path.isfile(local) and os.path.getsize(local) == size):
            todo.append((join(uri, rel), local))
        elif listed is not None and (_is_manifest(rel) or _sha256(local) != listed[rel]):
            todo.append((join(uri, rel), local))
    with _errors(target):
        if "" not in remote and os.path.isdir(target):  # drop what the prefix no longer holds
            for rel in _files(target):
                if rel not in remote and not _TMP.search(rel):  # leave other processes' downloads alone
                    os.remove(os.path.join(target, rel))
    _copy_many(todo)
    return target


def _is_manifest(rel: str) -> bool:
    from llava.artifact_manifest import is_manifest_name

    return is_manifest_name(rel)


def _sha256(path: str) -> str:
    from llava.artifact_manifest import sha256_file

    return sha256_file(path)


def _listed_files(uri: str, remote: dict[str, int]) -> dict[str, str] | None:
    """``{path: sha256}`` that the checksum manifests at the top of the prefix list (llava.artifact_manifest),
    or None when it has none. An incomplete manifest (being rewritten) or a listed file missing is refused."""
    from llava.artifact_manifest import ManifestError, combine

    names = [rel for rel in remote if rel and _is_manifest(rel)]
    if not names:
        return None
    try:
        listed = combine({rel: read_text(join(uri, rel)) for rel in names}, uri)
    except ManifestError as error:
        raise StorageError(str(error)) from error
    missing = sorted(rel for rel in listed if rel not in remote)
    if missing:
        raise StorageError(f"{uri}: {missing[0]} is listed in its manifest but missing")
    return {rel: entry.sha256 for rel, entry in listed.items()}


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (S3 prefix or local directory), keeping the tree."""
    files = _files(local_dir)
    if "" in files:
        raise StorageError(f"{local_dir}: not a directory")
    _copy_many([(join(filesystem(local_dir)[1], rel), join(uri, rel)) for rel in files])


def check_reachable(uri: str) -> None:
    """Fail fast, before a long job starts: S3 - the endpoint answers, accepts the credentials and holds
    the bucket; local - the path exists or its nearest existing parent is a writable directory."""
    if is_s3(uri):
        bucket, _ = _split_s3(uri)
        with _errors(uri):
            if filesystem(uri)[0].get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{uri}: bucket '{bucket}' does not exist (endpoint {_describe(None)})")
        return
    path = filesystem(uri)[1]
    if os.path.exists(path):
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise StorageError(f"{uri}: cannot create it, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StorageError(f"{uri}: cannot create it, {parent} is not writable")


def size(uri: str) -> int:
    """Size in bytes of the file at ``uri``."""
    with _errors(uri):
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        return info.size


def move(src_uri: str, dst_uri: str) -> None:
    """Rename a file or directory/prefix to a URI that does not exist yet (local: one rename; S3: each object
    copied server-side, then deleted). Both on the same filesystem."""
    if is_s3(src_uri) != is_s3(dst_uri):
        raise StorageError(f"{src_uri} -> {dst_uri}: cannot move between local storage and S3")
    if exists(dst_uri):
        raise StorageError(f"{dst_uri}: already exists, not moving {src_uri} onto it")
    fs, src = filesystem(src_uri)
    dst = filesystem(dst_uri)[1]
    with _errors(src_uri):
        if not is_s3(src_uri):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(src, dst)
            return
        for rel in _files(src_uri):
            fs.move(join(src, rel), join(dst, rel))


def remove(uri: str) -> None:
    """Delete a file or a whole directory/prefix; a missing one is not an error."""
    fs, path = filesystem(uri)
    with _errors(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory or is_s3(uri):
            try:
                fs.delete_dir(path)
            except FileNotFoundError:
                pass
