"""Stage-2 training throughput: our Ray Train + DeepSpeed loop vs. transformers `Trainer` + LlavaForConditionalGeneration.

    python benchmarks/training.py [--steps 60] [--llm-width 384] [--llm-layers 4] [--out-dir DIR]

Both sides train the same model (tiny CLIP + a Llama of the given size, mlp2x_gelu projector,
initialised identically: ours, then exported to HF format for the peer) on the same digits
stage-2 conversations (vicuna_v1, identical token ids and labels from llava.tokenization), with the
same global batch (16), learning rate, cosine schedule and number of optimizer steps, on this machine.

- ours: `llava.training.trainer.train` (2 Ray Train workers x 1 CPU, DeepSpeed ZeRO-2, length-grouped
  batches of 8 per worker);
- peer: the way users fine-tune HF LLaVA today: one process, `Trainer(per_device_train_batch_size=16)`
  with a pad-to-longest collator, default random sampler (no length grouping), all cores to torch.

Tokens/s counts real (non-padding) tokens per second of steady-state training (the first 20% of steps,
start-up included, are left out on both sides). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_inputs(out: Path, width: int, layers: int) -> dict:
    from llava.config import ImageConfig, ModelConfig
    from llava.data.prepare import prepare_digits
    from llava.model import LlavaModel
    from llava.tiny_models import TinySizes, build_tiny_base_models

    if not (out / "data" / "stage2" / "_manifest.json").exists():
        prepare_digits(str(out / "data"))
    base = build_tiny_base_models(
        out / "base", TinySizes(llm_width=width, llm_layers=layers, llm_heads=max(4, width // 64))
    )
    config = ModelConfig(
        vision_tower=base["vision_tower"],
        llm=base["llm"],
        template="vicuna_v1",
        max_length=256,
        image=ImageConfig(size=32),
    )
    model = LlavaModel.from_config(config)
    model.save_pretrained(out / "init", llm=False)  # stage-1-like start: base LLM + a fresh projector
    return {"init": str(out / "init"), "data": str(out / "data" / "stage2"), "model": model}


def run_ours(inputs: dict, out: Path, steps: int, lr: float) -> dict:
    from llava.training.config import load_train_config
    from llava.training.trainer import train

    config = load_train_config(
        "finetune",
        preset="demo",
        overrides=[
            f"init_from={inputs['init']}",
            f"data.train=[{inputs['data']}]",
            f"checkpoint.storage_path={out / 'runs'}",
            f"checkpoint.run_name=bench-{time.time_ns()}",
            f"optim.max_steps={steps}",
            "optim.epochs=100",
            f"optim.lr={lr}",
            "data.micro_batch_size=8",
            "optim.global_batch_size=16",
            "log_every_steps=5",
            "data.cache=true",
        ],
    )
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    steady = result.metrics[len(result.metrics) // 5 :]
    seconds = sum(m["step_time_s"] for m in steady)
    tokens = sum(m["tokens_per_s"] * m["step_time_s"] for m in steady)
    padding = sum(m["padding_fraction"] for m in steady) / len(steady)
    return {
        "tokens_per_s": tokens / seconds,
        "padding": padding,
        "wall_s": wall,
        "loss_end": result.metrics[-1]["loss"],
    }


def run_peer(inputs: dict, out: Path, steps: int, lr: float) -> dict:
    import json as _json

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import LlavaForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    from llava.data.schema import shard_uris
    from llava.export_hf import export_hf
    from llava.image_processing import load_pixel_values
    from llava.model import LlavaModel
    from llava.tokenization import IGNORE_INDEX, tokenize_conversation

    ours = LlavaModel.from_pretrained(inputs["init"])
    export = export_hf(ours, out / "peer_init")
    model = LlavaForConditionalGeneration.from_pretrained(export.path)
    rows = [r for shard in shard_uris(inputs["data"]) for r in pq.read_table(shard).to_pylist()]

    class Items(torch.utils.data.Dataset):  # the official kind: tokenise and decode per __getitem__
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            sample = tokenize_conversation(
                _json.loads(rows[i]["conversations"]),
                ours.tokenizer,
                "vicuna_v1",
                ours.num_image_tokens,
                256,
                len(rows[i]["images"]),
            )
            pixels = load_pixel_values(rows[i]["images"][0], ours.config.image)
            return {"input_ids": sample.input_ids, "labels": sample.labels, "pixel_values": pixels}

    counts = {"real": 0, "padded": 0}

    def collate(items):
        length = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), length), ours.tokenizer.pad_token_id)
        labels = torch.full((len(items), length), IGNORE_INDEX)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, x in enumerate(items):
            ids[i, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
            labels[i, : len(x["labels"])] = torch.tensor(x["labels"])
            mask[i, : len(x["input_ids"])] = 1
        counts["real"] += int(mask.sum())
        counts["padded"] += mask.numel()
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": torch.from_numpy(np.stack([x["pixel_values"] for x in items])),
        }

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps // 5:
                marks["start"], marks["real"] = time.perf_counter(), counts["real"]

    args = TrainingArguments(
        output_dir=str(out / "peer"),
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    model.model.vision_tower.requires_grad_(False)  # stage 2: projector + LLM
    started = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=Items(), data_collator=collate, callbacks=[Clock()])
    trainer.train()
    wall = time.perf_counter() - started
    seconds = time.perf_counter() - marks["start"]
    return {
        "tokens_per_s": (counts["real"] - marks["real"]) / seconds,
        "padding": 1 - counts["real"] / counts["padded"],
        "wall_s": wall,
        "loss_end": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--llm-width", type=int, default=384)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out-dir", default=str(ROOT / ".cache" / "benchmarks" / "training"))
    args = parser.parse_args()
    import logging

    import torch

    from llava.ray_runtime import init_ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out_dir)
    init_ray()
    inputs = build_inputs(out, args.llm_width, args.llm_layers)
    params = sum(p.numel() for p in inputs.pop("model").parameters())
    ours = run_ours(inputs, out, args.steps, args.lr)
    peer = run_peer(inputs, out, args.steps, args.lr)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: {params / 1e6:.1f}M parameters (LLM width {args.llm_width}, {args.llm_layers} layers); "
        f"{args.steps} steps of global batch 16 on digits stage 2\n"
    )
    print(
        "| metric | ours (Ray Train + DeepSpeed ZeRO-2, 2 workers) | HF Trainer + LlavaForConditionalGeneration | ratio |"
    )
    print("|---|---|---|---|")
    for key, label in (
        ("tokens_per_s", "training tokens/s (steady state)"),
        ("padding", "padding fraction"),
        ("wall_s", "wall time incl. start-up (s)"),
        ("loss_end", "loss, last logging interval"),
    ):
        ratio = ours[key] / peer[key] if peer[key] else float("nan")
        print(f"| {label} | {ours[key]:.3f} | {peer[key]:.3f} | {ratio:.2f}x |")
    print(json.dumps({"ours": ours, "peer": peer}))


if __name__ == "__main__":
    main()
