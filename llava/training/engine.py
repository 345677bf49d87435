"""Model construction and DeepSpeed wiring for one training worker.

Kept apart from the model (llava/model.py) like torchtitan keeps `parallelize.py` apart
from `model.py`: here the LLaVA model gets its freeze policy, optional LoRA and gradient
checkpointing, then an AdamW (no weight decay) with a cosine schedule and 3% warm-up
(LLaVA recipe) inside a DeepSpeed engine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from llava.freeze import apply_freeze, count_trainable, parameter_groups
from llava.model import LlavaModel
from llava.model_loading import load_checkpoint, load_projector
from llava.run_format import resolve_model_uri
from llava.training.config import TrainConfig
from llava.training.lora import apply_lora

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """How the global batch maps onto the workers, and how long the run is."""

    world_size: int
    micro_batch_size: int
    accumulation: int
    steps_per_epoch: int
    total_steps: int  # length of the learning-rate schedule
    epochs: int  # epochs to run (the last may stop early at stop_step)
    stop_step: int | None  # stop here (max_steps, or a fractional last epoch); None: run the epochs out

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.accumulation

    @classmethod
    def build(cls, config: TrainConfig, rows: int, world_size: int) -> StepPlan:
        micro = config.data.micro_batch_size
        accumulation = max(1, round(config.optim.global_batch_size / (micro * world_size)))
        if accumulation * micro * world_size != config.optim.global_batch_size:
            log.warning(
                "global batch %d is not a multiple of %d workers x micro batch %d: using %d",
                config.optim.global_batch_size,
                world_size,
                micro,
                accumulation * micro * world_size,
            )
        micro_batches = math.ceil((rows // world_size) / micro)  # per worker and epoch
        steps_per_epoch = max(1, micro_batches // accumulation)
        epochs = config.optim.epochs
        total = max(1, math.ceil(steps_per_epoch * epochs))
        stop = total if epochs != int(epochs) else None
        if config.optim.max_steps and config.optim.max_steps < total:
            total = stop = config.optim.max_steps
        return cls(world_size, micro, accumulation, steps_per_epoch, total, max(1, math.ceil(epochs)), stop)


def build_model(config: TrainConfig) -> tuple[LlavaModel, dict[str, bool]]:
    """The model to train, its freeze policy applied (and LoRA, gradient checkpointing if configured)."""
    if config.init_from:
        source = resolve_model_uri(config.init_from)
        log.info("starting from %s", source)
        model = load_checkpoint(
            source,
            template=config.model.template,  # ours, llava-hf or official LLaVA
            max_length=config.model.max_length,
            image=config.model.image,
        )
    else:
        model = LlavaModel.from_config(config.model)
    if config.projector_init:  # e.g. an official stage-1 mm_projector.bin
        load_projector(model, config.projector_init)
    trainable = apply_freeze(model, config.freeze)
    if config.lora.enabled:
        if not trainable["llm"]:
            raise ValueError("lora.enabled needs a trainable LLM (freeze preset stage2 or freeze.llm=true)")
        apply_lora(model, config.lora)
    if config.deepspeed.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if trainable["vision"]:
            model.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("trainable parameters per component: %s", count_trainable(model))
    return model, trainable


def use_bf16(setting: bool | None) -> bool:
    """deepspeed.bf16: as set, or (None, auto) where the GPU supports it; CPU bf16 is ~100x slower than fp32."""
    if setting is None:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return setting


def deepspeed_config(config: TrainConfig, plan: StepPlan) -> dict:
    zero: dict = {"stage": config.deepspeed.zero_stage}
    if config.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if config.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": config.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(config.deepspeed.bf16)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0 (HF `cosine` schedule)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(model: LlavaModel, config: TrainConfig, plan: StepPlan):
    """deepspeed.initialize with a torch AdamW (per-component lr groups) and the cosine schedule."""
    import deepspeed

    groups = parameter_groups(model, config.optim.lr, config.freeze, weight_decay=config.optim.weight_decay)
    optimizer = torch.optim.AdamW(
        groups, lr=config.optim.lr, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay
    )
    scheduler = cosine_with_warmup(optimizer, plan.total_steps, config.optim.warmup_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, plan)
    )
    return engine


def component_checksums(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """sha256 of each component's weights (vision / projector / llm), for audits of what a stage changed."""
    import hashlib

    digests = {"vision": hashlib.sha256(), "projector": hashlib.sha256(), "llm": hashlib.sha256()}
    prefixes = {"vision_tower.": "vision", "projector.": "projector", "llm.": "llm"}
    for name in sorted(state_dict):
        component = next((c for p, c in prefixes.items() if name.startswith(p)), None)
        if component:
            digests[component].update(name.encode())
            digests[component].update(state_dict[name].detach().float().cpu().numpy().tobytes())
    return {name: digest.hexdigest() for name, digest in digests.items()}


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on rank 0 (None elsewhere). Every rank must call it (ZeRO-3 gathers)."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    return state if engine.global_rank == 0 else None
