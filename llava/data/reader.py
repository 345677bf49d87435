"""Parquet shards -> model-ready rows (Ray Data) -> padded batches grouped by length.

`model_ready_dataset` is what training and evaluation call: it reads the shards (local
or s3://, only the needed columns), cuts them into blocks of a few dozen rows so that the
preprocessing runs as many parallel Ray Data `map_batches` tasks (one shard row group would
otherwise be one task), and in those tasks decodes and preprocesses each image and renders
the conversation into `input_ids` / `labels` with the core library (llava.image_processing,
llava.tokenization). Rows that cannot be used are dropped and counted by reason, like
ingestion does.

Images travel as uint8 (the squared, resized image before normalisation, 4x smaller than
float32) together with the mean/std to normalise them with; `collate` normalises a whole
batch at once, with the same float32 arithmetic as `load_pixel_values`, so the result is
identical to it.

`LengthGroupedBatcher` then forms batches that waste little compute on padding: it sorts
a window of rows by (modality, length), cuts batches and shuffles their order, like the
official `group_by_modality_length` sampler.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from llava import storage
from llava.config import ModelConfig, config_from_dict, config_to_dict
from llava.data.ingest import skip_reason
from llava.data.schema import shard_uris
from llava.image_processing import ImageError, load_pixels_uint8, normalise_pixels
from llava.ray_runtime import uninterruptible
from llava.templates import SampleRejected
from llava.tokenization import IGNORE_INDEX, load_tokenizer, prepare_tokenizer, tokenize_conversation

if TYPE_CHECKING:
    import torch

READY_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        # uint8 (num_images, 3, S, S), C order, NOT normalised: normalise with pixel_mean/pixel_std
        # (`row_pixel_values` or `collate` do it). Empty for text-only rows.
        ("pixels_uint8", pa.large_binary()),
        ("pixel_mean", pa.list_(pa.float32(), 3)),  # ImageConfig.mean the pixels are to be normalised with
        ("pixel_std", pa.list_(pa.float32(), 3)),  # ImageConfig.std
        ("num_images", pa.int32()),
        ("length", pa.int32()),
    ]
)

ROWS_PER_BLOCK = 256  # default rows per Ray Data block, i.e. per preprocessing task
OUTPUT_BLOCK_BYTES = 8 << 20  # a preprocessing task hands its rows on in blocks of about this size


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, template: str):
    return prepare_tokenizer(load_tokenizer(path), template)


@functools.lru_cache(maxsize=8)
def _ready_config(config_json: str) -> ModelConfig:
    """The ModelConfig for a config dict, built (OmegaConf, ~10 ms) once per worker process."""
    return config_from_dict(ModelConfig, json.loads(config_json))


def _list_array(lists: list[list[int]]) -> pa.Array:
    """list<int32> array straight from Python lists (one flat buffer + offsets)."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _binary_array(chunks: list[np.ndarray]) -> pa.Array:
    """large_binary array whose i-th value is the bytes of chunks[i], built with one concatenation."""
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([c.nbytes for c in chunks], out=offsets[1:])
    data = np.concatenate([c.reshape(-1) for c in chunks]) if offsets[-1] else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(pa.large_binary(), len(chunks), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def make_model_ready(batch: pa.Table, model_config: dict, num_image_tokens: int, counter=None) -> pa.Table:
    """Ray Data map_batches function: stored rows -> READY_SCHEMA rows; bad rows dropped and counted."""
    config = _ready_config(json.dumps(model_config, sort_keys=True))
    tokenizer = uninterruptible(_tokenizer, config.tokenizer_path, config.template)  # a cancel cannot break its imports
    ids, input_ids, labels, pixels, num_images = [], [], [], [], []
    skipped, examples = Counter(), []
    no_pixels = np.zeros(0, np.uint8)
    columns = zip(
        batch.column("id").to_pylist(), batch.column("images").to_pylist(), batch.column("conversations").to_pylist()
    )
    for row_id, images, conversations in columns:
        images = images or []
        try:
            sample = tokenize_conversation(
                json.loads(conversations),
                tokenizer,
                config.template,
                num_image_tokens,
                config.max_length,
                len(images),
                config.image_placement,
            )
            row_pixels = [load_pixels_uint8(data, config.image) for data in images[: sample.num_images]]
        except (SampleRejected, ImageError) as error:
            reason = skip_reason(error)
            skipped[reason] += 1
            examples.append((reason, f"id={row_id!r}: {error}"))
            continue
        ids.append(row_id)
        input_ids.append(sample.input_ids)
        labels.append(sample.labels)
        pixels.append(np.stack(row_pixels) if row_pixels else no_pixels)
        num_images.append(sample.num_images)
    if counter is not None and skipped:
        ray.get(counter.add.remote(dict(skipped), examples))
    n = len(ids)
    norm_type = READY_SCHEMA.field("pixel_mean").type
    mean = pa.FixedSizeListArray.from_arrays(pa.array(np.tile(np.asarray(config.image.mean, np.float32), n)), 3)
    std = pa.FixedSizeListArray.from_arrays(pa.array(np.tile(np.asarray(config.image.std, np.float32), n)), 3)
    assert mean.type == norm_type
    arrays = [
        pa.array(ids, pa.string()),
        _list_array(input_ids),
        _list_array(labels),
        _binary_array(pixels),
        mean,
        std,
        pa.array(num_images, pa.int32()),
        pa.array([len(x) for x in input_ids], pa.int32()),
    ]
    return pa.Table.from_arrays(arrays, schema=READY_SCHEMA)


def expand_dataset_uris(uris: Iterable[str]) -> list[str]:
    """Dataset directories and/or shard URIs -> shard URIs."""
    shards: list[str] = []
    for uri in uris:
        shards += [uri] if uri.endswith(".parquet") else shard_uris(uri)
    return shards


SOURCE_COLUMNS = ["id", "images", "conversations"]


def read_shards(batch: pa.Table, filesystem, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """Ray Data map_batches function: a batch of shard paths -> their rows (only `columns`), `rows` at a time."""
    for path in batch.column("path").to_pylist():
        with filesystem.open_input_file(path) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=columns):
                yield pa.Table.from_batches([record_batch])


def model_ready_dataset(
    uris: Iterable[str],
    model_config: ModelConfig,
    num_image_tokens: int,
    counter=None,
    batch_size: int = 32,
    rows_per_block: Optional[int] = None,
) -> ray.data.Dataset:
    """A Ray Dataset of model-ready rows (READY_SCHEMA) from parquet datasets or shards.

    Plan: one read task per shard (`read_shards`, only the needed columns) -> blocks of
    `rows_per_block` rows (default max(batch_size, ROWS_PER_BLOCK)) -> `make_model_ready`, one
    `map_batches` task per block, called on `batch_size` rows at a time, its output handed on
    in blocks of about OUTPUT_BLOCK_BYTES. Ray Data runs one task per block, and a shard is
    often a single parquet row group read as one block: without the re-cut one task would do
    a whole shard's preprocessing on one core.

    The shards are read with pyarrow in plain tasks rather than `ray.data.read_parquet`: in
    Ray 2.60 every read_parquet execution first lists the files through 32 freshly started
    footer-reader actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), i.e. 32 new worker processes
    per epoch, which took seconds of CPU and wall time per epoch on a small machine.
    """
    shards = expand_dataset_uris(uris)
    fs, _ = storage.filesystem(shards[0])
    paths = [storage.filesystem(s)[1] for s in shards]
    rows = rows_per_block or max(batch_size, ROWS_PER_BLOCK)
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(
        read_shards,
        batch_format="pyarrow",
        batch_size=1,
        fn_kwargs={"filesystem": fs, "columns": SOURCE_COLUMNS, "rows": rows},
    )
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds = ds.map_batches(
        make_model_ready,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={
            "model_config": config_to_dict(model_config),
            "num_image_tokens": num_image_tokens,
            "counter": counter,
        },
    )
    # Settings on this dataset's own DataContext (a copy; the process-wide one is untouched):
    # - small output blocks stream a task's first rows out long before the task ends, so big
    #   blocks (few task dispatches, each of which leaves a CPU idle ~0.1-0.2 s) cost no latency;
    # - no per-operator CPU reservation: with it, on a small cluster the preprocessing waited
    #   for the whole first shard to be read before it used the second CPU.
    ds.context.target_max_block_size = min(ds.context.target_max_block_size or OUTPUT_BLOCK_BYTES, OUTPUT_BLOCK_BYTES)
    ds.context.op_resource_reservation_enabled = False
    return ds


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 where masked or padded
    attention_mask: torch.Tensor  # (B, L) long
    pixel_values: Optional[torch.Tensor]  # (total images in batch, 3, S, S) float32, normalised; or None
    real_tokens: int
    padded_tokens: int


def _row_uint8(row: dict, image_size: int) -> np.ndarray:
    count = int(row["num_images"])
    array = np.frombuffer(row["pixels_uint8"], dtype=np.uint8)
    if array.size != count * 3 * image_size * image_size:
        raise ValueError(
            f"row {row.get('id')!r}: {array.size} pixel bytes do not hold {count} image(s) of "
            f"3x{image_size}x{image_size}; is image_size the ImageConfig.size the rows were made with?"
        )
    return array.reshape(count, 3, image_size, image_size)


def row_pixel_values(row: dict, image_size: int) -> np.ndarray:
    """One model-ready row's images as float32 (num_images, 3, S, S), normalised: equal to `load_pixel_values`."""
    return normalise_pixels(_row_uint8(row, image_size), row["pixel_mean"], row["pixel_std"])


def collate(rows: list[dict], pad_token_id: int, image_size: int) -> Batch:
    """Right-pad a list of model-ready rows into tensors; images concatenated in row order.

    Pixels are normalised here, per row with the `pixel_mean` / `pixel_std` the row carries (the
    ImageConfig it was made with), so `pixel_values` equals `load_pixel_values` bit for bit.
    """
    import torch  # here, not at the top: the Data tasks that import this module never need torch

    lengths = [int(r["length"]) for r in rows]
    counts = [int(r["num_images"]) for r in rows]
    size, length = len(rows), max(lengths)
    input_ids = np.full((size, length), pad_token_id, dtype=np.int64)
    labels = np.full((size, length), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((size, length), dtype=np.int64)
    total = sum(counts)
    pixels = np.empty((total, 3, image_size, image_size), dtype=np.float32) if total else None
    start = 0
    for i, row in enumerate(rows):
        n = lengths[i]
        input_ids[i, :n] = row["input_ids"]
        labels[i, :n] = row["labels"]
        attention[i, :n] = 1
        if counts[i]:
            stop = start + counts[i]
            normalise_pixels(_row_uint8(row, image_size), row["pixel_mean"], row["pixel_std"], out=pixels[start:stop])
            start = stop
    return Batch(
        [str(r["id"]) for r in rows],
        torch.from_numpy(input_ids),
        torch.from_numpy(labels),
        torch.from_numpy(attention),
        None if pixels is None else torch.from_numpy(pixels),
        sum(lengths),
        size * length,
    )


class LengthGroupedBatcher:
    """Rows -> batches of similar length and modality (official `group_by_modality_length`).

    Rows are gathered in windows, sorted by (has image, length), cut into batches whose order
    is then shuffled. Windows hold `window_batches` batches, except the first ones: they start
    at `first_window_batches` and double, so the first batch is ready after a few batches' worth
    of rows instead of a whole window (the padding cost is in those few small windows only).
    Deterministic for a given (seed, epoch) and input order. Tracks the padding fraction.
    Batches come from `collate` (float32 normalised pixels; see there).
    """

    def __init__(
        self,
        batch_size: int,
        pad_token_id: int,
        image_size: int,
        window_batches: int = 16,
        seed: int = 0,
        group_by_length: bool = True,
        first_window_batches: int = 2,
    ):
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.image_size = image_size
        self.window = batch_size * window_batches
        self.first_window = batch_size * max(1, min(first_window_batches, window_batches))
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
        size = self.first_window
        for row in rows:
            window.append(row)
            if len(window) == size:
                yield from self._emit(window, rng)
                window = []
                size = min(2 * size, self.window)
        if window:
            yield from self._emit(window, rng)
