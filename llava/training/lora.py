"""LoRA adapters for stage 2 (LLaVA-1.5 `finetune_lora.sh`), through peft.

Adapters go on the LLM's linear layers only: the wrapper is applied to `model.llm`, so the
vision tower can never receive one (the official code's regex also matched CLIP's layers,
haotian-liu/LLaVA#1647). The projector stays fully trainable; the LLM's base weights freeze.
"""

from __future__ import annotations

import logging

from llava.training.config import LoraConfig

log = logging.getLogger(__name__)


def apply_lora(model, config: LoraConfig) -> None:
    """Wrap `model.llm` in a peft LoRA model in place; only adapter weights of the LLM stay trainable."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.llm.named_modules()}
    missing = [m for m in config.target_modules if m not in names]
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not modules of the LLM {type(model.llm).__name__}")
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, peft_config)
    trainable = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    log.info(
        "LoRA r=%d alpha=%d on %s: %d trainable LLM parameters",
        config.r,
        config.alpha,
        ",".join(config.target_modules),
        trainable,
    )
