"""Contrastive pretraining of the tiny CLIP (Radford et al. 2021): vision and text towers on captioned images.

Only the vision tower is kept (`out/vision`, a CLIPVisionModel + its image processor): LLaVA uses CLIP's image
encoder and drops its text encoder. Captions repeat in a small data set (the digits have ten), so a batch's
identical captions are merged into one text and every image with it is a positive (UniCL, Yang et al. 2022);
with unique captions this is exactly CLIP's symmetric InfoNCE.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from llava import storage
from llava.base_models.config import BasePretrainConfig
from llava.base_models.schedule import adamw_cosine, optimizer_step
from llava.config import ImageConfig
from llava.data.schema import shard_uris
from llava.image_processing import load_pixel_values
from llava.tiny_models import vision_config, write_image_processor

log = logging.getLogger(__name__)


def captioned_images(uris: list[str], image: ImageConfig) -> tuple[torch.Tensor, list[str]]:
    """(pixels (N, 3, S, S) float32, captions): each row's first image and its first answer."""
    pixels, captions = [], []
    for uri in uris:
        for shard in shard_uris(uri):
            fs, path = storage.filesystem(shard)
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["images", "conversations"])
            for images, conversations in zip(
                table.column("images").to_pylist(), table.column("conversations").to_pylist()
            ):
                answers = [t["value"] for t in json.loads(conversations) if t["from"] == "gpt"]
                if images and answers:
                    pixels.append(load_pixel_values(images[0], image))
                    captions.append(answers[0].strip())
    if not pixels:
        raise ValueError(f"no image with a caption in {uris}")
    return torch.from_numpy(np.stack(pixels)), captions


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, filling with the border (edge) value."""
    if max_shift <= 0:
        return pixels
    n, _, h, w = pixels.shape  # (n, 3, H, W)
    padded = F.pad(pixels, (max_shift,) * 4, mode="replicate")  # (n, 3, H + 2s, W + 2s)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_of_image: torch.Tensor, scale
) -> torch.Tensor:
    """Symmetric InfoNCE; image_emb (B, P), text_emb (U, P) for the batch's U distinct texts, text_of_image (B,)."""
    # CLIP Fig. 3: logits = scale * normalised image @ normalised text^T; CE over both axes
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B, U)
    image_to_text = F.cross_entropy(logits, text_of_image)
    positives = (text_of_image[None, :] == torch.arange(len(text_emb))[:, None]).float()  # (U, B)
    text_to_image = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(-1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def pretrain_clip(config: BasePretrainConfig, tokenizer, out: str | Path) -> dict:
    """Train CLIP on config.captions, write out/ (vision tower + image processor); returns the run's metrics."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    c, sizes = config.clip, config.sizes
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    pixels, captions = captioned_images(config.captions, ImageConfig(size=sizes.image_size, aspect="pad"))
    texts = sorted(set(captions))
    text_index = torch.tensor([texts.index(t) for t in captions])  # (N,)
    encoded = tokenizer(
        [t + tokenizer.eos_token for t in texts],
        padding="max_length",
        truncation=True,
        max_length=c.max_text_tokens,
        return_tensors="pt",
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=c.text_width,
        intermediate_size=c.text_width * 4,
        num_hidden_layers=c.text_layers,
        num_attention_heads=4,
        max_position_embeddings=c.max_text_tokens,
        projection_dim=sizes.vision_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = vision_config(sizes)
    model = CLIPModel(
        CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(), projection_dim=sizes.vision_width)
    )
    optimizer, scheduler = adamw_cosine(model.parameters(), c.lr, c.weight_decay, c.warmup_steps, c.steps)
    history, started = [], time.perf_counter()
    for step in range(c.steps):
        batch = torch.randperm(len(captions), generator=generator)[: c.batch_size]  # (B,)
        present, text_of_image = torch.unique(text_index[batch], return_inverse=True)  # (U,), (B,)
        image_emb = _features(
            model.get_image_features(pixel_values=random_shift(pixels[batch], c.shift_pixels, generator))
        )
        text_emb = text_features(model, encoded["input_ids"][present], encoded["attention_mask"][present])  # (U, P)
        loss = contrastive_loss(image_emb, text_emb, text_of_image, model.logit_scale.exp().clamp(max=100))
        optimizer_step(model, optimizer, scheduler, loss, step, c.steps, history, "clip")
    model.eval()
    with torch.no_grad():  # zero-shot accuracy on the training images: the caption CLIP ranks first
        img = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(text_features(model, encoded["input_ids"], encoded["attention_mask"]), dim=-1)
        train_accuracy = ((img @ txt.T).argmax(-1) == text_index).float().mean().item()
    tower = CLIPVisionModel(vision)
    tower.load_state_dict(model.vision_model.state_dict())
    tower.save_pretrained(out)
    write_image_processor(out, sizes.image_size)
    return {
        "loss_start": history[0]["loss"],
        "loss_end": float(np.mean([h["loss"] for h in history[-10:]])),
        "zero_shot_train_accuracy": train_accuracy,
        "images": len(captions),
        "texts": len(texts),
        "seconds": time.perf_counter() - started,
        "history": history,
    }


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(U, P): the text tower's state at each caption's last token (its EOS), projected. Pooled here because
    CLIPTextModel pools at argmax(input_ids) when eos_token_id == 2 (the original CLIP vocabulary's quirk)."""
    hidden = model.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (U, T, D)
    last = attention_mask.sum(1) - 1  # (U,)
    return model.text_projection(hidden[torch.arange(len(hidden)), last])  # (U, P)


def _features(output) -> torch.Tensor:
    """transformers 5 may return an output object from get_*_features: its pooled projection."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
