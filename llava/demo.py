"""The embedded demo behind `llava-ray demo`: offline, no cluster, no cloud.

Prepares the digits data set on a local Ray (stage1 / stage2 / eval parquet), builds
tiny offline base models and a LLaVA model with the LLaVA-1.5 projector, takes one
stage-1 optimizer step on a digits sample read back through the training reader, saves
and reloads the checkpoint, exports it to stock transformers and compares logits.
Training on Ray Train replaces the single step when the training job lands.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava.config import FreezeConfig, ImageConfig, ModelConfig
from llava.export_hf import export_hf
from llava.freeze import apply_freeze, count_trainable, parameter_groups
from llava.data.prepare import prepare_digits
from llava.data.reader import LengthGroupedBatcher, model_ready_dataset
from llava.model import LlavaModel
from llava.ray_runtime import init_ray
from llava.tiny_models import build_tiny_base_models

log = logging.getLogger(__name__)


def run_demo(out: str | Path) -> dict:
    out = Path(out).absolute()
    torch.manual_seed(0)
    log.info("step 1/5: preparing the digits data set under %s", out / "data")
    init_ray()
    manifests = prepare_digits(str(out / "data"))

    log.info("step 2/5: building tiny offline base models under %s", out / "base")
    base = build_tiny_base_models(out / "base")
    config = ModelConfig(
        vision_tower=base["vision_tower"], llm=base["llm"], template="plain", max_length=512,
        image=ImageConfig(size=32, aspect="pad"),
    )
    model = LlavaModel.from_config(config)

    log.info("step 3/5: one stage-1 step (projector only) on a batch read through the training reader")
    apply_freeze(model, FreezeConfig(preset="stage1"))
    rows = model_ready_dataset([str(out / "data" / "stage1")], config, model.num_image_tokens).take(16)
    batch = next(LengthGroupedBatcher(16, model.tokenizer.pad_token_id, config.image.size).batches(rows))
    input_ids, labels, pixel_values = batch.input_ids, batch.labels, batch.pixel_values
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3, FreezeConfig()), weight_decay=0.0)
    loss_before = model(input_ids, attention_mask=batch.attention_mask, pixel_values=pixel_values, labels=labels).loss
    loss_before.backward()
    optimizer.step()

    log.info("step 4/5: saving and reloading the checkpoint")
    checkpoint = model.save_pretrained(out / "checkpoint")
    reloaded = LlavaModel.from_pretrained(checkpoint)

    log.info("step 5/5: exporting to Hugging Face format and comparing logits")
    from transformers import LlavaForConditionalGeneration

    export = export_hf(reloaded, out / "export")
    hf_model = LlavaForConditionalGeneration.from_pretrained(export.path)
    with torch.no_grad():
        ours = reloaded(input_ids, attention_mask=batch.attention_mask, pixel_values=pixel_values, labels=labels)
        theirs = hf_model(input_ids=input_ids, attention_mask=batch.attention_mask, pixel_values=pixel_values).logits
    return {
        "data_dir": str(out / "data"),
        "data": {split: {"rows": m.rows, "skipped": m.skipped} for split, m in manifests.items()},
        "trainable_parameters": count_trainable(model),
        "loss_before_step": round(loss_before.item(), 4),
        "loss_after_step": round(float(ours.loss), 4),
        "export_max_abs_logit_diff": float(((ours.logits - theirs).abs() * batch.attention_mask[..., None]).max()),
        "checkpoint": str(checkpoint),
        "export": export.path,
    }
