"""One way to load a model for answering: a llava-ray checkpoint, a training run dir, or an HF Llava export."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava import storage

log = logging.getLogger(__name__)


def inference_device() -> tuple[str, torch.dtype]:
    """(device, dtype): a GPU in bf16 where supported, else the CPU in fp32 (no native bf16 on CPUs)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def load_model(uri: str, device: str | None = None, dtype: torch.dtype | None = None):
    """The model at `uri` (local or s3://), on `device`, in eval mode."""
    from llava.export_hf import is_hf_export, load_hf_export
    from llava.model import LlavaModel
    from llava.training.engine import resolve_model_uri

    auto_device, auto_dtype = inference_device()
    device, dtype = device or auto_device, dtype or auto_dtype
    uri = resolve_model_uri(uri)
    local = storage.local_copy(uri) if storage.is_s3(uri) else uri
    if not Path(local).is_dir():
        raise FileNotFoundError(f"no model at {uri}: not a directory")
    model = load_hf_export(local, dtype) if is_hf_export(local) else LlavaModel.from_pretrained(local, dtype=dtype)
    log.info("model %s ready on %s (%s)", uri, device, dtype)
    return model.to(device).eval()
