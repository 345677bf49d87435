"""The GPT-assisted generation job: symbolic contexts -> teacher requests on Ray Data -> LLaVA data.

One request per (image, type). Requests run in a Ray Data actor pool (`actors` actors, each
with `endpoint.concurrency` requests in flight and its share of the requests-per-minute cap)
through llava.chat_client (timeouts, retries with backoff on 429/5xx). Every finished batch is
written at once to `out/parts/` (JSONL), so a crash loses at most the requests in flight, and a
re-run skips every (image, type) already answered or rejected: no duplicate requests. Requests
that failed for good (retries exhausted) are not recorded and are asked again by the next run.

At the end the parts become `out/llava.json` (LLaVA JSON, for interoperability), the project's
parquet under `out/parquet` (images inline, through the normal ingestion) and `out/summary.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import ray

from llava import storage
from llava.chat_client import ChatClient, EndpointConfig
from llava.instruct.context import load_contexts
from llava.instruct.parse import Unparsable, to_conversation
from llava.instruct.prompts import TYPES, detail_questions, teacher_messages
from llava.progress import Progress

log = logging.getLogger(__name__)

# The paper's LLaVA-Instruct-158K mixture: 58K conversations, 23K detailed descriptions, 77K complex reasoning.
MIXTURES = {"llava158k": {"conversation": 58, "detail": 23, "complex": 77}}


@dataclass
class GenerateConfig:
    captions: str = ""  # COCO captions JSON (local or s3://)
    instances: Optional[str] = None  # COCO instances JSON (boxes)
    images: str = ""  # image root the file names are relative to
    out: str = ""
    types: list[str] = field(default_factory=lambda: list(TYPES))
    mixture: Optional[str] = None  # e.g. llava158k: each image gets one type, drawn in these proportions
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    max_images: int = 0  # 0 = all
    actors: int = 2
    seed: int = 0


def request_plan(config: GenerateConfig) -> list[dict]:
    """Every (image, type) request of the run, in a fixed order."""
    unknown = set(config.types) - set(TYPES)
    if unknown:
        raise ValueError(f"unknown types {sorted(unknown)}; choose from {TYPES}")
    contexts = load_contexts(config.captions, config.instances)
    contexts = contexts[: config.max_images] if config.max_images else contexts
    plan = []
    for c in contexts:
        if config.mixture:
            weights = MIXTURES[config.mixture]
            kinds = random.Random(f"{config.seed}-{c.image_id}").choices(list(weights), list(weights.values()))
        else:
            kinds = config.types
        plan += [
            {
                "key": f"{c.image_id}-{kind}",
                "image_id": c.image_id,
                "file_name": c.file_name,
                "kind": kind,
                "context": c.text(),
            }
            for kind in kinds
        ]
    return plan


class TeacherCaller:
    """Ray Data actor: asks the teacher for a batch of requests and writes the results to out/parts/ at once."""

    def __init__(self, endpoint: dict, out: str, seed: int, rpm_share: float):
        self.client = ChatClient(EndpointConfig(**{**endpoint, "requests_per_minute": rpm_share}))
        self.model, self.concurrency = endpoint["model"], max(1, endpoint["concurrency"])
        self.out, self.seed, self.questions = out, seed, detail_questions()

    def _one(self, row: dict) -> Optional[dict]:
        result = {k: row[k] for k in ("key", "image_id", "file_name", "kind")}
        try:
            text = self.client.complete(teacher_messages(row["kind"], row["context"]))
        except Exception as error:  # retries exhausted (openai.APIError, timeouts): asked again next run
            log.warning("request %s failed for good: %s", row["key"], error)
            return {
                **result,
                "conversations": None,
                "failure": f"request_failed: {type(error).__name__}",
                "done": False,
            }
        try:
            turns = to_conversation(row["kind"], text, random.Random(f"{self.seed}-{row['key']}"), self.questions)
            return {**result, "conversations": json.dumps(turns), "failure": None, "model": self.model, "done": True}
        except Unparsable as error:
            log.warning("response for %s dropped (%s): %r", row["key"], error.reason, text[:200])
            return {**result, "conversations": None, "failure": f"unparsable_{error.reason}", "done": True}

    def __call__(self, batch: pa.Table) -> pa.Table:
        with ThreadPoolExecutor(self.concurrency) as pool:
            results = list(pool.map(self._one, batch.to_pylist()))
        done = [r for r in results if r["done"]]
        if done:
            storage.write_text(
                storage.join(self.out, "parts", f"part-{uuid.uuid4().hex}.jsonl"),
                "".join(json.dumps(r) + "\n" for r in done),
            )
        return pa.Table.from_pylist(
            [{"key": r["key"], "failure": r["failure"]} for r in results],
            schema=pa.schema([("key", pa.string()), ("failure", pa.string())]),
        )


def finished_results(out: str) -> dict[str, dict]:
    """Every recorded result under out/parts/, by request key."""
    try:
        uris = storage.list_files(storage.join(out, "parts"), suffix=".jsonl")
    except (FileNotFoundError, storage.StorageError):
        return {}
    results = {}
    for uri in uris:
        for line in storage.read_text(uri).splitlines():
            if line.strip():
                r = json.loads(line)
                results[r["key"]] = r
    return results


def generate(config: GenerateConfig) -> dict:
    plan = request_plan(config)
    done = finished_results(config.out)
    todo = [r for r in plan if r["key"] not in done]
    log.info(
        "generate: %d requests planned, %d already done in %s, asking %s (%s) for %d",
        len(plan),
        len(plan) - len(todo),
        config.out,
        config.endpoint.url,
        config.endpoint.model,
        len(todo),
    )
    lost = Counter()
    if todo:
        endpoint = {k: getattr(config.endpoint, k) for k in EndpointConfig.__dataclass_fields__}
        actors = max(1, min(config.actors, len(todo)))
        answered = ray.data.from_items(todo).repartition(target_num_rows_per_block=max(1, config.endpoint.concurrency))
        answered = answered.map_batches(
            TeacherCaller,
            batch_format="pyarrow",
            batch_size=max(1, config.endpoint.concurrency),
            fn_constructor_kwargs={
                "endpoint": endpoint,
                "out": config.out,
                "seed": config.seed,
                "rpm_share": config.endpoint.requests_per_minute / actors,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=0.5,
        )
        failed = 0
        with Progress("generate", len(todo), "requests", logger=log) as progress:  # a bar on a terminal
            for row in answered.iter_rows():
                failed += bool(row["failure"])
                if row["failure"] and row["failure"].startswith("request_failed"):
                    lost[row["failure"]] += 1
                progress.update(1, failed=failed)
        done = finished_results(config.out)
    return write_outputs(config, plan, done, lost)


def _previous_summary(out: str) -> dict:
    uri = storage.join(out, "summary.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


def write_outputs(config: GenerateConfig, plan: list[dict], done: dict[str, dict], lost: Counter) -> dict:
    from llava.data.prepare import prepare_llava_json

    keys = [r["key"] for r in plan]
    kept = [done[k] for k in keys if k in done and done[k]["conversations"]]
    records = [
        {
            "id": r["key"],
            "image": r["file_name"],
            "conversations": json.loads(r["conversations"]),
            "type": r["kind"],
            "teacher": r["model"],
        }
        for r in kept
    ]
    text = json.dumps(records, indent=1)
    digest = hashlib.sha256((config.images + "\n" + text).encode()).hexdigest()  # what the parquet is built from
    storage.write_text(storage.join(config.out, "llava.json"), text)
    failures = Counter(done[k]["failure"] for k in keys if k in done and done[k]["failure"]) + lost
    summary = {
        "planned": len(plan),
        "kept": len(kept),
        "by_type": dict(Counter(r["type"] for r in records)),
        "failures": dict(failures),
        "not_done": len(plan) - sum(k in done for k in keys),
        "json": storage.join(config.out, "llava.json"),
        "parquet": storage.join(config.out, "parquet"),
    }
    previous = _previous_summary(config.out)
    if records and previous.get("json_sha256") == digest and storage.exists(summary["parquet"]):
        log.info("generate: the kept rows are those the parquet in %s was built from; not rebuilt", summary["parquet"])
        summary["parquet_rows"], summary["parquet_skipped"] = previous["parquet_rows"], previous["parquet_skipped"]
    elif records:
        # rebuilt from all parts and published as a whole (the previous version stays readable until then)
        manifest = prepare_llava_json(
            summary["json"], config.images, summary["parquet"], source="generated", overwrite=True
        )
        summary["parquet_rows"], summary["parquet_skipped"] = manifest.rows, manifest.skipped
    elif storage.exists(summary["parquet"]):
        storage.remove(summary["parquet"])  # nothing kept: no stale parquet
    summary["json_sha256"] = digest
    storage.write_text(storage.join(config.out, "summary.json"), json.dumps(summary, indent=2))
    log.info(
        "generate: kept %d of %d requests %s, failures %s; LLaVA JSON %s, parquet %s",
        len(kept),
        len(plan),
        summary["by_type"],
        dict(failures) or "none",
        summary["json"],
        summary["parquet"],
    )
    return summary
