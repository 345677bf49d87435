"""A Jinja chat template equivalent to one of our conversation templates.

Exported models carry it in their processor and tokenizer, so stock transformers, vLLM
and SGLang render prompts the way training did: applied to the same messages, it gives
the string `llava.templates.render` gives, hence (tokenised whole, as every server does)
the same ids as `llava.tokenization.tokenize_prompt`.

Messages use the OpenAI/HF shape: `{"role": "system"|"user"|"assistant", "content":
str | [{"type": "text", "text": ...} | {"type": "image"} | {"type": "image_url", ...}]}`.
A message's parts are joined with "\\n" (images as `<image>`), as our chat server joins
them; then a user turn with exactly one image gets it moved to its start as `<image>\\n`
(official LLaVA training's placement; the model's `image_placement: keep` skips this).
A leading system message replaces the template's system prompt.

As in LLaVA, the user turn already ends with the assistant cue ("... ASSISTANT:"), so
the prompt is complete with or without `add_generation_prompt`. A template that starts
with BOS writes `bos_token` itself: tokenise the result without adding special tokens
(`apply_chat_template(..., tokenize=True)` and vLLM's chat endpoint do so).

Training tokenises the text after a leading BOS as the start of a string, the way
`tokenizer(prompt)` does. A SentencePiece tokenizer in non-legacy mode marks no word
start (`▁`) on text that follows a special token in the same string, so "<s>A chat"
would give `A` where training had `▁A`; for such tokenizers the template writes a space
after BOS, which gives back exactly the training ids (`text_after_bos` finds out which).
"""

from __future__ import annotations

import json

from llava.config import IMAGE_TOKEN
from llava.templates import EOS, Template

_IMAGE = json.dumps(IMAGE_TOKEN)


def _literal(text: str) -> str:
    """`text` as a Jinja expression printing it verbatim (the EOS marker prints eos_token)."""
    if text == EOS:
        return "{{ eos_token }}"
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _split(fmt: str, field: str = "{content}") -> tuple[str, str]:
    head, tail = fmt.split(field)
    return head, tail


def _message_text(var: str) -> str:
    """Jinja setting `var` to the message's text: a string as is, parts joined with "\\n", images as <image>."""
    return (
        "{%- if message['content'] is string -%}{%- set " + var + " = message['content'] -%}"
        "{%- else -%}{%- set ns = namespace(parts=[]) -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] in ('image', 'image_url') -%}{%- set ns.parts = ns.parts + [" + _IMAGE + "] -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.parts = ns.parts + [part['text']] -%}{%- endif -%}"
        "{%- endfor -%}{%- set " + var + " = ns.parts | join('\\n') -%}{%- endif -%}"
    )


def _place_image(image_placement: str) -> str:
    """Jinja moving a user turn's single <image> to its start as `<image>\\n` (llava.templates.place_image)."""
    if image_placement == "keep":
        return ""
    return (
        "{%- if content.count(" + _IMAGE + ") == 1 -%}"
        "{%- set content = (" + _IMAGE + " + '\\n' + (content.replace(" + _IMAGE + ", '') | trim)) | trim -%}"
        "{%- endif -%}"
    )


# Text a template may start with after BOS: system prompts, [INST], v0's "\n\n###" (not a leading space: see below).
_PROBES = ("A chat between", "[INST] <<SYS>>\nYou", "\n\n### Human: Hi", "Be brief.")


def text_after_bos(tokenizer) -> str:
    """What to write between a leading BOS and the text after it so that the whole string tokenises
    to [BOS] + the ids of the text alone: "" for most tokenizers, " " for non-legacy SentencePiece ones."""
    if tokenizer.bos_token is None:
        return ""
    for candidate in ("", " "):
        if all(
            tokenizer(tokenizer.bos_token + candidate + probe, add_special_tokens=False)["input_ids"]
            == [tokenizer.bos_token_id] + tokenizer(probe, add_special_tokens=False)["input_ids"]
            for probe in _PROBES
        ):
            return candidate
    raise ValueError(
        f"no text after {tokenizer.bos_token!r} makes {type(tokenizer).__name__} tokenise the rest as a string start; "
        "a chat template cannot reproduce this tokenizer's training ids"
    )


def build_chat_template(template: Template, image_placement: str = "start", after_bos: str = "") -> str:
    """The Jinja source rendering OpenAI/HF-style messages exactly as `template` renders LLaVA turns.

    `after_bos` is written right after a leading BOS followed by text (see `text_after_bos`).
    """
    if image_placement not in ("start", "keep"):
        raise ValueError(f"image placement must be start or keep, got {image_placement!r}")
    user_head, user_tail = _split(template.user_format)
    assistant_head, assistant_tail = _split(template.assistant_format)
    if template.keep_user_text:
        user_content = "{{ content }}"
    else:  # plain: the human turn is replaced by its image(s) alone
        user_content = "{{ " + _IMAGE + " * content.count(" + _IMAGE + ") }}"
    user_block = _literal(user_head) + user_content + _literal(user_tail)

    first_block = user_block
    if template.first_user_format:  # llama_2 style: the system prompt sits inside the first [INST]
        first_head, first_tail = _split(template.first_user_format)
        before_system, after_system = _split(first_head, "{system}")
        first_block = (
            "{%- if system -%}"
            + _literal(before_system)
            + "{{ system }}"
            + _literal(after_system)
            + user_content
            + _literal(first_tail)
            + "{%- else -%}"
            + user_block
            + "{%- endif -%}"
        )

    system_block = ""
    if template.system_format and template.keep_user_text:
        before_system, after_system = (template.system_format.split("{system}") + [""])[:2]
        condition = "true" if template.system_always else "system"
        system_block = (
            "{%- if "
            + condition
            + " -%}"
            + _literal(before_system)
            + "{{ system }}"
            + _literal(after_system)
            + "{%- endif -%}"
        )
    # llama_2: BOS before every [INST]; the first one is the leading BOS written below
    bos_turn = (
        "{%- if not loop.first -%}{{ bos_token }}{%- endif -%}" if template.bos and template.bos_each_user_turn else ""
    )
    leading_bos = ""
    if template.bos:
        # no word-start fix before text that already starts with a space, nor before an image (plain)
        leading_bos = (
            "{{ bos_token }}{%- if not (body.startswith(' ') or body.startswith("
            + _IMAGE
            + ")) -%}"
            + _literal(after_bos)
            + "{%- endif -%}"
        )

    return (
        "{%- set system = " + json.dumps(template.system) + " -%}"
        "{%- set turns = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set message = messages[0] -%}" + _message_text("system") + "{%- set turns = messages[1:] -%}"
        "{%- endif -%}"
        "{%- set body -%}"
        + system_block
        + "{%- for message in turns -%}"
        + _message_text("content")
        + "{%- if message['role'] == 'user' -%}"
        + _place_image(image_placement)
        + bos_turn
        + "{%- if loop.first -%}"
        + first_block
        + "{%- else -%}"
        + user_block
        + "{%- endif -%}"
        "{%- else -%}"
        + _literal(assistant_head)
        + "{{ content }}"
        + _literal(assistant_tail)
        + _literal(template.assistant_end)
        + _literal(template.turn_separator)
        + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endset -%}" + leading_bos + "{{ body }}"
    )
