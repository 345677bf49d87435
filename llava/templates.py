"""Conversation templates: how a LLaVA conversation becomes a sequence of pieces.

A template renders a conversation into `Piece`s (text, image placeholder, BOS, EOS),
each marked trainable or not. `llava.tokenization` tokenises the rendered string once
(as official training and every inference server do) and labels each token by the
piece its characters come from, so the loss mask never depends on re-tokenising parts
of the string and counting (the official code's "tokenization mismatch" bug, LLaVA
issues #661/#1166/#1706).

Image placement (`image_placement`, default "start"): as official training does
(`preprocess_multimodal`, haotian-liu/LLaVA llava/train/train.py), a user turn holding
one `<image>` is rewritten to `<image>\n{text without it, stripped}`, wherever the JSON
put the placeholder. "keep" leaves every placeholder where it was written. A turn with
two or more `<image>` always keeps its written positions: the official code would
collapse them into one placeholder (it trains one image per sample), which would lose
images; interleaved multi-image text ("compare <image> with <image>") stays readable.

Rendered forms (REFERENCE.md §1, official `llava/conversation.py`):
  plain      <image>{caption}\n
  vicuna_v1  {system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>
  llava_v1   same as vicuna_v1 with the "human" system prompt
  v1_paper   {system} ###Human: {q} ###Assistant: {a} ###Human: ...
  llama_2    <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] ...
  chatml     <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from llava.config import IMAGE_TOKEN

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)

EOS = "\x00eos\x00"  # marker: the tokenizer's own end-of-sequence token


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""  # default system prompt; a leading "system" turn overrides it
    system_format: str = "{system}"  # text before the first user turn (when the system prompt is non-empty)
    first_user_format: Optional[str] = None  # llama_2 puts the system prompt inside the first user turn
    user_format: str = "{content}"  # ends with the assistant cue: the inference prompt stops here
    assistant_format: str = " {content}"  # trained
    assistant_end: str = EOS  # trained: the stop the model must learn to emit
    turn_separator: str = ""  # untrained text after an assistant end
    bos: bool = True  # start with the tokenizer's BOS (when it has one)
    bos_each_user_turn: bool = False  # llama_2: <s> before every [INST]
    keep_user_text: bool = True  # plain: the human turn is replaced by its image(s) alone
    stop_strings: tuple[str, ...] = ()  # extra strings that end generation (besides EOS)


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            name="plain",
            user_format="{content}",
            assistant_format="{content}",
            assistant_end="\n",
            keep_user_text=False,
            stop_strings=("\n",),
        ),
        Template(
            name="vicuna_v1",
            system=VICUNA_SYSTEM,
            system_format="{system} ",
            user_format="USER: {content} ASSISTANT:",
        ),
        Template(
            name="llava_v1",
            system=LLAVA_SYSTEM,
            system_format="{system} ",
            user_format="USER: {content} ASSISTANT:",
        ),
        Template(
            name="v1_paper",
            system=LLAVA_SYSTEM,
            system_format="{system} ###",
            user_format="Human: {content} ###Assistant:",
            assistant_end=" ###",
            stop_strings=("###",),
        ),
        Template(
            name="llama_2",
            system=LLAMA_2_SYSTEM,
            system_format="",
            first_user_format="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
            user_format="[INST] {content} [/INST]",
            assistant_format=" {content} ",
            bos_each_user_turn=True,
        ),
        Template(
            name="chatml",
            system="Answer the questions.",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            assistant_format="{content}",
            assistant_end="<|im_end|>",
            turn_separator="\n",
            bos=False,
            stop_strings=("<|im_end|>",),
        ),
    ]
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass(frozen=True)
class Piece:
    """One unit of a rendered conversation. kind: text | image | bos | eos."""

    kind: str
    text: str = ""
    trainable: bool = False


class SampleRejected(ValueError):
    """A conversation that cannot become a correctly masked sample. `reason` is a stable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalise_turns(conversations: Iterable[dict]) -> tuple[Optional[str], list[tuple[str, str]]]:
    """LLaVA-format turns -> (system override, [(role, text)]) with roles user/assistant, validated."""
    turns = list(conversations or [])
    if not turns:
        raise SampleRejected("empty_conversation", "the conversation has no turns")
    system = None
    normalised: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleRejected("bad_roles", f"turn {i} is not a {{'from', 'value'}} object: {turn!r:.80}")
        role = ROLE_ALIASES.get(str(turn["from"]).lower())
        value = turn["value"]
        if role is None or not isinstance(value, str):
            raise SampleRejected("bad_roles", f"turn {i} has unknown role {turn['from']!r} or a non-text value")
        if role == "system":
            if i != 0:
                raise SampleRejected("bad_roles", f"a system turn may only come first (turn {i})")
            system = value
            continue
        expected = "user" if len(normalised) % 2 == 0 else "assistant"
        if role != expected:
            raise SampleRejected("bad_roles", f"turn {i} is {turn['from']!r}; expected the {expected} to speak")
        if role == "assistant" and IMAGE_TOKEN in value:
            raise SampleRejected("image_count_mismatch", f"turn {i}: {IMAGE_TOKEN} inside an assistant answer")
        normalised.append((role, value))
    if not normalised:
        raise SampleRejected("empty_conversation", "the conversation has only a system turn")
    return system, normalised


IMAGE_PLACEMENTS = ("start", "keep")


def place_image(text: str, placement: str = "start") -> str:
    """A user turn's text with its `<image>` placed as `placement` says (see the module docstring)."""
    if placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"image placement must be one of {IMAGE_PLACEMENTS}, got {placement!r}")
    if placement == "keep" or text.count(IMAGE_TOKEN) != 1:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def _user_pieces(text: str, keep_text: bool) -> list[Piece]:
    """Split user text at each <image> into text and image pieces."""
    parts = text.split(IMAGE_TOKEN)
    pieces: list[Piece] = []
    for i, part in enumerate(parts):
        if i > 0:
            pieces.append(Piece("image"))
        if keep_text and part:
            pieces.append(Piece("text", part))
    return pieces


def _format_user(template: Template, fmt: str, content: str, system: str) -> list[Piece]:
    """Apply a user format string; the content keeps its image placeholders."""
    if not template.keep_user_text:
        return _user_pieces(content, keep_text=False)
    head, tail = fmt.split("{content}")
    return _user_pieces(head.format(system=system) + content + tail, keep_text=True)


def render(
    template: Template, turns: list[tuple[str, str]], system: Optional[str] = None, image_placement: str = "start"
) -> list[Piece]:
    """Render validated turns. If the last turn is the user's, the result is an inference prompt."""
    system = template.system if system is None else system
    turns = [(role, place_image(text, image_placement) if role == "user" else text) for role, text in turns]
    pieces: list[Piece] = []
    if template.bos and not template.bos_each_user_turn:
        pieces.append(Piece("bos"))
    if system and template.system_format and template.keep_user_text:
        pieces.append(Piece("text", template.system_format.format(system=system)))
    for index, (role, text) in enumerate(turns):
        if role == "user":
            if template.bos and template.bos_each_user_turn:
                pieces.append(Piece("bos"))
            fmt = template.first_user_format if index == 0 and template.first_user_format and system else template.user_format
            pieces.extend(_format_user(template, fmt, text, system))
        else:
            pieces.append(Piece("text", template.assistant_format.format(content=text), trainable=True))
            if template.assistant_end == EOS:
                pieces.append(Piece("eos", trainable=True))
            else:
                pieces.append(Piece("text", template.assistant_end, trainable=True))
            if template.turn_separator:
                pieces.append(Piece("text", template.turn_separator))
    return _merge_text(pieces)


def _merge_text(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring text pieces with the same trainability (and drop empty ones)."""
    merged: list[Piece] = []
    for piece in pieces:
        if piece.kind == "text" and not piece.text:
            continue
        previous = merged[-1] if merged else None
        if piece.kind == "text" and previous and previous.kind == "text" and previous.trainable == piece.trainable:
            merged[-1] = Piece("text", previous.text + piece.text, piece.trainable)
        else:
            merged.append(piece)
    return merged
