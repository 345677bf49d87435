"""llava.storage against local paths and a real S3 server (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from llava import storage
from llava.storage import StorageError
from tests.s3_server import MotoServer


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh directory URI of each kind."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_join_and_is_s3():
    assert storage.join("s3://b", "x", "y.json") == "s3://b/x/y.json"
    assert storage.join("s3://b/runs/", "/ckpt/", "", "a.bin") == "s3://b/runs/ckpt/a.bin"
    assert storage.join("/data", "a/", "/b") == "/data/a/b"
    assert storage.join("rel", "a") == "rel/a"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://x") and not storage.is_s3("data")


def test_filesystem_paths(s3_server, tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage.filesystem("s3://bkt/a/b/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bkt/a/b"
    assert storage.filesystem("s3://bkt")[1] == "bkt"
    assert storage.filesystem("s3://other/x")[0] is fs  # cached per endpoint
    fs, path = storage.filesystem("~/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.expanduser("~/x")


def test_round_trip_and_exists(root):
    uri = storage.join(root, "deep/er/blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.exists(uri) and storage.exists(root)
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    text_uri = storage.join(root, "t.txt")
    storage.write_text(text_uri, "héllo ✓")
    assert storage.read_text(text_uri) == "héllo ✓"
    # No transparent (de)compression by extension.
    storage.write_bytes(storage.join(root, "x.json.gz"), b"not gzip")
    assert storage.read_bytes(storage.join(root, "x.json.gz")) == b"not gzip"


def test_list_files(root):
    for rel in ["a.json", "b.txt", "sub/c.json", "sub/deeper/d.json"]:
        storage.write_text(storage.join(root, rel), rel)
    base = root if storage.is_s3(root) else os.path.abspath(root)
    assert storage.list_files(root) == [f"{base}/{r}" for r in ["a.json", "b.txt", "sub/c.json", "sub/deeper/d.json"]]
    assert storage.list_files(storage.join(root, "sub"), suffix=".json") == [
        f"{base}/sub/c.json",
        f"{base}/sub/deeper/d.json",
    ]
    assert storage.list_files(storage.join(root, "b.txt")) == [f"{base}/b.txt"]  # a file lists itself
    with pytest.raises(StorageError, match="nothing-here: not found"):
        storage.list_files(storage.join(root, "nothing-here"))


def test_open_input_streams(root):
    data = os.urandom(3 * 1024 * 1024 + 17)
    uri = storage.join(root, "big.json")
    storage.write_bytes(uri, data)
    chunks = []
    with storage.open_input(uri) as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    assert b"".join(chunks) == data and len(chunks) > 1


def test_local_copy_mirrors_and_skips_unchanged(s3_bucket, tmp_path, monkeypatch):
    files = {"config.json": b"{}", "weights/model.safetensors": os.urandom(5000), "tok/a/b/vocab.txt": b"a\nb\n"}
    for rel, data in files.items():
        storage.write_bytes(storage.join(s3_bucket, "models/m1", rel), data)
    copied = []
    real_copy = storage._copy
    monkeypatch.setattr(storage, "_copy", lambda src, dst: (copied.append(src), real_copy(src, dst)))

    local = storage.local_copy(storage.join(s3_bucket, "models/m1"), cache_dir=str(tmp_path / "cache"))
    assert local == str(tmp_path / "cache" / "s3" / s3_bucket[5:] / "models" / "m1")
    got = {str(p.relative_to(local)): p.read_bytes() for p in Path(local).rglob("*") if p.is_file()}
    assert got == files and len(copied) == 3
    mtime = os.stat(os.path.join(local, "config.json")).st_mtime_ns

    copied.clear()
    assert storage.local_copy(storage.join(s3_bucket, "models/m1/"), cache_dir=str(tmp_path / "cache")) == local
    assert copied == [] and os.stat(os.path.join(local, "config.json")).st_mtime_ns == mtime

    # A changed size is fetched again; a file gone from the prefix is dropped from the mirror.
    storage.write_bytes(storage.join(s3_bucket, "models/m1/config.json"), b'{"x": 1}')
    storage.write_bytes(os.path.join(local, "stale.bin"), b"old")
    storage.local_copy(storage.join(s3_bucket, "models/m1"), cache_dir=str(tmp_path / "cache"))
    assert copied == [storage.join(s3_bucket, "models/m1/config.json")]
    assert storage.read_bytes(os.path.join(local, "config.json")) == b'{"x": 1}'
    assert not os.path.exists(os.path.join(local, "stale.bin"))

    # A single object, and the default cache root from $LLAVA_RAY_CACHE.
    monkeypatch.setenv("LLAVA_RAY_CACHE", str(tmp_path / "envcache"))
    one = storage.local_copy(storage.join(s3_bucket, "models/m1/tok/a/b/vocab.txt"))
    assert one.startswith(str(tmp_path / "envcache")) and Path(one).read_bytes() == b"a\nb\n"
    # Local paths are returned as they are.
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)


def test_upload_dir_round_trip(s3_bucket, tmp_path):
    src = tmp_path / "ckpt"
    (src / "llm" / "sub").mkdir(parents=True)
    (src / "llava_config.json").write_text('{"a": 1}')
    (src / "llm" / "sub" / "w.bin").write_bytes(os.urandom(1000))
    storage.upload_dir(str(src), storage.join(s3_bucket, "runs/ckpt"))
    assert storage.list_files(storage.join(s3_bucket, "runs")) == [
        f"{s3_bucket}/runs/ckpt/llava_config.json",
        f"{s3_bucket}/runs/ckpt/llm/sub/w.bin",
    ]
    back = storage.local_copy(storage.join(s3_bucket, "runs/ckpt"), cache_dir=str(tmp_path / "c"))
    assert Path(back, "llm/sub/w.bin").read_bytes() == (src / "llm" / "sub" / "w.bin").read_bytes()
    whole = storage.local_copy(s3_bucket, cache_dir=str(tmp_path / "c"))  # a bucket root works too
    assert whole == str(tmp_path / "c" / "s3" / s3_bucket[5:]) and Path(whole, "runs/ckpt/llava_config.json").exists()
    with pytest.raises(StorageError, match="not a directory"):
        storage.upload_dir(str(src / "llava_config.json"), storage.join(s3_bucket, "x"))
    # local -> local copies too
    storage.upload_dir(str(src), str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "llava_config.json").read_text() == '{"a": 1}'


def test_parquet_through_filesystem(s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    fs, path = storage.filesystem(storage.join(s3_bucket, "data/part-0.parquet"))
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.list_files(s3_bucket, suffix=".parquet") == [f"{s3_bucket}/data/part-0.parquet"]


def test_errors_name_the_uri(s3_bucket, s3_server, tmp_path):
    with pytest.raises(StorageError, match=f"^{s3_bucket}/missing.json: not found$"):
        storage.read_bytes(storage.join(s3_bucket, "missing.json"))
    with pytest.raises(StorageError, match="^s3://no-such-bucket-x/k: bucket 'no-such-bucket-x' does not exist"):
        storage.read_bytes("s3://no-such-bucket-x/k")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.write_bytes("s3://no-such-bucket-x/k", b"x")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        storage.list_files("s3://no-such-bucket-x/k")
    with pytest.raises(StorageError, match=f"^{tmp_path}/nope.txt: not found$"):
        storage.read_bytes(str(tmp_path / "nope.txt"))
    with pytest.raises(StorageError, match="not found"):
        storage.local_copy(storage.join(s3_bucket, "no/model"), cache_dir=str(tmp_path))
    assert not storage.exists("s3://no-such-bucket-x/k")


def test_check_reachable(s3_bucket, tmp_path):
    storage.check_reachable(s3_bucket)
    storage.check_reachable(storage.join(s3_bucket, "not/yet/written"))
    with pytest.raises(StorageError, match="^s3://no-such-bucket-y/out: bucket 'no-such-bucket-y' does not exist"):
        storage.check_reachable("s3://no-such-bucket-y/out")
    storage.check_reachable(str(tmp_path / "new" / "deeper"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is not a directory"):
        storage.check_reachable(str(tmp_path / "file" / "sub"))


def test_unreachable_endpoint_fails_fast(s3_server, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for call in (storage.check_reachable, storage.read_bytes, storage.list_files):
        start = time.monotonic()
        with pytest.raises(
            StorageError, match=f"^s3://bkt/k: cannot reach S3 endpoint {endpoint}: connection refused$"
        ):
            call("s3://bkt/k")
        assert time.monotonic() - start < 10


def test_stalled_endpoint_times_out(s3_server, monkeypatch):
    """A server that accepts and never answers: the request timeout (a stall timeout on Linux) applies."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
    monkeypatch.setattr(storage, "REQUEST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 1)
    monkeypatch.setattr(storage, "_cache", {})
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach S3 endpoint .*: timed out"):
        storage.check_reachable("s3://bkt")
    assert time.monotonic() - start < 5
    listener.close()


def test_rejected_credentials(s3_server, monkeypatch):
    server = MotoServer(auth=True)  # enforces IAM auth: the "testing" keys are unknown to it
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        with pytest.raises(StorageError, match=r"^s3://bkt/k: access denied by S3 endpoint .*check credentials"):
            storage.check_reachable("s3://bkt/k")
    finally:
        server.stop()


def test_a_write_that_fails_midway_leaves_no_object(root, s3_server):
    """The producer of the bytes raises after 40 MiB (S3: two 16 MiB multipart parts are uploaded by then):
    nothing appears at the key, an object already there is untouched, no upload is left open."""
    uri = storage.join(root, "model.safetensors")
    part = os.urandom(4 << 20)

    def failing():
        for _ in range(10):
            yield part
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="the producer failed"):
        storage.write_stream(uri, failing())
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"the previous version")
    with pytest.raises(RuntimeError, match="the producer failed"):
        storage.write_stream(uri, failing())
    assert storage.read_bytes(uri) == b"the previous version"
    storage.write_stream(uri, iter([part, part, b"end"]))
    assert storage.read_bytes(uri) == part + part + b"end"
    if storage.is_s3(root):
        bucket = root[len("s3://") :].split("/")[0]
        assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    else:
        assert os.listdir(os.path.dirname(storage.filesystem(uri)[1])) == ["model.safetensors"]  # no temp file left


def test_capped_reads_stop_at_the_limit(root):
    uri = storage.join(root, "blob.bin")
    storage.write_bytes(uri, b"x" * 1000)
    assert storage.read_bytes(uri, max_bytes=1000) == b"x" * 1000
    with pytest.raises(storage.TooLargeError, match="blob.bin: larger than the limit of 999 bytes"):
        storage.read_bytes(uri, max_bytes=999)
    with pytest.raises(storage.TooLargeError):
        storage.read_bytes("/dev/zero", max_bytes=1 << 20)  # an endless file: stops after 1 MiB + 1 byte
