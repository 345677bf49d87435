"""The optimiser both base-model pretrainings use: AdamW, linear warm-up, cosine decay to zero."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def adamw_cosine(params, lr: float, weight_decay: float, warmup: int, steps: int):
    """(optimizer, scheduler); the scheduler steps once per optimiser step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model, optimizer, scheduler, loss, step: int, steps: int, history: list, name: str) -> None:
    """Backward, clip to norm 1, step optimiser and schedule; record and (every 50 steps) log the loss and lr."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    history.append({"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
    if (step + 1) % 50 == 0 or step == 0:
        log.info("%s step %d/%d loss %.4f", name, step + 1, steps, loss.item())
