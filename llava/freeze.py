"""Which parts of the model train, and at what learning rate.

Presets follow the paper's two stages (Liu et al., 2023, §4.1):
    stage1  feature alignment: projector only (vision tower and LLM frozen)
    stage2  end-to-end fine-tuning: projector + LLM (vision tower frozen)
Explicit per-component flags in `FreezeConfig` override the preset.
"""

from __future__ import annotations

from torch import nn

from llava.config import FreezeConfig

COMPONENTS = ("vision", "projector", "llm")
PRESETS: dict[str, dict[str, bool]] = {
    "stage1": {"vision": False, "projector": True, "llm": False},
    "stage2": {"vision": False, "projector": True, "llm": True},
    "full": {"vision": True, "projector": True, "llm": True},
}


def resolve_trainable(config: FreezeConfig) -> dict[str, bool]:
    """The preset's flags with every explicitly set flag applied on top."""
    if config.preset not in PRESETS:
        raise ValueError(f"unknown freeze preset {config.preset!r}; choose one of {sorted(PRESETS)}")
    explicit = {name: getattr(config, name) for name in COMPONENTS if getattr(config, name) is not None}
    unknown = set(config.lr_multipliers) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"lr_multipliers has unknown component(s) {sorted(unknown)}; use {COMPONENTS}")
    return {**PRESETS[config.preset], **explicit}


def component_modules(model) -> dict[str, nn.Module]:
    return {"vision": model.vision_tower, "projector": model.projector, "llm": model.llm}


def apply_freeze(model, config: FreezeConfig) -> dict[str, bool]:
    """Set `requires_grad` per component; returns the resolved flags."""
    trainable = resolve_trainable(config)
    for name, module in component_modules(model).items():
        module.requires_grad_(trainable[name])
    return trainable


def parameter_groups(model, base_lr: float, config: FreezeConfig, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of trainable parameters, one per component, lr scaled by its multiplier."""
    groups = []
    for name, module in component_modules(model).items():
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            lr = base_lr * config.lr_multipliers.get(name, 1.0)
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": weight_decay})
    if not groups:
        raise ValueError("the freeze policy leaves no trainable parameter")
    return groups


def count_trainable(model) -> dict[str, int]:
    """Trainable parameter count per component (for logs and tests)."""
    return {
        name: sum(p.numel() for p in module.parameters() if p.requires_grad)
        for name, module in component_modules(model).items()
    }
