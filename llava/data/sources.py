"""Input formats -> raw rows (see llava.data.ingest) as Ray Datasets.

- LLaVA JSON (blip_laion_cc_sbu_558k.json, llava_instruct_150k.json, llava_v1_5_mix665k.json):
  streamed with ijson into small staging parquet chunks, never loaded whole into memory.
- Image-caption pairs (JSONL / CSV / parquet): one-turn stage-1 conversations, the question
  drawn from the paper's 11 brief-description prompts with a seeded RNG.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from llava import storage
from llava.config import IMAGE_TOKEN
from llava.data.ingest import RAW_SCHEMA

log = logging.getLogger(__name__)

# Visual Instruction Tuning (Liu et al., 2023, arXiv:2304.08485), Table 8: instructions for brief image descriptions.
BRIEF_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


class InputError(ValueError):
    """An input that cannot be used at all (wrong JSON shape, ...): the job fails fast, naming the URI."""


# ---- LLaVA JSON -------------------------------------------------------------------------------------


def _raw_from_llava_item(item, index: int, source: str) -> dict:
    if not isinstance(item, dict):
        return {
            "id": f"{source}-{index}",
            "image_refs": None,
            "images": None,
            "conversations": "null",
            "source": source,
        }
    image = item.get("image")
    refs = [image] if isinstance(image, str) else (list(image) if isinstance(image, list) else None)
    conversations = item.get("conversations")
    return {
        "id": str(item.get("id", f"{source}-{index}")),
        "image_refs": refs,
        "images": None,
        "conversations": json.dumps(conversations) if isinstance(conversations, list) else "null",
        "source": source,
    }


def _iter_llava_items(json_uri: str) -> Iterator:
    """Yield the samples of a top-level JSON array one at a time (ijson: constant memory)."""
    import ijson

    with storage.open_input(json_uri) as stream:
        head = stream.read(256).lstrip()[:1]
    if head != b"[":
        raise InputError(f"{json_uri}: expected a JSON array of LLaVA samples, found {head!r} at the start")
    with storage.open_input(json_uri) as stream:
        try:
            yield from ijson.items(stream, "item", use_float=True)
        except ijson.JSONError as error:
            raise InputError(f"{json_uri}: malformed JSON: {error}") from error


def stage_llava_json(json_uri: str, staging_uri: str, source: str, chunk_rows: int = 50_000) -> list[str]:
    """Stream a LLaVA JSON array into parquet chunks of raw rows; returns the chunk URIs."""
    storage.check_reachable(json_uri)
    chunks, rows = [], []

    def flush():
        uri = storage.join(staging_uri, f"chunk-{len(chunks):05d}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), sink)
        storage.write_bytes(uri, sink.getvalue().to_pybytes())
        chunks.append(uri)
        rows.clear()

    for index, item in enumerate(_iter_llava_items(json_uri)):
        rows.append(_raw_from_llava_item(item, index, source))
        if len(rows) >= chunk_rows:
            flush()
    if rows or not chunks:
        flush()
    log.info("staged %s into %d chunk(s) under %s", json_uri, len(chunks), staging_uri)
    return chunks


def read_raw_chunks(chunk_uris: list[str]) -> ray.data.Dataset:
    fs, _ = storage.filesystem(chunk_uris[0])
    return ray.data.read_parquet([storage.filesystem(u)[1] for u in chunk_uris], filesystem=fs)


# ---- caption pairs ------------------------------------------------------------------------------------


def caption_conversation(sample_id: str, caption: str, seed: int) -> list[dict]:
    """Stage-1 conversation for one caption: a seeded prompt, <image> before or after it (paper §3)."""
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "big"))
    prompt = rng.choice(BRIEF_PROMPTS)
    question = f"{IMAGE_TOKEN}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n{IMAGE_TOKEN}"
    return [{"from": "human", "value": question}, {"from": "gpt", "value": caption}]


def _caption_batch(
    batch: pa.Table, image_column: str, caption_column: str, id_column: str | None, seed: int, source: str
):
    rows = []
    for row in batch.to_pylist():
        image, caption = row.get(image_column), row.get(caption_column)
        sample_id = str(row[id_column]) if id_column and row.get(id_column) is not None else str(image)
        if not isinstance(caption, str) or not caption.strip() or not isinstance(image, str):
            conversations = "null"  # counted as bad_conversation by ingest
        else:
            conversations = json.dumps(caption_conversation(sample_id, caption.strip(), seed))
        rows.append(
            {
                "id": sample_id,
                "image_refs": [image] if isinstance(image, str) else None,
                "images": None,
                "conversations": conversations,
                "source": source,
            }
        )
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def read_caption_pairs(
    pairs_uri: str,
    seed: int,
    source: str,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = "id",
) -> ray.data.Dataset:
    """JSONL / CSV / parquet of (image path, caption) -> raw rows with stage-1 conversations."""
    storage.check_reachable(pairs_uri)
    fs, path = storage.filesystem(pairs_uri)
    if pairs_uri.endswith(".jsonl"):
        ds = ray.data.read_json(path, filesystem=fs)  # pyarrow reads newline-delimited JSON
    elif pairs_uri.endswith(".csv"):
        ds = ray.data.read_csv(path, filesystem=fs)
    elif pairs_uri.endswith(".parquet") or not pairs_uri.rsplit("/", 1)[-1].count("."):
        ds = ray.data.read_parquet(path, filesystem=fs)
    else:
        raise InputError(f"{pairs_uri}: caption pairs must be .jsonl, .csv or .parquet")
    columns = ds.columns()
    missing = [c for c in (image_column, caption_column) if c not in columns]
    if missing:
        raise InputError(f"{pairs_uri}: missing column(s) {missing}; found {columns}")
    return ds.map_batches(
        _caption_batch,
        batch_format="pyarrow",
        fn_kwargs={
            "image_column": image_column,
            "caption_column": caption_column,
            "id_column": id_column if id_column in columns else None,
            "seed": seed,
            "source": source,
        },
    )
