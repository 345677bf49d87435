"""The one way to load a model, whatever its format: training init (`init_from`), infer, eval, serve, export.

`load_checkpoint` detects the layout (llava.checkpoint_import.detect_layout):

    llava-ray        our checkpoint directory (LlavaModel.from_pretrained), or a training run dir
    llava-hf         a transformers LlavaForConditionalGeneration directory (our export or any llava-hf one)
    llava-official   a haotian-liu/LLaVA LlavaLlamaForCausalLM checkpoint (e.g. liuhaotian/llava-v1.5-7b)

local or s3://. `load_model` adds the device and eval mode for answering.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from llava import storage
from llava.checkpoint_import import (LLAVA_RAY, CheckpointError, describe, detect_layout, import_checkpoint,
                                     load_component, read_projector_weights)
from llava.config import ModelConfig, config_from_dict

log = logging.getLogger(__name__)

# Fields of a saved model config that a job may replace on load (the data side), as LlavaModel.from_pretrained.
OVERRIDABLE = ("template", "max_length", "image")


def inference_device() -> tuple[str, torch.dtype]:
    """(device, dtype): a GPU in bf16 where supported, else the CPU in fp32 (no native bf16 on CPUs)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def _resolve(uri: str) -> str:
    """A checkpoint dir as is; a training run dir -> the model it produced. Missing -> FileNotFoundError."""
    from llava.run_format import resolve_model_uri

    if not storage.is_s3(uri) and not Path(uri).is_dir():
        raise FileNotFoundError(f"no model at {uri}: not a directory")
    return resolve_model_uri(uri)


def _check_overrides(overrides: dict) -> dict:
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"only {', '.join(OVERRIDABLE)} can be overridden on load, got {sorted(unknown)}")
    return {k: v for k, v in overrides.items() if v is not None}


def load_checkpoint(uri: str, dtype: torch.dtype = torch.float32, **overrides):
    """The LlavaModel at `uri` (any supported layout, local or s3://), on the CPU in `dtype`.

    `overrides` (template, max_length, image) replace the data-side fields of the checkpoint's config,
    e.g. stage 2 with another template; for official checkpoints, which do not record their template,
    `template` replaces the vicuna_v1 default.
    """
    from llava.model import LlavaModel

    overrides = _check_overrides(overrides)
    uri = _resolve(uri)
    layout = detect_layout(uri)
    if layout == LLAVA_RAY:
        return LlavaModel.from_pretrained(uri, dtype=dtype, **overrides)
    local = storage.local_copy(uri) if storage.is_s3(uri) else uri
    parts = import_checkpoint(local, template=overrides.pop("template", None))
    config = dataclasses.replace(parts.config, **overrides)
    log.info("imported the %s checkpoint %s (template %s)", layout, uri, config.template)
    return LlavaModel(config, parts.vision, parts.projector, parts.llm, parts.tokenizer).to(dtype)


def checkpoint_model_config(uri: str, **overrides) -> tuple[ModelConfig, int]:
    """(the model config of the checkpoint at `uri`, image tokens per image), without reading weights."""
    import json

    from llava.model import CONFIG_FILE, image_tokens_per_image

    overrides = _check_overrides(overrides)
    uri = _resolve(uri)
    if detect_layout(uri) == LLAVA_RAY:
        saved = json.loads(storage.read_text(storage.join(uri, CONFIG_FILE)))
        config = config_from_dict(ModelConfig, {**saved["model"], **overrides})
        return config, int(saved["num_image_tokens"])
    config, vision_config = describe(uri, template=overrides.pop("template", None))
    config = dataclasses.replace(config, **overrides)
    return config, image_tokens_per_image(config, vision_config)


def load_projector(model, uri: str) -> None:
    """Replace `model`'s projector weights with those in the file at `uri` (local or s3://): an official
    stage-1 `mm_projector.bin` (read with weights_only=True) or safetensors. Type and shapes must match."""
    load_component(model.projector, read_projector_weights(uri), f"{model.config.projector.type} projector", uri)
    log.info("projector initialised from %s", uri)


def load_model(uri: str, device: str | None = None, dtype: torch.dtype | None = None, template: str | None = None):
    """The model at `uri` (local or s3://, any layout `load_checkpoint` reads), on `device`, in eval mode."""
    auto_device, auto_dtype = inference_device()
    device, dtype = device or auto_device, dtype or auto_dtype
    model = load_checkpoint(uri, dtype, template=template)
    log.info("model %s ready on %s (%s)", uri, device, dtype)
    return model.to(device).eval()


__all__ = ["CheckpointError", "checkpoint_model_config", "inference_device", "load_checkpoint", "load_model",
           "load_projector"]
