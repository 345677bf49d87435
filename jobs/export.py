"""Export a llava-ray checkpoint as a stock Hugging Face LlavaForConditionalGeneration directory."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="llava-ray checkpoint, training run dir, llava-hf or official LLaVA checkpoint (local or s3://)",
    )
    parser.add_argument(
        "--template",
        default=None,
        help="conversation template of a checkpoint that does not record one (official LLaVA: vicuna_v1)",
    )
    parser.add_argument(
        "--out", required=True, help="output directory (local or s3://): a previous export there is replaced as a whole"
    )


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from jobs.output import emit
    from llava.export_hf import export_hf
    from llava.model_loading import load_checkpoint

    result = export_hf(load_checkpoint(args.checkpoint, template=args.template), args.out)
    emit(asdict(result))
    return 0
