"""Typed configuration of the training jobs (`llava-ray pretrain` / `llava-ray finetune`).

One dataclass per job, nested per component. Built by llava.config.load_config from the job's
defaults, then a preset (`preset: NAME` -> `llava/presets/<name>/<job>.yaml`), then a YAML file, then
`a.b=value` overrides (see `load_train_config`). Recipes: Liu et al. 2023 (v1) and the LLaVA-1.5
scripts (v1_5). Each section checks its own values when it is built (`__post_init__`), so a config
object that exists is consistent; `validate` adds what only a run needs (training data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llava.config import FreezeConfig, ModelConfig, Presets, load_config
from llava.training.health import HealthConfig
from llava.training.tracking import TrackingConfig

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # dataset dirs or shard URIs (local or s3://)
    micro_batch_size: int = 16  # per worker, per forward pass
    group_by_length: bool = True  # batches of similar length and modality (official sampler)
    window_batches: int = 16  # rows sorted within windows of this many batches
    seed: int = 0  # data order is a function of (seed, epoch)
    cache: bool = False  # preprocess once into the object store and reuse every epoch (data sets that fit)

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0:
            raise ValueError(f"data.micro_batch_size must be positive, got {self.micro_batch_size}")


@dataclass
class OptimConfig:
    lr: float = 2e-3
    global_batch_size: int = 128  # kept whatever the cluster size, by gradient accumulation
    epochs: float = 1.0
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs when smaller)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.global_batch_size <= 0:
            raise ValueError(f"optim.global_batch_size must be positive, got {self.global_batch_size}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0-3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 only: parameters in CPU memory
    bf16: Optional[bool] = None  # None / auto: on where the GPU supports it
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0-3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage=3")


@dataclass
class WorkersConfig:
    num_workers: int = 2
    use_gpu: Optional[bool] = None  # None / auto: if the cluster has GPUs when the job starts
    cpus_per_worker: float = 1.0  # leave the rest of the cluster's CPUs to Ray Data
    gpus_per_worker: float = 1.0  # used when use_gpu resolves to true

    def __post_init__(self) -> None:
        if self.num_workers <= 0:
            raise ValueError(f"workers.num_workers must be positive, got {self.num_workers}")


@dataclass
class CheckpointConfig:
    storage_path: str = "runs"  # local dir or s3://bucket/prefix, shared by every node
    run_name: str = "llava"  # same name + storage path = resume that run
    every_steps: int = 500  # 0: only at the end
    keep: int = 2  # newest K checkpoints kept
    max_failures: int = 3  # worker failures survived by restarting from the newest checkpoint


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the LLM's linear layers only; never on the vision tower."""

    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainConfig:
    preset: Optional[str] = None  # llava/presets/<preset>/<job>.yaml, layered under these fields when loaded
    model: ModelConfig = field(default_factory=ModelConfig)
    init_from: Optional[str] = (
        None  # checkpoint or run dir to start from: ours (e.g. the stage-1 run), llava-hf or official LLaVA
    )
    projector_init: Optional[str] = None  # projector weights to start from, e.g. an official stage-1 mm_projector.bin
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log_every_steps: int = 10
    tracking: TrackingConfig = field(
        default_factory=TrackingConfig
    )  # TensorBoard / MLflow / W&B (training/tracking.py)
    health: HealthConfig = field(
        default_factory=HealthConfig
    )  # non-finite steps skipped; the run stops after N in a row
    audit_dir: Optional[str] = None  # local dir: sample ids of every micro-batch and weight checksums per checkpoint

    def __post_init__(self) -> None:
        if self.lora.enabled and self.freeze.llm is False:
            raise ValueError("lora.enabled trains LLM adapters but freeze.llm=false freezes the LLM")

    def validate(self) -> TrainConfig:
        """This config, if a run can start from it (it names training data). Checks only, changes nothing."""
        if not self.data.train:
            raise ValueError("data.train is empty: give at least one dataset URI (data.train=[URI,...])")
        return self


@dataclass
class PretrainConfig(TrainConfig):
    """Stage 1, feature alignment: only the projector trains (paper §4.1)."""

    freeze: FreezeConfig = field(default_factory=lambda: FreezeConfig(preset="stage1"))


@dataclass
class FinetuneConfig(TrainConfig):
    """Stage 2, end-to-end: projector + LLM (or LoRA adapters on the LLM) from the stage-1 output."""

    freeze: FreezeConfig = field(default_factory=lambda: FreezeConfig(preset="stage2"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, global_batch_size=32, epochs=3.0))


JOB_CONFIGS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}
PRESETS = {job: Presets(PRESETS_DIR, f"{job}.yaml") for job in JOB_CONFIGS}  # a job's preset files


def preset_names() -> list[str]:
    return sorted(p.name for p in PRESETS_DIR.iterdir() if p.is_dir())


def load_train_config(
    job: str, preset: str | None = None, path: str | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """defaults <- preset <- YAML file <- overrides, type-checked into the job's dataclass, ready to train.

    `preset` (the --preset flag) names the preset like `preset: NAME` in the file would, and wins over it.
    """
    layers: list = [path] if path else []
    if preset:
        layers.append({"preset": preset})
    return load_config(JOB_CONFIGS[job], layers, overrides, presets={"": PRESETS[job]}).validate()
