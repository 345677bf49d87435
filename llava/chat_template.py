"""A Jinja chat template equivalent to one of our conversation templates.

Exported models carry it in their processor, so stock transformers, vLLM and SGLang
render prompts the way training did. Messages use the OpenAI/HF shape:
`{"role": "system"|"user"|"assistant", "content": str | [{"type": "text"|"image", ...}]}`.
As in LLaVA, the user turn already ends with the assistant cue ("... ASSISTANT:"),
so the prompt is complete with or without `add_generation_prompt`.
"""

from __future__ import annotations

import json

from llava.config import IMAGE_TOKEN
from llava.templates import EOS, Template


def _literal(text: str) -> str:
    """`text` as a Jinja expression printing it verbatim (the EOS marker prints eos_token)."""
    if text == EOS:
        return "{{ eos_token }}"
    return "{{ " + json.dumps(text) + " }}" if text else ""


def _split(fmt: str) -> tuple[str, str]:
    head, tail = fmt.split("{content}")
    return head, tail


def build_chat_template(template: Template) -> str:
    user_head, user_tail = _split(template.user_format)
    first = template.first_user_format or template.user_format
    first_head, first_tail = _split(first)
    sys_head, sys_tail = (template.system_format.split("{system}") + [""])[:2] if template.system_format else ("", "")
    assistant_head, assistant_tail = _split(template.assistant_format)
    if template.keep_user_text:
        user_content = "{{ content }}"
    else:  # plain: the human turn is replaced by its image(s) alone
        user_content = "{{ " + json.dumps(IMAGE_TOKEN) + " * content.count(" + json.dumps(IMAGE_TOKEN) + ") }}"
    bos_once = "{{ bos_token }}" if template.bos and not template.bos_each_user_turn else ""
    bos_turn = "{{ bos_token }}" if template.bos and template.bos_each_user_turn else ""
    system_block = ""
    if template.system_format and template.keep_user_text:
        system_block = "{%- if system -%}" + _literal(sys_head) + "{{ system }}" + _literal(sys_tail) + "{%- endif -%}"
    first_block = _literal(user_head) + user_content + _literal(user_tail)
    if template.first_user_format:
        first_block = (
            "{%- if system -%}"
            + _literal(first_head.split("{system}")[0])
            + "{{ system }}"
            + _literal(first_head.split("{system}")[1])
            + user_content
            + _literal(first_tail)
            + "{%- else -%}"
            + first_block
            + "{%- endif -%}"
        )
    return (
        "{%- set system = " + json.dumps(template.system) + " -%}"
        "{%- set turns = messages -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
        "else (messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- endif -%}"
        + bos_once
        + system_block
        + "{%- for message in turns -%}"
        "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
        "{%- else -%}{%- set ns = namespace(text='') -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{%- set ns.text = ns.text + "
        + json.dumps(IMAGE_TOKEN)
        + " -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set content = ns.text -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        + bos_turn
        + "{%- if loop.first -%}"
        + first_block
        + "{%- else -%}"
        + _literal(user_head)
        + user_content
        + _literal(user_tail)
        + "{%- endif -%}"
        "{%- else -%}"
        + _literal(assistant_head)
        + "{{ content }}"
        + _literal(assistant_tail)
        + _literal(template.assistant_end)
        + _literal(template.turn_separator)
        + "{%- endif -%}"
        "{%- endfor -%}"
    )
