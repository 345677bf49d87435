"""The one way to load a model, whatever its format: training init (`init_from`), infer, eval, serve, export.

`load_checkpoint` detects the layout (llava.checkpoint_import.detect_layout):

    llava-ray        our checkpoint directory (LlavaModel.from_pretrained), or a training run dir
    llava-hf         a transformers LlavaForConditionalGeneration directory (our export or any llava-hf one)
    llava-official   a haotian-liu/LLaVA LlavaLlamaForCausalLM checkpoint (e.g. liuhaotian/llava-v1.5-7b)

local or s3://. `load_model` adds the device and eval mode for answering.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from llava import storage
from llava.artifact_manifest import verify_or_warn, write_manifest
from llava.artifact_publish import publish
from llava.checkpoint_import import (
    LLAVA_RAY,
    CheckpointError,
    describe,
    detect_layout,
    import_checkpoint,
    load_component,
    read_projector_weights,
)
from llava.config import ModelConfig, config_from_dict
from llava.run_format import CONFIG_FILE, LLM_DIR, VISION_DIR

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
    verify_or_warn(local, f"{layout} checkpoint")  # our exports carry a checksum manifest; others load with a warning
    parts = import_checkpoint(local, template=overrides.pop("template", None))
    config = dataclasses.replace(parts.config, **overrides)
    log.info("imported the %s checkpoint %s (template %s)", layout, uri, config.template)
    return LlavaModel(config, parts.vision, parts.projector, parts.llm, parts.tokenizer).to(dtype)


def checkpoint_model_config(uri: str, **overrides) -> tuple[ModelConfig, int]:
    """(the model config of the checkpoint at `uri`, image tokens per image), without reading weights."""
    from llava.model import image_tokens_per_image

    overrides = _check_overrides(overrides)
    uri = _resolve(uri)
    if detect_layout(uri) == LLAVA_RAY:
        saved = json.loads(storage.read_text(storage.join(uri, CONFIG_FILE)))
        config = config_from_dict(ModelConfig, {**saved["model"], **overrides})
        return config, int(saved["num_image_tokens"])
    config, vision_config, _ = describe(uri, template=overrides.pop("template", None))
    config = dataclasses.replace(config, **overrides)
    return config, image_tokens_per_image(config, vision_config)


IMPORTED_DIR = "imported"  # in a training run dir: the llava-hf / official checkpoint `init_from` named, converted
IMPORT_SOURCE_FILE = "imported_from.json"  # written last into a converted checkpoint: what it was converted from


def _source_dtype(uri: str) -> torch.dtype:
    """The dtype a foreign checkpoint's weights are stored in (config.json `torch_dtype`), so a conversion is exact."""
    config = json.loads(storage.read_text(storage.join(uri, "config.json")))
    name = config.get("torch_dtype") or config.get("dtype") or config.get("text_config", {}).get("dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def import_for_training(uri: str, out: str, template: str | None = None) -> str:
    """The checkpoint training starts from (`init_from`) as a llava-ray checkpoint the workers can load.

    A llava-ray checkpoint or run dir is returned as given. A llava-hf or official checkpoint is converted
    once into a llava-ray checkpoint at `out` (local or s3://) with every component saved as a plain HF
    directory (`llm/`, `vision/`), which the run's own checkpoints then name as their base; `out` is returned.
    A conversion already at `out` from the same source is reused.
    """
    import tempfile

    given, uri = uri, _resolve(uri)
    if detect_layout(uri) == LLAVA_RAY:
        return given
    marker = storage.join(out, IMPORT_SOURCE_FILE)
    if storage.exists(marker) and json.loads(storage.read_text(marker)).get("source") == uri:
        log.info("reusing %s, converted earlier from %s", out, uri)
        return out
    model = load_checkpoint(uri, _source_dtype(uri), template=template)
    config = model.config
    config.vision_tower, config.llm, config.tokenizer = (
        storage.join(out, VISION_DIR),
        storage.join(out, LLM_DIR),
        storage.join(out, LLM_DIR),
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, llm=True, vision=True)
        Path(tmp, IMPORT_SOURCE_FILE).write_text(json.dumps({"source": uri}))
        write_manifest(tmp)  # the marker is part of the checkpoint: listed too
        publish(tmp, out)  # replaces `out` as a whole, manifest last
    log.info("converted %s into the llava-ray checkpoint %s", uri, out)
    return out


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


__all__ = [
    "CheckpointError",
    "checkpoint_model_config",
    "inference_device",
    "import_for_training",
    "load_checkpoint",
    "load_model",
    "load_projector",
]
