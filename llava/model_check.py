"""An end-to-end check of the model path on one drawn image, used by `llava-ray demo`.

Builds tiny offline base models, a LLaVA model with the LLaVA-1.5 projector, takes
one stage-1 optimizer step on one conversation, saves and reloads the checkpoint,
exports it to stock transformers and compares logits.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch

from llava.config import FreezeConfig, ImageConfig, ModelConfig
from llava.export_hf import export_hf
from llava.freeze import apply_freeze, count_trainable, parameter_groups
from llava.image_processing import load_pixel_values, stack_pixel_values
from llava.model import LlavaModel
from llava.tiny_models import build_tiny_base_models
from llava.tokenization import tokenize_conversation

log = logging.getLogger(__name__)

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat digit is shown in the image?"},
    {"from": "gpt", "value": "The digit in the image is seven."},
]


def drawn_digit_png() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("L", (48, 64), 0)
    ImageDraw.Draw(image).line([(8, 10), (40, 10), (18, 58)], fill=255, width=6)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_model_check(out: str | Path) -> dict:
    out = Path(out)
    torch.manual_seed(0)
    log.info("step 1/4: building tiny offline base models under %s", out / "base")
    base = build_tiny_base_models(out / "base")
    config = ModelConfig(
        vision_tower=base["vision_tower"], llm=base["llm"], max_length=512, image=ImageConfig(size=32, aspect="pad")
    )
    model = LlavaModel.from_config(config)

    log.info("step 2/4: one stage-1 step (projector only) on a drawn digit")
    apply_freeze(model, FreezeConfig(preset="stage1"))
    sample = tokenize_conversation(CONVERSATION, model.tokenizer, config.template, model.num_image_tokens, 512, 1)
    input_ids = torch.tensor([sample.input_ids])
    labels = torch.tensor([sample.labels])
    pixel_values = stack_pixel_values([load_pixel_values(drawn_digit_png(), config.image)])
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3, FreezeConfig()), weight_decay=0.0)
    loss_before = model(input_ids, pixel_values=pixel_values, labels=labels).loss
    loss_before.backward()
    optimizer.step()

    log.info("step 3/4: saving and reloading the checkpoint")
    checkpoint = model.save_pretrained(out / "checkpoint")
    reloaded = LlavaModel.from_pretrained(checkpoint)

    log.info("step 4/4: exporting to Hugging Face format and comparing logits")
    from transformers import LlavaForConditionalGeneration

    export = export_hf(reloaded, out / "export")
    hf_model = LlavaForConditionalGeneration.from_pretrained(export.path)
    with torch.no_grad():
        ours = reloaded(input_ids, pixel_values=pixel_values, labels=labels)
        theirs = hf_model(input_ids=input_ids, pixel_values=pixel_values).logits
    return {
        "trainable_parameters": count_trainable(model),
        "loss_before_step": round(loss_before.item(), 4),
        "loss_after_step": round(float(ours.loss), 4),
        "export_max_abs_logit_diff": float((ours.logits - theirs).abs().max()),
        "checkpoint": str(checkpoint),
        "export": export.path,
    }
