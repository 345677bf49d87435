"""The embedded demo behind `llava-ray demo`: the whole recipe offline, no cluster, no cloud.

1. prepare the digits data set on a local Ray (stage1 / stage2 / eval parquet),
2. build tiny offline base models (random CLIP + Llama + BPE tokenizer),
3. stage 1 on Ray Train + DeepSpeed, 2 workers: projector only,
4. stage 2 from the stage-1 run: projector + LLM,
5. held-out accuracy by greedy decoding on a Ray Data actor pool (`llava-ray infer`),
6. export to stock transformers.
Re-running with the same --out resumes or reuses finished runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llava.data.prepare import prepare_digits
from llava.data.schema import Manifest
from llava.evaluation.digits import heldout_accuracy
from llava.export_hf import export_hf
from llava.model import LlavaModel
from llava.ray_runtime import init_ray
from llava.tiny_models import build_tiny_base_models
from llava.training.config import load_train_config
from llava.training.trainer import train

log = logging.getLogger(__name__)


def run_demo(out: str | Path, address: str | None = None, overrides: list[str] | None = None) -> dict:
    """Returns the summary printed as the demo's JSON line. `overrides` apply to both stages."""
    out = Path(out).absolute()
    data, runs = out / "data", out / "runs"
    init_ray(address)
    log.info("step 1/6: digits data set -> %s", data)
    if all((data / split / "_manifest.json").exists() for split in ("stage1", "stage2", "eval")):
        manifests = {split: Manifest.read(str(data / split)) for split in ("stage1", "stage2", "eval")}
    else:
        manifests = prepare_digits(str(data))

    log.info("step 2/6: tiny offline base models -> %s", out / "base")
    base = build_tiny_base_models(out / "base")

    log.info("step 3/6: stage 1 (projector only) -> %s", runs / "stage1")
    stage1 = train(load_train_config("pretrain", preset="demo", overrides=[
        f"model.vision_tower={base['vision_tower']}", f"model.llm={base['llm']}",
        f"data.train=[{data / 'stage1'}]", f"checkpoint.storage_path={runs}", *(overrides or [])]))

    log.info("step 4/6: stage 2 (projector + LLM) from %s -> %s", stage1.run_dir, runs / "stage2")
    stage2 = train(load_train_config("finetune", preset="demo", overrides=[
        f"init_from={stage1.run_dir}", f"data.train=[{data / 'stage2'}]", f"checkpoint.storage_path={runs}",
        *(overrides or [])]))

    log.info("step 5/6: held-out accuracy on %d digits (batch inference) -> %s", manifests["eval"].rows, out / "eval")
    accuracy = heldout_accuracy(stage2.model, str(data / "eval"), str(out / "eval"))
    log.info("held-out accuracy %.3f (%d/%d)", accuracy["accuracy"], accuracy["correct"], accuracy["total"])

    log.info("step 6/6: export to Hugging Face format -> %s", out / "export")
    export = export_hf(LlavaModel.from_pretrained(stage2.model), out / "export")
    return {
        "stage1_loss_start": round(stage1.metrics[0]["loss"], 4),
        "stage1_loss_end": round(stage1.metrics[-1]["loss"], 4),
        "stage2_loss_start": round(stage2.metrics[0]["loss"], 4),
        "stage2_loss_end": round(stage2.metrics[-1]["loss"], 4),
        "heldout_accuracy": round(accuracy["accuracy"], 4),
        "predictions": accuracy["predictions"],
        "stage1_run": stage1.run_dir,
        "checkpoint": stage2.model,
        "export": export.path,
        "data": {split: {"rows": m.rows, "skipped": m.skipped} for split, m in manifests.items()},
    }
