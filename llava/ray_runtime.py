"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import ray
import ray.data

log = logging.getLogger(__name__)

# transformers.activations pulls in the torch.distributed.tensor -> sympy chain that every HF config load needs.
WORKER_PRELOAD = (
    "torch",
    "transformers.activations",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.auto.configuration_auto",
    "llava.data.reader",
)


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    s3_endpoint: str | None = None,
    preload_imports: bool = True,
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

    `preload_imports` makes every worker import the heavy libraries before its first task
    (`preload_worker_imports`); jobs that run no Ray Data tasks (serving) can skip its cost.
    """
    env_vars = {}
    if s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = env_vars["AWS_ENDPOINT_URL"] = s3_endpoint
    if ray.is_initialized():
        return
    # Ray Data's progress bars redraw with carriage returns: noise in a log file, useful on a terminal.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    runtime_env = {"worker_process_setup_hook": "llava.ray_runtime.preload_worker_imports"} if preload_imports else {}
    if env_vars:
        runtime_env["env_vars"] = env_vars
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


def preload_worker_imports() -> None:
    """Ray worker setup hook: import the heavy libraries once, before the worker runs any task.

    Ray cancels in-flight Data tasks by raising KeyboardInterrupt inside them (a training run
    does so when it restarts after a failed worker). Landing in a first-time import (loading a
    tokenizer pulls in transformers, torch.distributed and sympy: seconds), it leaves
    half-imported packages in sys.modules, and every later task in that reused process fails
    ("module 'sympy' has no attribute 'printing'"). Imported here, outside any task, they are
    complete before a task can be interrupted.
    """
    for module in WORKER_PRELOAD:
        importlib.import_module(module)
