"""Run the whole recipe from one YAML: prepare -> stage 1 -> stage 2 -> eval -> export -> (serve), resumable.

Outputs and the run manifest (`<root>/pipeline.json`) go under the config's `root` (local or s3://); a re-run
skips the stages already complete, resumes an interrupted one and re-runs those whose config or inputs changed.
Prints one JSON line (per stage: ran or skipped and why, outputs, metrics); with `serve.enabled` it then serves
until Ctrl-C. Example config: llava/presets/demo/pipeline.yaml.
"""

import argparse

from jobs.arguments import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "root=s3://bucket/runs/exp1 stage2.optim.lr=1e-5 serve.enabled=true")


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from jobs.pipeline_runner import Pipeline, load_pipeline_config, summary

    pipeline = Pipeline(load_pipeline_config(args.config, args.overrides), args.address, args.s3_endpoint)
    pipeline.run()
    result = summary(pipeline)
    if not pipeline.config.serve.enabled:
        emit(result)
        return 0
    from serve.app import wait_until_interrupted

    result["serve"] = pipeline.serve()
    emit(result)
    wait_until_interrupted()
    pipeline.serve_stopped()
    return 0
