"""A job's result: one JSON line on stdout; everything else a job prints goes to stderr.

`llava-ray` (jobs/cli.py) runs each job inside `results_only_on_stdout()`, which points `sys.stdout` at
stderr so that logs, progress, Ray's forwarded worker output and DeepSpeed banners never mix with the
result; `emit` writes to the real stdout. Inside a submitted Ray job (jobs/remote.py) each result line
carries RESULT_PREFIX so the submitter can tell it apart from the job's logs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

SUBMITTED_ENV = "LLAVA_RAY_SUBMITTED"  # set in every submitted job's environment
RESULT_PREFIX = "llava-ray-result: "  # marks `emit`'s lines in a submitted job's logs

_results = sys.stdout  # where `emit` writes


def emit(result) -> None:
    """Write a job's result to stdout as one JSON line (prefixed inside a submitted Ray job)."""
    print((RESULT_PREFIX if os.environ.get(SUBMITTED_ENV) else "") + json.dumps(result), file=_results, flush=True)


@contextmanager
def results_only_on_stdout() -> Iterator[None]:
    """While inside, `print` goes to stderr and only `emit` writes to stdout."""
    global _results
    _results, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout = _results
