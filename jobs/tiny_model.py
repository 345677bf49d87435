"""Write tiny, randomly initialised base models (CLIP vision, Llama-style LM, BPE tokenizer) built offline."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write vision/ and llm/ into")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from llava.tiny_models import build_tiny_base_models

    paths = build_tiny_base_models(args.out, seed=args.seed)
    emit(paths)
    return 0
