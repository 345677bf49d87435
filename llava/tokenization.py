"""Rendered pieces -> `input_ids` + `labels`, built segment by segment.

Each piece is tokenised on its own and its ids are appended; the label of every id
is decided by the piece it came from. Each `<image>` becomes `num_image_tokens`
copies of the image token id right here, so a sequence's length is known before the
model sees it (batching by length needs that) and the model only has to scatter the
projected features into those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from llava.config import IMAGE_TOKEN
from llava.templates import EOS, Piece, SampleRejected, Template, get_template, normalise_turns, render

IGNORE_INDEX = -100  # label of every position that carries no loss


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # images whose placeholders survived truncation (the first num_images of the sample)


class PromptTooLong(ValueError):
    """An inference prompt longer than the model's context."""


def prepare_tokenizer(tokenizer, template: str | Template | None = None):
    """Make a tokenizer usable for LLaVA: add `<image>`, a pad token and the template's specials.

    Returns the tokenizer (modified in place). The caller must resize the LLM's
    embeddings to `len(tokenizer)` if tokens were added.
    """
    specials = [IMAGE_TOKEN]
    template = get_template(template) if isinstance(template, str) else template
    if template is not None and template.name == "chatml":
        specials += ["<|im_start|>", "<|im_end|>"]
    missing = [t for t in specials if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def image_token_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; call llava.tokenization.prepare_tokenizer first")
    return token_id


def _encode_pieces(pieces: Iterable[Piece], tokenizer, num_image_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """-> (input_ids, labels, start offsets of each image's placeholder run)."""
    image_id = image_token_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    image_starts: list[int] = []
    for piece in pieces:
        if piece.kind == "text":
            piece_ids = tokenizer(piece.text, add_special_tokens=False)["input_ids"]
        elif piece.kind == "image":
            image_starts.append(len(ids))
            piece_ids = [image_id] * num_image_tokens
        elif piece.kind == "bos":
            piece_ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        elif piece.kind == "eos":
            piece_ids = [tokenizer.eos_token_id]
        else:
            raise AssertionError(f"unknown piece kind {piece.kind}")
        ids.extend(piece_ids)
        labels.extend(piece_ids if piece.trainable else [IGNORE_INDEX] * len(piece_ids))
    return ids, labels, image_starts


def check_training_turns(conversations: list[dict], num_images: Optional[int] = None):
    """Validate a training conversation -> (system override, turns). Raises `SampleRejected`.

    The checks that need no tokenizer: roles alternate user/assistant and end with an
    answer, no answer is empty, and the `<image>` placeholders match the row's images.
    """
    system, turns = normalise_turns(conversations)
    if turns[-1][0] != "assistant":
        raise SampleRejected("bad_roles", "a training conversation must end with an assistant answer")
    empty = [i for i, (role, text) in enumerate(turns) if role == "assistant" and not text.strip()]
    if empty:
        raise SampleRejected("no_trainable_tokens", f"answer(s) {empty} are empty: nothing to train on")
    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if num_images is not None and placeholders != num_images:
        raise SampleRejected(
            "image_count_mismatch", f"{placeholders} {IMAGE_TOKEN} placeholder(s) for {num_images} image(s)"
        )
    return system, turns


def tokenize_conversation(
    conversations: list[dict],
    tokenizer,
    template: str | Template,
    num_image_tokens: int,
    max_length: int,
    num_images: Optional[int] = None,
) -> TokenizedSample:
    """A LLaVA-format conversation -> a training sample with loss only on the answers.

    `num_images`, when given, is how many images the row carries: the number of
    `<image>` placeholders must match it. Raises `SampleRejected` (with a `reason`)
    instead of ever returning a sample without a trainable token.
    """
    template = get_template(template) if isinstance(template, str) else template
    system, turns = check_training_turns(conversations, num_images)
    ids, labels, image_starts = _encode_pieces(render(template, turns, system), tokenizer, num_image_tokens)
    if len(ids) > max_length:
        # Never cut through an image's placeholder run: its features are all-or-nothing.
        cut = max_length
        for start in image_starts:
            if start < cut < start + num_image_tokens:
                cut = start
        ids, labels = ids[:cut], labels[:cut]
        image_starts = [s for s in image_starts if s < cut]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleRejected("too_long", f"no answer token fits in max_length={max_length}")
    return TokenizedSample(ids, labels, len(image_starts))


def tokenize_prompt(
    messages: list[dict],
    tokenizer,
    template: str | Template,
    num_image_tokens: int,
    max_length: Optional[int] = None,
) -> tuple[list[int], int]:
    """History ending with a user turn -> (prompt ids ending at the assistant cue, number of images)."""
    template = get_template(template) if isinstance(template, str) else template
    system, turns = normalise_turns(messages)
    if turns[-1][0] != "user":
        raise SampleRejected("bad_roles", "a prompt must end with a user turn")
    ids, _, image_starts = _encode_pieces(render(template, turns, system), tokenizer, num_image_tokens)
    if max_length is not None and len(ids) > max_length:
        raise PromptTooLong(f"the prompt is {len(ids)} tokens; the model's context is {max_length}")
    return ids, len(image_starts)


def stop_token_ids(tokenizer, template: str | Template) -> list[int]:
    """Token ids that end generation for this template (EOS, and single-token stop strings)."""
    template = get_template(template) if isinstance(template, str) else template
    ids = [tokenizer.eos_token_id]
    ends = [template.assistant_end] if template.assistant_end != EOS else []
    for text in list(template.stop_strings) + ends:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids
