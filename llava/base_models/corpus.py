"""The text the base models learn from: the datasets' own captions and turns, plus a corpus generated offline.

The generated corpus is what a web-scale LM corpus is to Vicuna, in the demo's small world: sentences about the
ten digits (their names, numerals, parity, successors) and the demo's two text formats, with a written mention of a
digit where the image will later stand: a caption after it (stage 1's `plain` format) and conversations about it
(stage 2's template). So the LM already describes and answers questions about a digit named in its context, and
alignment only has to make an image read like that mention (LLaVA §4.1: the projector maps image features into the
word-embedding space of a frozen LLM).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pyarrow.parquet as pq

from llava import storage
from llava.data.digits import WORDS
from llava.data.schema import shard_uris
from llava.templates import get_template, normalise_turns, render

# How a text mentions a digit where an image will later be: varied so the LM learns the concept, not one string.
_MENTIONS = (
    "{word}",
    "{digit}",
    "{word} {word}",
    "a {word}",
    "the digit {word}",
    "the number {digit}",
    "a written {word}",
    "{digit} {word}",
    "picture: {word}",
    "a drawing of the number {word}",
)
_FACTS = (
    "{Word} is written {digit}.",
    "The number {digit} is {parity}.",
    "{Word} is an {parity} number.",
    "After {word} comes {next_word}.",
    "The digit after {digit} is {next_digit}.",
    "{digit} plus one is {next_digit}.",
    "A handwritten digit {word} ({digit}).",
    "I wrote the number {word} on a card.",
    "{Word} ({digit}) has the {parity} parity.",
)


def _slots(digit: int) -> dict:
    nxt = (digit + 1) % 10
    word = WORDS[digit]
    parity = "even" if digit % 2 == 0 else "odd"
    return {"word": word, "Word": word.capitalize(), "digit": digit, "parity": parity}, {
        "next_word": WORDS[nxt],
        "next_digit": nxt,
    }


def mention(digit: int, rng: random.Random) -> str:
    slots, _ = _slots(digit)
    return rng.choice(_MENTIONS).format(**slots)


def fact(digit: int, rng: random.Random) -> str:
    slots, nxt = _slots(digit)
    return rng.choice(_FACTS).format(**slots, **nxt)


def read_conversations(uris: list[str]) -> Iterator[list[dict]]:
    """Every row's LLaVA-format turns from prepared datasets (parquet), in shard order; images not read."""
    for uri in uris:
        for shard in shard_uris(uri):
            fs, path = storage.filesystem(shard)
            with fs.open_input_file(path) as f:
                for text in pq.read_table(f, columns=["conversations"]).column("conversations").to_pylist():
                    yield json.loads(text)


def digit_of(turns: list[dict]) -> int | None:
    """The digit a digits-data conversation is about (its first answer names it), else None."""
    for turn in turns:
        if turn["from"] == "gpt":
            for digit, word in enumerate(WORDS):
                if (
                    word in turn["value"].split()
                    or turn["value"].strip() == str(digit)
                    or f"({digit})" in turn["value"]
                ):
                    return digit
            return None
    return None


def render_text(turns: list[dict], template: str, image_text: str, eos: str) -> str:
    """A conversation as the LM will see it in `template`, with `image_text` where each image goes."""
    _, normalised = normalise_turns(turns)
    out = []
    for piece in render(get_template(template), normalised):
        if piece.kind == "text":
            out.append(piece.text)
        elif piece.kind == "image":
            out.append(image_text)
        elif piece.kind == "eos":
            out.append(eos)
    return "".join(out)


def lm_documents(
    captions: list[str],
    instructions: list[str],
    generated: int,
    seed: int,
    eos: str = "</s>",
    caption_template: str = "plain",
    instruction_template: str = "vicuna_v1",
) -> list[str]:
    """Text documents for causal LM pretraining: the datasets' conversations (their images written as a mention
    of the digit when the row is about one, else dropped) and `generated` documents of digit facts."""
    rng = random.Random(seed)
    docs = []
    for uris, template in ((captions, caption_template), (instructions, instruction_template)):
        # plain (stage 1) has nothing between the image and the caption: a newline keeps the caption's first word
        # tokenised as it will be after the image tokens; other templates write "<image>\n" themselves
        after = "" if get_template(template).keep_user_text else "\n"
        for turns in read_conversations(uris):
            digit = digit_of(turns)
            image_text = mention(digit, rng) + after if digit is not None else ""
            docs.append(render_text(turns, template, image_text, eos))
    for _ in range(generated):
        digits = [rng.randrange(10) for _ in range(rng.randint(1, 4))]
        docs.append(" ".join(fact(d, rng) for d in digits))
    rng.shuffle(docs)
    return docs


def tokenizer_texts() -> list[str]:
    """Text the BPE tokenizer is trained on besides its built-in corpus, so digit words are whole tokens."""
    rng = random.Random(0)
    return [fact(d, rng) + " " + mention(d, rng) for d in range(10) for _ in range(20)]
