"""ScienceQA accuracy the way LLaVA measures it.

Input: the released layout (`problems.json`, `pid_splits.json`, images at
`images/<split>/<pid>/image.png`; local or s3://), or the parquet this module writes
(`questions.parquet`, the same problems with the image bytes inline).

Prompt (LLaVA's ScienceQA question files + `--single-pred-prompt`):

    <image>                       (only when the problem has an image)
    Context: <hint>               (only when the hint is not empty)
    <question>
    A. <choice 0>
    B. <choice 1>
    Answer with the option's letter from the given choices directly.

Answers are parsed with the official rules (llava/eval/eval_science_qa.py): the bare letter, a
reply starting "X. ", or exactly one "The answer is X." in it; anything else is a failure and
counts as wrong. Accuracy is reported overall, by context modality (image: the problem has an
image; text: it has a text hint; none: neither; like ScienceQA's IMG/TXT/NO, a problem with both
counts under image and text), by subject and by grade.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from llava import storage
from llava.inference.batch import InferConfig, read_predictions, run_batch_inference
from llava.inference.questions import QUESTION_SCHEMA

log = logging.getLogger(__name__)

OPTIONS = "ABCDE"
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
PROBLEM_SCHEMA = pa.schema([
    ("pid", pa.string()), ("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int64()),
    ("hint", pa.string()), ("subject", pa.string()), ("grade", pa.string()), ("image", pa.binary()),
])


@dataclass
class ScienceQAConfig:
    infer: InferConfig = field(default_factory=InferConfig)  # model, out, the actor pool (questions built here)
    data: str = ""  # released ScienceQA dir or our questions.parquet
    split: str = "test"


def parse_answer(text: Optional[str], num_choices: int) -> int:
    """Index of the chosen option, or -1 when the reply follows none of the official rules."""
    text = (text or "").strip()
    options = OPTIONS[:num_choices]
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return options.index(letter) if letter and letter in options else -1


def build_prompt(problem: dict) -> str:
    lines = []
    if problem.get("hint"):
        lines.append(f"Context: {problem['hint']}")
    lines.append(problem["question"])
    lines += [f"{OPTIONS[i]}. {choice}" for i, choice in enumerate(problem["choices"])]
    lines.append(ANSWER_INSTRUCTION)
    prompt = "\n".join(lines)
    has_image = problem.get("image") is not None or problem.get("missing_image")
    return f"<image>\n{prompt}" if has_image else prompt


def load_problems(data: str, split: str) -> list[dict]:
    """PROBLEM_SCHEMA rows of one split, from the released layout or our parquet."""
    if data.endswith(".parquet"):
        fs, path = storage.filesystem(data)
        with fs.open_input_file(path) as f:
            return pq.read_table(f).to_pylist()
    problems_uri, splits_uri = storage.join(data, "problems.json"), storage.join(data, "pid_splits.json")
    for uri in (problems_uri, splits_uri):
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: not found; --data must be a ScienceQA dir (problems.json, "
                                    f"pid_splits.json, images/<split>/<pid>/image.png) or a questions.parquet")
    problems, splits = json.loads(storage.read_text(problems_uri)), json.loads(storage.read_text(splits_uri))
    if split not in splits:
        raise ValueError(f"{splits_uri} has no split {split!r} (it has {sorted(splits)})")
    rows = []
    for pid in splits[split]:
        p = problems[str(pid)]
        image, missing = None, None
        if p.get("image"):
            image_uri = storage.join(data, "images", split, str(pid), p["image"])
            try:
                image = storage.read_bytes(image_uri)
            except (FileNotFoundError, storage.StorageError):
                missing = image_uri  # batch inference reports it as an image_missing error row
        rows.append({"missing_image": missing, "pid": str(pid), "question": p["question"], "choices": list(p["choices"]),
                     "answer": int(p["answer"]), "hint": p.get("hint") or "", "subject": p.get("subject", ""),
                     "grade": p.get("grade", ""), "image": image})
    return rows


def _accuracy(outcomes: list[bool]) -> dict:
    return {"accuracy": round(sum(outcomes) / len(outcomes), 4) if outcomes else None,
            "correct": sum(outcomes), "total": len(outcomes)}


def score(problems: list[dict], answers: dict[str, Optional[str]]) -> tuple[dict, list[dict]]:
    """(metrics, per-problem predictions) from the problems and the model's raw answers by pid."""
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    predictions, overall, failures = [], [], 0
    for p in problems:
        choice = parse_answer(answers.get(p["pid"]), len(p["choices"]))
        correct = choice == p["answer"]
        failures += choice == -1
        overall.append(correct)
        has_image = p["image"] is not None or bool(p.get("missing_image"))
        modalities = [m for m, has in (("image", has_image), ("text", bool(p["hint"]))) if has] or ["none"]
        for modality in modalities:
            groups["by_context"][modality].append(correct)
        groups["by_subject"][p["subject"]].append(correct)
        groups["by_grade"][p["grade"]].append(correct)
        predictions.append({"pid": p["pid"], "text": answers.get(p["pid"]), "pred": choice, "answer": p["answer"],
                            "correct": correct})
    metrics = {**_accuracy(overall), "parse_failures": failures}
    for name, by in groups.items():
        metrics[name] = {k: _accuracy(v) for k, v in sorted(by.items())}
    return metrics, predictions


def evaluate_scienceqa(config: ScienceQAConfig) -> dict:
    """Answer every problem of the split with batch inference; write metrics.json and predictions.jsonl."""
    out = config.infer.out
    problems = load_problems(config.data, config.split)
    log.info("ScienceQA %s: %d problems from %s", config.split, len(problems), config.data)
    table = pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(out, "questions.parquet"), sink.getvalue().to_pybytes())  # reusable as --data
    questions = [{"index": i, "id": p["pid"], "prompt": build_prompt(p),
                  "images": None if p["image"] is None else [p["image"]],
                  "image_refs": [p["missing_image"]] if p.get("missing_image") else None,
                  "reference": OPTIONS[p["answer"]], "meta": "{}"} for i, p in enumerate(problems)]
    dataset = ray.data.from_arrow(pa.Table.from_pylist(questions, schema=QUESTION_SCHEMA))
    run_batch_inference(config.infer, dataset)
    answers = {r["id"]: r["answer"] for r in read_predictions(out)}
    metrics, predictions = score(problems, answers)
    storage.write_text(storage.join(out, "scienceqa_predictions.jsonl"), "".join(json.dumps(p) + "\n" for p in predictions))
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    log.info("ScienceQA %s accuracy %.4f (%d/%d, %d unparsable); metrics in %s", config.split, metrics["accuracy"],
             metrics["correct"], metrics["total"], metrics["parse_failures"], storage.join(out, "metrics.json"))
    return {**metrics, "out": out}
