"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import ray
import ray.data

log = logging.getLogger(__name__)
T = TypeVar("T")


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    s3_endpoint: str | None = None,
) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray of this job's own.

    Without an address the job always starts its own local Ray (`ray.init(address="local")`), whatever a
    crashed `ray start --head` left in `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`; Ray's own default
    would try to join that dead cluster. That local cluster runs without Ray's token authentication
    (RAY_AUTH_MODE=disabled unless you set RAY_AUTH_MODE yourself): it lives as long as the job, and a
    laptop run needs no token. Joining a cluster (`address` or RAY_ADDRESS) never touches the
    authentication settings: Ray reads RAY_AUTH_MODE, RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token as the cluster requires.

    `s3_endpoint` (an S3-compatible endpoint URL) is exported as AWS_ENDPOINT_URL to this
    process and to every Ray worker, so all s3:// URIs of the job go there.

    A local Ray gets at least 4 logical CPUs even on a 2-core machine: Ray Train workers and Ray Data
    tasks must both find a CPU slot, or a run whose workers hold every CPU deadlocks.
    """
    env_vars = {}
    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = env_vars["AWS_ENDPOINT_URL"] = s3_endpoint
    if ray.is_initialized():
        return
    # Ray Data's progress bars redraw with carriage returns: noise in a log file, useful on a terminal.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    runtime_env = {"env_vars": env_vars} if env_vars else {}
    target = cluster_address(address)
    if target:
        log.info("joining the Ray cluster at %s (%s)", target, "--address" if address else "RAY_ADDRESS")
        ray.init(address=target, runtime_env=runtime_env)
        log.info("joined the Ray cluster at %s: %s", target, ray.cluster_resources())
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # this job's own cluster only (see above)
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False, runtime_env=runtime_env)
    log.info("started a local Ray with %d logical CPUs (no --address or RAY_ADDRESS given)", cpus)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster a job joins: `address`, else RAY_ADDRESS, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


_UNINTERRUPTIBLE = threading.Lock()  # one `uninterruptible` call at a time per process


def uninterruptible(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` in a helper thread, so that an interrupt cannot land inside it.

    Ray cancels a running task by raising KeyboardInterrupt in the worker's main thread
    (`_thread.interrupt_main`); a training run does so to its Data tasks when it restarts after a
    failed worker. Landing inside a first-time import (loading a tokenizer pulls in transformers,
    torch.distributed and sympy: seconds of imports), it would leave half-imported packages in
    sys.modules, and every later task in that reused worker would fail ("module 'sympy' has no
    attribute 'printing'"). In another thread the work always completes: an interrupted caller
    leaves it running, and the next call waits for it (one such call at a time per process), so a
    cached result (`functools.lru_cache`) is there when it starts.

    Only the Data tasks that load heavy libraries pay this; no Ray worker preloads anything (a
    setup hook importing torch and transformers cost every worker process, actors included, about
    8 s of CPU on 2 cores, most of a small job's time).
    """
    outcome: dict = {}

    def run() -> None:
        with _UNINTERRUPTIBLE:
            try:
                outcome["value"] = fn(*args, **kwargs)
            except BaseException as error:  # noqa: B036 - re-raised in the caller's thread
                outcome["error"] = error

    thread = threading.Thread(target=run, name=f"uninterruptible-{getattr(fn, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
