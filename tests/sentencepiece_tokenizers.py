"""Llama-style SentencePiece tokenizers built offline, shipped the way Vicuna and Llama-2 ship.

`build_sentencepiece_tokenizer_dirs(root)` trains a small BPE SentencePiece model with
the settings of Llama's `tokenizer.model` (byte fallback, dummy prefix, digits split,
no normalisation, `<unk>`=0 `<s>`=1 `</s>`=2) on a generated English corpus, and
writes two tokenizer directories holding only `tokenizer.model` and
`tokenizer_config.json` (`"tokenizer_class": "LlamaTokenizer"`):

- "legacy":     `"legacy": true`  (Llama-1 / Vicuna v1.1 behaviour)
- "non_legacy": `"legacy": false` (Llama-2 / Vicuna v1.5 behaviour: no dummy-prefix `▁`
                after a special token, so `</s>USER` tokenises as `</s>`, `USER`)

The corpus carries the words our conversation templates use (USER, ASSISTANT, Human,
INST, SYS, im_start, ...) so they become whole pieces as in a real Llama vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB_SIZE = 800  # 3 specials + 256 byte pieces + merges; plenty for the corpus below

_WORDS = (
    "a the an of to and in is it that this with for on as at by from be are was what which who how why "
    "image picture photo digit cat dog man woman person people car bus street table room kitchen "
    "describe detail question answer brief concise explain show shows there here left right first second "
    "color colour red blue green white black seven three two one four odd even number compare please "
    "helpful detailed polite chat curious user human artificial intelligence assistant gives answers "
    "language vision visual content provides tasks natural able understand variety you are questions "
    "hello hi yes no thank thanks sure can could would should will"
).split()
_MARKUP = [
    "USER:",
    "ASSISTANT:",
    "Human:",
    "Assistant:",
    "###",
    "### Human:",
    "### Assistant:",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
]  # no newlines: as in Llama's vocabulary, "\n" is the byte piece <0x0A>


def _corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        line = " ".join(words) + rng.choice([".", "?", "!", ","])
        marks = rng.sample(_MARKUP, 2)
        glue = rng.choice([" ", "", "</s>"])  # markup also follows text directly, e.g. "...</s>USER:"
        out.append(f"{marks[0]} {line}{glue}{marks[1]} {rng.randint(0, 999)}")
    return out


def train_sentencepiece_model(path: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a Llama-style BPE SentencePiece model into `path` (a `.model` file)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        minloglevel=2,
        num_threads=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def write_tokenizer_dir(directory: Path, model_bytes: bytes, legacy: bool) -> Path:
    """A tokenizer directory as Llama checkpoints ship it: tokenizer.model + tokenizer_config.json only."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model_bytes)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": legacy,
        "model_max_length": 4096,
        "padding_side": "right",
        "sp_model_kwargs": {},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def build_sentencepiece_tokenizer_dirs(root: Path) -> dict[str, str]:
    """{"legacy": dir, "non_legacy": dir}: the same SentencePiece model in both modes."""
    root = Path(root)
    model = train_sentencepiece_model(root / "sp" / "tokenizer.model").read_bytes()
    return {
        "legacy": str(write_tokenizer_dir(root / "legacy", model, legacy=True)),
        "non_legacy": str(write_tokenizer_dir(root / "non_legacy", model, legacy=False)),
    }
