"""The embedded demo behind `llava-ray demo`: the pipeline (llava/pipeline.py) on llava/presets/demo/pipeline.yaml.

1. prepare: the digits data set on a local Ray (stage1 / stage2 / eval parquet) and tiny offline base models,
2. stage 1 on Ray Train + DeepSpeed, 2 workers: projector only,
3. stage 2 from the stage-1 run: projector + LLM,
4. eval: held-out accuracy by greedy decoding on a Ray Data actor pool (`llava-ray infer`),
5. export to stock transformers.
Everything goes under --out, with the run manifest `<out>/pipeline.json`: re-running with the same --out
skips the stages already complete, resumes an interrupted one, and re-runs what the overrides changed.
"""

from __future__ import annotations

from pathlib import Path

from llava.pipeline import DEMO_CONFIG, Pipeline, load_pipeline_config


def demo_pipeline(out: str | Path, address: str | None = None, overrides: list[str] | None = None) -> Pipeline:
    """`overrides` (key=value on a training config) apply to both training stages."""
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
