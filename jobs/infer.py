"""Answer a file of questions with a trained model: greedy decoding on a Ray Data actor pool."""

import argparse

from jobs.arguments import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="llava-ray checkpoint, training run dir or HF export (local or s3://)"
    )
    parser.add_argument("--questions", required=True, help="JSONL file or parquet file/dataset (local or s3://)")
    parser.add_argument("--out", required=True, help="output dir for predictions.jsonl and summary.json")
    parser.add_argument("--images", default=None, help="root for relative image paths (default: next to --questions)")
    parser.add_argument(
        "--allow-images-outside-root",
        action="store_true",
        help="follow image paths that leave --images (absolute, '..', other buckets); default: such "
        "questions become image_outside_root error rows (max_image_bytes=N caps image reads)",
    )
    add_config_arguments(parser, "batch_size=16 actors=4")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from jobs.output import emit
    from llava.config import load_config
    from llava.inference.batch import InferConfig, run_batch_inference
    from llava.ray_runtime import init_ray

    given = {
        "model": args.model,
        "questions": args.questions,
        "out": args.out,
        "images": args.images,
        "allow_images_outside_root": "true" if args.allow_images_outside_root else None,
    }
    config = load_config(InferConfig, args.config, [f"{k}={v}" for k, v in given.items() if v] + args.overrides)
    init_ray(args.address, s3_endpoint=args.s3_endpoint)
    emit(asdict(run_batch_inference(config)))
    return 0
