"""LLaVA-Bench: a text-only judge scores our answers against reference answers (relative score).

Inputs are the official files: questions JSONL (`question_id`, `image`, `text`, `category`),
context JSONL (by `image`: In-the-Wild's `caption`, or COCO's `captions` + `instances`) and
reference answers JSONL (`question_id`, `text`). Our answers come from batch inference
(llava.inference.batch), up to 1024 new tokens as the official model_vqa.py.

The judge (any OpenAI-compatible endpoint) gets the request the official review scripts send
(haotian-liu/LLaVA llava/eval/eval_gpt_review_bench.py and eval_gpt_review_visual.py): the
context, the question, the reference as "Assistant 1", ours as "Assistant 2", then the rule of
the question's category (llava.evaluation.judge_rules; the official rule.json with `rules`).
Its first line holds the two 1-10 scores. Two summaries, per category and overall:

- ours (`scores.json`): relative score = mean(ours) / mean(reference) x 100 over the reviews whose
  first line reads as two numbers (commas and extra spaces allowed); the rest are counted as
  `unparsable` and left out;
- official (`official_scores.json`), as summarize_gpt_review.py computes published numbers: the first
  line split on single spaces after commas become spaces, anything but exactly two numbers recorded as
  [-1, -1] and averaged in; means rounded to 3 decimals before their ratio; categories named as the
  rule keys (`conv` for COCO, `llava_bench_conv` for In-the-Wild), plus `all`.

Every review is cached in `reviews.jsonl` under `out`, keyed by the judge model and the exact
request, so a re-run asks only what it has not asked yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from llava import storage
from llava.chat_client import ChatClient, EndpointConfig
from llava.evaluation.judge_rules import DEFAULT_RULES, JudgeRule, load_rules, rule_category
from llava.inference.batch import InferConfig, read_predictions, run_batch_inference
from llava.progress import Progress

log = logging.getLogger(__name__)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."  # official
REVIEWS_FILE = "reviews.jsonl"
SCORES_FILE = "scores.json"
OFFICIAL_SCORES_FILE = "official_scores.json"
UNPARSABLE = (-1.0, -1.0)  # the official record of a review it cannot read


def _eval_infer() -> InferConfig:
    return InferConfig(max_new_tokens=1024)  # as the official model_vqa.py


@dataclass
class LlavaBenchConfig:
    infer: InferConfig = field(default_factory=_eval_infer)  # model, out, the actor pool (questions = below)
    judge: EndpointConfig = field(default_factory=EndpointConfig)
    questions: str = ""
    context: str = ""
    references: str = ""
    images: Optional[str] = None  # default: <questions dir>/images
    rules: Optional[str] = None  # rule.json (e.g. the official llava/eval/table/rule.json); default: our own rules


def _jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def context_text(context: dict) -> str:
    """The image description the judge sees, as the official scripts write it: COCO's captions, a
    blank line and one `category: bbox` line per object; In-the-Wild's caption (lines joined if a list)."""
    if "captions" in context:
        boxes = "\n".join(f"{i['category']}: {i['bbox']}" for i in context.get("instances", []))
        return "\n".join(context["captions"]) + "\n\n" + boxes
    caption = context["caption"]
    return "\n".join(caption) if isinstance(caption, list) else caption


def judge_request(context: str, question: str, reference: str, answer: str, rule: JudgeRule) -> list[dict]:
    role = rule.role
    content = (
        f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
        f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule.prompt}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_scores(review: str) -> Optional[tuple[float, float]]:
    """Ours: (reference score, our score) from the review's first line, or None.

    Lenient where the official parser is not: surrounding whitespace, commas, several spaces or tabs.
    """
    first = review.strip().split("\n")[0].replace(",", " ").split()
    try:
        scores = tuple(float(x) for x in first)
    except ValueError:
        return None
    return scores if len(scores) == 2 else None


def official_scores(review: str) -> tuple[float, float]:
    """The official parser (parse_score in eval_gpt_review_bench.py): the first line, commas made spaces,
    split on single spaces; exactly two numbers, else (-1, -1). "7, 8" therefore reads as three fields
    ("7", "", "8") and is unparsable there."""
    fields = review.split("\n")[0].replace(",", " ").split(" ")
    if len(fields) != 2:
        return UNPARSABLE
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:
        return UNPARSABLE


def _summary(pairs: list[tuple[float, float]], unparsable: int, round_means: bool) -> dict:
    if not pairs:
        return {
            "relative_score": None,
            "reference_mean": None,
            "ours_mean": None,
            "reviews": 0,
            "unparsable": unparsable,
        }
    reference = sum(p[0] for p in pairs) / len(pairs)
    ours = sum(p[1] for p in pairs) / len(pairs)
    if round_means:  # the official script rounds the means before dividing
        reference, ours = round(reference, 3), round(ours, 3)
    return {
        "relative_score": round(ours / reference * 100, 1) if reference else None,
        "reference_mean": round(reference, 3),
        "ours_mean": round(ours, 3),
        "reviews": len(pairs),
        "unparsable": unparsable,
    }


def relative_scores(reviews: list[dict]) -> dict:
    """Ours: {category: {...}, "overall": {...}}, unparsable reviews (scores None) left out and counted."""
    by_category: dict[str, list[tuple[float, float]]] = {}
    unparsable: dict[str, int] = {}
    for r in reviews:
        by_category.setdefault(r["category"], [])
        if r["scores"] is None:
            unparsable[r["category"]] = unparsable.get(r["category"], 0) + 1
        else:
            by_category[r["category"]].append(tuple(r["scores"]))
    result = {c: _summary(p, unparsable.get(c, 0), round_means=False) for c, p in sorted(by_category.items())}
    result["overall"] = _summary(
        [p for ps in by_category.values() for p in ps], sum(unparsable.values()), round_means=False
    )
    return result


def official_relative_scores(reviews: list[dict]) -> dict:
    """As summarize_gpt_review.py: {rule category: {...}, "all": {...}} over the official parses of the
    review texts, [-1, -1] entries included in the means (and counted as `unparsable`)."""
    by_category: dict[str, list[tuple[float, float]]] = {}
    for r in reviews:
        by_category.setdefault(r["rule"], []).append(official_scores(r["review"]))
    everything = [p for ps in by_category.values() for p in ps]
    result = {c: _summary(p, p.count(UNPARSABLE), round_means=True) for c, p in by_category.items()}
    result["all"] = _summary(everything, everything.count(UNPARSABLE), round_means=True)
    return dict(sorted(result.items()))


class ReviewCache:
    """reviews.jsonl under `out`: one line per judge call, keyed by sha256(judge model + request)."""

    def __init__(self, out: str):
        self.uri = storage.join(out, REVIEWS_FILE)
        self.entries = {e["key"]: e for e in _jsonl(self.uri)} if storage.exists(self.uri) else {}

    @staticmethod
    def key(model: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def save(self) -> None:
        storage.write_text(self.uri, "".join(json.dumps(e) + "\n" for e in self.entries.values()))


def evaluate_llava_bench(config: LlavaBenchConfig) -> dict:
    out = config.infer.out
    questions = {str(q["question_id"]): q for q in _jsonl(config.questions)}
    contexts = {c["image"]: c for c in _jsonl(config.context)}
    references = {str(r["question_id"]): r["text"] for r in _jsonl(config.references)}
    missing = [qid for qid, q in questions.items() if qid not in references or q["image"] not in contexts]
    if missing:
        raise ValueError(
            f"questions {missing[:5]} have no reference answer in {config.references} or no context in {config.context}"
        )
    rules = load_rules(config.rules) if config.rules else DEFAULT_RULES
    rule_of = {qid: rule_category(q, contexts[q["image"]]) for qid, q in questions.items()}
    unruled = sorted(set(rule_of.values()) - rules.keys())
    if unruled:  # checked before any inference or judge call
        raise ValueError(
            f"no judge rule for categor{'y' if len(unruled) == 1 else 'ies'} {', '.join(unruled)} in "
            f"{config.rules or 'the default rules'} (it has {', '.join(sorted(rules))})"
        )
    images = config.images or storage.join(config.questions.rsplit("/", 1)[0], "images")
    infer = InferConfig(**{**config.infer.__dict__, "questions": config.questions, "images": images})
    run_batch_inference(infer)
    answers = {r["id"]: r for r in read_predictions(out)}

    client, cache = ChatClient(config.judge), ReviewCache(out)
    requests = {}
    for qid, q in questions.items():
        answer = answers[qid]["answer"] if answers[qid]["answer"] is not None else ""
        messages = judge_request(
            context_text(contexts[q["image"]]), q["text"], references[qid], answer, rules[rule_of[qid]]
        )
        requests[qid] = (ReviewCache.key(config.judge.model, messages), messages)
    todo = {qid: r for qid, r in requests.items() if r[0] not in cache.entries}
    log.info(
        "LLaVA-Bench: %d questions, %d reviews cached, asking the judge (%s at %s) for %d; rules from %s",
        len(questions),
        len(requests) - len(todo),
        config.judge.model,
        config.judge.url,
        len(todo),
        config.rules or "the defaults",
    )

    def review(item):
        qid, (key, messages) = item
        text = client.complete(messages)
        return key, {"key": key, "question_id": qid, "rule": rule_of[qid], "review": text, "scores": parse_scores(text)}

    try:
        with (
            ThreadPoolExecutor(max(1, config.judge.concurrency)) as pool,
            Progress("eval: judge", len(todo), "reviews", logger=log) as progress,
        ):  # a bar on a terminal
            for key, entry in pool.map(review, todo.items()):
                cache.entries[key] = entry
                progress.update(1)
    finally:
        cache.save()  # whatever was reviewed is kept for the next run, even when a call failed for good

    reviews = [
        {**cache.entries[key], "category": questions[qid]["category"], "rule": rule_of[qid]}
        for qid, (key, _) in requests.items()
    ]
    scores, official = relative_scores(reviews), official_relative_scores(reviews)
    storage.write_text(storage.join(out, SCORES_FILE), json.dumps(scores, indent=2))
    storage.write_text(storage.join(out, OFFICIAL_SCORES_FILE), json.dumps(official, indent=2))
    log.info(
        "LLaVA-Bench relative score %s (ours %s / reference %s; %d unparsable reviews left out); computed "
        "the official way (unparsable as -1): %s; scores in %s",
        scores["overall"]["relative_score"],
        scores["overall"]["ours_mean"],
        scores["overall"]["reference_mean"],
        scores["overall"]["unparsable"],
        official["all"]["relative_score"],
        storage.join(out, SCORES_FILE),
    )
    return {"scores": scores, "official": official, "asked": len(todo), "cached": len(requests) - len(todo), "out": out}
