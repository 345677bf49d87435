"""GPT-assisted instruction data: COCO captions + boxes -> conversation / detail / complex through a teacher LLM."""

import argparse

from jobs.arguments import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="COCO captions JSON (local or s3://)")
    parser.add_argument("--instances", default=None, help="COCO instances JSON with the boxes")
    parser.add_argument("--images", required=True, help="image root the COCO file names are relative to")
    parser.add_argument("--out", required=True, help="output dir: parts/, llava.json, parquet/, summary.json")
    parser.add_argument("--types", default="conversation,detail,complex", help="comma-separated request types")
    parser.add_argument(
        "--mixture", default=None, help="llava158k: one type per image in the paper's 58K/23K/77K proportions"
    )
    parser.add_argument("--endpoint", required=True, help="OpenAI-compatible base URL (key from $OPENAI_API_KEY)")
    parser.add_argument("--model", required=True, help="teacher model name")
    parser.add_argument("--max-images", type=int, default=0, help="at most this many images (0 = all)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per actor")
    add_config_arguments(parser, "endpoint.requests_per_minute=60 actors=4")


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from llava.config import load_config
    from llava.instruct.generate import GenerateConfig, generate
    from llava.ray_runtime import init_ray

    given = {
        "captions": args.annotations,
        "instances": args.instances,
        "images": args.images,
        "out": args.out,
        "types": f"[{args.types}]",
        "mixture": args.mixture,
        "endpoint.url": args.endpoint,
        "endpoint.model": args.model,
        "max_images": args.max_images,
        "endpoint.concurrency": args.concurrency,
    }
    config = load_config(GenerateConfig, args.config, [f"{k}={v}" for k, v in given.items() if v] + args.overrides)
    init_ray(args.address, s3_endpoint=args.s3_endpoint)
    emit(generate(config))
    return 0
