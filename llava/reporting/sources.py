"""What a report shows, read from a training run dir (output.json + metrics.jsonl) or a pipeline root
(pipeline.json: base-model pretraining histories, both training stages, the eval stage's predictions)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from llava import storage
from llava.data.schema import shard_uris

PIPELINE_MANIFEST = "pipeline.json"
RUN_OUTPUT = "output.json"


@dataclass
class Series:
    """One stage's per-step metrics (rows of {"step", "loss", "lr", "tokens_per_s", ...})."""

    name: str
    rows: list[dict]

    def values(self, key: str) -> tuple[list[float], list[float]]:
        picked = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None and "step" in r]
        return [s for s, _ in picked], [v for _, v in picked]


@dataclass
class ReportData:
    root: str
    kind: str  # pipeline | run
    series: list[Series] = field(default_factory=list)
    accuracies: dict[str, float] = field(default_factory=dict)  # metric name -> value in [0, 1]
    predictions: list[dict] = field(default_factory=list)  # {"id", "answer", "reference"} of the held-out eval
    images: dict[str, bytes] = field(default_factory=dict)  # id -> image bytes of the predictions' rows
    facts: dict[str, object] = field(default_factory=dict)  # numbers shown as a table on the page


def _jsonl(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def run_series(run_dir: str, name: str) -> Series:
    return Series(name, [m for m in _jsonl(storage.join(run_dir, "metrics.jsonl")) if "step" in m])


def dataset_images(dataset_uri: str, ids: set[str]) -> dict[str, bytes]:
    """id -> first image bytes, for the rows of a prepared dataset whose id is in `ids`."""
    found = {}
    for shard in shard_uris(dataset_uri):
        fs, path = storage.filesystem(shard)
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["id", "images"])
        for row_id, images in zip(table.column("id").to_pylist(), table.column("images").to_pylist()):
            if row_id in ids and images:
                found[row_id] = images[0]
    return found


def _pipeline(root: str) -> ReportData:
    stages = json.loads(storage.read_text(storage.join(root, PIPELINE_MANIFEST)))["stages"]
    data = ReportData(root, "pipeline")
    base = stages.get("base", {}).get("outputs", {}).get("base_models", {})
    for label, path in (("base: CLIP", base.get("vision_tower")), ("base: LM", base.get("llm"))):
        if path and storage.exists(storage.join(path, "pretrain.json")):
            record = json.loads(storage.read_text(storage.join(path, "pretrain.json")))
            data.series.append(Series(label, record["metrics"].get("history", [])))
            data.facts.update({f"{label} {k}": v for k, v in record["metrics"].items() if k != "history"})
    for name in ("stage1", "stage2"):
        run_dir = stages.get(name, {}).get("outputs", {}).get("run_dir")
        if run_dir:
            data.series.append(run_series(run_dir, name))
            data.facts.update({f"{name} {k}": v for k, v in stages[name].get("metrics", {}).items()})
    evaluated = stages.get("eval", {})
    for metric, values in evaluated.get("metrics", {}).items():
        if isinstance(values, dict) and isinstance(values.get("accuracy"), (int, float)):
            data.accuracies[metric] = values["accuracy"]
    predictions = evaluated.get("outputs", {}).get("heldout_predictions")
    if predictions:
        data.predictions = _jsonl(predictions)
        eval_data = stages.get("prepare", {}).get("outputs", {}).get("data", {}).get("eval")
        if eval_data:
            data.images = dataset_images(eval_data, {p["id"] for p in data.predictions})
    return data


def collect(root: str) -> ReportData:
    """A pipeline root (has pipeline.json) or one training run dir (has output.json / metrics.jsonl)."""
    if storage.exists(storage.join(root, PIPELINE_MANIFEST)):
        return _pipeline(root)
    if storage.exists(storage.join(root, "metrics.jsonl")):
        data = ReportData(root, "run", [run_series(root, root.rstrip("/").rsplit("/", 1)[-1])])
        if storage.exists(storage.join(root, RUN_OUTPUT)):
            output = json.loads(storage.read_text(storage.join(root, RUN_OUTPUT)))
            data.facts.update({k: output[k] for k in ("steps", "model") if k in output})
        return data
    raise FileNotFoundError(f"{root}: neither a pipeline root ({PIPELINE_MANIFEST}) nor a run dir (metrics.jsonl)")
