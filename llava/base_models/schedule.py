"""The optimiser both base-model pretrainings use: AdamW, linear warm-up, cosine decay to zero."""

from __future__ import annotations

import math

import torch


def adamw_cosine(params, lr: float, weight_decay: float, warmup: int, steps: int):
    """(optimizer, scheduler); the scheduler steps once per optimiser step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
