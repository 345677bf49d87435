"""Checkpoint conversion: our LlavaModel -> a stock `LlavaForConditionalGeneration` directory.

The exported directory (model + processor with image processor, tokenizer and chat
template) loads with `AutoProcessor` + `LlavaForConditionalGeneration.from_pretrained`
and is the format vLLM / SGLang serve. Only `mlp2x_gelu` (LLaVA-1.5) maps onto HF's
`multi_modal_projector` (linear_1 -> GELU -> linear_2); other projectors are exported
in our own checkpoint format, and the result says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llava.chat_template import build_chat_template
from llava.config import config_to_dict
from llava.templates import get_template

log = logging.getLogger(__name__)

EXPORT_META_FILE = "llava_ray_export.json"  # our template and model config, beside HF's files

# Our parameter names -> transformers' LlavaForConditionalGeneration names.
_PREFIX_MAP = [
    ("vision_tower.", "model.vision_tower."),
    ("projector.0.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
]
# How llava-hf checkpoints name them on disk (transformers saves this legacy layout too).
_DISK_PREFIX_MAP = [
    ("vision_tower.", "vision_tower."),
    ("projector.0.", "multi_modal_projector.linear_1."),
    ("projector.2.", "multi_modal_projector.linear_2."),
    ("llm.model.", "language_model.model."),
    ("llm.lm_head.", "language_model.lm_head."),
]


@dataclass
class ExportResult:
    path: str
    format: str  # "hf-llava" | "llava-ray"
    message: str


def _renamed(state_dict: dict[str, torch.Tensor], prefixes: list[tuple[str, str]], unknown: str) -> dict:
    """Every key's first matching `(old, new)` prefix replaced; a key that matches none raises (no silent drops)."""
    converted = {}
    for key, value in state_dict.items():
        old, new = next(((old, new) for old, new in prefixes if key.startswith(old)), (None, None))
        if old is None:
            raise KeyError(f"{unknown} {key!r}")
        converted[new + key[len(old):]] = value
    return converted


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our parameters to HF Llava's."""
    return _renamed(state_dict, _PREFIX_MAP, "no HF Llava name for parameter")


def from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llava's parameter names (in memory or on disk) -> ours: the inverse of `to_hf_state_dict`."""
    flipped = [(theirs, ours) for ours, theirs in _PREFIX_MAP + _DISK_PREFIX_MAP]
    return _renamed(state_dict, flipped, "unknown HF Llava parameter")


def hf_llava_config(model):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=model.vision_tower.config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=model.config.select_layer,
        vision_feature_select_strategy="default" if model.config.select_feature == "patch" else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)),
    )


def build_processor(model):
    """An HF LlavaProcessor matching our preprocessing (CLIP resize + centre crop) and template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = model.config.image
    if image.aspect != "crop":
        log.warning(
            "the model was trained with image.aspect=%s; HF's CLIP processor only resizes and centre-crops, "
            "so pad/resize images on the client to reproduce training exactly",
            image.aspect,
        )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image.size},
        crop_size={"height": image.size, "width": image.size},
        image_mean=list(image.mean),
        image_std=list(image.std),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=model.tokenizer,
        patch_size=model.vision_tower.config.patch_size,
        vision_feature_select_strategy="default" if model.config.select_feature == "patch" else "full",
        chat_template=build_chat_template(get_template(model.config.template)),
        num_additional_image_tokens=1,
    )


def export_hf(model, out: str | Path) -> ExportResult:
    """Write `out` as a stock HF Llava directory, or in our format when the projector has no HF twin."""
    from transformers import LlavaForConditionalGeneration

    out = Path(out)
    if model.config.projector.type != "mlp2x_gelu":
        model.save_pretrained(out, llm=True, vision=True)
        message = (
            f"projector {model.config.projector.type!r} has no LlavaForConditionalGeneration equivalent "
            f"(only mlp2x_gelu does): wrote a llava-ray checkpoint to {out} instead"
        )
        log.warning(message)
        return ExportResult(str(out), "llava-ray", message)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_model = LlavaForConditionalGeneration(hf_llava_config(model)).to(next(model.parameters()).dtype)
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(state), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"HF export mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    hf_model.generation_config.eos_token_id = model.tokenizer.eos_token_id
    hf_model.generation_config.pad_token_id = model.tokenizer.pad_token_id
    hf_model.save_pretrained(out, safe_serialization=True)
    build_processor(model).save_pretrained(out)
    (out / EXPORT_META_FILE).write_text(json.dumps({"template": model.config.template,
                                                   "model": config_to_dict(model.config)}, indent=2))
    message = f"wrote a LlavaForConditionalGeneration + LlavaProcessor directory to {out}"
    log.info(message)
    return ExportResult(str(out), "hf-llava", message)
