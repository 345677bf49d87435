"""The `llava-ray` command: one CLI, one subcommand per job module in `jobs/`.

Each job module defines `add_arguments(parser)` and `run(args) -> int`, and keeps
its heavy imports inside `run` so `llava-ray --help` stays fast. Results go to
stdout (JSON where a program may read them); progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS = {
    "demo": "jobs.demo",
    "prepare": "jobs.prepare",
    "pretrain": "jobs.pretrain",
    "finetune": "jobs.finetune",
    "tiny-model": "jobs.tiny_model",
    "show-masks": "jobs.show_masks",
    "export": "jobs.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
