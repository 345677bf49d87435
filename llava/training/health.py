"""Training health: optimizer steps whose loss or gradient is not finite are skipped and counted.

One bad batch (a NaN from an overflow, a corrupt sample) should cost one step, not the run; many
in a row mean the run has diverged, and it stops with a message saying so.

How a step is skipped on every rank alike, under DeepSpeed:
- a rank whose micro-batch loss is not finite multiplies it by NaN before backward, so the
  gradient of the whole step is non-finite on every rank once the gradients are reduced;
- ZeRO stages 1-3 check the global gradient norm in `engine.step()` and skip the update (and the
  learning-rate schedule) when it is not finite (`engine.was_step_applied()` is then False);
- ZeRO stage 0 hands the gradients (already all-reduced, the same on every rank) straight to the
  torch optimizer: `optimizer_step` checks their norm itself and, when it is not finite, runs
  `engine.step()` with the optimizer's and the schedule's `step` disabled (DeepSpeed still clears
  the gradients and advances its own counters).
`optimizer_step` then agrees across ranks on what happened, counts it and logs it.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger("llava.train")


@dataclass
class HealthConfig:
    max_consecutive_skips: int = 10  # stop the run after this many skipped optimizer steps in a row (0: never)
    inject_nonfinite_steps: list[int] = field(default_factory=list)  # drill: these steps (1-based) get a NaN loss

    def __post_init__(self) -> None:
        if self.max_consecutive_skips < 0:
            raise ValueError(f"health.max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}")


class NonFiniteTrainingError(RuntimeError):
    """The run diverged: too many optimizer steps in a row had a non-finite loss or gradient."""


class StepHealth:
    """Per worker: watches every micro-batch loss and every optimizer step (see the module doc)."""

    def __init__(self, config: HealthConfig, zero_stage: int):
        self.config, self.zero_stage = config, zero_stage
        self.skipped_total = 0  # whole run (this process: restarts from a checkpoint start again at 0)
        self.consecutive = 0
        self.interval_skipped = 0  # since the last `interval_metrics`
        self.grad_norms: list[float] = []
        self._loss_bad = False  # a non-finite loss on this rank in the current accumulation window

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to run backward on: itself, or NaN when it is not finite (or `step + 1` is a drill step)."""
        drill = (step + 1) in self.config.inject_nonfinite_steps
        if drill or not torch.isfinite(loss):
            self._loss_bad = True
            return loss * float("nan")
        return loss

    def optimizer_step(self, engine, step: int, sample_ids: list[str]) -> bool:
        """`engine.step()` at an accumulation boundary (all ranks call): whether the update was applied.
        Raises NonFiniteTrainingError after `max_consecutive_skips` skipped steps in a row."""
        own_norm = None
        if hasattr(engine.optimizer, "overflow"):  # a DeepSpeed ZeRO / mixed-precision optimizer checks itself
            engine.step()
            applied = engine.was_step_applied()
        else:  # ZeRO-0: the torch optimizer itself; the gradients are reduced already
            own_norm = gradient_norm(engine.module)
            applied = math.isfinite(own_norm)
            if applied:
                engine.step()
            else:
                with _disabled(engine.optimizer, "step"), _disabled(engine.lr_scheduler, "step"):
                    engine.step()
        flags = torch.tensor([float(self._loss_bad)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, self._loss_bad = bool(flags[0]), False
        norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
        if applied:
            self.consecutive = 0
            if norm is not None and math.isfinite(float(norm)):
                self.grad_norms.append(float(norm))
            return True
        self.skipped_total += 1
        self.interval_skipped += 1
        self.consecutive += 1
        reason = "loss" if loss_bad else "gradient"
        if engine.global_rank == 0:
            log.warning(
                "step %d skipped: non-finite %s (%d skipped in this run, %d in a row); samples on rank 0: %s",
                step + 1,
                reason,
                self.skipped_total,
                self.consecutive,
                sample_ids[:8],
            )
        limit = self.config.max_consecutive_skips
        if limit and self.consecutive >= limit:
            raise NonFiniteTrainingError(
                f"training diverged: {self.consecutive} optimizer steps in a row (up to step {step + 1}) had a "
                f"non-finite {reason}; last samples on this rank: {sample_ids[:8]}. Lower optim.lr, check the data, "
                f"resume from an earlier checkpoint, or raise health.max_consecutive_skips (0 never stops)"
            )
        return False

    def interval_metrics(self) -> dict[str, float]:
        """grad_norm (mean over the interval's applied steps), skipped_steps (interval and run); then resets."""
        metrics = {"skipped_steps": float(self.interval_skipped), "skipped_steps_total": float(self.skipped_total)}
        if self.grad_norms:
            metrics["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        self.grad_norms, self.interval_skipped = [], 0
        return metrics


def gradient_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients of `module` (0 when there are none)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


@contextmanager
def _disabled(obj, method: str):
    """`obj.method(...)` does nothing inside the block (restored after, whether it was bound or patched)."""
    if obj is None:
        yield
        return
    saved = vars(obj).get(method)
    setattr(obj, method, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        if saved is None:
            delattr(obj, method)
        else:
            setattr(obj, method, saved)
