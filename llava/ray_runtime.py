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
WORKER_PRELOAD = ("torch", "transformers.activations", "transformers.models.auto.tokenization_auto",
                  "transformers.models.auto.configuration_auto", "llava.data.reader")


def init_ray(address: str | None = None, num_cpus: int | None = None, s3_endpoint: str | None = None,
             preload_imports: bool = True) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray.

    `s3_endpoint` (an S3-compatible endpoint URL) is exported as AWS_ENDPOINT_URL to this
    process and to every Ray worker, so all s3:// URIs of the job go there.

    A local Ray gets at least 4 logical CPUs even on a 2-core machine: Ray Train workers
    and Ray Data tasks must both find a CPU slot or the run deadlocks (PLATFORM.md).

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
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = {"worker_process_setup_hook": "llava.ray_runtime.preload_worker_imports"} if preload_imports else {}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        log.info("joined Ray cluster at %s: %s", address, ray.cluster_resources())
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, runtime_env=runtime_env)
    log.info("started a local Ray with %d logical CPUs", cpus)


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
