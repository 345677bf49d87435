"""The one progress reporter of the long jobs (llava/progress.py): a log line every N seconds off a terminal,
a tqdm bar with count, total and ETA on one."""

import io
import logging

from llava.progress import Progress, format_duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """An in-memory stream that says it is a terminal, as sys.stderr does on one."""

    def isatty(self) -> bool:
        return True


def test_log_file_gets_a_line_every_n_seconds_with_rate_and_eta(caplog):
    clock, stream = Clock(), io.StringIO()
    caplog.set_level(logging.INFO, logger="llava.progress")
    with Progress("infer", total=100, unit="questions", every_s=10, stream=stream, clock=clock) as progress:
        for second in range(1, 31):  # one question per 0.5 s for 15 s, an error at the 5th
            clock.now += 0.5
            progress.update(1, errors=int(second >= 5))
        clock.now += 5
        progress.update(70, errors=1)  # the rest at once
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "infer: 20/100 questions (20.0%), 2.0 questions/s, ETA 40s, errors=1",  # 10 s in
        "infer: 100/100 questions (100.0%), 5.0 questions/s, done in 20s, errors=1",  # 20 s in: last line
        "infer: 100/100 questions (100.0%), 5.0 questions/s, done in 20s, errors=1",  # close()
    ]
    assert stream.getvalue() == ""  # nothing drawn


def test_unknown_total_shows_count_and_rate(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="llava.progress")
    progress = Progress("prepare", every_s=5, stream=io.StringIO(), clock=clock)
    clock.now += 8
    progress.set(400, skipped=3)
    progress.close()
    assert [r.getMessage() for r in caplog.records][0] == "prepare: 400 rows, 50.0 rows/s, skipped=3"


def test_terminal_gets_a_bar_with_total_and_eta_and_no_log_lines(caplog):
    terminal = Terminal()
    caplog.set_level(logging.INFO, logger="llava.progress")
    with Progress("generate", total=8, unit="requests", stream=terminal) as progress:
        for _ in range(4):
            progress.update(1, failed=0)
    drawn = terminal.getvalue()
    assert "\r" in drawn and "generate:" in drawn  # redrawn in place
    final = drawn.split("\r")[-1]
    assert "4/8" in final and " 50%" in final and "<" in final and "failed=0" in final  # count, total, ETA
    assert not caplog.records


def test_terminal_bar_without_total_counts_rows():
    terminal = Terminal()
    with Progress("prepare", stream=terminal) as progress:
        progress.set(250)
    assert "250 rows" in terminal.getvalue().split("\r")[-1]


def test_durations_read_as_a_clock():
    assert [format_duration(s) for s in (7, 75, 3725)] == ["7s", "1m15s", "1h02m"]
