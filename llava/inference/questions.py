"""Questions for batch inference: JSONL or parquet (local or s3://) -> one normalised row shape.

Every question becomes

    index        int64          position in the input (results are returned in this order)
    id           string
    prompt       string         the user's turn; `<image>` marks where images go (added in front,
                                LLaVA-style, when the text has none)
    images       list<binary>   image bytes inline, or
    image_refs   list<string>   image URIs (relative ones resolved against the images root)
    image_error  string | null  "image_outside_root: ..." when a reference leaves the images root;
                                the question then becomes an error row with that reason
    reference    string | null  a reference answer when the input has one
    meta         string         the input's other fields as JSON (carried to the predictions)

Accepted input fields (LLaVA's own question files use the second names):
- JSONL: `id` | `question_id`, `prompt` | `text`, `image` (a path) | `images` (paths),
  optional `reference` | `answer`; anything else goes to `meta`.
- parquet (a file, a shard directory or a dataset with a manifest): `id`, `prompt` or LLaVA
  `conversations` (the first human turn is the prompt, the following gpt turn the reference),
  `images` (list<binary>) or `image` (binary); other scalar columns go to `meta`.

Image paths are confined to the images root and their reads capped in bytes, like ingestion's
(llava.data.image_refs): an absolute path, a `..` out of the root or another bucket is refused
unless `allow_outside_root`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from llava import storage
from llava.data.image_refs import DEFAULT_MAX_IMAGE_BYTES, ImageAccess, ImageRefRejected
from llava.data.schema import shard_uris

QUESTION_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("images", pa.list_(pa.binary())),
        ("image_refs", pa.list_(pa.string())),
        ("reference", pa.string()),
        ("meta", pa.string()),
        ("image_error", pa.string()),
    ]
)
IMAGE_TOKEN = "<image>"
SHARD_STRIDE = 1 << 32  # parquet rows are indexed shard * SHARD_STRIDE + row


class QuestionsError(ValueError):
    """The questions input as a whole is unusable (wrong format, missing fields)."""


def with_image_markers(prompt: str, num_images: int) -> str:
    """LLaVA puts `<image>\\n` before the question when the text does not place the image itself."""
    return prompt if IMAGE_TOKEN in prompt or not num_images else f"{IMAGE_TOKEN}\n" * num_images + prompt


def _first(record: dict, *names: str) -> Any:
    return next((record.pop(n) for n in names if n in record), None)


def normalise_record(record: dict, index: int, access: ImageAccess) -> dict:
    """One JSONL/parquet record -> a QUESTION_SCHEMA row. Raises QuestionsError for a record with no id/prompt."""
    record = dict(record)
    qid = _first(record, "id", "question_id", "pid")
    conversations = record.pop("conversations", None)
    prompt = _first(record, "prompt", "text", "question")
    reference = _first(record, "reference", "answer")
    if prompt is None and conversations is not None:
        turns = json.loads(conversations) if isinstance(conversations, str) else conversations
        prompt = turns[0]["value"]
        reference = turns[1]["value"] if len(turns) > 1 else reference
    if qid is None or prompt is None:
        raise QuestionsError(f"question #{index} has no id or no prompt (fields: {sorted(record)})")
    images = _first(record, "images", "image")
    image_bytes, refs, image_error = [], [], None
    for item in [] if images is None else images if isinstance(images, list) else [images]:
        if isinstance(item, (bytes, bytearray)):
            image_bytes.append(bytes(item))
        elif isinstance(item, str):
            try:
                refs.append(access.resolve(item))
            except ImageRefRejected as error:
                refs.append(item)  # kept for the count of images; never read
                image_error = image_error or str(error)
    meta = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    return {
        "index": index,
        "id": str(qid),
        "prompt": with_image_markers(str(prompt), len(image_bytes) + len(refs)),
        "images": image_bytes or None,
        "image_refs": refs or None,
        "reference": None if reference is None else str(reference),
        "meta": json.dumps(meta, default=str),
        "image_error": image_error,
    }


def question_images(row: dict, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[bytes]:
    """One question row's images: inline bytes, or its (already confined) references read with a byte cap.
    Raises ImageRefRejected (image_outside_root / image_too_large) or a storage error for a missing file."""
    if row.get("image_error"):
        reason, _, message = row["image_error"].partition(": ")
        raise ImageRefRejected(reason, message)
    if row.get("images"):
        return list(row["images"])
    reader = ImageAccess(allow_outside_root=True, max_bytes=max_bytes)  # resolved and checked by normalise_record
    return [reader.read(ref) for ref in row.get("image_refs") or []]


def _jsonl_rows(uri: str, access: ImageAccess) -> list[dict]:
    rows = []
    for number, line in enumerate(storage.read_text(uri).splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise QuestionsError(f"{uri}: line {number + 1} is not JSON ({error})") from error
        if not isinstance(record, dict):
            raise QuestionsError(f"{uri}: line {number + 1} is not a JSON object")
        rows.append(normalise_record(record, len(rows), access))
    return rows


def read_question_shards(batch: pa.Table, access: ImageAccess) -> Iterator[pa.Table]:
    """Ray Data map_batches function: parquet shard paths -> QUESTION_SCHEMA rows."""
    for shard_no, uri in zip(batch.column("shard").to_pylist(), batch.column("uri").to_pylist()):
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
        rows = [normalise_record(r, shard_no * SHARD_STRIDE + i, access) for i, r in enumerate(table.to_pylist())]
        yield pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA)


def _access(uri: str, images_root: Optional[str], allow_outside_root: bool) -> ImageAccess:
    """Image paths resolve under `images_root`, default: the questions file's directory (or the dataset)."""
    if images_root is None:
        images_root = uri.rsplit("/", 1)[0] if uri.endswith((".jsonl", ".json", ".parquet")) else uri
    return ImageAccess(images_root, allow_outside_root)


def jsonl_questions(uri: str, images_root: Optional[str] = None, allow_images_outside_root: bool = False) -> list[dict]:
    """The QUESTION_SCHEMA rows of a JSONL question file (what `question_dataset` serves for one)."""
    return _jsonl_rows(str(uri), _access(str(uri), images_root, allow_images_outside_root))


def question_dataset(
    uri: str, images_root: Optional[str] = None, allow_images_outside_root: bool = False
) -> ray.data.Dataset:
    """A Ray Dataset of QUESTION_SCHEMA rows from a JSONL file or parquet file(s).

    Image paths resolve under `images_root` (default: the questions file's directory, or the
    parquet dataset directory); see llava.data.image_refs for what is refused.
    """
    uri = str(uri)
    access = _access(uri, images_root, allow_images_outside_root)
    if uri.endswith((".jsonl", ".json")):
        return ray.data.from_arrow(pa.Table.from_pylist(_jsonl_rows(uri, access), schema=QUESTION_SCHEMA))
    shards = [uri] if uri.endswith(".parquet") else shard_uris(uri)
    if not shards:
        raise QuestionsError(f"{uri}: no .jsonl file and no parquet shards found")
    items = [{"shard": i, "uri": s} for i, s in enumerate(shards)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_question_shards, batch_format="pyarrow", batch_size=1, fn_kwargs={"access": access}
    )
