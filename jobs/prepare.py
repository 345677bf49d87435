"""Turn a data source into llava-ray's sharded parquet format (local or s3://), on Ray Data."""

import argparse

from jobs.remote import add_submission_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    llava_json = kinds.add_parser("llava-json", help="the official LLaVA JSON (558K, Instruct-150K, mix665K)")
    llava_json.add_argument("--json", required=True, help="URI of the JSON array")
    llava_json.add_argument("--images", required=True, help="URI of the image folder the 'image' paths are relative to")
    llava_json.add_argument("--source", default=None, help="dataset name stored with each row (default: JSON file name)")
    captions = kinds.add_parser("captions", help="image-caption pairs -> stage-1 conversations")
    captions.add_argument("--pairs", required=True, help="URI of a .jsonl, .csv or .parquet with image + caption")
    captions.add_argument("--images", required=True, help="URI of the image folder")
    captions.add_argument("--seed", type=int, default=0)
    captions.add_argument("--image-column", default="image")
    captions.add_argument("--caption-column", default="caption")
    captions.add_argument("--source", default="captions")
    digits = kinds.add_parser("digits", help="the embedded default: scikit-learn digits (stage1/stage2/eval)")
    digits.add_argument("--seed", type=int, default=0)
    for sub in (llava_json, captions, digits):
        sub.add_argument("--out", required=True, help="output URI (directory or s3://bucket/prefix)")
        sub.add_argument("--shard-mb", type=int, default=128, help="target shard size in MB")
        add_submission_arguments(sub)
        sub.add_argument("--s3-endpoint", default=None,
                         help="S3-compatible endpoint URL for every s3:// URI (default: AWS_ENDPOINT_URL or AWS)")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from jobs.output import emit
    from llava.data.prepare import prepare
    from llava.ray_runtime import init_ray

    init_ray(args.address, s3_endpoint=args.s3_endpoint)
    manifests = prepare(args)
    emit({name: asdict(m) for name, m in manifests.items()})
    return 0
