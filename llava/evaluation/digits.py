"""Held-out accuracy on the digits data set: ask each eval image its digit, compare the bare answer.

The questions are the eval split's first human turns and the references its gpt turns; they are
answered by the same distributed batch inference as `llava-ray infer` (llava.inference.batch).
"""

from __future__ import annotations

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
