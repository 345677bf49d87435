"""The three ingestion jobs behind `llava-ray prepare`: LLaVA JSON, caption pairs, digits."""

from __future__ import annotations

import logging

import pyarrow as pa
import ray

from llava import storage
from llava.data.digits import build_digits
from llava.data.ingest import RAW_SCHEMA, IngestConfig, ingest
from llava.data.schema import Manifest
from llava.data.sources import read_caption_pairs, read_raw_chunks, stage_llava_json

log = logging.getLogger(__name__)


def prepare_llava_json(json_uri: str, images_uri: str, out_uri: str, source: str | None = None,
                       config: IngestConfig | None = None) -> Manifest:
    source = source or json_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
    storage.check_reachable(images_uri)
    staging = storage.join(out_uri, "_staging")
    chunks = stage_llava_json(json_uri, staging, source)
    try:
        manifest = ingest(read_raw_chunks(chunks), out_uri, [json_uri, images_uri], images_uri, config)
    finally:
        storage.remove(staging)
    return manifest


def prepare_captions(pairs_uri: str, images_uri: str, out_uri: str, seed: int = 0, source: str = "captions",
                     image_column: str = "image", caption_column: str = "caption",
                     config: IngestConfig | None = None) -> Manifest:
    storage.check_reachable(images_uri)
    raw = read_caption_pairs(pairs_uri, seed, source, image_column, caption_column)
    return ingest(raw, out_uri, [pairs_uri, images_uri], images_uri, config, extra={"seed": seed})


def prepare_digits(out_uri: str, seed: int = 0, config: IngestConfig | None = None) -> dict[str, Manifest]:
    """out/stage1, out/stage2, out/eval."""
    manifests = {}
    for split, rows in build_digits(seed).items():
        raw = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
        manifests[split] = ingest(raw, storage.join(out_uri, split), ["sklearn.datasets.load_digits"], None, config,
                                  extra={"seed": seed, "split": split})
    return manifests


def prepare(args) -> dict[str, Manifest]:
    """Dispatch the parsed `llava-ray prepare KIND ...` arguments."""
    config = IngestConfig(shard_mb=args.shard_mb)
    if args.kind == "llava-json":
        return {"out": prepare_llava_json(args.json, args.images, args.out, args.source, config)}
    if args.kind == "captions":
        return {"out": prepare_captions(args.pairs, args.images, args.out, args.seed, args.source,
                                        args.image_column, args.caption_column, config)}
    if args.kind == "digits":
        return prepare_digits(args.out, args.seed, config)
    raise ValueError(f"unknown prepare kind {args.kind!r}")
