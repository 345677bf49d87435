"""LLaVA-Bench: a text-only judge scores our answers against reference answers (relative score).

Inputs are the official files: questions JSONL (`question_id`, `image`, `text`, `category`),
context JSONL (by `image`: `caption`, or COCO's `captions` + `instances`) and reference answers
JSONL (`question_id`, `text`). Our answers come from batch inference (llava.inference.batch).

The judge (any OpenAI-compatible endpoint) sees the context, the question, the reference as
"Assistant 1" and ours as "Assistant 2", in the official prompt (llava/eval/eval_gpt_review_bench.py
with table/rule.json), and answers with the two 1-10 scores on its first line. Relative score =
mean(ours) / mean(reference) x 100, per category and overall. Reviews whose first line is not two
numbers are counted as unparsable and left out of the means (the official script averaged them in
as -1). Every review is cached in `reviews.jsonl` under `out`, keyed by the judge model and the
exact request, so a re-run asks only what it has not asked yet.
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
from llava.inference.batch import InferConfig, read_predictions, run_batch_inference

log = logging.getLogger(__name__)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above. The user asks the question on observing an image. For your reference, the visual "
    "content in the image is represented with a few sentences describing the image. \nPlease rate the helpfulness, "
    "relevance, accuracy, level of details of their responses. Each assistant receives an overall score on a scale "
    "of 1 to 10, where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two scores are "
    "separated by a space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented does not affect "
    "your judgment."
)
REVIEWS_FILE = "reviews.jsonl"


@dataclass
class LlavaBenchConfig:
    infer: InferConfig = field(default_factory=InferConfig)  # model, out, the actor pool (questions = below)
    judge: EndpointConfig = field(default_factory=EndpointConfig)
    questions: str = ""
    context: str = ""
    references: str = ""
    images: Optional[str] = None  # default: <questions dir>/images


def _jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def context_text(context: dict) -> str:
    """The image description the judge sees: the caption, or COCO captions + boxes."""
    if "caption" in context:
        return context["caption"]
    captions = "\n".join(context.get("captions", []))
    boxes = "\n".join(f"{i['category']}: {i['bbox']}" for i in context.get("instances", []))
    return f"{captions}\n\n{boxes}" if boxes else captions


def judge_request(context: str, question: str, reference: str, answer: str) -> list[dict]:
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
               f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_RULE}\n\n")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def parse_scores(review: str) -> Optional[tuple[float, float]]:
    """(reference score, our score) from the review's first line, or None."""
    first = review.strip().split("\n")[0].replace(",", " ").split()
    try:
        scores = tuple(float(x) for x in first)
    except ValueError:
        return None
    return scores if len(scores) == 2 else None


def relative_scores(reviews: list[dict]) -> dict:
    """{category: {...}, "overall": {...}} with relative score and both means (x10, like the paper's table)."""
    by_category: dict[str, list[tuple[float, float]]] = {}
    unparsable: dict[str, int] = {}
    for r in reviews:
        if r["scores"] is None:
            unparsable[r["category"]] = unparsable.get(r["category"], 0) + 1
        else:
            by_category.setdefault(r["category"], []).append(tuple(r["scores"]))

    def summary(pairs: list[tuple[float, float]], failed: int) -> dict:
        if not pairs:
            return {"relative_score": None, "reference_mean": None, "ours_mean": None, "reviews": 0, "unparsable": failed}
        reference = sum(p[0] for p in pairs) / len(pairs)
        ours = sum(p[1] for p in pairs) / len(pairs)
        return {"relative_score": round(ours / reference * 100, 1) if reference else None,
                "reference_mean": round(reference, 3), "ours_mean": round(ours, 3),
                "reviews": len(pairs), "unparsable": failed}

    result = {c: summary(p, unparsable.get(c, 0)) for c, p in sorted(by_category.items())}
    for c in unparsable.keys() - by_category.keys():
        result[c] = summary([], unparsable[c])
    result["overall"] = summary([p for ps in by_category.values() for p in ps], sum(unparsable.values()))
    return result


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
        raise ValueError(f"questions {missing[:5]} have no reference answer in {config.references} "
                         f"or no context in {config.context}")
    images = config.images or storage.join(config.questions.rsplit("/", 1)[0], "images")
    infer = InferConfig(**{**config.infer.__dict__, "questions": config.questions, "images": images})
    run_batch_inference(infer)
    answers = {r["id"]: r for r in read_predictions(out)}

    client, cache = ChatClient(config.judge), ReviewCache(out)
    requests = {}
    for qid, q in questions.items():
        answer = answers[qid]["answer"] if answers[qid]["answer"] is not None else ""
        messages = judge_request(context_text(contexts[q["image"]]), q["text"], references[qid], answer)
        requests[qid] = (ReviewCache.key(config.judge.model, messages), messages)
    todo = {qid: r for qid, r in requests.items() if r[0] not in cache.entries}
    log.info("LLaVA-Bench: %d questions, %d reviews cached, asking the judge (%s at %s) for %d",
             len(questions), len(requests) - len(todo), config.judge.model, config.judge.url, len(todo))

    def review(item):
        qid, (key, messages) = item
        text = client.complete(messages)
        return key, {"key": key, "question_id": qid, "review": text, "scores": parse_scores(text)}

    try:
        with ThreadPoolExecutor(max(1, config.judge.concurrency)) as pool:
            for key, entry in pool.map(review, todo.items()):
                cache.entries[key] = entry
    finally:
        cache.save()  # whatever was reviewed is kept for the next run, even when a call failed for good

    reviews = [{**cache.entries[key], "category": questions[qid].get("category", "all")}
               for qid, (key, _) in requests.items()]
    scores = relative_scores(reviews)
    storage.write_text(storage.join(out, "scores.json"), json.dumps(scores, indent=2))
    log.info("LLaVA-Bench relative score %s (ours %s / reference %s; %d unparsable reviews); scores in %s",
             scores["overall"]["relative_score"], scores["overall"]["ours_mean"], scores["overall"]["reference_mean"],
             scores["overall"]["unparsable"], storage.join(out, "scores.json"))
    return {"scores": scores, "asked": len(todo), "cached": len(requests) - len(todo), "out": out}
