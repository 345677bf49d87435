"""Teacher prompts per request type, from editable data files under llava/instruct/prompts/<type>/.

system.txt      the system message
fewshot.jsonl   {"context": ..., "response": ...} examples, sent as user/assistant turns
questions.txt   (detail only) the questions a detailed description answers, one per line
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
TYPES = ("conversation", "detail", "complex")


@cache
def _read(kind: str, name: str) -> str:
    if kind not in TYPES:
        raise ValueError(f"unknown request type {kind!r}; choose from {TYPES}")
    return (PROMPTS_DIR / kind / name).read_text()


def detail_questions() -> list[str]:
    return [line.strip() for line in _read("detail", "questions.txt").splitlines() if line.strip()]


def teacher_messages(kind: str, context: str) -> list[dict]:
    """System message, few-shot turns, then this image's context."""
    messages = [{"role": "system", "content": _read(kind, "system.txt").strip()}]
    for line in _read(kind, "fewshot.jsonl").splitlines():
        if line.strip():
            example = json.loads(line)
            messages += [
                {"role": "user", "content": example["context"]},
                {"role": "assistant", "content": example["response"]},
            ]
    return messages + [{"role": "user", "content": context}]
