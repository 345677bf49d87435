"""Distributed batch inference: questions -> greedy answers on a Ray Data actor pool.

Each actor loads the model once (`GreedyAnswerer.__init__`) and answers `batch_size` questions
per batch with `llava.decoding.greedy_decode`: the batched decoder the serving engine runs,
at temperature 0. A question that cannot be answered (image missing or undecodable, too
many/few images, prompt over the context) becomes an error row with a reason code; it never
fails the job. The driver streams the results, logs progress, writes
`predictions.jsonl` (in input order) and `summary.json` under `out`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import ray

from llava import storage
from llava.image_processing import ImageError
from llava.inference.questions import question_dataset, question_images
from llava.progress import Progress
from llava.templates import SampleRejected
from llava.tokenization import PromptTooLong

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
ANSWER_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
        ("error", pa.string()),
        ("error_reason", pa.string()),
        ("reference", pa.string()),
        ("meta", pa.string()),
    ]
)


@dataclass
class InferConfig:
    model: str = (
        ""  # llava-ray checkpoint, training run dir, HF export, llava-hf or official LLaVA checkpoint (local or s3://)
    )
    template: Optional[str] = (
        None  # conversation template for a checkpoint that records none (official LLaVA: vicuna_v1)
    )
    questions: str = ""  # JSONL file or parquet file/dataset (local or s3://)
    out: str = ""  # output dir: predictions.jsonl + summary.json
    images: Optional[str] = None  # root for relative image paths (default: the questions file's dir)
    allow_images_outside_root: bool = False  # follow absolute / `..` / other-bucket image paths (default: refuse)
    max_image_bytes: int = 32 << 20  # larger image files become image_too_large error rows
    max_new_tokens: int = 128
    batch_size: int = 8  # questions per forward pass inside an actor
    actors: int = 0  # model replicas; 0 = one per GPU if the cluster has GPUs, else 2
    gpus_per_actor: float = -1  # -1 = 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1
    log_every_s: float = 10


@dataclass
class InferResult:
    out: str
    predictions: str
    total: int
    answered: int
    errors: dict[str, int] = field(default_factory=dict)


def error_reason(error: Exception) -> str:
    if isinstance(error, ImageError):
        return f"image_{error.reason}"
    if isinstance(error, SampleRejected):
        return error.reason
    if isinstance(error, PromptTooLong):
        return "prompt_too_long"
    return "image_missing"  # FileNotFoundError / StorageError while fetching an image


class GreedyAnswerer:
    """Ray Data actor: one model per actor, `batch_size` questions per forward pass."""

    def __init__(
        self,
        model_uri: str,
        max_new_tokens: int,
        batch_size: int,
        max_image_bytes: int = 32 << 20,
        template: Optional[str] = None,
    ):
        from transformers.utils import logging as hf_logging

        from llava.model_loading import load_model

        hf_logging.disable_progress_bar()
        self.model = load_model(model_uri, template=template)  # GPU + bf16 when present, else CPU + fp32
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.max_image_bytes = max_image_bytes

    def __call__(self, batch: pa.Table) -> pa.Table:
        from llava.decoding import greedy_decode
        from llava.generation import Prompt, encode_prompt

        rows = batch.to_pylist()
        encoded, answered = [], []
        for row in rows:
            row["answer"] = row["error"] = row["error_reason"] = None
            try:
                images = question_images(row, self.max_image_bytes)  # confined paths, capped reads
                encoded.append(encode_prompt(self.model, Prompt([{"from": "human", "value": row["prompt"]}], images)))
                answered.append(row)
            except (SampleRejected, ImageError, PromptTooLong, FileNotFoundError, storage.StorageError) as error:
                row["error"], row["error_reason"] = str(error), error_reason(error)
        for row, answer in zip(answered, greedy_decode(self.model, encoded, self.max_new_tokens, self.batch_size)):
            row["answer"] = answer
        return pa.Table.from_pylist([{k: r[k] for k in ANSWER_SCHEMA.names} for r in rows], schema=ANSWER_SCHEMA)


def _pool(config: InferConfig) -> tuple[int, float]:
    """(actors, GPUs per actor) from the config and the cluster."""
    gpus = ray.cluster_resources().get("GPU", 0)
    per_actor = config.gpus_per_actor if config.gpus_per_actor >= 0 else (1.0 if gpus else 0.0)
    actors = config.actors or (max(1, int(gpus // per_actor)) if per_actor else 2)
    return actors, per_actor


def answer_dataset(config: InferConfig, questions: ray.data.Dataset) -> ray.data.Dataset:
    actors, gpus = _pool(config)
    log.info(
        "answering with %d model actor(s) (%s GPU each), %d question(s) per forward pass",
        actors,
        gpus,
        config.batch_size,
    )
    # Blocks of a few forward passes each, so that every actor gets work even for a small file.
    questions = questions.repartition(target_num_rows_per_block=config.batch_size * 2)
    return questions.map_batches(
        GreedyAnswerer,
        fn_constructor_kwargs={
            "model_uri": config.model,
            "max_new_tokens": config.max_new_tokens,
            "batch_size": config.batch_size,
            "max_image_bytes": config.max_image_bytes,
            "template": config.template,
        },
        batch_format="pyarrow",
        batch_size=config.batch_size * 2,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=config.cpus_per_actor,
    )


def run_batch_inference(config: InferConfig, questions: Optional[ray.data.Dataset] = None) -> InferResult:
    """Answer every question; write predictions.jsonl (input order) and summary.json under config.out."""
    if not config.model or not config.out or (questions is None and not config.questions):
        raise ValueError("infer needs model, questions and out")
    if questions is None:
        questions = question_dataset(config.questions, config.images, config.allow_images_outside_root)
    total = questions.count()
    log.info("batch inference: %d question(s) from %s with %s", total, config.questions or "a dataset", config.model)
    results, errors = [], Counter()
    with Progress("infer", total, "questions", config.log_every_s, logger=log) as progress:  # bar on a terminal
        for row in answer_dataset(config, questions).iter_rows():
            results.append(row)
            if row["error_reason"]:
                errors[row["error_reason"]] += 1
            progress.update(1, errors=sum(errors.values()))
    results.sort(key=lambda r: r["index"])
    predictions = storage.join(config.out, PREDICTIONS_FILE)
    storage.write_text(
        predictions, "".join(json.dumps({k: v for k, v in r.items() if k != "index"}) + "\n" for r in results)
    )
    result = InferResult(config.out, predictions, total, total - sum(errors.values()), dict(errors))
    storage.write_text(storage.join(config.out, SUMMARY_FILE), json.dumps(result.__dict__, indent=2))
    for reason, count in sorted(errors.items()):
        example = next(r for r in results if r["error_reason"] == reason)
        log.warning("%d question(s) not answered (%s), e.g. id=%s: %s", count, reason, example["id"], example["error"])
    log.info("answered %d/%d question(s); predictions in %s", result.answered, total, predictions)
    return result


def read_predictions(out: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(out, PREDICTIONS_FILE)).splitlines() if line]
