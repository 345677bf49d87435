"""Show how one LLaVA-format sample is tokenised and which tokens carry loss (labels -100 = masked)."""

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
    parser.add_argument("--template", required=True, help="conversation template name")
    parser.add_argument("--json", required=True, help="a JSON file holding one sample, or a list (see --index)")
    parser.add_argument("--index", type=int, default=0, help="which sample when the file holds a list")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--image-tokens", type=int, default=576, help="placeholder tokens per image (576 = CLIP-L/336)")
    parser.add_argument(
        "--image-placement",
        choices=["start", "keep"],
        default="start",
        help="start: a turn's <image> moves to its start + newline (official LLaVA); keep: as written",
    )


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from llava.templates import SampleRejected
    from llava.tokenization import load_tokenizer, prepare_tokenizer, tokenize_conversation

    with open(args.json) as f:
        sample = json.load(f)
    if isinstance(sample, list):
        sample = sample[args.index]
    if not isinstance(sample, dict) or "conversations" not in sample:
        print(f"error: {args.json} does not hold a LLaVA sample with 'conversations'", file=sys.stderr)
        return 2
    tokenizer = prepare_tokenizer(load_tokenizer(args.tokenizer), args.template)
    images = sample.get("image")
    num_images = 0 if images is None else (len(images) if isinstance(images, list) else 1)
    try:
        tokenized = tokenize_conversation(
            sample["conversations"],
            tokenizer,
            args.template,
            args.image_tokens,
            args.max_length,
            num_images,
            args.image_placement,
        )
    except SampleRejected as error:
        print(f"error: sample {sample.get('id')!r} rejected: {error}", file=sys.stderr)
        return 2
    tokens = tokenizer.convert_ids_to_tokens(tokenized.input_ids)
    emit({"input_ids": tokenized.input_ids, "labels": tokenized.labels, "tokens": tokens})
    return 0
