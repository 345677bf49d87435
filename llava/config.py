"""Typed configuration for the LLaVA model and its image preprocessing.

Every job config nests these dataclasses; `load_config` builds any of them from
a YAML file plus `key.sub=value` command-line overrides (OmegaConf does the
merging and type checking, so a typo in a key is an error, not a silent no-op).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import OmegaConf

# CLIP's normalisation constants (openai/clip-vit-large-patch14 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN = "<image>"


@dataclass
class ImageConfig:
    """How a decoded image becomes `pixel_values` (LLaVA-1.5 uses aspect=pad)."""

    size: int = 336
    aspect: str = "pad"  # pad (to square with the mean colour) | resize (squash) | crop (CLIP: shortest edge + centre crop)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = 64_000_000  # decoded width * height above this is refused as a decompression bomb

    def __post_init__(self) -> None:
        if self.aspect not in ("pad", "resize", "crop"):
            raise ValueError(f"image.aspect must be pad, resize or crop, got {self.aspect!r}")
        if self.size <= 0 or self.max_pixels <= 0:
            raise ValueError(f"image.size and image.max_pixels must be positive, got {self.size}, {self.max_pixels}")
        self.mean = tuple(self.mean)
        self.std = tuple(self.std)


@dataclass
class ProjectorConfig:
    """The vision-to-language connector (see llava/projectors.py for the registry)."""

    type: str = "mlp2x_gelu"  # linear | mlp{N}x_gelu | identity | qformer
    num_queries: int = 32  # qformer only: visual tokens per image
    qformer_layers: int = 2  # qformer only
    qformer_heads: int = 8  # qformer only; must divide the vision width


@dataclass
class ModelConfig:
    """A LLaVA model: CLIP vision tower -> projector -> causal LM.

    `vision_tower`, `llm` and `tokenizer` are anything `from_pretrained` takes:
    a hub id, a local directory, or (through llava.storage) an s3:// URI.
    """

    vision_tower: str = "openai/clip-vit-large-patch14-336"
    llm: str = "lmsys/vicuna-7b-v1.5"
    tokenizer: Optional[str] = None  # defaults to the llm's own tokenizer
    select_layer: int = -2  # hidden state used as image features (paper: penultimate layer)
    select_feature: str = "patch"  # patch (drop CLS) | cls_patch
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    template: str = "vicuna_v1"
    max_length: int = 2048
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self) -> None:
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"model.select_feature must be patch or cls_patch, got {self.select_feature!r}")
        if self.max_length <= 0:
            raise ValueError(f"model.max_length must be positive, got {self.max_length}")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.llm


@dataclass
class FreezeConfig:
    """Which components train. `preset` gives the defaults; an explicit flag wins.

    stage1 = projector only (paper: feature alignment); stage2 = projector + LLM.
    `lr_multipliers` scales the base learning rate per component, e.g. {projector: 10}.
    """

    preset: str = "stage1"
    vision: Optional[bool] = None
    projector: Optional[bool] = None
    llm: Optional[bool] = None
    lr_multipliers: dict[str, float] = field(default_factory=dict)


T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | dict | list[str | Path | dict] | None = None,
                overrides: list[str] | None = None) -> T:
    """Build `cls` from its defaults, then layers in order (later wins): YAML files or dicts of fields,
    then `a.b=value` overrides."""
    merged = OmegaConf.structured(cls)
    for layer in ([] if path is None else path if isinstance(path, list) else [path]):
        merged = OmegaConf.merge(merged, OmegaConf.create(layer) if isinstance(layer, dict) else OmegaConf.load(str(layer)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key.sub=value, got {bad}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)


def config_to_dict(config: Any) -> dict:
    """Plain-dict form of a config dataclass (JSON/YAML friendly)."""
    return _plain(dataclasses.asdict(config))


def config_from_dict(cls: type[T], data: dict) -> T:
    """Inverse of `config_to_dict`, with the same type checks as `load_config`."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data)))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
