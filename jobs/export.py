"""Export a llava-ray checkpoint as a stock Hugging Face LlavaForConditionalGeneration directory."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="llava-ray checkpoint or training run dir (local or s3://)")
    parser.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from llava.cli import emit
    from llava.export_hf import export_hf
    from llava.model import LlavaModel
    from llava.training.engine import resolve_model_uri

    result = export_hf(LlavaModel.from_pretrained(resolve_model_uri(args.checkpoint)), args.out)
    emit(asdict(result))
    return 0
