"""Run the embedded demo offline: digits -> tiny models -> stage 1 -> stage 2 (Ray Train + DeepSpeed) -> eval -> export.

It is `llava-ray pipeline` on llava/presets/demo/pipeline.yaml with root=--out: a re-run with the same --out
skips what is complete (manifest: <out>/pipeline.json). Ends by printing one JSON line with the losses, the
held-out accuracy and where the model went.
"""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both training stages")


def run(args: argparse.Namespace) -> int:
    from llava.cli import emit
    from llava.demo import run_demo

    emit(run_demo(args.out, args.address, args.overrides))
    return 0
