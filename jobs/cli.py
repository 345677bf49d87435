"""The `llava-ray` command: one CLI, one subcommand per job module in `jobs/`.

Each job module defines `add_arguments(parser)` and `run(args) -> int`, and keeps
its heavy imports inside `run` so `llava-ray --help` stays fast. A job's result goes to
stdout as one JSON line (`jobs.output.emit`); everything else printed while it runs (logs,
progress, Ray's forwarded worker output, DeepSpeed banners) is sent to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from jobs import remote
from jobs.output import results_only_on_stdout

COMMANDS = {
    "demo": "jobs.demo",
    "pipeline": "jobs.pipeline",
    "prepare": "jobs.prepare",
    "pretrain": "jobs.pretrain",
    "finetune": "jobs.finetune",
    "pretrain-base": "jobs.pretrain_base",
    "tiny-model": "jobs.tiny_model",
    "report": "jobs.report",
    "show-masks": "jobs.show_masks",
    "export": "jobs.export",
    "checksums": "jobs.checksums",
    "infer": "jobs.infer",
    "eval": "jobs.eval",
    "generate": "jobs.generate",
    "serve": "jobs.serve",
    "jobs": "jobs.jobs",
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
    submit_to = remote.submission_target(args)  # --address http(s)://HEAD:8265: run as a Ray job there
    if not submit_to:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    ray_was_up = _ray_is_up()  # called in-process (a notebook, a test) on a Ray of the caller's: leave it up
    with results_only_on_stdout():
        try:
            if submit_to:
                return remote.submit(args, submit_to, sys.argv[1:] if argv is None else list(argv))
            return int(args.run(args) or 0)
        finally:
            if _ray_is_up() and not ray_was_up:
                sys.modules["ray"].shutdown()  # flush forwarded worker logs while they still go to stderr


def _ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


if __name__ == "__main__":  # `python -m jobs.cli` (a --working-dir job)
    sys.exit(main())
