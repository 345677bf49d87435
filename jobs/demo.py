"""Run the embedded demo offline: digits -> tiny models -> stage 1 -> stage 2 (Ray Train + DeepSpeed) -> eval -> export.

It is `llava-ray pipeline` (jobs/pipeline_runner.py) on llava/presets/demo/pipeline.yaml with root=--out:
1. prepare: the digits data set on a local Ray (stage1 / stage2 / eval parquet) and tiny offline base models,
2. stage 1 on Ray Train + DeepSpeed, 2 workers: projector only,
3. stage 2 from the stage-1 run: projector + LLM,
4. eval: held-out accuracy by greedy decoding on a Ray Data actor pool (`llava-ray infer`),
5. export to stock transformers.
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
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both training stages")


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit

    emit(run_demo(args.out, args.address, args.overrides))
    return 0


def demo_pipeline(out: str | Path, address: str | None = None, overrides: list[str] | None = None):
    """The demo's Pipeline; `overrides` (key=value on a training config) apply to both training stages."""
    from jobs.pipeline_runner import DEMO_CONFIG, Pipeline, load_pipeline_config

    stages = [f"{stage}.{o}" for o in overrides or [] for stage in ("stage1", "stage2")]
    return Pipeline(load_pipeline_config(DEMO_CONFIG, [f"root={Path(out).absolute()}", *stages]), address)


def run_demo(out: str | Path, address: str | None = None, overrides: list[str] | None = None) -> dict:
    """Returns the summary printed as the demo's JSON line."""
    records = demo_pipeline(out, address, overrides).run()
    prepare, stage1, stage2 = records["prepare"], records["stage1"], records["stage2"]
    heldout = records["eval"].metrics["heldout"]
    return {
        "stage1_loss_start": round(stage1.metrics["loss_start"], 4),
        "stage1_loss_end": round(stage1.metrics["loss_end"], 4),
        "stage2_loss_start": round(stage2.metrics["loss_start"], 4),
        "stage2_loss_end": round(stage2.metrics["loss_end"], 4),
        "heldout_accuracy": round(heldout["accuracy"], 4),
        "predictions": records["eval"].outputs["heldout_predictions"],
        "stage1_run": stage1.outputs["run_dir"],
        "checkpoint": stage2.outputs["model"],
        "export": records["export"].outputs["path"],
        "data": prepare.metrics["data"],
    }
