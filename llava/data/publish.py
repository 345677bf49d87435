"""Datasets are replaced as a whole, never appended to: write under a fresh attempt, publish the manifest last.

A dataset directory (local or s3://) looks like

    out/_manifest.json                                 the published version; lists its shards
    out/_attempts/20261202T074400Z-1a2b3c4d/shards/    the parquet shards of one `prepare` run
    out/_attempts/20261202T074400Z-1a2b3c4d/staging/   that run's temporary files

A run writes only under its own attempt prefix, then writes `_manifest.json` (one S3 PUT, or a
rename of a complete local file: either the old manifest or the new one is there, never a part).
Readers (`llava.data.schema.shard_uris`) read exactly the shards the manifest lists, so they see
the previous version or the new one: never a partial write, and never the rows of two runs. A run
that dies before publishing leaves only an unlisted attempt; the next run deletes it. A published
dataset is replaced only when asked (`overwrite=True`, `llava-ray prepare ... --overwrite`).

Two runs writing the same dataset at the same time are not supported (the later manifest wins).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from llava import storage
from llava.data.schema import MANIFEST_FILE, Manifest, parquet_rows

log = logging.getLogger(__name__)

ATTEMPTS_DIR = "_attempts"


class DatasetExistsError(FileExistsError):
    """The output already holds a published dataset and replacing it was not asked for."""


@dataclass(frozen=True)
class Attempt:
    """One run's private prefix inside a dataset directory."""

    dataset_uri: str
    name: str  # "<UTC time>-<random>": sorts by start time

    @property
    def uri(self) -> str:
        return storage.join(self.dataset_uri, ATTEMPTS_DIR, self.name)

    @property
    def shards_uri(self) -> str:
        return storage.join(self.uri, "shards")

    @property
    def staging_uri(self) -> str:
        return storage.join(self.uri, "staging")

    def shards(self) -> list[str]:
        """The parquet files this attempt wrote (URIs), sorted; [] when it wrote none."""
        try:
            return storage.list_files(self.shards_uri, suffix=".parquet")
        except (FileNotFoundError, storage.StorageError):
            if storage.exists(self.shards_uri):
                raise
            return []


def begin(dataset_uri: str, overwrite: bool = False) -> Attempt:
    """A fresh attempt for `dataset_uri`; DatasetExistsError if a dataset is published there and not `overwrite`."""
    storage.check_reachable(dataset_uri)
    manifest_uri = storage.join(dataset_uri, MANIFEST_FILE)
    if not overwrite and storage.exists(manifest_uri):
        existing = Manifest.read(dataset_uri)
        raise DatasetExistsError(
            f"{dataset_uri}: already holds a dataset ({existing.rows} rows, created {existing.created}); "
            "pass --overwrite (overwrite=True) to replace it, or choose another output"
        )
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    base = dataset_uri.rstrip("/") if storage.is_s3(dataset_uri) else storage.filesystem(dataset_uri)[1]
    return Attempt(base, name)


def publish(attempt: Attempt, manifest: Manifest) -> Manifest:
    """Point the dataset at `attempt`'s shards (manifest written last), then delete what no reader needs."""
    shards = attempt.shards()
    base = attempt.dataset_uri
    manifest.shards = [uri[len(base) :].lstrip("/") for uri in shards]
    manifest.rows = sum(parquet_rows(uri) for uri in shards)
    manifest.extra = {**manifest.extra, "attempt": attempt.name}
    previous = Manifest.read(base) if storage.exists(storage.join(base, MANIFEST_FILE)) else None
    manifest.write(base)
    _clean_up(attempt, previous)
    return manifest


def _attempt_names(dataset_uri: str) -> set[str]:
    root = storage.join(dataset_uri, ATTEMPTS_DIR)
    try:
        files = storage.list_files(root)
    except (FileNotFoundError, storage.StorageError):
        return set()
    prefix = (root if storage.is_s3(root) else storage.filesystem(root)[1]).rstrip("/") + "/"
    return {uri[len(prefix) :].split("/", 1)[0] for uri in files if uri.startswith(prefix)}


def _clean_up(attempt: Attempt, previous: Manifest | None) -> None:
    """Delete attempts older than `attempt` (interrupted runs, the replaced version) and the shards the
    previous manifest listed outside `_attempts/` (datasets written before attempts existed). Files
    that no manifest ever listed are left alone: the directory may hold the user's own files."""
    for name in sorted(_attempt_names(attempt.dataset_uri)):
        if name < attempt.name:
            log.info(
                "removing %s (an earlier or interrupted attempt)", storage.join(attempt.dataset_uri, ATTEMPTS_DIR, name)
            )
            storage.remove(storage.join(attempt.dataset_uri, ATTEMPTS_DIR, name))
    for rel in previous.shards if previous else []:
        if not rel.startswith(ATTEMPTS_DIR + "/") and ".." not in rel.split("/"):
            storage.remove(storage.join(attempt.dataset_uri, rel))
