"""Write a report of a training run or a pipeline: PNG plots and an index.html that shows them.

    llava-ray report runs/demo            # a pipeline root: base models, both stages, eval (digits: confusion, images)
    llava-ray report runs/demo/runs/stage2 --out /tmp/report

Loss and learning rate per stage, tokens/s, eval accuracy; for the digits a confusion matrix and a grid of
held-out images with the model's answers. Prints {"index", "figures"}.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="a pipeline root (pipeline.json) or a training run dir (metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where the report goes (default ROOT/report)")


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from llava.reporting.page import write_report

    emit(write_report(args.root, args.out))
    return 0
