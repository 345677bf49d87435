"""The three ingestion jobs behind `llava-ray prepare`: LLaVA JSON, caption pairs, digits.

Each writes a dataset directory as a whole (llava.data.publish): into an output that already
holds a dataset only with `overwrite=True`, and then it replaces it; never appended to.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import ray

from llava import storage
from llava.data import publish
from llava.data.digits import build_digits
from llava.data.ingest import RAW_SCHEMA, IngestConfig, ingest
from llava.data.schema import Manifest
from llava.data.sources import read_caption_pairs, read_raw_chunks, stage_llava_json

log = logging.getLogger(__name__)


def prepare_llava_json(
    json_uri: str,
    images_uri: str,
    out_uri: str,
    source: str | None = None,
    config: IngestConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """A LLaVA JSON array (image paths relative to `images_uri`) -> the dataset at `out_uri`."""
    source = source or json_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")
    storage.check_reachable(images_uri)
    attempt = publish.begin(out_uri, overwrite)
    chunks = stage_llava_json(json_uri, attempt.staging_uri, source)
    try:
        manifest = ingest(read_raw_chunks(chunks), attempt, [json_uri, images_uri], images_uri, config)
    finally:
        storage.remove(attempt.staging_uri)
    return manifest


def prepare_captions(
    pairs_uri: str,
    images_uri: str,
    out_uri: str,
    seed: int = 0,
    source: str = "captions",
    image_column: str = "image",
    caption_column: str = "caption",
    config: IngestConfig | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Image-caption pairs (JSONL / CSV / parquet) -> a stage-1 dataset at `out_uri`."""
    storage.check_reachable(images_uri)
    attempt = publish.begin(out_uri, overwrite)
    raw = read_caption_pairs(pairs_uri, seed, source, image_column, caption_column)
    return ingest(raw, attempt, [pairs_uri, images_uri], images_uri, config, extra={"seed": seed})


def prepare_digits(
    out_uri: str, seed: int = 0, config: IngestConfig | None = None, overwrite: bool = False
) -> dict[str, Manifest]:
    """out/stage1, out/stage2, out/eval (all three are checked before anything is written)."""
    splits = build_digits(seed)
    attempts = {split: publish.begin(storage.join(out_uri, split), overwrite) for split in splits}
    manifests = {}
    for split, rows in splits.items():
        raw = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
        manifests[split] = ingest(
            raw, attempts[split], ["sklearn.datasets.load_digits"], None, config, extra={"seed": seed, "split": split}
        )
    return manifests
