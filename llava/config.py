"""Typed configuration for the LLaVA model and its image preprocessing.

Every job config nests these dataclasses; `load_config` builds any of them (and every job's
config) from its defaults, shipped presets, YAML files or dicts, and `key.sub=value` command-line
overrides (OmegaConf does the merging and type checking, so a typo in a key is an error, not a
silent no-op).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

from omegaconf import OmegaConf

# CLIP's normalisation constants (openai/clip-vit-large-patch14 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN = "<image>"


@dataclass
class ImageConfig:
    """How a decoded image becomes `pixel_values` (LLaVA-1.5 uses aspect=pad)."""

    size: int = 336
    aspect: str = (
        "pad"  # pad (to square with the mean colour) | resize (squash) | crop (CLIP: shortest edge + centre crop)
    )
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
    # where a user turn's <image> goes: "start" = `<image>\n{text}` as official LLaVA training moves it;
    # "keep" = where the data wrote it (a turn with several <image> always keeps them; llava/templates.py)
    image_placement: str = "start"
    max_length: int = 2048
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self) -> None:
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"model.select_feature must be patch or cls_patch, got {self.select_feature!r}")
        if self.max_length <= 0:
            raise ValueError(f"model.max_length must be positive, got {self.max_length}")
        if self.image_placement not in ("start", "keep"):
            raise ValueError(f"model.image_placement must be start or keep, got {self.image_placement!r}")

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
Layer = Union[str, Path, dict]

# Mark a numeric field whose None means "decide at run time" (tri-state), e.g.
# `num_gpus: Optional[float] = field(default=None, metadata=AUTO)`. Every Optional[bool] field is one already.
AUTO = {"auto": True}


@dataclass(frozen=True)
class Presets:
    """Named YAML files layered under a config section: `<directory>/<name>/<file>`, e.g. presets/v1_5/pretrain.yaml."""

    directory: Path
    file: str

    def names(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir() if (p / self.file).is_file())

    def path(self, name: str, section: str = "") -> Path:
        found = self.directory / name / self.file
        if not name or "/" in name or not found.is_file():
            key = f"{section}.preset" if section else "preset"
            raise ValueError(f"unknown {key} {name!r}; choose one of {self.names()}")
        return found


def load_config(
    cls: type[T],
    path: Layer | list[Layer] | None = None,
    overrides: list[str] | None = None,
    presets: dict[str, Presets] | None = None,
) -> T:
    """The one way every job builds its config: `cls`'s defaults, then presets, then layers, then overrides.

    Layers are YAML files or dicts of fields, in order (later wins); overrides are `a.b=value` strings.
    `presets` maps a section ("" for the whole config, else a dotted path such as "stage1") to its preset
    files: when the layers or overrides set `<section>.preset: NAME`, that preset's YAML goes under them
    at that section. OmegaConf checks every key and type, so a typo in a key is an error, not a no-op.
    Tri-state fields (`Optional[bool]`, or marked AUTO; None means auto) also take the string "auto".
    """
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key.sub=value, got {bad}")
    layers = [] if path is None else path if isinstance(path, list) else [path]
    given = [OmegaConf.create(layer) if isinstance(layer, dict) else OmegaConf.load(str(layer)) for layer in layers]
    if overrides:
        given.append(OmegaConf.from_dotlist(list(overrides)))
    auto = tri_state_fields(cls)
    given = [_auto_to_none(layer, auto) for layer in given]
    merged = OmegaConf.structured(cls)
    if presets:
        chosen = OmegaConf.merge(*given) if given else OmegaConf.create()
        for section, files in presets.items():
            name = OmegaConf.select(chosen, f"{section}.preset" if section else "preset")
            if name:
                preset = OmegaConf.load(str(files.path(str(name), section)))
                preset = _auto_to_none(
                    preset, [f[len(section) + 1 :] for f in auto if f.startswith(section + ".")] if section else auto
                )
                merged = OmegaConf.merge(merged, _nest(section, preset))
    return OmegaConf.to_object(OmegaConf.merge(merged, *given))


def tri_state_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of `cls`'s tri-state fields (Optional[bool], or metadata AUTO), nested dataclasses included."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) == 1 and len(typing.get_args(kind)) == 2
        inner = args[0] if optional else kind
        if (optional and inner is bool) or f.metadata.get("auto"):
            found.append(prefix + f.name)
        elif dataclasses.is_dataclass(inner):
            found += tri_state_fields(inner, f"{prefix}{f.name}.")
    return found


def _auto_to_none(layer, fields: list[str]):
    """The string "auto" (any case) at a tri-state field -> None."""
    for key in fields:
        value = OmegaConf.select(layer, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and value.lower() == "auto":
            OmegaConf.update(layer, key, None, merge=False)
    return layer


def _nest(section: str, layer):
    for part in reversed(section.split(".") if section else []):
        layer = {part: layer}
    return layer


def config_to_dict(config: Any) -> dict:
    """Plain-dict form of a config dataclass (JSON/YAML friendly)."""
    return _plain(dataclasses.asdict(config))


def config_from_dict(cls: type[T], data: dict) -> T:
    """Inverse of `config_to_dict`, with the same type checks (and "auto") as `load_config`."""
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(cls), _auto_to_none(OmegaConf.create(data), tri_state_fields(cls)))
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
