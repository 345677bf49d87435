"""Checkpoint conversion: our LlavaModel -> a stock `LlavaForConditionalGeneration` directory.

The exported directory (model + processor with image processor, tokenizer and chat
template) loads with `AutoProcessor` + `LlavaForConditionalGeneration.from_pretrained`
and is the format vLLM / SGLang serve. Only `mlp2x_gelu` (LLaVA-1.5) maps onto HF's
`multi_modal_projector` (linear_1 -> GELU -> linear_2); other projectors are exported
in our own checkpoint format, and the result says so. The destination (local or s3://) is replaced as a
whole and gets a checksum manifest (llava/artifact_manifest.py), which loaders verify.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llava.artifact_manifest import clear_destination, write_manifest
from llava.artifact_publish import publish
from llava.chat_template import build_chat_template, text_after_bos
from llava.config import ImageConfig, ModelConfig, config_to_dict
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
        converted[new + key[len(old) :]] = value
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


def build_image_processor(image: ImageConfig):
    """An HF image processor giving our `preprocess_image` pixels (PIL backend: the same PIL resampling).

    transformers' Llava image processor pads to a square with the mean colour (`do_pad`)
    before its CLIP resize + centre crop, as official LLaVA-1.5 (`expand2square`) and our
    `aspect=pad` do; `aspect=resize` squashes to size x size without a crop.
    """
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    square = {"height": image.size, "width": image.size}
    common = dict(
        image_mean=list(image.mean),
        image_std=list(image.std),
        resample=PILImageResampling.BICUBIC,
        crop_size=square,
        do_convert_rgb=True,
    )
    if image.aspect == "resize":
        return LlavaImageProcessorPil(size=square, do_center_crop=False, do_pad=False, **common)
    return LlavaImageProcessorPil(
        size={"shortest_edge": image.size}, do_center_crop=True, do_pad=image.aspect == "pad", **common
    )


def export_tokenizer(tokenizer):
    """A copy of `tokenizer` for the export: it adds no BOS of its own, since the chat template writes it.

    Every path through the chat template then has exactly the BOS training had: tokenize=True,
    vLLM's chat endpoint, and `processor(text=apply_chat_template(...))` alike. A SentencePiece
    tokenizer keeps its `legacy` mode: transformers' save_pretrained leaves the flag out of
    tokenizer_config.json and a reloaded tokenizer would fall back to non-legacy tokenisation.
    """
    import copy

    exported = copy.deepcopy(tokenizer)
    if getattr(exported, "add_bos_token", False):
        exported.add_bos_token = False
    if hasattr(exported, "legacy"):
        exported.init_kwargs["legacy"] = exported.legacy
    return exported


def build_processor(model):
    """An HF LlavaProcessor for `model`: see `make_processor`."""
    return make_processor(model.config, model.tokenizer, model.vision_tower.config.patch_size)


def make_processor(config: ModelConfig, tokenizer, patch_size: int):
    """An HF LlavaProcessor with our preprocessing (`image.aspect` included), template and image placement."""
    from transformers import LlavaProcessor

    tokenizer = export_tokenizer(tokenizer)
    chat_template = build_chat_template(
        get_template(config.template), config.image_placement, text_after_bos(tokenizer)
    )
    return LlavaProcessor(
        image_processor=build_image_processor(config.image),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default" if config.select_feature == "patch" else "full",
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )


_PIXELS = {
    "pad": "pads the image to a square with the mean colour (`do_pad: true`), then resizes it to {size}x{size}, as "
    "official LLaVA-1.5 training does",
    "crop": "resizes the shortest edge to {size} and centre-crops {size}x{size} (CLIP preprocessing)",
    "resize": "resizes the image to {size}x{size} without keeping its aspect ratio",
}


def export_readme(model) -> str:
    """README.md of an HF export: how to prompt it and feed it images the way it was trained."""
    image, template = model.config.image, get_template(model.config.template)
    pixels = _PIXELS[image.aspect].format(size=image.size)
    placement = (
        " (a user turn's single image goes first, as `<image>\\n`)" if model.config.image_placement == "start" else ""
    )
    if template.bos:
        bos = (
            f"The template writes the BOS token `{model.tokenizer.bos_token}` itself and the tokenizer adds none "
            "(`add_bos_token: false`), so every path through the template has exactly one; a prompt written "
            "by hand must start with it."
        )
    else:
        bos = "Prompts start without a BOS token, as in training; the tokenizer adds none (`add_bos_token: false`)."
    fill = tuple(int(m * 255) for m in image.mean)
    return f"""# LLaVA model exported by llava-ray

`LlavaForConditionalGeneration` + `LlavaProcessor`, trained with the `{model.config.template}` conversation
template on images `{image.aspect}` at {image.size} px. `{EXPORT_META_FILE}` holds the full llava-ray model config.

## Prompts
The processor and tokenizer carry a chat template that renders OpenAI/HF-style messages exactly as training
did{placement}. Let it build the prompt:

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")

with images as `{{"type": "image", "image": PIL_image}}` (or `"url"` / `"path"`) content parts. vLLM and
SGLang apply the same template to `image_url` parts on their OpenAI chat endpoint.

{bos}

## Images
The image processor {pixels}. A transformers version whose Llava image processor lacks `do_pad` ignores
it: then pad the image yourself (a square canvas of colour {fill}, the image centred) before passing it.
"""


def export_hf(model, out: str | Path) -> ExportResult:
    """Write `out` (a local directory or s3:// prefix) as a stock HF Llava directory, or in our format when the
    projector has no HF twin.

    The destination is replaced as a whole: a previous export there is removed first (marked incomplete while
    this one is written), never mixed with the new files; a non-empty destination that is not a previous
    llava-ray artifact is refused. `_checksums.json`, written last, lists every file with its sha256."""
    from llava import storage

    out = str(out)
    if storage.is_s3(out):
        with tempfile.TemporaryDirectory(prefix="llava-export-") as tmp:
            fmt = _write_export(model, Path(tmp))
            publish(tmp, out)
    else:
        fmt = _write_export(model, clear_destination(out))
    if fmt == "llava-ray":
        message = (
            f"projector {model.config.projector.type!r} has no LlavaForConditionalGeneration equivalent "
            f"(only mlp2x_gelu does): wrote a llava-ray checkpoint to {out} instead"
        )
        log.warning(message)
    else:
        message = f"wrote a LlavaForConditionalGeneration + LlavaProcessor directory to {out}"
        log.info(message)
    return ExportResult(out, fmt, message)


def _write_export(model, out: Path) -> str:
    """Write the export into the empty local directory `out`, its manifest last; returns its format."""
    from transformers import LlavaForConditionalGeneration

    if model.config.projector.type != "mlp2x_gelu":
        model.save_pretrained(out, llm=True, vision=True)  # writes its manifest
        return "llava-ray"
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
    (out / "README.md").write_text(export_readme(model))
    (out / EXPORT_META_FILE).write_text(
        json.dumps({"template": model.config.template, "model": config_to_dict(model.config)}, indent=2)
    )
    write_manifest(out)
    return "hf-llava"
