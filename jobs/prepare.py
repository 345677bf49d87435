"""Turn a data source into llava-ray's sharded parquet format (local or s3://), on Ray Data."""

import argparse

from jobs.remote import add_submission_arguments
from llava.data.image_refs import DEFAULT_MAX_IMAGE_BYTES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    llava_json = kinds.add_parser("llava-json", help="the official LLaVA JSON (558K, Instruct-150K, mix665K)")
    llava_json.add_argument("--json", required=True, help="URI of the JSON array")
    llava_json.add_argument("--images", required=True, help="URI of the image folder the 'image' paths are relative to")
    llava_json.add_argument(
        "--source", default=None, help="dataset name stored with each row (default: JSON file name)"
    )
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
        sub.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the dataset --out already holds (default: refuse); the old version stays "
            "readable until the new one is complete",
        )
        sub.add_argument("--shard-mb", type=int, default=128, help="target shard size in MB")
        if sub is not digits:
            sub.add_argument(
                "--max-image-bytes",
                type=int,
                default=DEFAULT_MAX_IMAGE_BYTES,
                help="image files larger than this are skipped as image_too_large (default: 32 MiB)",
            )
            sub.add_argument(
                "--allow-images-outside-root",
                action="store_true",
                help="follow image paths that leave --images (absolute paths, '..', other buckets); "
                "default: such rows are skipped as image_outside_root",
            )
        add_submission_arguments(sub)
        sub.add_argument(
            "--s3-endpoint",
            default=None,
            help="S3-compatible endpoint URL for every s3:// URI (default: AWS_ENDPOINT_URL or AWS)",
        )


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from jobs.output import emit
    from llava.data.ingest import IngestConfig
    from llava.data.prepare import prepare_captions, prepare_digits, prepare_llava_json
    from llava.ray_runtime import init_ray

    config = IngestConfig(
        shard_mb=args.shard_mb,
        max_image_bytes=getattr(args, "max_image_bytes", DEFAULT_MAX_IMAGE_BYTES),
        allow_images_outside_root=getattr(args, "allow_images_outside_root", False),
    )
    init_ray(args.address, s3_endpoint=args.s3_endpoint)
    if args.kind == "llava-json":
        manifests = {
            "out": prepare_llava_json(
                args.json, args.images, args.out, source=args.source, config=config, overwrite=args.overwrite
            )
        }
    elif args.kind == "captions":
        manifests = {
            "out": prepare_captions(
                args.pairs,
                args.images,
                args.out,
                seed=args.seed,
                source=args.source,
                image_column=args.image_column,
                caption_column=args.caption_column,
                config=config,
                overwrite=args.overwrite,
            )
        }
    else:
        manifests = prepare_digits(args.out, seed=args.seed, config=config, overwrite=args.overwrite)
    emit({name: asdict(m) for name, m in manifests.items()})
    return 0
