"""Read back what the tracking backends wrote, with each library's own reader (no network).

- TensorBoard: tensorboard's EventAccumulator over the event files.
- MLflow: MlflowClient on the same tracking URI.
- W&B offline: the records of `offline-run-*/run-<id>.wandb`. Those files are a LevelDB-style log
  (a 7-byte header ":W&B" + key + version, then 32 KiB blocks of records: crc32, length (2 bytes,
  little-endian), type (1 full, 2 first, 3 middle, 4 last) and the bytes of a protobuf
  `wandb_internal_pb2.Record`); wandb 0.31 ships no Python reader for them, so this is one.
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def tensorboard_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def tensorboard_texts(log_dir: str) -> dict[str, list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag.removesuffix("/text_summary"): [
            (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(tag)
        ]
        for tag in acc.Tags()["tensors"]
    }


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # the rest of a block too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_offline_run(directory: str, run_id: str) -> dict:
    """Every offline segment of one run id, merged: {history: {key: {step: value}}, config, summary}."""
    history: dict[str, dict[int, float]] = {}
    config: dict = {}
    summary: dict = {}
    files = sorted(Path(directory).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files, f"no offline W&B run {run_id} under {directory}"
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                step = record.history.step.num
                for key, value in items.items():
                    if not key.startswith("_"):
                        history.setdefault(key, {})[step] = value
            elif kind == "config":
                for i in record.config.update:
                    config[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
            elif kind == "summary":
                for i in record.summary.update:
                    summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return {"history": history, "config": config, "summary": summary, "segments": len(files)}
