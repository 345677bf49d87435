"""Parquet shards -> model-ready rows (Ray Data) -> padded batches grouped by length.

`model_ready_dataset` is what training and evaluation call: it reads the shards (local
or s3://, only the needed columns) and, in Ray Data `map_batches` tasks, decodes and
preprocesses each image and renders the conversation into `input_ids` / `labels` with the
core library (llava.image_processing, llava.tokenization). Rows that cannot be used are
dropped and counted by reason, like ingestion does.

`LengthGroupedBatcher` then forms batches that waste little compute on padding: it sorts
a window of rows by (modality, length), cuts batches and shuffles their order, like the
official `group_by_modality_length` sampler.
"""

from __future__ import annotations

import functools
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import ray
import torch

from llava import storage
from llava.config import ModelConfig, config_from_dict, config_to_dict
from llava.data.ingest import skip_reason
from llava.data.schema import shard_uris
from llava.image_processing import ImageError, load_pixel_values
from llava.templates import SampleRejected
from llava.tokenization import IGNORE_INDEX, prepare_tokenizer, tokenize_conversation

READY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("pixel_values", pa.binary()),  # float32 (num_images, 3, S, S), C order
        ("num_images", pa.int32()),
        ("length", pa.int32()),
    ]
)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, template: str):
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(path), template)


def make_model_ready(batch: pa.Table, model_config: dict, num_image_tokens: int, counter=None) -> pa.Table:
    """Ray Data map_batches function: stored rows -> READY_SCHEMA rows; bad rows dropped and counted."""
    config = config_from_dict(ModelConfig, model_config)
    tokenizer = _tokenizer(config.tokenizer_path, config.template)
    out, skipped, examples = [], Counter(), []
    for row in batch.to_pylist():
        images = row.get("images") or []
        try:
            sample = tokenize_conversation(
                json.loads(row["conversations"]), tokenizer, config.template, num_image_tokens, config.max_length, len(images)
            )
            pixels = [load_pixel_values(data, config.image) for data in images[: sample.num_images]]
        except (SampleRejected, ImageError) as error:
            reason = skip_reason(error)
            skipped[reason] += 1
            examples.append((reason, f"id={row.get('id')!r}: {error}"))
            continue
        pixel_bytes = np.stack(pixels).astype(np.float32).tobytes() if pixels else b""
        out.append({"id": row["id"], "input_ids": sample.input_ids, "labels": sample.labels, "pixel_values": pixel_bytes,
                    "num_images": sample.num_images, "length": len(sample.input_ids)})
    if counter is not None and skipped:
        ray.get(counter.add.remote(dict(skipped), examples))
    return pa.Table.from_pylist(out, schema=READY_SCHEMA)


def expand_dataset_uris(uris: Iterable[str]) -> list[str]:
    """Dataset directories and/or shard URIs -> shard URIs."""
    shards: list[str] = []
    for uri in uris:
        shards += [uri] if uri.endswith(".parquet") else shard_uris(uri)
    return shards


def model_ready_dataset(
    uris: Iterable[str], model_config: ModelConfig, num_image_tokens: int, counter=None, batch_size: int = 32
) -> ray.data.Dataset:
    """A Ray Dataset of model-ready rows (READY_SCHEMA) from parquet datasets or shards."""
    shards = expand_dataset_uris(uris)
    fs, _ = storage.filesystem(shards[0])
    ds = ray.data.read_parquet([storage.filesystem(s)[1] for s in shards], filesystem=fs, columns=["id", "images", "conversations"])
    return ds.map_batches(
        make_model_ready,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={"model_config": config_to_dict(model_config), "num_image_tokens": num_image_tokens, "counter": counter},
    )


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 where masked or padded
    attention_mask: torch.Tensor  # (B, L) long
    pixel_values: Optional[torch.Tensor]  # (total images in batch, 3, S, S) or None
    real_tokens: int
    padded_tokens: int


def collate(rows: list[dict], pad_token_id: int, image_size: int) -> Batch:
    """Right-pad a list of model-ready rows into tensors; images concatenated in row order."""
    length = max(int(r["length"]) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    pixels = []
    for i, row in enumerate(rows):
        n = int(row["length"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.as_tensor(np.asarray(row["labels"], dtype=np.int64))
        attention[i, :n] = 1
        if row["num_images"]:
            array = np.frombuffer(row["pixel_values"], dtype=np.float32).reshape(int(row["num_images"]), 3, image_size, image_size)
            pixels.append(torch.from_numpy(array.copy()))
    real = int(attention.sum())
    return Batch([str(r["id"]) for r in rows], input_ids, labels, attention, torch.cat(pixels) if pixels else None,
                 real, len(rows) * length)


class LengthGroupedBatcher:
    """Rows -> batches of similar length and modality (official `group_by_modality_length`).

    Deterministic for a given (seed, epoch) and input order. Tracks the padding fraction.
    """

    def __init__(self, batch_size: int, pad_token_id: int, image_size: int, window_batches: int = 16,
                 seed: int = 0, group_by_length: bool = True):
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.image_size = image_size
        self.window = batch_size * window_batches
        self.seed = seed
        self.group_by_length = group_by_length
        self.real_tokens = 0
        self.padded_tokens = 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def _emit(self, window: list[dict], rng: random.Random) -> Iterator[Batch]:
        if self.group_by_length:
            window = sorted(window, key=lambda r: (int(r["num_images"]) > 0, int(r["length"])))
        batches = [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        if self.group_by_length:
            rng.shuffle(batches)
        for rows in batches:
            batch = collate(rows, self.pad_token_id, self.image_size)
            self.real_tokens += batch.real_tokens
            self.padded_tokens += batch.padded_tokens
            yield batch

    def batches(self, rows: Iterable[dict], epoch: int = 0) -> Iterator[Batch]:
        rng = random.Random(f"{self.seed}:{epoch}")
        window: list[dict] = []
        for row in rows:
            window.append(row)
            if len(window) == self.window:
                yield from self._emit(window, rng)
                window = []
        if window:
            yield from self._emit(window, rng)
