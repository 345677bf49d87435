"""Rendered pieces -> `input_ids` + `labels`: the whole string tokenised once, labelled per piece.

The pieces of a rendered conversation are joined into one string (BOS/EOS written as
the tokenizer's own special-token strings, `<image>` as the image token) and tokenised
in one call, with character offsets, the way official LLaVA training and every
inference server (HF, vLLM, SGLang) tokenise a prompt. So `input_ids` are the ids of
the whole string: a piece boundary never changes them (with a non-legacy SentencePiece
tokenizer `</s>USER:` gives `</s>`, `USER`; tokenising `USER:` on its own would give
`▁US`, `ER`). A leading BOS is the tokenizer's BOS id put before the string, as
`tokenizer(prompt)` adds it, so the text after it starts as a fresh string does.
`<image>` is a token of the vocabulary here (as in llava-hf checkpoints, which HF and
vLLM serve), so it sits in the one string; the official code instead tokenises the
text between images as separate strings (`tokenizer_image_token`), which with a
SentencePiece tokenizer puts a dummy-prefix `▁` after every image.

Labels are still decided by the pieces: each token is trained iff the characters it
covers lie in trainable pieces (the answers and their end separators). A token that
covers characters of both a trainable and an untrained piece cannot be masked exactly:
the sample is refused (`SampleRejected("mask_boundary")`), never silently masked.

Each `<image>` becomes `num_image_tokens` copies of the image token id right here, so a
sequence's length is known before the model sees it (batching by length needs that)
and the model only has to scatter the projected features into those positions.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llava.config import IMAGE_TOKEN
from llava.templates import EOS, Piece, SampleRejected, Template, get_template, normalise_turns, render

IGNORE_INDEX = -100  # label of every position that carries no loss
# Marker tokens a template's strings may use; `prepare_tokenizer` adds those missing from the vocabulary.
TEMPLATE_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # images whose placeholders survived truncation (the first num_images of the sample)


class PromptTooLong(ValueError):
    """An inference prompt longer than the model's context."""


def load_tokenizer(path_or_uri: str | Path):
    """The (fast) tokenizer in a directory, hub id or s3:// prefix.

    Directories holding only `tokenizer.model` + `tokenizer_config.json` (how Vicuna and
    Llama-2 ship) load too: transformers converts the SentencePiece model to a fast
    tokenizer, which needs the `sentencepiece` and `protobuf` packages. A fast tokenizer
    is required: labels are built from its character offsets.
    """
    from transformers import AutoTokenizer

    from llava import storage

    path = storage.local_copy(str(path_or_uri)) if storage.is_s3(str(path_or_uri)) else str(path_or_uri)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:
        if (Path(path) / "tokenizer.model").is_file() and not _sentencepiece_available():
            raise ImportError(
                f"{path_or_uri} holds a SentencePiece tokenizer.model; loading it needs the sentencepiece "
                "and protobuf packages (pip install sentencepiece protobuf)"
            ) from error
        raise
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{path_or_uri} loads as a slow tokenizer ({type(tokenizer).__name__}); llava-ray needs a fast one "
            "(character offsets build the loss masks): save it with tokenizer.json, or install sentencepiece "
            "and protobuf so transformers can convert tokenizer.model"
        )
    if hasattr(tokenizer, "legacy"):
        # transformers' save_pretrained leaves `legacy` out of tokenizer_config.json, and a reloaded Llama
        # tokenizer falls back to non-legacy: keep the flag so a saved checkpoint tokenises as training did
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    return tokenizer


def _sentencepiece_available() -> bool:
    try:
        import google.protobuf  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_tokenizer(tokenizer, template: str | Template | None = None):
    """Make a tokenizer usable for LLaVA: add `<image>`, a pad token and the template's specials.

    Returns the tokenizer (modified in place). The caller must resize the LLM's
    embeddings to `len(tokenizer)` if tokens were added.
    """
    specials = [IMAGE_TOKEN]
    template = get_template(template) if isinstance(template, str) else template
    if template is not None:
        strings = [
            template.system_format,
            template.first_user_format or "",
            template.user_format,
            template.assistant_format,
            template.assistant_end,
            template.turn_separator,
            *template.stop_strings,
        ]
        specials += [t for t in TEMPLATE_SPECIAL_TOKENS if any(t in text for text in strings)]
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


@dataclass(frozen=True)
class RenderedText:
    """Pieces joined into the one string the tokenizer sees."""

    text: str
    spans: list[tuple[int, int]]  # per piece: its characters text[start:end]
    pieces: list[Piece]
    leading_bos: bool  # the tokenizer's BOS id goes before the string's ids


def render_text(pieces: Sequence[Piece], tokenizer) -> RenderedText:
    """Join pieces into one string: BOS/EOS as the tokenizer's special-token strings, images as `<image>`.

    A leading BOS piece is not written into the string: it is the id `tokenizer(prompt)`
    puts first, and the text after it is tokenised as the start of a string.
    """
    pieces = list(pieces)
    leading_bos = bool(pieces) and pieces[0].kind == "bos"
    if leading_bos:
        pieces = pieces[1:]
    text, spans = [], []
    position = 0
    for piece in pieces:
        if piece.kind == "text":
            chunk = piece.text
        elif piece.kind == "image":
            chunk = IMAGE_TOKEN
        elif piece.kind == "bos":
            chunk = tokenizer.bos_token or ""
        elif piece.kind == "eos":
            chunk = tokenizer.eos_token
            if chunk is None:
                raise ValueError("the tokenizer has no EOS token; this template ends every answer with it")
        else:
            raise AssertionError(f"unknown piece kind {piece.kind}")
        text.append(chunk)
        spans.append((position, position + len(chunk)))
        position += len(chunk)
    return RenderedText("".join(text), spans, pieces, leading_bos and tokenizer.bos_token_id is not None)


def _token_spans(offsets: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Offsets made contiguous: a character no token claims (e.g. a space a byte-level BPE trims from its
    token's offsets) belongs to the next token, so no character escapes the boundary check."""
    spans, covered = [], 0
    for start, end in offsets:
        if end > start and start > covered:
            start = covered
        spans.append((start, end))
        covered = max(covered, end)
    if spans and covered < length:
        start, end = spans[-1]
        spans[-1] = (start, length)
    return spans


def _encode_pieces(pieces: Sequence[Piece], tokenizer, num_image_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """-> (input_ids, labels, start offsets of each image's placeholder run)."""
    rendered = render_text(pieces, tokenizer)
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    token_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    piece_starts = [start for start, _ in rendered.spans]
    owners: list[list[int]] = []  # per token: indices of the pieces its characters come from
    for start, end in _token_spans(offsets, len(rendered.text)):
        first = max(0, bisect.bisect_right(piece_starts, start) - 1)
        while first + 1 < len(rendered.spans) and rendered.spans[first][1] <= start and start < len(rendered.text):
            first += 1  # skip empty pieces
        owned = [first]
        while owned[-1] + 1 < len(rendered.spans) and rendered.spans[owned[-1] + 1][0] < end:
            owned.append(owned[-1] + 1)
        owners.append(owned)
    _check_special_pieces(rendered, token_ids, owners, tokenizer)

    image_id = image_token_id(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    image_starts: list[int] = []
    if rendered.leading_bos:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for token_id, owned, (start, end) in zip(token_ids, owners, offsets):
        trainable = {rendered.pieces[i].trainable for i in owned}
        if len(trainable) > 1:
            raise SampleRejected(
                "mask_boundary",
                f"token {tokenizer.convert_ids_to_tokens(token_id)!r} covers {rendered.text[start:end]!r}, part of an "
                "answer and part of the untrained text around it, so it cannot be masked exactly",
            )
        if rendered.pieces[owned[0]].kind == "image":
            image_starts.append(len(ids))
            ids.extend([image_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            ids.append(token_id)
            labels.append(token_id if trainable.pop() else IGNORE_INDEX)
    return ids, labels, image_starts


def _check_special_pieces(rendered: RenderedText, token_ids: list[int], owners: list[list[int]], tokenizer) -> None:
    """Every image/BOS/EOS piece must come out as exactly its own single token."""
    expected = {"image": image_token_id(tokenizer), "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    tokens_of: dict[int, list[int]] = {}
    for token_index, owned in enumerate(owners):
        for piece_index in owned:
            tokens_of.setdefault(piece_index, []).append(token_index)
    for piece_index, piece in enumerate(rendered.pieces):
        if piece.kind == "text" or rendered.spans[piece_index][0] == rendered.spans[piece_index][1]:
            continue
        tokens = tokens_of.get(piece_index, [])
        if len(tokens) != 1 or token_ids[tokens[0]] != expected[piece.kind] or owners[tokens[0]] != [piece_index]:
            raise ValueError(
                f"the tokenizer does not keep {rendered.text[slice(*rendered.spans[piece_index])]!r} as one special "
                f"token (got {tokenizer.convert_ids_to_tokens([token_ids[t] for t in tokens])}); "
                "load it with llava.tokenization.load_tokenizer + prepare_tokenizer"
            )


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
    image_placement: str = "start",
) -> TokenizedSample:
    """A LLaVA-format conversation -> a training sample with loss only on the answers.

    `num_images`, when given, is how many images the row carries: the number of
    `<image>` placeholders must match it. `image_placement`: "start" moves a turn's
    `<image>` to its start as official training does, "keep" leaves it where written
    (llava.templates). Raises `SampleRejected` (with a `reason`) instead of ever
    returning a sample without a trainable token.
    """
    template = get_template(template) if isinstance(template, str) else template
    system, turns = check_training_turns(conversations, num_images)
    pieces = render(template, turns, system, image_placement)
    ids, labels, image_starts = _encode_pieces(pieces, tokenizer, num_image_tokens)
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
    image_placement: str = "start",
) -> tuple[list[int], int]:
    """History ending with a user turn -> (prompt ids ending at the assistant cue, number of images).

    Tokenised exactly as training tokenises the same turns, so the prompt's ids are
    the training sample's ids up to the answer.
    """
    template = get_template(template) if isinstance(template, str) else template
    system, turns = normalise_turns(messages)
    if turns[-1][0] != "user":
        raise SampleRejected("bad_roles", "a prompt must end with a user turn")
    pieces = render(template, turns, system, image_placement)
    ids, _, image_starts = _encode_pieces(pieces, tokenizer, num_image_tokens)
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
