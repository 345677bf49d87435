"""Shared command line of the two training jobs (pretrain, finetune)."""

import argparse

from jobs.remote import add_submission_arguments


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML file with the job's settings (see llava/presets/)")
    parser.add_argument("--preset", default=None, help="a shipped preset applied under --config: v1, v1_5 or demo")
    add_submission_arguments(parser)
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL for every s3:// URI")
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3 data.train=[s3://b/d]"
    )


def run_train(job: str, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from jobs.output import emit
    from llava.ray_runtime import init_ray
    from llava.training.config import load_train_config
    from llava.training.trainer import train

    config = load_train_config(job, preset=args.preset, path=args.config, overrides=args.overrides)
    init_ray(args.address, s3_endpoint=args.s3_endpoint)
    result = train(config)
    summary = {k: v for k, v in asdict(result).items() if k != "metrics"}
    summary["loss_start"] = result.metrics[0]["loss"] if result.metrics else None
    summary["loss_end"] = result.metrics[-1]["loss"] if result.metrics else None
    emit(summary)
    return 0
