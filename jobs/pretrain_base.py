"""Pretrain the tiny base models offline: a CLIP (contrastive, on image-caption data) and a Llama (causal LM on text).

    llava-ray pretrain-base --out runs/base captions=[runs/demo/data/stage1] instructions=[runs/demo/data/stage2]

Writes DIR/vision (CLIPVisionModel + image processor) and DIR/llm (LlamaForCausalLM + tokenizer), the two trained
as Ray tasks side by side; a re-run with the same config and data skips them (llava/base_models/build.py).
Prints {"vision_tower", "llm", "metrics", "cached"}. `tiny-model` writes random ones instantly (unit tests).
"""

from __future__ import annotations

import argparse

from jobs.arguments import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output directory (the config's `out`)")
    add_config_arguments(parser, "captions=[runs/demo/data/stage1] clip.steps=200 seed=1")


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from llava.base_models.build import pretrain_base_models
    from llava.base_models.config import BasePretrainConfig
    from llava.config import load_config
    from llava.ray_runtime import init_ray

    overrides = [*args.overrides, *([f"out={args.out}"] if args.out else [])]
    config = load_config(BasePretrainConfig, args.config, overrides).validate()
    emit(pretrain_base_models(config, lambda: init_ray(args.address, s3_endpoint=args.s3_endpoint)))
    return 0
