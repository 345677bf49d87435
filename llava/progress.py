"""Progress of a long job (prepare, infer, eval, generate): rows done, the total when known, rate and ETA.

    with Progress("infer", total=len(questions), unit="questions") as progress:
        for row in rows:
            progress.update(1, errors=n_errors)

On a terminal (the stream's `isatty()`) it draws a tqdm bar; anywhere else (a log file, a Ray job's
captured output) it logs one line every `every_s` seconds and one at the end:

    infer: 120/1000 questions (12.0%), 8.5 questions/s, ETA 1m43s, errors=2
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Optional, TextIO

log = logging.getLogger("llava.progress")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    def __init__(
        self,
        what: str,
        total: Optional[int] = None,
        unit: str = "rows",
        every_s: float = 10.0,
        stream: Optional[TextIO] = None,
        logger: Optional[logging.Logger] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.log, self.clock = logger or log, clock
        self.done = 0
        self.details: dict[str, object] = {}
        self.started = self.last_line = clock()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=stream, dynamic_ncols=True, smoothing=0.1)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **details) -> None:
        """`n` more rows done; `details` (e.g. errors=3) are shown with the count."""
        self.set(self.done + n, **details)

    def set(self, done: int, **details) -> None:
        """The count so far (for a job that polls a counter instead of seeing each row)."""
        step, self.done = done - self.done, done
        self.details.update(details)
        if self.bar is not None:
            if details:
                self.bar.set_postfix(details, refresh=False)
            self.bar.update(step)
        elif self.clock() - self.last_line >= self.every_s:
            self.log.info("%s", self.line())
            self.last_line = self.clock()

    def line(self) -> str:
        """`what: done/total unit (pct), rate unit/s, ETA ..., details` (no total: `what: done unit, rate`)."""
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [
            f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(1, self.total):.1f}%)"
            if self.total is not None
            else f"{self.what}: {self.done} {self.unit}",
            f"{rate:.1f} {self.unit}/s",
        ]
        if self.total is not None:
            left = self.total - self.done
            parts.append(
                "ETA " + (format_duration(left / rate) if rate > 0 else "?")
                if left > 0
                else f"done in {format_duration(elapsed)}"
            )
        parts += [f"{k}={v}" for k, v in self.details.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.done:
            self.log.info("%s", self.line())
