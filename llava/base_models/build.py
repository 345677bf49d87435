"""Pretrain both base models as two Ray tasks side by side, cached by config hash.

    pretrain_base_models(BasePretrainConfig(out="runs/base", captions=[...stage1], instructions=[...stage2]))

writes `out/vision` (CLIPVisionModel + CLIPImageProcessor, llava.base_models.clip) and `out/llm` (LlamaForCausalLM
+ tokenizer, llava.base_models.lm), normal HF directories loaded by the same `from_pretrained` calls as
openai/clip-vit-* and lmsys/vicuna-*. Each directory records its fingerprint (the config fields and data that
shape it) in `pretrain.json`; a re-run with the same fingerprint skips that model. A task returns its files and
the driver writes them, so `out` may be s3:// and the tasks may run on any node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable

from llava import storage
from llava.base_models.config import BasePretrainConfig
from llava.config import config_from_dict, config_to_dict
from llava.data.schema import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

RECORD = "pretrain.json"
COMPONENTS = {"vision": "clip", "llm": "lm"}  # output dir -> the config section only it depends on


def _data_identity(uris: list[str]) -> list:
    """What a dataset holds, not where its shards happen to be (a re-prepared identical dataset keeps it)."""
    found = []
    for uri in uris:
        if not storage.exists(storage.join(uri, MANIFEST_FILE)):  # parquet written by other tools: its location
            found.append(uri)
            continue
        m = Manifest.read(uri)
        found.append(
            {"rows": m.rows, "sources": m.sources, "extra": {k: v for k, v in m.extra.items() if k != "attempt"}}
        )
    return found


def fingerprint(config: BasePretrainConfig, component: str) -> str:
    """Hash of everything that shapes `component` (vision or llm): sizes, seed, its own section, its data."""
    d = config_to_dict(config)
    other = COMPONENTS["llm" if component == "vision" else "vision"]
    shaped = {k: v for k, v in d.items() if k not in ("out", "threads", other, "captions", "instructions")}
    shaped["captions"] = _data_identity(config.captions)
    if component == "llm":
        shaped["instructions"] = _data_identity(config.instructions)
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


def cached(out: str, component: str, print_: str) -> dict | None:
    record_uri = storage.join(out, component, RECORD)
    if not storage.exists(record_uri):
        return None
    record = json.loads(storage.read_text(record_uri))
    return record if record.get("fingerprint") == print_ else None


def _pretrain_files(component: str, config: dict) -> tuple[dict[str, bytes], dict]:
    """Run in a Ray task: train one base model in a temp dir; returns ({relative path: bytes}, metrics)."""
    import torch

    from llava.base_models.corpus import tokenizer_texts
    from llava.tiny_models import build_tokenizer

    c = config_from_dict(BasePretrainConfig, config)
    torch.set_num_threads(c.threads)
    tokenizer = build_tokenizer(c.sizes.vocab_size, tokenizer_texts())
    with tempfile.TemporaryDirectory() as tmp:
        if component == "vision":
            from llava.base_models.clip import pretrain_clip as pretrain
        else:
            from llava.base_models.lm import pretrain_lm as pretrain
        metrics = pretrain(c, tokenizer, tmp)
        files = {}
        for root, _, names in os.walk(tmp):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, tmp)] = f.read()
    return files, metrics


def pretrain_base_models(config: BasePretrainConfig, start_ray: Callable[[], None] | None = None) -> dict:
    """{"vision_tower", "llm", "metrics": {vision, llm}, "cached": [components skipped]}. `start_ray` is called
    before the first task (a run whose models are all cached never starts Ray)."""
    import ray

    config.validate()
    plain = config_to_dict(config)
    prints = {component: fingerprint(config, component) for component in COMPONENTS}
    records = {component: cached(config.out, component, prints[component]) for component in COMPONENTS}
    if start_ray and any(record is None for record in records.values()):
        start_ray()
    task = ray.remote(num_cpus=config.threads)(_pretrain_files)
    running = {c: task.remote(c, plain) for c, record in records.items() if record is None}
    for component in running:
        log.info("pretrain-base: %s (%s) running as a Ray task", component, prints[component])
    for component, ref in running.items():
        files, metrics = ray.get(ref)
        target = storage.join(config.out, component)
        if storage.exists(target):
            storage.remove(target)  # an older fingerprint: replaced as a whole
        for rel, data in sorted(files.items()):
            storage.write_bytes(storage.join(target, rel), data)
        records[component] = {"fingerprint": prints[component], "metrics": metrics}
        storage.write_text(storage.join(target, RECORD), json.dumps(records[component], indent=1))
        log.info(
            "pretrain-base: %s -> %s (loss %.3f -> %.3f)", component, target, metrics["loss_start"], metrics["loss_end"]
        )
    return {
        "vision_tower": storage.join(config.out, "vision"),
        "llm": storage.join(config.out, "llm"),
        "metrics": {c: {k: v for k, v in r["metrics"].items() if k != "history"} for c, r in records.items()},
        "cached": [c for c in COMPONENTS if c not in running],
    }
