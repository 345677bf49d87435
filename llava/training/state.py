"""What a checkpoint must hold besides weights and optimizer: where the run is in its data.

Resume restores the epoch, the optimizer step and the ids of the samples this epoch has
already trained on; a resumed worker skips those ids, so after resume a run repeats at most
the samples consumed since the newest checkpoint and skips none. This holds whatever order
Ray Data hands rows to workers in and even if the worker count changes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from llava.artifact_manifest import MANIFEST_FILE, NoManifestError, verify
from llava.run_format import METRICS_FILE, STATE_FILE


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimizer steps done
    consumed: set[str] = field(default_factory=set)  # ids trained on in `epoch`, as of the last checkpoint
    metrics: list[dict] = field(default_factory=list)  # one entry per logging step, whole run

    def save(self, directory: Path) -> None:
        state = {"epoch": self.epoch, "step": self.step, "consumed": sorted(self.consumed)}
        (directory / STATE_FILE).write_text(json.dumps(state))
        (directory / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in self.metrics))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        state = json.loads((directory / STATE_FILE).read_text())
        metrics_file = directory / METRICS_FILE
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
        return cls(state["epoch"], state["step"], set(state["consumed"]), metrics)


def verify_resume(directory: Path) -> None:
    """Refuse to resume from a checkpoint whose files do not match their manifests (each training worker
    lists its own files, llava/artifact_manifest.py): DeepSpeed's load_checkpoint unpickles the optimizer
    state with torch.load(weights_only=False), so a planted or modified file would run code. A checkpoint
    written before manifests existed is refused too, with how to vouch for it."""
    try:
        verify(directory)
    except NoManifestError as error:
        raise NoManifestError(
            f"refusing to resume from {directory}: it has no checksum manifest (written before llava-ray verified "
            f"checkpoints), and DeepSpeed would unpickle its files unchecked. If you trust it, write one with "
            f"`llava-ray checksums write <checkpoint dir>` (it adds {MANIFEST_FILE}), then resume"
        ) from error


def gather_ids(local_ids: list[str]) -> set[str]:
    """Union of every rank's ids (all ranks call)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local_ids)
    return {i for ids in gathered for i in ids}


@dataclass
class IntervalMetrics:
    """Counters between two logging steps, reduced over all ranks when logged."""

    loss_sum: float = 0.0
    micro_batches: int = 0  # with a finite loss (a non-finite one is skipped, see llava/training/health.py)
    tokens: int = 0  # real (non-padding) tokens
    padded_tokens: int = 0
    samples: int = 0
    data_wait_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, batch, data_wait_s: float) -> None:
        if math.isfinite(loss):
            self.loss_sum += loss
            self.micro_batches += 1
        self.tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        self.samples += len(batch.ids)
        self.data_wait_s += data_wait_s

    def reduce(self, steps: int) -> dict:
        """All ranks call; returns the interval's metrics summed (counts) or averaged (loss) over ranks."""
        values = torch.tensor(
            [self.loss_sum, self.micro_batches, self.tokens, self.padded_tokens, self.samples, self.data_wait_s],
            dtype=torch.float64,
        )
        dist.all_reduce(values)
        loss_sum, micro, tokens, padded, samples, wait = values.tolist()
        elapsed = time.perf_counter() - self.started
        world = dist.get_world_size()
        return {
            "loss": loss_sum / micro if micro else float("nan"),  # NaN: every micro-batch was non-finite
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "step_time_s": elapsed / max(1, steps),
            "data_wait_s": wait / world / max(1, steps),
            "padding_fraction": 1.0 - tokens / padded if padded else 0.0,
        }


class SampleRecorder:
    """Optional audit log (JSONL per rank and process): every micro-batch's sample ids, and the
    weight checksums per component at every checkpoint (rank 0)."""

    def __init__(self, directory: str | None, rank: int):
        self.file = None
        if directory:
            import os

            Path(directory).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(directory) / f"rank{rank}-pid{os.getpid()}.jsonl", "a", buffering=1)
            self.pid = os.getpid()

    def record(self, epoch: int, step: int, ids: list[str]) -> None:
        if self.file:
            record = {"epoch": epoch, "step": step, "pid": self.pid, "time": time.time(), "ids": ids}
            self.file.write(json.dumps(record) + "\n")

    def checksums(self, step: int, checksums: dict[str, str]) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, "pid": self.pid, "checksums": checksums}) + "\n")
