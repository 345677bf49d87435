"""Run the embedded demo offline: digits -> tiny models -> stage 1 -> stage 2 (Ray Train + DeepSpeed) -> eval -> export.

It is `llava-ray pipeline` (jobs/pipeline_runner.py) on llava/presets/demo/pipeline.yaml with root=--out:
1. prepare: the digits data set on a local Ray (stage1 / stage2 / eval parquet); base: tiny base models pretrained
   offline as two Ray tasks (a contrastive CLIP on the training images and captions, a Llama on text),
2. stage 1 on Ray Train + DeepSpeed, 2 workers: projector only (vision tower and LLM frozen),
3. stage 2 from the stage-1 run: projector + LLM (vision tower frozen),
4. eval: held-out accuracy by greedy decoding on a Ray Data actor pool (`llava-ray infer`), and the stage-1
   model's captions of the held-out images (does it name the digit?),
5. export to stock transformers,
6. a report: plots of every stage and the held-out answers, <out>/report/index.html (`llava-ray report`).
Everything goes under --out, with the run manifest `<out>/pipeline.json`: re-running with the same --out
skips the stages already complete, resumes an interrupted one, and re-runs what the overrides changed.
Ends by printing one JSON line with the losses, the held-out accuracy and where the model went.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    parser.add_argument("--seed", type=int, default=0, help="seed of base-model pretraining and both stages")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides for both training stages (optim.max_steps=5); a key that starts with a pipeline "
        "section goes to that section only (base.clip.steps=50, stage2.optim.epochs=3, eval.heldout.batch_size=64)",
    )


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit

    emit(run_demo(args.out, args.address, args.overrides, args.seed))
    return 0


def demo_pipeline(out: str | Path, address: str | None = None, overrides: list[str] | None = None, seed: int = 0):
    """The demo's Pipeline; `overrides` (key=value on a training config) apply to both training stages, except those
    whose key starts with a pipeline section (base., stage1., eval., ...): those go to that section as they are."""
    from dataclasses import fields

    from jobs.pipeline_runner import DEMO_CONFIG, Pipeline, PipelineConfig, load_pipeline_config

    sections = {f.name for f in fields(PipelineConfig)}
    stages = []
    for override in overrides or []:
        if override.split("=", 1)[0].split(".", 1)[0] in sections:
            stages.append(override)
        else:
            stages += [f"stage1.{override}", f"stage2.{override}"]
    seeds = [f"base.seed={seed}", f"stage1.data.seed={seed}", f"stage2.data.seed={seed}"]
    return Pipeline(load_pipeline_config(DEMO_CONFIG, [f"root={Path(out).absolute()}", *seeds, *stages]), address)


def run_demo(out: str | Path, address: str | None = None, overrides: list[str] | None = None, seed: int = 0) -> dict:
    """Returns the summary printed as the demo's JSON line."""
    from llava.reporting.page import write_report

    pipeline = demo_pipeline(out, address, overrides, seed)
    records = pipeline.run()
    prepare, stage1, stage2 = records["prepare"], records["stage1"], records["stage2"]
    heldout = records["eval"].metrics["heldout"]
    captions = records["eval"].metrics.get("stage1_captions")
    return {
        "seed": seed,
        "stage1_loss_start": round(stage1.metrics["loss_start"], 4),
        "stage1_loss_end": round(stage1.metrics["loss_end"], 4),
        "stage2_loss_start": round(stage2.metrics["loss_start"], 4),
        "stage2_loss_end": round(stage2.metrics["loss_end"], 4),
        "heldout_accuracy": round(heldout["accuracy"], 4),
        "stage1_caption_accuracy": round(captions["accuracy"], 4) if captions else None,
        "predictions": records["eval"].outputs["heldout_predictions"],
        "stage1_run": stage1.outputs["run_dir"],
        "checkpoint": stage2.outputs["model"],
        "export": records["export"].outputs["path"],
        "data": prepare.metrics["data"],
        "base_models": records["base"].outputs["base_models"] if "base" in records else None,
        "report": write_report(pipeline.root)["index"],  # plots of every stage + index.html (llava-ray report)
    }
