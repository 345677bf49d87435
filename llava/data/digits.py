"""The embedded default data set: scikit-learn's handwritten digits, real and offline.

1,797 8x8 grey images (UCI optical digits, values 0-16) become 32x32 PNGs, split once
with a fixed seed into 1,497 training and 300 held-out images:

    stage1  image + caption, in the paper's stage-1 form (a brief-description prompt, the caption)
    stage2  instruction conversations about the same training images: which digit, even or odd,
            the next digit (one to three turns)
    eval    held-out images with one question whose answer is the bare digit
"""

from __future__ import annotations

import io
import json
import random

import numpy as np

from llava.config import IMAGE_TOKEN
from llava.data.sources import caption_conversation

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EVAL_QUESTION = "What digit is shown in the image? Answer with a single number."
HELDOUT = 300
SPLIT_SEED = 0
IMAGE_SIZE = 32


def digit_png(pixels: np.ndarray, size: int = IMAGE_SIZE) -> bytes:
    """An 8x8 array of 0-16 intensities -> a size x size grey PNG (white digit on black)."""
    from PIL import Image

    grey = Image.fromarray((pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8), "L")
    buffer = io.BytesIO()
    grey.resize((size, size), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def _instruction_turns(digit: int, rng: random.Random) -> list[dict]:
    qa = [
        (rng.choice(["What digit is shown in the image?", "Which number is written here?", EVAL_QUESTION]), str(digit)),
        ("Is the number even or odd?", "even" if digit % 2 == 0 else "odd"),
        ("What digit comes next?", str((digit + 1) % 10)),
    ]
    first, rest = qa[0], qa[1:]
    rng.shuffle(rest)
    chosen = [first] + rest[: rng.randint(0, 2)]
    turns = []
    for i, (question, answer) in enumerate(chosen):
        value = (
            (f"{IMAGE_TOKEN}\n{question}" if rng.random() < 0.5 else f"{question}\n{IMAGE_TOKEN}")
            if i == 0
            else question
        )
        turns += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return turns


def build_digits(seed: int = 0) -> dict[str, list[dict]]:
    """{"stage1": rows, "stage2": rows, "eval": rows}: raw rows with images inline (see ingest.RAW_SCHEMA)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(digits.target))
    heldout, train = order[:HELDOUT], order[HELDOUT:]
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"stage1": [], "stage2": [], "eval": []}
    for index in train:
        digit, png = int(digits.target[index]), digit_png(digits.images[index])
        caption = f"A handwritten digit {WORDS[digit]} ({digit})."
        row = {"image_refs": None, "images": [png], "source": "digits"}
        splits["stage1"].append(
            {
                **row,
                "id": f"digits-{index}",
                "conversations": json.dumps(caption_conversation(str(index), caption, seed)),
            }
        )
        splits["stage2"].append(
            {**row, "id": f"digits-{index}", "conversations": json.dumps(_instruction_turns(digit, rng))}
        )
    for index in heldout:
        digit = int(digits.target[index])
        turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{EVAL_QUESTION}"}, {"from": "gpt", "value": str(digit)}]
        splits["eval"].append(
            {
                "id": f"digits-{index}",
                "image_refs": None,
                "images": [digit_png(digits.images[index])],
                "conversations": json.dumps(turns),
                "source": "digits",
            }
        )
    return splits
