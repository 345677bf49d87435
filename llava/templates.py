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

Rendered forms, byte for byte as the official code builds them (haotian-liu/LLaVA v1.2.2
`llava/conversation.py` get_prompt, `llava/train/train.py` preprocess_*); `<s>` is the
tokenizer's BOS, which the official tokenisation (`tokenizer_image_token`) puts first:
  plain           <s><image>{caption}\n
  vicuna_v1 (v1)  <s>{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>
  llava_v1        vicuna_v1 with the "curious human" system prompt
  v0 (v1_paper)   <s>{system}\n\n### Human: {q}\n### Assistant: {a}\n### Human: {q2}\n### Assistant: {a2}\n###
                  (the string ends with "### ", its space included)
  llava_v0        <s>{system}###Human: {q}###Assistant: {a}###Human: {q2}###Assistant: {a2}###
  llava_llama_2   <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>
  mistral_instruct  <s>[INST] {q} [/INST] {a} </s>[INST] {q2} [/INST] {a2} </s>   (no default system prompt)
  chatml_direct   <|im_start|>system\n{system}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>...
  mpt             chatml_direct's layout with MPT's system prompt
  chatml          standard ChatML (Qwen, HF): chatml_direct plus "\n" after every <|im_end|>; not an official LLaVA format
An inference prompt is the same string cut after the last user turn's assistant cue
(`... ASSISTANT:`, `### Assistant:`, `[/INST]`, `<|im_start|>assistant\n`), exactly the
official `conv.get_prompt()` after `append_message(roles[1], None)`. The official names
(`--version` / `--conv-mode`: v1, vicuna_v1, llava_v1, v0, llava_v0, v0_plain, plain,
llava_llama_2, mistral_instruct, chatml_direct, mistral_direct, mpt) all work as template
names (`TEMPLATE_ALIASES`); so do this project's earlier `llama_2` and `v1_paper`.

v0 is the one official format whose training and inference strings differ: the release
that trained the v1 paper's models (default conversation conv_vicuna_v0) ran `--version v0`
through the fallback `_add_speaker_and_signal` ("### Human: ...\n"; later releases default
to vicuna_v1, so there the same flag trains vicuna_v1), while official inference prompts v0
models with conv_llava_v0 ("###Human: ...###Assistant:"). A template
here renders one format for training and inference alike (a model should be prompted the
way it was trained), so the two are two templates: `v0` (alias `v1_paper`) is the
training format, `llava_v0` the inference one, to prompt an official v0 checkpoint the
way the official eval did.

Where this deliberately differs from the official code:
- Loss mask: only the answers and their end separators are trained. Official v0 training
  also trains each "### Assistant: " header and the first two tokens of each human turn
  (`_mask_targets`), and the official v1/llama_2/mpt masks drop a whole sample when their
  token counting drifts ("tokenization mismatch").
- An empty system prompt: vicuna_v1, llava_v1, v0 and llava_v0 keep the separator
  (` USER: ...`, `\n\n### Human: ...`, `###Human: ...`) as the official string does;
  the ChatML family drops the system block (officially the system text carries its own
  `<|im_start|>system\n` header, so "no system prompt" cannot be expressed there).
- The ChatML family (chatml_direct, mpt, chatml) never starts with BOS; the official code
  prepends one only when the tokenizer adds BOS by default.
- `*_mmtag` versions (`<Image><image></Image>` and an extra "Received." turn) are not provided.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

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
MPT_SYSTEM = (
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)

EOS = "\x00eos\x00"  # marker: the tokenizer's own end-of-sequence token


@dataclass(frozen=True)
class Template:
    name: str
    system: str = ""  # default system prompt; a leading "system" turn overrides it
    system_format: str = "{system}"  # text before the first user turn (when the system prompt is non-empty)
    system_always: bool = False  # render system_format even for an empty system prompt (official: system + sep)
    first_user_format: Optional[str] = None  # llama_2 puts the system prompt inside the first user turn
    user_format: str = "{content}"  # ends with the assistant cue: the inference prompt stops here
    assistant_format: str = " {content}"  # trained
    assistant_end: str = EOS  # trained: the stop the model must learn to emit
    turn_separator: str = ""  # untrained text after an assistant end
    bos: bool = True  # start with the tokenizer's BOS (when it has one)
    bos_each_user_turn: bool = False  # llama_2: <s> before every [INST]
    keep_user_text: bool = True  # plain: the human turn is replaced by its image(s) alone
    stop_strings: tuple[str, ...] = ()  # extra strings that end generation (besides EOS)


_LLAMA_2_FIRST_USER = "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]"
_CHATML_DIRECT_USER = "<|im_start|>user\n{content}<|im_end|><|im_start|>assistant\n"

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        # official plain (stage 1): conv_llava_plain / preprocess_plain
        Template(
            name="plain",
            user_format="{content}",
            assistant_format="{content}",
            assistant_end="\n",
            keep_user_text=False,
            stop_strings=("\n",),
        ),
        # official conv_vicuna_v1 (SeparatorStyle.TWO: sep " ", sep2 "</s>")
        Template(
            name="vicuna_v1",
            system=VICUNA_SYSTEM,
            system_format="{system} ",
            system_always=True,
            user_format="USER: {content} ASSISTANT:",
        ),
        # official conv_llava_v1: vicuna_v1 with the "human" system prompt
        Template(
            name="llava_v1",
            system=LLAVA_SYSTEM,
            system_format="{system} ",
            system_always=True,
            user_format="USER: {content} ASSISTANT:",
        ),
        # official `--version v0` training (train.py preprocess -> _add_speaker_and_signal): the v1 paper's "###"
        Template(
            name="v0",
            system=LLAVA_SYSTEM,
            system_format="{system}\n\n### ",
            system_always=True,
            user_format="Human: {content}\n### Assistant:",
            assistant_end="\n###",
            turn_separator=" ",
            stop_strings=("###",),
        ),
        # official conv_llava_v0 (SeparatorStyle.SINGLE, sep "###"): how official inference prompts v0 models
        Template(
            name="llava_v0",
            system=LLAVA_SYSTEM,
            system_format="{system}###",
            system_always=True,
            user_format="Human: {content}###Assistant:",
            assistant_end="###",
            stop_strings=("###",),
        ),
        # official conv_llava_llama_2 (SeparatorStyle.LLAMA_2: sep "<s>", sep2 "</s>")
        Template(
            name="llava_llama_2",
            system=LLAMA_2_SYSTEM,
            system_format="",
            first_user_format=_LLAMA_2_FIRST_USER,
            user_format="[INST] {content} [/INST]",
            assistant_format=" {content} ",
            bos_each_user_turn=True,
        ),
        # official conv_mistral_instruct (LLAMA_2 style, sep "", no system prompt): one <s> at the start
        Template(
            name="mistral_instruct",
            system="",
            system_format="",
            first_user_format=_LLAMA_2_FIRST_USER,
            user_format="[INST] {content} [/INST]",
            assistant_format=" {content} ",
        ),
        # official conv_chatml_direct (SeparatorStyle.MPT, sep "<|im_end|>"): nothing between messages
        Template(
            name="chatml_direct",
            system="Answer the questions.",
            system_format="<|im_start|>system\n{system}<|im_end|>",
            user_format=_CHATML_DIRECT_USER,
            assistant_format="{content}",
            assistant_end="<|im_end|>",
            bos=False,
            stop_strings=("<|im_end|>",),
        ),
        # official conv_mpt: chatml_direct's layout with MPT's system prompt
        Template(
            name="mpt",
            system=MPT_SYSTEM,
            system_format="<|im_start|>system\n{system}<|im_end|>",
            user_format=_CHATML_DIRECT_USER,
            assistant_format="{content}",
            assistant_end="<|im_end|>",
            bos=False,
            stop_strings=("<|im_end|>",),
        ),
        # standard ChatML (Qwen, HF): "\n" after every <|im_end|>. Not an official LLaVA format.
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

# Other names for the templates above: the official `--version` / `--conv-mode` spellings
# (haotian-liu/LLaVA llava/conversation.py conv_templates) and this project's earlier names.
TEMPLATE_ALIASES: dict[str, str] = {
    "v1": "vicuna_v1",
    "v0_plain": "plain",
    "mistral_direct": "chatml_direct",
    "llama_2": "llava_llama_2",  # earlier name here; official `llama_2` is Llama-2-chat's long system prompt
    "v1_paper": "v0",  # earlier name here for the paper's "###" format
}


def template_names() -> list[str]:
    """Every accepted template name: the templates' own names and their aliases."""
    return sorted([*TEMPLATES, *TEMPLATE_ALIASES])


def get_template(name: str) -> Template:
    """The template called `name` (its own name or an alias such as the official `v1`)."""
    template = TEMPLATES.get(TEMPLATE_ALIASES.get(name, name))
    if template is None:
        raise ValueError(f"unknown conversation template {name!r}; choose one of {template_names()}")
    return template


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
    if (system or template.system_always) and template.system_format and template.keep_user_text:
        pieces.append(Piece("text", template.system_format.format(system=system)))
    for index, (role, text) in enumerate(turns):
        if role == "user":
            if template.bos and template.bos_each_user_turn:
                pieces.append(Piece("bos"))
            fmt = (
                template.first_user_format
                if index == 0 and template.first_user_format and system
                else template.user_format
            )
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
