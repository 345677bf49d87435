"""Teacher responses -> LLaVA-format conversations; anything malformed is rejected whole, never half-kept."""

from __future__ import annotations

import random


class Unparsable(ValueError):
    """A response that does not have the expected shape. `reason` is a stable code for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def qa_pairs(response: str) -> list[tuple[str, str]]:
    """`Question:` / `===` / `Answer:` blocks -> [(question, answer)], strictly alternating."""
    blocks = [b.strip() for b in response.replace("\r\n", "\n").split("\n===") if b.strip().strip("=").strip()]
    if not blocks:
        raise Unparsable("empty", "the response is empty")
    pairs = []
    for i in range(0, len(blocks), 2):
        question, answer = blocks[i], blocks[i + 1] if i + 1 < len(blocks) else None
        if not question.startswith("Question:"):
            raise Unparsable("bad_format", f"block {i + 1} does not start with 'Question:': {question[:60]!r}")
        if answer is None or not answer.startswith("Answer:"):
            raise Unparsable("bad_format", f"question {i // 2 + 1} has no 'Answer:' block")
        q, a = question[len("Question:") :].strip(), answer[len("Answer:") :].strip()
        if not q or not a:
            raise Unparsable("bad_format", f"question {i // 2 + 1} or its answer is empty")
        pairs.append((q, a))
    return pairs


def to_conversation(kind: str, response: str, rng: random.Random, detail_questions: list[str]) -> list[dict]:
    """LLaVA-format turns, `<image>` in the first human turn (before or after the text, at random, as LLaVA does)."""
    if kind == "detail":
        text = response.strip()
        if not text:
            raise Unparsable("empty", "the response is empty")
        if "Question:" in text or "Answer:" in text:
            raise Unparsable("bad_format", "a detailed description must not contain Question:/Answer: blocks")
        pairs = [(rng.choice(detail_questions), text)]
    else:
        pairs = qa_pairs(response)
        if kind == "complex" and len(pairs) != 1:
            raise Unparsable("bad_format", f"complex reasoning needs exactly one question, got {len(pairs)}")
    turns = []
    for i, (question, answer) in enumerate(pairs):
        if i == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns
