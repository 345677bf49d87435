"""Run the embedded demo offline: tiny base models -> LLaVA model -> one training step -> HF export, checked.

Until the data and training jobs land this covers the model path end to end on one
drawn image; it ends by printing one JSON line with where everything went.
"""

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")


def run(args: argparse.Namespace) -> int:
    from llava.model_check import run_model_check

    print(json.dumps(run_model_check(args.out)))
    return 0
