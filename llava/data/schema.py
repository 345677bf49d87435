"""The storage format: one parquet schema for every dataset, plus a manifest per dataset.

A dataset is a directory (local or s3://) holding `_manifest.json` and the parquet shards it lists
(how a dataset is written and replaced: llava.data.publish). Each shard has the columns:

    id            string         sample id (unique within the dataset)
    images        list<binary>   encoded image bytes inline, in <image> order; null for text-only rows
    image_paths   list<string>   where each image came from (path or URI), same order; null for text-only rows
    conversations string         the LLaVA-format turns as JSON text (round-trips exactly)
    source        string         dataset name, e.g. "llava_instruct_150k", "digits"
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from llava import storage

SCHEMA_VERSION = 1
MANIFEST_FILE = "_manifest.json"

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("images", pa.list_(pa.binary())),
        pa.field("image_paths", pa.list_(pa.string())),
        pa.field("conversations", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)


@dataclass
class Manifest:
    """What a dataset directory holds and what ingestion left out."""

    rows: int
    skipped: dict[str, int]  # reason -> count
    sources: list[str]  # input URIs
    shards: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    extra: dict = field(default_factory=dict)

    def write(self, dataset_uri: str) -> str:
        uri = storage.join(dataset_uri, MANIFEST_FILE)
        storage.write_text(uri, json.dumps(asdict(self), indent=2, sort_keys=True))
        return uri

    @classmethod
    def read(cls, dataset_uri: str) -> Manifest:
        return cls(**json.loads(storage.read_text(storage.join(dataset_uri, MANIFEST_FILE))))


def shard_uris(dataset_uri: str) -> list[str]:
    """The parquet shards of a dataset directory: exactly those its `_manifest.json` lists.

    A directory without a manifest (parquet files written by other tools) is listed: every
    `*.parquet` below it, sorted, except under `_`/`.`-prefixed names (unpublished attempts,
    staging, hidden files).
    """
    base = dataset_uri.rstrip("/")
    if storage.exists(storage.join(base, MANIFEST_FILE)):
        manifest = Manifest.read(base)
        if not manifest.shards:
            raise FileNotFoundError(
                f"{dataset_uri}: the dataset holds no rows (its manifest lists no shards; "
                f"skipped rows: {manifest.skipped or 'none'})"
            )
        return [storage.join(base, rel) for rel in manifest.shards]
    listed = base if storage.is_s3(base) else storage.filesystem(base)[1]  # list_files' absolute form
    shards = [
        uri
        for uri in storage.list_files(dataset_uri, suffix=".parquet")
        if not any(part.startswith(("_", ".")) for part in uri[len(listed) :].split("/") if part)
    ]
    if not shards:
        raise FileNotFoundError(f"{dataset_uri}: no parquet shards found")
    return shards


def parquet_rows(shard_uri: str) -> int:
    """Row count from a shard's footer (no data read)."""
    fs, path = storage.filesystem(shard_uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows
