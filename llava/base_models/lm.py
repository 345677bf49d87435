"""Causal-LM pretraining of the tiny Llama on text (llava.base_models.corpus): it speaks the demo's language
before it sees an image, as Vicuna does before LLaVA's stage 1."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from llava.base_models.config import BasePretrainConfig
from llava.base_models.corpus import lm_documents
from llava.base_models.schedule import adamw_cosine, optimizer_step
from llava.tiny_models import llama_config

log = logging.getLogger(__name__)


def pack(documents: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Documents -> (rows, seq_len) token ids: each document as <s> text, concatenated, cut into rows."""
    ids = []
    for ids_of_doc in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *ids_of_doc]
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)  # (rows, seq_len)


def pretrain_lm(config: BasePretrainConfig, tokenizer, out: str | Path) -> dict:
    """Train the LM on the captions' and instructions' text plus the generated corpus; write out/ (model +
    tokenizer); returns the run's metrics."""
    from transformers import LlamaForCausalLM

    c = config.lm
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    documents = lm_documents(
        config.captions,
        config.instructions,
        c.corpus_documents,
        config.seed,
        tokenizer.eos_token,
        config.caption_template,
        config.instruction_template,
    )
    rows = pack(documents, tokenizer, c.seq_len)  # (R, T)
    model = LlamaForCausalLM(llama_config(config.sizes, tokenizer))
    optimizer, scheduler = adamw_cosine(model.parameters(), c.lr, c.weight_decay, c.warmup_steps, c.steps)
    history, started = [], time.perf_counter()
    for step in range(c.steps):
        batch = rows[torch.randint(0, len(rows), (c.batch_size,), generator=generator)]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer_step(model, optimizer, scheduler, loss, step, c.steps, history, "lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "loss_start": history[0]["loss"],
        "loss_end": float(np.mean([h["loss"] for h in history[-10:]])),
        "documents": len(documents),
        "tokens": rows.numel(),
        "seconds": time.perf_counter() - started,
        "history": history,
    }
