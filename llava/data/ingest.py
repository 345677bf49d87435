"""Raw rows -> validated rows with images inline -> parquet shards + manifest, on Ray Data.

Every ingestion job (LLaVA JSON, caption pairs, digits) produces "raw rows":

    id            string
    image_refs    list<string> | null   image paths relative to the images root (see llava.data.image_refs)
    images        list<binary> | null   image bytes already in hand (digits); wins over image_refs
    conversations string                the turns as JSON text ("null" when the input row was malformed)
    source        string

`ingest` reads each image in parallel (only inside the images root, at most `max_image_bytes`),
checks it decodes (within the pixel limit) and that the conversation is trainable, and writes good
rows in the `schema.SCHEMA` format as a new version of the dataset (llava.data.publish). A bad row
never stops the job: it is skipped, counted by reason, and a few examples are logged.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import ray

from llava import storage
from llava.data.image_refs import DEFAULT_MAX_IMAGE_BYTES, ImageAccess
from llava.data.publish import Attempt, publish
from llava.data.schema import SCHEMA, Manifest
from llava.image_processing import ImageError, decode_image
from llava.progress import Progress
from llava.templates import SampleRejected
from llava.tokenization import check_training_turns

log = logging.getLogger(__name__)

RAW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image_refs", pa.list_(pa.string())),
        ("images", pa.list_(pa.binary())),
        ("conversations", pa.string()),
        ("source", pa.string()),
    ]
)


@dataclass
class IngestConfig:
    shard_mb: int = 128  # target parquet shard size (images dominate the bytes)
    max_pixels: int = 64_000_000  # larger decoded images are refused as decompression bombs
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # larger image files are refused (image_too_large)
    allow_images_outside_root: bool = False  # follow absolute / `..` / other-bucket image paths
    batch_size: int = 32  # rows per map task batch
    examples_per_reason: int = 3  # skipped rows logged per reason


@ray.remote(num_cpus=0)
class SkipCounter:
    """Collects skipped-row counts (and a few examples) from every ingestion task."""

    def __init__(self, examples_per_reason: int):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.limit = examples_per_reason
        self.rows_seen = 0  # rows checked so far, good or not (the job's progress)

    def add(self, counts: dict[str, int], examples: list[tuple[str, str]], rows: int = 0) -> None:
        self.counts.update(counts)
        self.rows_seen += rows
        for reason, text in examples:
            kept = self.examples.setdefault(reason, [])
            if len(kept) < self.limit:
                kept.append(text)

    def report(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        return dict(self.counts), self.examples

    def progress(self) -> tuple[int, int]:
        """(rows checked, rows skipped) so far."""
        return self.rows_seen, sum(self.counts.values())


def new_skip_counter(examples_per_reason: int):
    """A SkipCounter pinned to this driver's node: it lives as long as the job does. Placed anywhere, it
    could land on a worker node that a spot reclaim takes away, and the job would lose its counts (and
    fail reading them) after training itself had recovered."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return SkipCounter.options(scheduling_strategy=here).remote(examples_per_reason)


def close_skip_counter(counter) -> tuple[dict[str, int], dict[str, list[str]]]:
    """The counter's final counts and examples; then the actor ends (it holds a worker process, and a
    long-lived driver such as the pipeline would otherwise keep one per stage)."""
    report = ray.get(counter.report.remote())
    ray.kill(counter)
    return report


def validate_row(row: dict, access: ImageAccess, max_pixels: int) -> dict:
    """One raw row -> a SCHEMA row. Raises SampleRejected (ImageRefRejected included) / ImageError."""
    refs = row.get("image_refs") or []
    images = row.get("images")
    conversations = json.loads(row["conversations"]) if row.get("conversations") else None
    if not isinstance(conversations, list):
        raise SampleRejected("bad_conversation", "the row has no list of conversation turns")
    num_images = len(images) if images else len(refs)
    check_training_turns(conversations, num_images)
    uris = [access.resolve(ref) for ref in refs]  # image_outside_root before any read
    if not images:
        images = []
        for uri in uris:
            try:
                images.append(access.read(uri))  # image_too_large past max_bytes
            except (FileNotFoundError, storage.StorageError) as error:
                raise SampleRejected("missing_image", f"{uri}: {error}") from error
    for data in images:
        decode_image(data, max_pixels)  # raises ImageError(reason) for undecodable / truncated / bombs
    return {
        "id": str(row["id"]),
        "images": list(images) or None,
        "image_paths": uris or None,
        "conversations": row["conversations"],
        "source": row["source"],
    }


def skip_reason(error: Exception) -> str:
    """image_undecodable / image_truncated / image_too_many_pixels / image_empty, or the SampleRejected reason."""
    return f"image_{error.reason}" if isinstance(error, ImageError) else error.reason


def validate_batch(batch: pa.Table, access: ImageAccess, max_pixels: int, counter) -> pa.Table:
    """Ray Data map_batches function: keeps good rows, reports the others to `counter`."""
    good, counts, examples = [], Counter(), []
    for row in batch.to_pylist():
        try:
            good.append(validate_row(row, access, max_pixels))
        except (SampleRejected, ImageError) as error:
            reason = skip_reason(error)
            counts[reason] += 1
            examples.append((reason, f"id={row.get('id')!r}: {error}"))
    ray.get(counter.add.remote(dict(counts), examples, batch.num_rows))
    return pa.Table.from_pylist(good, schema=SCHEMA)


def rows_per_shard(raw: ray.data.Dataset, access: ImageAccess, shard_mb: int, sample: int = 16) -> int:
    """Rows per parquet shard so a shard is about `shard_mb` MB, from a sample of image sizes."""
    sizes = []
    for row in raw.take(sample):
        if row.get("images"):
            sizes.append(sum(len(b) for b in row["images"]))
        else:
            total = 0
            for ref in row.get("image_refs") or []:
                try:
                    total += min(access.size(access.resolve(ref)) or 0, access.max_bytes)
                except SampleRejected:
                    pass
            sizes.append(total)
    per_row = max(1024, int(sum(sizes) / max(1, len(sizes))) + 1024)
    return max(1, shard_mb * 1_000_000 // per_row)


def ingest(
    raw: ray.data.Dataset,
    attempt: Attempt,
    sources: list[str],
    images_root: Optional[str] = None,
    config: Optional[IngestConfig] = None,
    extra: Optional[dict] = None,
) -> Manifest:
    """Validate `raw` rows, write the good ones as parquet shards under `attempt`, publish them as the
    dataset (llava.data.publish) and return its manifest."""
    config = config or IngestConfig()
    access = ImageAccess(images_root, config.allow_images_outside_root, config.max_image_bytes)
    counter = new_skip_counter(config.examples_per_reason)
    shard_rows = rows_per_shard(raw, access, config.shard_mb)
    # One validation task per batch: a staging chunk or an input file is often a single block of
    # thousands of rows, which would otherwise be checked (and its images held) by one task.
    raw = raw.repartition(target_num_rows_per_block=config.batch_size)
    rows = raw.map_batches(
        validate_batch,
        batch_format="pyarrow",
        batch_size=config.batch_size,
        fn_kwargs={"access": access, "max_pixels": config.max_pixels, "counter": counter},
    )
    fs, path = storage.filesystem(attempt.shards_uri)
    log.info("ingesting %s -> %s (about %d rows per shard)", ", ".join(sources), attempt.shards_uri, shard_rows)
    with Progress("prepare", unit="rows", logger=log) as progress:  # a bar on a terminal, else a line every 10 s
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            write = pool.submit(
                rows.write_parquet, path, filesystem=fs, min_rows_per_file=shard_rows, max_rows_per_file=shard_rows
            )
            while True:
                try:
                    write.result(timeout=1.0)  # raises the write's own error, if any
                    break
                except concurrent.futures.TimeoutError:
                    seen, skipped_rows = ray.get(counter.progress.remote())
                    progress.set(seen, skipped=skipped_rows)
        seen, skipped_rows = ray.get(counter.progress.remote())
        progress.set(seen, skipped=skipped_rows)
    skipped, examples = close_skip_counter(counter)
    manifest = publish(attempt, Manifest(rows=0, skipped=skipped, sources=list(sources), extra=extra or {}))
    for reason, texts in sorted(examples.items()):
        for text in texts:
            log.warning("skipped (%s): %s", reason, text)
    if not manifest.rows:
        log.warning("%s: no row could be used; the dataset is empty", attempt.dataset_uri)
    log.info(
        "wrote %d rows in %d shard(s) to %s; skipped %s",
        manifest.rows,
        len(manifest.shards),
        attempt.dataset_uri,
        skipped or "none",
    )
    return manifest
