"""Held-out accuracy on the digits data set: ask each eval image its digit, compare the bare answer."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from llava import storage
from llava.data.schema import shard_uris
from llava.generation import Prompt, greedy_answers


def read_eval_rows(dataset_uri: str) -> list[dict]:
    rows = []
    for shard in shard_uris(dataset_uri):
        fs, path = storage.filesystem(shard)
        with fs.open_input_file(path) as f:
            rows += pq.read_table(f, columns=["id", "images", "conversations"]).to_pylist()
    return rows


def heldout_accuracy(model, dataset_uri: str, batch_size: int = 32) -> dict:
    """{"accuracy", "correct", "total", "examples"}: greedy answer == the reference digit, exactly."""
    rows = read_eval_rows(dataset_uri)
    prompts, references = [], []
    for row in rows:
        turns = json.loads(row["conversations"])
        prompts.append(Prompt(turns[:1], list(row["images"] or [])))
        references.append(turns[1]["value"].strip())
    answers = greedy_answers(model, prompts, max_new_tokens=4, batch_size=batch_size)
    correct = sum(a == r for a, r in zip(answers, references))
    examples = [{"id": row["id"], "answer": a, "reference": r} for row, a, r in list(zip(rows, answers, references))[:5]]
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows), "examples": examples}
