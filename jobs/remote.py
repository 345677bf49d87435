"""Remote submission: a llava-ray command given a dashboard address runs as a Ray job on that cluster.

`llava-ray <command> ... --address http://HEAD:8265` (or RAY_ADDRESS=http(s)://...) does not start or
join Ray here: it submits `llava-ray <the same arguments>` through the Ray Jobs API
(`JobSubmissionClient.submit_job`) with a runtime environment (the package installed on the
cluster, or `--working-dir` uploaded; `--pip` requirements; `--env KEY=VALUE`, or `--env NAME` to forward
this shell's value of NAME without writing it on the command line), prints the job id,
follows the job's logs to stderr until it ends, and exits with its status: 0 if it SUCCEEDED,
else the job's exit code (1 when it has none). Ctrl-C detaches and leaves the job running.

Inside the job Ray sets RAY_ADDRESS to the cluster's GCS address, so the job's `init_ray` joins the
cluster as a driver; the SUBMITTED_ENV marker (and the submission flags being left out of the job's
command line) keeps it from submitting itself again. There, `emit` (jobs/output.py) prefixes each result
line with RESULT_PREFIX so the submitter can tell it apart from the logs and put it on its own stdout.

Only the standard library is imported at module level: `jobs.cli` imports this on every command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from jobs.output import RESULT_PREFIX, SUBMITTED_ENV, emit

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DETACHED_EXIT = 130  # Ctrl-C: we stopped following; the job goes on
# Flags only the submitting side uses (value-taking ones first); they are left out of the job's command line.
_VALUE_FLAGS = ("--address", "--working-dir", "--pip", "--env")
_BARE_FLAGS = ("--detach",)
_WORKING_DIR_EXCLUDES = [".git", ".venv", ".cache", "__pycache__", "*.egg-info", "runs"]  # on top of .gitignore


def is_dashboard_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def env_pair(text: str) -> tuple[str, str]:
    """argparse type for --env: KEY=VALUE as given, or NAME alone for this process's value of $NAME.

    `--env NAME` keeps a secret (an API key) out of argv and shell history; it still reaches the job's
    runtime environment, which the Ray dashboard and `ray job` APIs show to whoever can reach them.
    """
    key, sep, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or NAME, got {text!r}")
    if sep:
        return key, value
    if key not in os.environ:
        raise argparse.ArgumentTypeError(
            f"--env {key}: {key} is not set here; export it first or pass --env {key}=VALUE"
        )
    return key, os.environ[key]


def add_submission_arguments(parser: argparse.ArgumentParser) -> None:
    """--address plus the flags that shape a remote submission (runtime environment, --detach)."""
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster. http(s)://HEAD:8265 (a dashboard) submits this command as a Ray job there and follows it; "
        "HOST:PORT or 'auto' joins the cluster from here (default: RAY_ADDRESS, else a local Ray)",
    )
    remote = parser.add_argument_group("remote submission (with --address http(s)://HEAD:8265)")
    remote.add_argument(
        "--working-dir",
        default=None,
        help="upload this source tree and run it (python -m jobs.cli) instead of the llava-ray "
        "installed on the cluster; relative paths in the command resolve inside it",
    )
    remote.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQUIREMENT",
        help="pip requirement installed into the job's environment (repeatable)",
    )
    remote.add_argument(
        "--env",
        action="append",
        default=[],
        type=env_pair,
        metavar="KEY=VALUE|NAME",
        help="environment variable of the job (repeatable); NAME alone forwards this shell's "
        "$NAME without putting its value on the command line (use it for secrets)",
    )
    remote.add_argument("--detach", action="store_true", help="print the job id and return without following it")


def submission_target(args: argparse.Namespace) -> str | None:
    """The dashboard address to submit this command to, or None to run it here.

    A command is submitted when it takes --address (and is not marked `submittable=False`, as the
    `jobs` command is), the address (or RAY_ADDRESS) is http(s)://, and we are not already inside a
    submitted job. Inside one, a dashboard address left in the arguments is cleared so that the job's
    `init_ray` joins the cluster through the RAY_ADDRESS that Ray set.
    """
    if not hasattr(args, "address") or not getattr(args, "submittable", True):
        return None
    if os.environ.get(SUBMITTED_ENV):
        if is_dashboard_address(args.address):
            args.address = None
        return None
    address = args.address or os.environ.get("RAY_ADDRESS")
    return address if is_dashboard_address(address) else None


@dataclass(frozen=True)
class Submission:
    """What goes to `JobSubmissionClient.submit_job`: the command line and its runtime environment."""

    argv: tuple[str, ...]  # this process's arguments (after `llava-ray`)
    working_dir: str | None = None
    pip: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: list[str]) -> Submission:
        return cls(
            tuple(argv),
            getattr(args, "working_dir", None),
            tuple(getattr(args, "pip", None) or ()),
            dict(getattr(args, "env", None) or ()),
        )

    def job_argv(self) -> list[str]:
        """The arguments without the submission-only flags (--address X, --address=X, --pip X, --detach, ...)."""
        out, skip = [], False
        for token in self.argv:
            if skip:
                skip = False
            elif token in _VALUE_FLAGS:
                skip = True
            elif token in _BARE_FLAGS or token.startswith(tuple(f + "=" for f in _VALUE_FLAGS)):
                continue
            else:
                out.append(token)
        return out

    def entrypoint(self) -> str:
        program = ["python", "-m", "jobs.cli"] if self.working_dir else ["llava-ray"]
        return shlex.join(program + self.job_argv())

    def runtime_env(self) -> dict:
        runtime_env: dict = {"env_vars": {**self.env, SUBMITTED_ENV: "1"}}
        if self.working_dir:
            runtime_env["working_dir"] = self.working_dir
            runtime_env["excludes"] = list(_WORKING_DIR_EXCLUDES)
        if self.pip:
            runtime_env["pip"] = list(self.pip)
        return runtime_env


def dashboard_address(address: str | None = None) -> str:
    """`address`, else RAY_ADDRESS, else the local dashboard on port 8265."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD


def connect(address: str):
    """A JobSubmissionClient talking to the dashboard at `address`."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as error:
        raise SystemExit(f"llava-ray: no Ray dashboard answers at {address}: {error}") from error


def submit(args: argparse.Namespace, address: str, argv: list[str]) -> int:
    """Submit this command as a Ray job at `address`, then follow it (unless --detach). Returns the exit code."""
    submission = Submission.from_args(args, argv)
    client = connect(address)
    job_id = client.submit_job(
        entrypoint=submission.entrypoint(),
        runtime_env=submission.runtime_env(),
        submission_id=f"llava-ray-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
        metadata={"llava_ray_command": args.command},
    )
    log.info("submitted Ray job %s to %s: %s", job_id, address, submission.entrypoint())
    emit({"job_id": job_id, "address": address, "status": "SUBMITTED"})
    if getattr(args, "detach", False):
        _print_how_to_reattach(job_id, address)
        return 0
    return attach(client, job_id, address)


def attach(client, job_id: str, address: str) -> int:
    """Follow a job's logs (to stderr) until it ends; its result lines go to stdout as they come.

    Returns 0 if the job SUCCEEDED, else its exit code (1 when it has none); DETACHED_EXIT on Ctrl-C,
    which leaves the job running. A final status line is printed unless the job succeeded with results.
    """
    follower = _LogFollower(emit)
    try:
        try:
            asyncio.run(follower.tail(client, job_id))
        except Exception as error:  # the log stream broke: polling below picks up where it stopped
            log.warning("lost the log stream of job %s (%s); polling instead", job_id, error)
        follower.poll(client, job_id)
    except KeyboardInterrupt:
        follower.flush()
        log.info("detached from Ray job %s: it keeps running", job_id)
        _print_how_to_reattach(job_id, address)
        try:
            status = client.get_job_status(job_id).value
        except Exception:  # a second Ctrl-C, or the dashboard gone: detach all the same
            status = "UNKNOWN"
        emit({"job_id": job_id, "address": address, "status": status, "detached": True})
        return DETACHED_EXIT
    follower.flush()
    info = describe(client.get_job_info(job_id))
    succeeded = info["status"] == "SUCCEEDED"
    log.info("Ray job %s %s", job_id, info["status"])
    if not (succeeded and follower.results):
        emit(info)
    if succeeded:
        return 0
    code = info.get("driver_exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else 1


def describe(info) -> dict:
    """JSON-able summary of a ray.job_submission.JobDetails / JobInfo."""

    def when(ms):
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None

    message = (info.message or "").strip().splitlines()
    return {
        "job_id": getattr(info, "submission_id", None) or getattr(info, "job_id", None),
        "status": info.status.value if hasattr(info.status, "value") else str(info.status),
        "entrypoint": info.entrypoint,
        "start_time": when(info.start_time),
        "end_time": when(info.end_time),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
        "message": message[0] if message else None,  # the rest repeats the end of the logs
        "metadata": info.metadata or {},
    }


class _LogFollower:
    """Feeds a job's log text, split into lines: result lines to `emit`, the rest to stderr."""

    def __init__(self, emit):
        self._emit = emit
        self._partial = ""
        self.seen = 0  # characters of the log consumed so far
        self.results: list[dict] = []

    def feed(self, text: str) -> None:
        self.seen += len(text)
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._line(line)

    def flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, line: str) -> None:
        if line.startswith(RESULT_PREFIX):
            import json

            self.results.append(json.loads(line[len(RESULT_PREFIX) :]))
            self._emit(self.results[-1])
        else:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    async def tail(self, client, job_id: str) -> None:
        async for chunk in client.tail_job_logs(job_id):
            self.feed(chunk)

    def poll(self, client, job_id: str, period_s: float = 1.0) -> None:
        """Until the job is in a terminal state, read its whole log and feed what is new."""
        while True:
            done = client.get_job_status(job_id).value in TERMINAL
            logs = client.get_job_logs(job_id)
            if len(logs) > self.seen:
                self.feed(logs[self.seen :])
            if done:
                return
            time.sleep(period_s)


def _print_how_to_reattach(job_id: str, address: str) -> None:
    log.info("follow it: llava-ray jobs logs %s --follow --address %s", job_id, address)
    log.info("stop it:   llava-ray jobs stop %s --address %s", job_id, address)
