"""Export a llava-ray checkpoint as a stock Hugging Face LlavaForConditionalGeneration directory."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="llava-ray checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from llava.export_hf import export_hf
    from llava.model import LlavaModel

    result = export_hf(LlavaModel.from_pretrained(args.checkpoint), args.out)
    from llava.cli import emit

    emit(asdict(result))
    return 0
