"""Starting or joining Ray the same way from every job."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray.

    A local Ray gets at least 4 logical CPUs even on a 2-core machine: Ray Train workers
    and Ray Data tasks must both find a CPU slot or the run deadlocks (PLATFORM.md).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        log.info("joined Ray cluster at %s: %s", address, ray.cluster_resources())
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
    log.info("started a local Ray with %d logical CPUs", cpus)
