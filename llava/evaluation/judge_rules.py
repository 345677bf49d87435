"""The LLaVA-Bench judge's instructions, one rule per question category.

LLaVA-Bench questions carry a `category`: `conv`, `detail` or `complex`. The official review
scripts (haotian-liu/LLaVA llava/eval/eval_gpt_review_visual.py for LLaVA-Bench (COCO),
eval_gpt_review_bench.py for LLaVA-Bench (In-the-Wild)) look the judge's instructions up in
llava/eval/table/rule.json under that category (COCO) or under `llava_bench_` + category
(In-the-Wild), each entry `{"role": "Assistant", "prompt": "..."}`. `load_rules` reads such a
file (pass the official one to judge exactly as published numbers were judged); the defaults
below are this project's own wording of the same instructions.

Which set a question belongs to is told by its context: COCO contexts carry `captions` and
object `instances`, In-the-Wild contexts one `caption`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llava import storage

IN_THE_WILD_PREFIX = "llava_bench_"


@dataclass(frozen=True)
class JudgeRule:
    role: str  # the answers are shown as "[{role} 1]" (the reference) and "[{role} 2]" (ours)
    prompt: str  # the instructions after "[System]"


_COCO_CONTEXT = (
    "Two AI assistants answered the user question shown above, which the user asked while looking at an "
    "image. You cannot see the image; it is described above by five captions and by the objects in it, one "
    "per line as the object's category and its bounding box [x1, y1, x2, y2] (top-left and bottom-right "
    "corners, normalised to 0-1)."
)
_WILD_CONTEXT = (
    "Two AI assistants answered the user question shown above, which the user asked while looking at an "
    "image. You cannot see the image; it is described above in a few sentences."
)
_FOCUS = {
    "conv": "The question has a definite answer. Judge first whether each answer is correct and on topic, "
    "then how helpful and clear it is.",
    "detail": "The user asked for a detailed description. Judge how accurate each description is (nothing "
    "invented that the description above does not support), how complete it is, and how well it "
    "is organised.",
    "complex": "The question needs reasoning beyond what is directly visible. Judge whether each answer's "
    "reasoning is sound and agrees with the description above, and whether its conclusion is "
    "helpful and accurate.",
}
_SCORING = (
    "Give each assistant one overall score from 1 to 10, higher meaning better, weighing helpfulness, "
    "relevance, accuracy and level of detail.\n"
    "On the first line write only the two scores, Assistant 1's first, separated by one space.\n"
    "From the second line on, explain the scores. Be impartial: the order in which the two answers were "
    "shown must not sway you."
)


def _default_rules() -> dict[str, JudgeRule]:
    rules = {}
    for category, focus in _FOCUS.items():
        rules[category] = JudgeRule("Assistant", f"{_COCO_CONTEXT}\n{focus}\n{_SCORING}")
        rules[IN_THE_WILD_PREFIX + category] = JudgeRule("Assistant", f"{_WILD_CONTEXT}\n{focus}\n{_SCORING}")
    return rules


DEFAULT_RULES = _default_rules()


def load_rules(uri: str) -> dict[str, JudgeRule]:
    """Rules from a rule.json (local or s3://): {category: {"role": ..., "prompt": ...}, ...}.

    Entries that are not judge rules in that shape are refused with their key named.
    """
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as error:
        raise ValueError(f'{uri}: not JSON ({error}); expected {{category: {{"role", "prompt"}}}}') from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{uri}: expected a JSON object {{category: {{"role", "prompt"}}}}')
    rules = {}
    for category, entry in data.items():
        if not (
            isinstance(entry, dict) and isinstance(entry.get("role"), str) and isinstance(entry.get("prompt"), str)
        ):
            raise ValueError(f'{uri}: rule {category!r} must be an object with string fields "role" and "prompt"')
        rules[category] = JudgeRule(entry["role"], entry["prompt"])
    return rules


def rule_category(question: dict, context: dict) -> str:
    """The rule key of one question: its category (COCO) or llava_bench_<category> (In-the-Wild)."""
    category = question.get("category")
    if not category:
        raise ValueError(
            f"question {question.get('question_id')!r} has no category (LLaVA-Bench questions carry "
            f"conv, detail or complex)"
        )
    if "captions" in context:
        return category
    if "caption" in context:
        return IN_THE_WILD_PREFIX + category
    raise ValueError(
        f"context of image {context.get('image')!r} has neither `caption` (In-the-Wild) nor `captions` (COCO)"
    )
