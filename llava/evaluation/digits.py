"""Held-out accuracy on the digits data set: ask each eval image its digit, compare the bare answer.

The questions are the eval split's first human turns and the references its gpt turns; they are
answered by the same distributed batch inference as `llava-ray infer` (llava.inference.batch).
"""

from __future__ import annotations

import re

from llava.data.digits import WORDS
from llava.inference.batch import InferConfig, read_predictions, run_batch_inference


def heldout_accuracy(model_uri: str, dataset_uri: str, out: str, batch_size: int = 32) -> dict:
    """{"accuracy", "correct", "total", "predictions", "examples"}: greedy answer == the reference digit."""
    run_batch_inference(
        InferConfig(model=model_uri, questions=dataset_uri, out=out, max_new_tokens=4, batch_size=batch_size)
    )
    rows = read_predictions(out)
    correct = sum(r["answer"] is not None and r["answer"] == r["reference"].strip() for r in rows)
    examples = [{"id": r["id"], "answer": r["answer"], "reference": r["reference"]} for r in rows[:5]]
    return {
        "accuracy": correct / len(rows),
        "correct": correct,
        "total": len(rows),
        "predictions": f"{out}/predictions.jsonl",
        "examples": examples,
    }


def digits_named(text: str | None) -> set[int]:
    """The digits a text names, as words ("seven") or numerals ("7")."""
    words = re.findall(r"[a-z]+|[0-9]", (text or "").lower())
    return {WORDS.index(w) if w in WORDS else int(w) for w in words if w in WORDS or w.isdigit()}


def caption_accuracy(model_uri: str, dataset_uri: str, out: str, batch_size: int = 32) -> dict:
    """A stage-1 model's captions of the eval images: correct when a caption names the reference digit and no
    other. The eval split's questions go through the model's own template (stage 1's `plain` shows the image
    alone), so the model writes the caption it learned in stage 1."""
    run_batch_inference(
        InferConfig(model=model_uri, questions=dataset_uri, out=out, max_new_tokens=12, batch_size=batch_size)
    )
    rows = read_predictions(out)
    correct = sum(digits_named(r["answer"]) == {int(r["reference"].strip())} for r in rows)
    return {
        "accuracy": correct / len(rows),
        "correct": correct,
        "total": len(rows),
        "predictions": f"{out}/predictions.jsonl",
        "examples": [{"id": r["id"], "answer": r["answer"], "reference": r["reference"]} for r in rows[:5]],
    }
