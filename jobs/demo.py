"""Run the embedded demo offline: digits data -> tiny base models -> LLaVA -> one training step -> HF export.

Until the training job lands this covers data preparation and the model path end to
end; it ends by printing one JSON line with where everything went.
"""

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")


def run(args: argparse.Namespace) -> int:
    from llava.demo import run_demo

    print(json.dumps(run_demo(args.out)))
    return 0
