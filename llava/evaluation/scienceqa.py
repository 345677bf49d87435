"""ScienceQA accuracy the way LLaVA measures it.

Input: the released layout (`problems.json`, `pid_splits.json`, images at
`images/<split>/<pid>/image.png`; local or s3://), or the parquet this module writes
(`questions.parquet`, the same problems with the image bytes inline).

Prompt formats (`prompt_format`):

- `CQM-A` (default; LLaVA-1.5's question files + `--single-pred-prompt`):

      <image>                       (only when the problem has an image)
      Context: <hint>               (only when the hint is not empty)
      <question>
      A. <choice 0>
      B. <choice 1>
      Answer with the option's letter from the given choices directly.

- `QCM-LEA` (LLaVA v1, fine-tuned on ScienceQA; haotian-liu/LLaVA scripts/convert_sqa_to_llava.py):

      <image>
      <question>
      Context: <hint, or N/A>
      Options: (A) <choice 0> (B) <choice 1>

  and the model answers with the lecture, the solution, then "The answer is X."
  (`lea_conversation` builds such training conversations).

Answers are parsed exactly as haotian-liu/LLaVA llava/eval/eval_science_qa.py does (`parse_letter`),
and answers missing or unparsable ("FAILED") count as wrong. Accuracy is reported overall, by
context modality (image: the problem has an image; text: it has a text hint; none: neither; like
ScienceQA's IMG/TXT/NO, a problem with both counts under image and text), by subject and by grade.
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

OPTIONS = ("A", "B", "C", "D", "E")  # the official scorer's --options
FAILED = "FAILED"  # the official scorer's parsed answer for a reply it cannot read
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
PROMPT_FORMATS = ("CQM-A", "QCM-LEA")
# As written in the official scorer: the final "." matches any character but a newline.
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
PROBLEM_SCHEMA = pa.schema(
    [
        ("pid", pa.string()),
        ("question", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("answer", pa.int64()),
        ("hint", pa.string()),
        ("subject", pa.string()),
        ("grade", pa.string()),
        ("image", pa.binary()),
        ("lecture", pa.string()),
        ("solution", pa.string()),
    ]
)


def _eval_infer() -> InferConfig:
    return InferConfig(max_new_tokens=1024)  # as the official model_vqa_science.py


@dataclass
class ScienceQAConfig:
    infer: InferConfig = field(default_factory=_eval_infer)  # model, out, the actor pool (questions built here)
    data: str = ""  # released ScienceQA dir or our questions.parquet
    split: str = "test"
    prompt_format: str = "CQM-A"  # CQM-A (LLaVA-1.5, answer with the letter) | QCM-LEA (LLaVA v1)

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")


def parse_letter(text: Optional[str]) -> str:
    """The option letter the official scorer reads in a reply, or "FAILED"; the checks in its order:

    1. the reply is one of the letters A-E;
    2. it starts with a letter A-E, a dot and a space (that letter wins over anything later);
    3. exactly one match of `The answer is ([A-Z]).` (two matches, even agreeing ones, fail).

    The official answer files hold stripped replies (model_vqa_science.py strips the decoded text),
    so surrounding whitespace is stripped here too. No reply at all is a failure.
    """
    text = (text or "").strip()
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def parse_answer(text: Optional[str], num_choices: int) -> int:
    """Index of the chosen option, or -1 (counted wrong) when the letter read is not one of the choices."""
    letter = parse_letter(text)
    return OPTIONS.index(letter) if letter in OPTIONS[:num_choices] else -1


def _has_image(problem: dict) -> bool:
    return problem.get("image") is not None or bool(problem.get("missing_image"))


def build_prompt(problem: dict, prompt_format: str = "CQM-A") -> str:
    """The question as the model sees it (before the conversation template)."""
    if prompt_format == "QCM-LEA":
        prompt = _qcm_input(problem)
    elif prompt_format == "CQM-A":
        lines = []
        if problem.get("hint"):
            lines.append(f"Context: {problem['hint']}")
        lines.append(problem["question"])
        lines += [f"{OPTIONS[i]}. {choice}" for i, choice in enumerate(problem["choices"])]
        lines.append(ANSWER_INSTRUCTION)
        prompt = "\n".join(lines)
    else:
        raise ValueError(
            f"unknown ScienceQA prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)}"
        )
    return f"<image>\n{prompt}" if _has_image(problem) else prompt


def _qcm_input(problem: dict) -> str:
    """QCM input as the official converter writes it: labelled lines, double spaces collapsed once,
    stripped, then the leading "Question: " label dropped (every occurrence, as its str.replace does)."""
    context = (problem.get("hint") or "").strip() or "N/A"  # the image caption is not used (use_caption=False)
    options = " ".join(f"({OPTIONS[i]}) {choice}" for i, choice in enumerate(problem["choices"]))
    text = f"Question: {problem['question']}\nContext: {context}\nOptions: {options}\n".replace("  ", " ").strip()
    return text.replace("Question: ", "") if text.startswith("Question: ") else text


def _lea_output(problem: dict) -> str:
    """LEA answer as the official converter writes it: lecture, solution, "The answer is X."."""
    lecture = (problem.get("lecture") or "").replace("\\n", "\n")  # the converter turns a literal \n into a newline
    solution = (problem.get("solution") or "").replace("\\n", "\n")
    text = f"Answer: {lecture} {solution} The answer is {OPTIONS[problem['answer']]}.".replace("  ", " ").strip()
    return text.replace("Answer: ", "") if text.startswith("Answer: ") else text


def lea_conversation(problem: dict) -> list[dict]:
    """A QCM-LEA training conversation (LLaVA JSON turns) for one problem, as LLaVA v1 was fine-tuned.

    The official converter writes the image marker after the question ("...\n<image>"); official
    training (and this project by default) moves it to the start of the turn, which gives
    `build_prompt(problem, "QCM-LEA")`.
    """
    human = _qcm_input(problem) + ("\n<image>" if _has_image(problem) else "")
    return [{"from": "human", "value": human}, {"from": "gpt", "value": _lea_output(problem)}]


def load_problems(data: str, split: str) -> list[dict]:
    """PROBLEM_SCHEMA rows of one split, from the released layout or our parquet."""
    if data.endswith(".parquet"):
        fs, path = storage.filesystem(data)
        with fs.open_input_file(path) as f:
            return pq.read_table(f).to_pylist()
    problems_uri, splits_uri = storage.join(data, "problems.json"), storage.join(data, "pid_splits.json")
    for uri in (problems_uri, splits_uri):
        if not storage.exists(uri):
            raise FileNotFoundError(
                f"{uri}: not found; --data must be a ScienceQA dir (problems.json, "
                f"pid_splits.json, images/<split>/<pid>/image.png) or a questions.parquet"
            )
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
        rows.append(
            {
                "missing_image": missing,
                "pid": str(pid),
                "question": p["question"],
                "choices": list(p["choices"]),
                "answer": int(p["answer"]),
                "hint": p.get("hint") or "",
                "subject": p.get("subject", ""),
                "grade": p.get("grade", ""),
                "image": image,
                "lecture": p.get("lecture") or "",
                "solution": p.get("solution") or "",
            }
        )
    return rows


def _accuracy(outcomes: list[bool]) -> dict:
    return {
        "accuracy": round(sum(outcomes) / len(outcomes), 4) if outcomes else None,
        "correct": sum(outcomes),
        "total": len(outcomes),
    }


def score(problems: list[dict], answers: dict[str, Optional[str]]) -> tuple[dict, list[dict]]:
    """(metrics, per-problem predictions) from the problems and the model's raw answers by pid."""
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    predictions, overall, failures = [], [], 0
    for p in problems:
        letter, choice = parse_letter(answers.get(p["pid"])), parse_answer(answers.get(p["pid"]), len(p["choices"]))
        correct = choice == p["answer"]
        failures += choice == -1
        overall.append(correct)
        modalities = [m for m, has in (("image", _has_image(p)), ("text", bool(p["hint"]))) if has] or ["none"]
        for modality in modalities:
            groups["by_context"][modality].append(correct)
        groups["by_subject"][p["subject"]].append(correct)
        groups["by_grade"][p["grade"]].append(correct)
        predictions.append(
            {
                "pid": p["pid"],
                "text": answers.get(p["pid"]),
                "parsed": letter,
                "pred": choice,
                "answer": p["answer"],
                "correct": correct,
            }
        )
    metrics = {**_accuracy(overall), "parse_failures": failures}
    for name, by in groups.items():
        metrics[name] = {k: _accuracy(v) for k, v in sorted(by.items())}
    return metrics, predictions


def evaluate_scienceqa(config: ScienceQAConfig) -> dict:
    """Answer every problem of the split with batch inference; write metrics.json and predictions.jsonl."""
    out = config.infer.out
    problems = load_problems(config.data, config.split)
    log.info(
        "ScienceQA %s: %d problems from %s, %s prompts", config.split, len(problems), config.data, config.prompt_format
    )
    table = pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(out, "questions.parquet"), sink.getvalue().to_pybytes())  # reusable as --data
    questions = [
        {
            "index": i,
            "id": p["pid"],
            "prompt": build_prompt(p, config.prompt_format),
            "images": None if p["image"] is None else [p["image"]],
            "image_refs": [p["missing_image"]] if p.get("missing_image") else None,
            "reference": OPTIONS[p["answer"]],
            "meta": "{}",
        }
        for i, p in enumerate(problems)
    ]
    dataset = ray.data.from_arrow(pa.Table.from_pylist(questions, schema=QUESTION_SCHEMA))
    run_batch_inference(config.infer, dataset)
    answers = {r["id"]: r["answer"] for r in read_predictions(out)}
    metrics, predictions = score(problems, answers)
    storage.write_text(
        storage.join(out, "scienceqa_predictions.jsonl"), "".join(json.dumps(p) + "\n" for p in predictions)
    )
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    log.info(
        "ScienceQA %s accuracy %.4f (%d/%d, %d unparsable); metrics in %s",
        config.split,
        metrics["accuracy"],
        metrics["correct"],
        metrics["total"],
        metrics["parse_failures"],
        storage.join(out, "metrics.json"),
    )
    return {**metrics, "out": out}
