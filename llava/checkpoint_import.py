"""Checkpoints users bring: official LLaVA and llava-hf directories, read into our LlavaModel.

Three layouts are recognised (`detect_layout`):

    llava-ray       our own checkpoint (`llava_config.json`; loaded by `LlavaModel.from_pretrained`)
    llava-hf        transformers `LlavaForConditionalGeneration` (config.json `model_type: llava`,
                    `vision_config` + `text_config`); weights named `model.language_model.*` (in memory,
                    transformers >= 4.52) or `language_model.model.*` (older files on disk)
    llava-official  haotian-liu/LLaVA `LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`
                    (llava/model/llava_arch.py): a Llama/Mistral config.json plus `mm_*` fields; weights
                    `model.*` + `lm_head.*` (the LLM), `model.mm_projector.*` (projector),
                    `model.vision_tower.vision_tower.*` (the CLIP tower, only when it was trained/saved;
                    otherwise it comes from `mm_vision_tower`)

and a stage-1 `mm_projector.bin` (haotian-liu/LLaVA llava/train/llava_trainer.py saves the projector
alone; `build_vision_projector` keeps the part of each key after `mm_projector.`) can initialise a
projector (`read_projector_weights`).

Safety: weights are read from safetensors when a directory has them; pickle files (`*.bin`) only
through `torch.load(weights_only=True)`, which refuses anything but plain tensors and containers, so
a pickle that would run code is refused, never executed. Sharded weights are read through their
index (`*.index.json`), only the files it lists. Every refusal is a `CheckpointError` that names the
file and what was wrong.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava import storage
from llava.config import CLIP_MEAN, CLIP_STD, ImageConfig, ModelConfig, ProjectorConfig, config_from_dict
from llava.export_hf import EXPORT_META_FILE
from llava.model import resize_embeddings_deterministically
from llava.run_format import CONFIG_FILE

log = logging.getLogger(__name__)

LLAVA_RAY, LLAVA_HF, LLAVA_OFFICIAL = "llava-ray", "llava-hf", "llava-official"
# The conversation template official checkpoints were trained with in LLaVA-1.5 (`--version v1`).
OFFICIAL_DEFAULT_TEMPLATE = "vicuna_v1"
# Weight files in the order they are looked for: safetensors first, a sharded set through its index.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# Official model types and the plain causal LM their config describes (LlavaMptForCausalLM renames the
# whole transformer and is not supported).
_OFFICIAL_LLM_TYPES = {"llava_llama": "llama", "llava": "llama", "llava_mistral": "mistral"}
# config.json keys the official code adds to the LLM's own config (llava/train/train.py, llava_arch.py).
_OFFICIAL_EXTRA_KEYS = {
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "architectures",
    "model_type",
}
# Official parameter names -> ours (first matching prefix wins).
_OFFICIAL_PREFIXES = [
    ("model.mm_projector.", "projector."),
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
]
_ROTARY_BUFFER = re.compile(r"\.rotary_emb\.inv_freq$")  # saved by old transformers, recomputed today


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what was wrong."""


@dataclass
class ImportedParts:
    """Everything `LlavaModel(config, vision, projector, llm, tokenizer)` needs, weights loaded."""

    config: ModelConfig
    vision: nn.Module
    projector: nn.Module
    llm: nn.Module
    tokenizer: Any


# ---- layout detection ---------------------------------------------------------------------------------------


def _read_json(uri: str) -> dict:
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{uri} is not valid JSON: {error}") from error


def detect_layout(uri: str) -> str:
    """LLAVA_RAY, LLAVA_HF or LLAVA_OFFICIAL for the checkpoint directory at `uri` (local or s3://)."""
    if storage.exists(storage.join(uri, CONFIG_FILE)):
        return LLAVA_RAY
    config_file = storage.join(uri, "config.json")
    if not storage.exists(config_file):
        raise CheckpointError(
            f"{uri} is not a model checkpoint: it has neither {CONFIG_FILE} (llava-ray) "
            f"nor config.json (llava-hf or official LLaVA)"
        )
    config = _read_json(config_file)
    if "mm_vision_tower" in config or "mm_projector_type" in config:
        return LLAVA_OFFICIAL
    if config.get("model_type") == "llava" and "vision_config" in config:
        return LLAVA_HF
    raise CheckpointError(
        f"{config_file} describes neither an official LLaVA checkpoint (no mm_vision_tower / mm_projector_type) "
        f"nor a llava-hf LlavaForConditionalGeneration (model_type {config.get('model_type')!r}); "
        f"architectures: {config.get('architectures')}"
    )


# ---- reading weights ----------------------------------------------------------------------------------------


def read_pickle_weights(file: str | Path) -> dict[str, torch.Tensor]:
    """A torch-saved dict of tensors, read with `weights_only=True`; anything else is refused."""
    try:
        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code, RuntimeError/EOFError/... for a file that is no pickle
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"refused {file}: not a plain-tensor torch checkpoint (torch.load with weights_only=True failed: "
            f"{first_line})"
        ) from error
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(f"refused {file}: expected a dict of parameter name -> tensor, got {type(data).__name__}")
    return data


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {file}: {error}") from error
    return read_pickle_weights(file)


def _shards(index_file: Path) -> list[Path]:
    """The weight files an index lists, each inside the index's directory."""
    index = json.loads(index_file.read_text())
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file} has no weight_map")
    root = index_file.parent.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        file = (root / name).resolve()
        if root not in file.parents:
            raise CheckpointError(f"{index_file} lists {name!r}, which is outside {root}")
        if not file.is_file():
            raise CheckpointError(f"{index_file} lists {name}, which does not exist")
        files.append(file)
    return files


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `directory`, from the first of `WEIGHT_FILES` present."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        found = directory / name
        if not found.is_file():
            continue
        files = _shards(found) if name.endswith(".index.json") else [found]
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(_read_file(file))
        log.info("read %d tensors from %s", len(state), ", ".join(f.name for f in files))
        return state
    raise CheckpointError(f"{directory} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")


def read_projector_weights(uri: str) -> dict[str, torch.Tensor]:
    """A projector's own parameter names -> tensors, from an official stage-1 `mm_projector.bin`
    (keys like `model.mm_projector.0.weight`; the part after `mm_projector.` is kept), a safetensors file
    of such keys, or one of our `projector.safetensors` files (keys `0.weight`, ...). Local or s3://."""
    local = Path(storage.local_copy(uri) if storage.is_s3(uri) else uri)
    if not local.is_file():
        raise CheckpointError(f"projector weights {uri} not found (expected a file such as mm_projector.bin)")
    state = _read_file(local)
    if not state:
        raise CheckpointError(f"{uri} holds no tensors")
    if any("mm_projector." in key for key in state):
        outside = [k for k in state if "mm_projector." not in k]
        if outside:
            raise CheckpointError(f"{uri} mixes projector and other weights, e.g. {outside[:3]}")
        return {key.split("mm_projector.", 1)[1]: value for key, value in state.items()}
    return state


def load_component(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    """`module.load_state_dict(state)` with every missing, unexpected or wrongly shaped key named."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)} expected"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"shape mismatch ({'; '.join(shapes[:3])})" if shapes else "",
        ]
        raise CheckpointError(f"{source}: the {what} weights do not fit: " + ", ".join(p for p in problems if p))
    module.load_state_dict(state, strict=True)


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ---- official LLaVA (LlavaLlamaForCausalLM) --------------------------------------------------------------


def official_to_ours(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Official parameter names -> ours (`llm.*`, `projector.*`, `vision_tower.*`); unknown names refused."""
    converted, unknown = {}, []
    for key, value in state.items():
        if _ROTARY_BUFFER.search(key):
            continue
        prefix = next(((old, new) for old, new in _OFFICIAL_PREFIXES if key.startswith(old)), None)
        if prefix is None:
            unknown.append(key)
        else:
            converted[prefix[1] + key[len(prefix[0]) :]] = value
    if unknown:
        raise CheckpointError(f"{source}: parameters that are not part of an official LLaVA checkpoint: {unknown[:5]}")
    return converted


def _processor_settings(vision_source: str) -> dict:
    """The CLIP image processor config next to a vision tower (local dir or hub id), {} when there is none."""
    from transformers.utils import cached_file

    try:
        file = cached_file(
            _local(vision_source), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
    except OSError:
        return {}
    return json.loads(Path(file).read_text()) if file else {}


def official_model_config(config: dict, source: str, vision_config, template: str | None = None) -> ModelConfig:
    """Our ModelConfig for an official config.json (`mm_*` fields as llava/model/llava_arch.py reads them)."""

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{source}/config.json: {what} is not supported")

    if config.get("mm_use_im_start_end"):
        raise refuse("mm_use_im_start_end=true (images wrapped in <im_start>/<im_end>)")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise refuse(f"mm_patch_merge_type={config['mm_patch_merge_type']!r} (LLaVA-NeXT any-resolution)")
    aspect = config.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise refuse(f"image_aspect_ratio={aspect!r} (LLaVA-NeXT any-resolution)")
    if "mm_vision_select_layer" not in config:
        raise CheckpointError(f"{source}/config.json has no mm_vision_select_layer")
    projector = config.get("mm_projector_type", "linear")  # the official default (build_vision_projector)
    if projector not in ("linear", "identity") and not re.fullmatch(r"mlp\d+x_gelu", projector):
        raise refuse(f"mm_projector_type={projector!r}")
    processor = _processor_settings(config["mm_vision_tower"])
    return ModelConfig(
        vision_tower=config["mm_vision_tower"],
        llm=source,
        tokenizer=source,
        select_layer=int(config["mm_vision_select_layer"]),
        select_feature=config.get("mm_vision_select_feature", "patch"),
        projector=ProjectorConfig(type=projector),
        template=template or OFFICIAL_DEFAULT_TEMPLATE,
        max_length=int(config.get("tokenizer_model_max_length") or config.get("max_position_embeddings") or 2048),
        # Official preprocessing: expand2square for "pad", else the CLIP processor (resize + centre crop).
        image=ImageConfig(
            size=vision_config.image_size,
            aspect="pad" if aspect == "pad" else "crop",
            mean=processor.get("image_mean", CLIP_MEAN),
            std=processor.get("image_std", CLIP_STD),
        ),
    )


def official_llm_config(config: dict, source: str):
    """The plain causal-LM config inside an official config.json (mm_* and training fields removed)."""
    from transformers import AutoConfig

    llm_type = _OFFICIAL_LLM_TYPES.get(config.get("model_type"))
    if llm_type is None:
        raise CheckpointError(
            f"{source}/config.json: model_type {config.get('model_type')!r} is not supported "
            f"(supported: {sorted(_OFFICIAL_LLM_TYPES)})"
        )
    fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in _OFFICIAL_EXTRA_KEYS}
    return AutoConfig.for_model(llm_type, **fields)


def vision_tower_config(source: str):
    """The CLIPVisionConfig of a vision tower (a CLIPVisionModel or a whole CLIP model; dir or hub id)."""
    from transformers import AutoConfig

    try:
        found = AutoConfig.from_pretrained(_local(source))
    except (OSError, ValueError) as error:  # ValueError: not a valid hub id either
        raise CheckpointError(
            f"cannot read the vision tower config of {source!r} (mm_vision_tower): {error}. "
            f"Point mm_vision_tower in config.json at a local CLIP directory"
        ) from error
    return getattr(found, "vision_config", found)


def describe_official(uri: str, template: str | None = None) -> tuple[ModelConfig, Any, Any]:
    """(our ModelConfig, CLIP vision config, LLM config) of an official checkpoint, no weights read."""
    config = _read_json(storage.join(uri, "config.json"))
    if not config.get("mm_vision_tower"):
        raise CheckpointError(f"{uri}/config.json has no mm_vision_tower (the CLIP model the checkpoint was built on)")
    vision_config = vision_tower_config(config["mm_vision_tower"])
    model_config = official_model_config(config, uri, vision_config, template)
    return model_config, vision_config, official_llm_config(config, uri)


def import_official(path: str | Path, template: str | None = None) -> ImportedParts:
    """An official LLaVA checkpoint directory (local), weights loaded."""
    path = Path(path)
    config, vision_config, llm_config = describe_official(str(path), template)
    state = official_to_ours(read_weights(path), str(path))
    vision_state = _split(state, "vision_tower.")
    if not vision_state:  # the tower was frozen and not saved: load it from mm_vision_tower
        vision_state = _tower_weights(config.vision_tower)
    return _assemble(
        config, vision_config, llm_config, vision_state, _split(state, "projector."), _split(state, "llm."), str(path)
    )


def _tower_weights(source: str) -> dict[str, torch.Tensor]:
    """The CLIPVisionModel weights of `source` (a CLIPVisionModel or whole CLIP model directory or hub id)."""
    from transformers import CLIPVisionModel

    try:
        tower = CLIPVisionModel.from_pretrained(_local(source))  # transformers reads *.bin with weights_only=True
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the vision tower {source!r} (mm_vision_tower): {error}") from error
    return tower.state_dict()


# ---- llava-hf (transformers LlavaForConditionalGeneration) ------------------------------------------------


def describe_llava_hf(uri: str, template: str | None = None) -> tuple[ModelConfig, Any, Any]:
    """(our ModelConfig, CLIP vision config, LLM config) of a llava-hf directory, no weights read.

    Our own exports carry the llava-ray model config (`llava_ray_export.json`); for others the template
    defaults to vicuna_v1 and preprocessing comes from the processor config (`do_pad` -> aspect pad).
    """
    from transformers import LlavaConfig

    hf_config = LlavaConfig.from_dict(_read_json(storage.join(uri, "config.json")))
    meta_file = storage.join(uri, EXPORT_META_FILE)
    meta = _read_json(meta_file) if storage.exists(meta_file) else {}
    if "model" in meta:
        config = config_from_dict(ModelConfig, {**meta["model"], **({"template": template} if template else {})})
    else:
        if not isinstance(hf_config.vision_feature_layer, int):
            raise CheckpointError(
                f"{uri}/config.json: vision_feature_layer={hf_config.vision_feature_layer!r} "
                f"(several layers) is not supported"
            )
        if hf_config.projector_hidden_act != "gelu":
            raise CheckpointError(
                f"{uri}/config.json: projector_hidden_act={hf_config.projector_hidden_act!r} "
                f"is not supported (only gelu, as in LLaVA-1.5)"
            )
        processor_file = storage.join(uri, "preprocessor_config.json")
        processor = _read_json(processor_file) if storage.exists(processor_file) else {}
        log.warning(
            "%s has no %s: assuming the %s template", uri, EXPORT_META_FILE, template or OFFICIAL_DEFAULT_TEMPLATE
        )
        config = ModelConfig(
            select_layer=hf_config.vision_feature_layer,
            select_feature="patch" if hf_config.vision_feature_select_strategy == "default" else "cls_patch",
            projector=ProjectorConfig(type="mlp2x_gelu"),
            template=template or OFFICIAL_DEFAULT_TEMPLATE,
            max_length=hf_config.text_config.max_position_embeddings,
            image=ImageConfig(
                size=hf_config.vision_config.image_size,
                aspect="pad" if processor.get("do_pad") else "crop",
                mean=processor.get("image_mean", CLIP_MEAN),
                std=processor.get("image_std", CLIP_STD),
            ),
        )
    config.vision_tower = config.llm = config.tokenizer = uri
    return config, hf_config.vision_config, hf_config.text_config


def import_llava_hf(path: str | Path, template: str | None = None) -> ImportedParts:
    """A llava-hf directory (local), weights loaded; both the in-memory and the on-disk key naming."""
    from llava.export_hf import from_hf_state_dict

    path = Path(path)
    config, vision_config, llm_config = describe_llava_hf(str(path), template)
    try:
        state = from_hf_state_dict(read_weights(path))
    except KeyError as error:
        raise CheckpointError(f"{path}: {error.args[0]}") from error
    return _assemble(
        config,
        vision_config,
        llm_config,
        _split(state, "vision_tower."),
        _split(state, "projector."),
        _split(state, "llm."),
        str(path),
    )


# ---- both ---------------------------------------------------------------------------------------------------


def describe(uri: str, template: str | None = None) -> tuple[ModelConfig, Any, Any]:
    """(our ModelConfig, CLIP vision config, LLM config) of a llava-hf or official checkpoint, no weights read."""
    layout = detect_layout(uri)
    if layout == LLAVA_RAY:
        raise CheckpointError(f"{uri} is a llava-ray checkpoint, not a foreign one")
    config, vision_config, llm_config = (describe_official if layout == LLAVA_OFFICIAL else describe_llava_hf)(
        uri, template
    )
    if getattr(vision_config, "model_type", None) != "clip_vision_model":  # our model runs a CLIPVisionModel
        raise CheckpointError(
            f"{uri}: vision tower {getattr(vision_config, 'model_type', None)!r} is not supported "
            f"(only CLIP vision towers, as in LLaVA-1.5)"
        )
    return config, vision_config, llm_config


def import_checkpoint(path: str | Path, template: str | None = None) -> ImportedParts:
    """A llava-hf or official checkpoint directory (local), weights loaded."""
    describe(str(path), template)  # refuses what our model cannot run before any weights are read
    if detect_layout(str(path)) == LLAVA_OFFICIAL:
        return import_official(path, template)
    return import_llava_hf(path, template)


def _assemble(
    config: ModelConfig,
    vision_config,
    llm_config,
    vision_state: dict,
    projector_state: dict,
    llm_state: dict,
    source: str,
) -> ImportedParts:
    """Build the three components from their configs (no random init) and load each one's weights."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from transformers.initialization import no_init_weights

    from llava.projectors import build_projector
    from llava.tokenization import load_tokenizer, prepare_tokenizer

    with no_init_weights():  # every weight is overwritten below: skip the random init
        vision = CLIPVisionModel(vision_config)
        llm = AutoModelForCausalLM.from_config(llm_config)
    projector = build_projector(config.projector, vision_config.hidden_size, llm_config.hidden_size)
    if getattr(llm.config, "tie_word_embeddings", False) and "lm_head.weight" not in llm_state:
        llm_state = {**llm_state, "lm_head.weight": llm_state.get("model.embed_tokens.weight")}
        llm_state = {k: v for k, v in llm_state.items() if v is not None}
    load_component(vision, _fit_clip_prefix(vision_state, vision), "vision tower", source)
    load_component(projector, projector_state, f"{config.projector.type} projector", source)
    load_component(llm, llm_state, "language model", source)
    try:
        tokenizer = prepare_tokenizer(load_tokenizer(config.tokenizer_path), config.template)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{source}: cannot load its tokenizer: {error}") from error
    resize_embeddings_deterministically(llm, len(tokenizer))  # e.g. <image>, which official tokenizers lack
    return ImportedParts(config, vision, projector, llm, tokenizer)


def _fit_clip_prefix(state: dict[str, torch.Tensor], vision: nn.Module) -> dict[str, torch.Tensor]:
    """CLIPVisionModel weights as `vision` names them: checkpoints written by transformers < 5 (every official
    and released llava-hf one) put them under `vision_model.`, transformers 5 does not."""
    expects_prefix = any(k.startswith("vision_model.") for k in vision.state_dict())
    has_prefix = bool(state) and all(k.startswith("vision_model.") for k in state)
    if has_prefix and not expects_prefix:
        return {k[len("vision_model.") :]: v for k, v in state.items()}
    if expects_prefix and state and not has_prefix:
        return {"vision_model." + k: v for k, v in state.items()}
    return state


def _local(path: str) -> str:
    return storage.local_copy(path) if storage.is_s3(str(path)) else str(path)
