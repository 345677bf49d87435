"""ScienceQA and LLaVA-Bench evaluation: the official parsing rules, prompt formats and judge rules,
metrics by hand (ours and the official summary), and both jobs end to end on real Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.config import load_config
from llava.evaluation.judge_rules import DEFAULT_RULES, load_rules, rule_category
from llava.evaluation.llava_bench import (
    LlavaBenchConfig,
    context_text,
    evaluate_llava_bench,
    official_relative_scores,
    official_scores,
    parse_scores,
    relative_scores,
)
from llava.evaluation.scienceqa import (
    ScienceQAConfig,
    build_prompt,
    lea_conversation,
    load_problems,
    parse_answer,
    parse_letter,
    score,
)
from llava.inference.batch import InferConfig
from tests.conftest import png
from tests.openai_stub import ScriptedOpenAI

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# Outcomes of haotian-liu/LLaVA llava/eval/eval_science_qa.py (v1.2.2) on each reply: the letter it reads
# ("FAILED" when none) and whether that letter is one of the problem's choices.
@pytest.mark.parametrize(
    "reply, choices, letter, expected",
    [
        ("B", 3, "B", 1),  # 1. the reply is a letter A-E
        ("  C  ", 3, "C", 2),  # official answer files are stripped (model_vqa_science.py)
        ("A. a cat", 3, "A", 0),  # 2. "X. " at the start
        ("B.", 3, "FAILED", -1),  # a letter and a dot without the space: no rule
        ("The answer is C.", 3, "C", 2),  # 3. exactly one "The answer is X."
        ("I think so. The answer is A. Yes.", 3, "A", 0),
        ("AB", 3, "FAILED", -1),  # not a letter, no "X. ", no "The answer is": wrong
        ("A B", 3, "FAILED", -1),
        ("B. The answer is A.", 3, "B", 1),  # rule 2 before rule 3: the leading letter wins
        ("E. The answer is A.", 3, "E", -1),  # ... even when it is beyond the choices (then wrong)
        ("The answer is A. The answer is B.", 3, "FAILED", -1),  # two matches fail
        ("The answer is A. The answer is A.", 3, "FAILED", -1),  # ... even when they agree
        ("The answer is A", 3, "FAILED", -1),  # the pattern's final "." needs one more character
        ("The answer is AB", 3, "A", 0),  # ... which may be any character but a newline
        ("The answer is A\n", 3, "FAILED", -1),  # (stripped to "The answer is A")
        ("The answer is F.", 3, "F", -1),  # [A-Z] reads F, not a choice
        ("The answer is E.", 5, "E", 4),
        ("The answer is (A).", 3, "FAILED", -1),
        ("the answer is A.", 3, "FAILED", -1),  # case matters
        ("D", 3, "D", -1),  # a letter beyond the choices
        ("The answer is D.", 3, "D", -1),
        ("b", 3, "FAILED", -1),
        ("", 2, "FAILED", -1),
        (None, 2, "FAILED", -1),  # no answer (e.g. an error row, or missing)
        ("cat", 2, "FAILED", -1),
    ],
)
def test_scienceqa_answer_parsing_is_the_official_scorers(reply, choices, letter, expected):
    assert parse_letter(reply) == letter
    assert parse_answer(reply, choices) == expected


def test_scienceqa_prompt_is_llavas():
    problem = {
        "question": "Which is a mammal?",
        "choices": ["frog", "whale"],
        "hint": "Look at the animals.",
        "image": b"png",
    }
    assert build_prompt(problem) == (
        "<image>\nContext: Look at the animals.\nWhich is a mammal?\nA. frog\nB. whale\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert build_prompt({**problem, "hint": "", "image": None}) == (
        "Which is a mammal?\nA. frog\nB. whale\nAnswer with the option's letter from the given choices directly."
    )
    assert build_prompt(problem, "CQM-A") == build_prompt(problem)  # the default format


def test_scienceqa_qcm_lea_prompt_and_training_conversation_are_the_official_converters():
    problem = {
        "question": "Which is a mammal?",
        "choices": ["frog", "whale"],
        "hint": "Look at the animals.",
        "image": b"png",
        "answer": 1,
        "lecture": "Mammals have hair.\nFrogs are amphibians.",
        "solution": "A whale is a mammal.",
    }
    assert build_prompt(problem, "QCM-LEA") == (
        "<image>\nWhich is a mammal?\nContext: Look at the animals.\nOptions: (A) frog (B) whale"
    )
    # no hint: "N/A"; double spaces collapsed once (three spaces leave two), as the converter's str.replace
    text_only = {**problem, "question": "Which  is a   mammal?", "hint": " ", "image": None}
    assert build_prompt(text_only, "QCM-LEA") == "Which is a  mammal?\nContext: N/A\nOptions: (A) frog (B) whale"
    assert lea_conversation(problem) == [
        {
            "from": "human",
            "value": "Which is a mammal?\nContext: Look at the animals.\nOptions: (A) frog (B) whale\n<image>",
        },
        {"from": "gpt", "value": "Mammals have hair.\nFrogs are amphibians. A whale is a mammal. The answer is B."},
    ]
    # an empty lecture leaves "Answer:  <solution>", collapsed to one space before "Answer: " is dropped
    assert (
        lea_conversation({**problem, "lecture": "", "image": None})[1]["value"]
        == "A whale is a mammal. The answer is B."
    )
    assert lea_conversation({**problem, "lecture": "Line one.\\nLine two."})[1]["value"].startswith(
        "Line one.\nLine two. "
    )
    with pytest.raises(ValueError, match="prompt_format must be one of CQM-A, QCM-LEA, got 'QCM-A'"):
        load_config(ScienceQAConfig, overrides=["prompt_format=QCM-A"])


def test_eval_answers_up_to_1024_new_tokens_by_default():
    assert load_config(ScienceQAConfig).infer.max_new_tokens == 1024  # official model_vqa_science.py / model_vqa.py
    assert load_config(LlavaBenchConfig).infer.max_new_tokens == 1024
    assert load_config(ScienceQAConfig, overrides=["infer.max_new_tokens=8"]).infer.max_new_tokens == 8


def test_scienceqa_metrics_by_context_subject_and_grade():
    def problem(pid, answer, image, hint, subject, grade):
        return {
            "pid": pid,
            "choices": ["x", "y", "z"],
            "answer": answer,
            "image": b"i" if image else None,
            "hint": hint,
            "subject": subject,
            "grade": grade,
        }

    problems = [
        problem("1", 0, True, "", "natural science", "grade2"),
        problem("2", 1, True, "a hint", "natural science", "grade2"),
        problem("3", 2, False, "a hint", "social science", "grade7"),
        problem("4", 0, False, "", "language science", "grade7"),
    ]
    answers = {"1": "A", "2": "The answer is C.", "3": "C. z", "4": "no idea"}
    metrics, predictions = score(problems, answers)
    assert (metrics["correct"], metrics["total"], metrics["accuracy"], metrics["parse_failures"]) == (2, 4, 0.5, 1)
    assert metrics["by_context"] == {
        "image": {"accuracy": 0.5, "correct": 1, "total": 2},
        "none": {"accuracy": 0.0, "correct": 0, "total": 1},
        "text": {"accuracy": 0.5, "correct": 1, "total": 2},
    }
    assert metrics["by_subject"]["natural science"]["total"] == 2 and metrics["by_grade"]["grade7"]["correct"] == 1
    assert [p["pred"] for p in predictions] == [0, 2, 2, -1]
    assert [p["parsed"] for p in predictions] == ["A", "C", "C", "FAILED"]


@pytest.mark.slow  # the eval command in its own process, on a local Ray of its own
def test_eval_scienceqa_cli_on_the_released_layout(tiny_checkpoint, tmp_path):
    data = tmp_path / "scienceqa"
    problems = {
        "11": {
            "question": "Which animal is shown?",
            "choices": ["cat", "dog"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "subject": "natural science",
            "grade": "grade3",
        },
        "12": {
            "question": "Which word rhymes with cat?",
            "choices": ["hat", "dog", "sun"],
            "answer": 0,
            "hint": "Rhymes end alike.",
            "image": None,
            "subject": "language science",
            "grade": "grade1",
            "lecture": "Rhyming words end with the same sound.",
            "solution": "Hat and cat end with -at.",
        },
        "13": {
            "question": "What is the capital?",
            "choices": ["Paris", "Rome"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "subject": "social science",
            "grade": "grade8",
        },
        "14": {
            "question": "Not in the test split",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": None,
            "subject": "x",
            "grade": "grade1",
        },
        "15": {
            "question": "Its image is missing",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "subject": "natural science",
            "grade": "grade3",
        },
    }
    (data / "images" / "test" / "11").mkdir(parents=True)
    (data / "images" / "test" / "13").mkdir(parents=True)
    (data / "images" / "test" / "11" / "image.png").write_bytes(png(1))
    (data / "images" / "test" / "13" / "image.png").write_bytes(png(2))
    (data / "problems.json").write_text(json.dumps(problems))
    (data / "pid_splits.json").write_text(json.dumps({"train": ["14"], "test": ["11", "12", "13", "15"]}))

    exe = Path(sys.executable).parent / "llava-ray"
    out = subprocess.run(
        [
            str(exe),
            "eval",
            "scienceqa",
            "--model",
            tiny_checkpoint,
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--prompt-format",
            "QCM-LEA",
            "infer.max_new_tokens=3",
            "infer.actors=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["total"] == 4  # the test split only
    predictions = [
        json.loads(line) for line in (tmp_path / "out" / "scienceqa_predictions.jsonl").read_text().splitlines()
    ]
    assert [p["pid"] for p in predictions] == ["11", "12", "13", "15"]
    assert result["correct"] == sum(p["correct"] for p in predictions)
    assert result["parse_failures"] == sum(parse_answer(p["text"], 3) == -1 and p["pred"] == -1 for p in predictions)
    assert predictions[3]["text"] is None and predictions[3]["pred"] == -1  # the missing image: an error row, wrong
    assert result["by_context"]["image"]["total"] == 3 and result["by_context"]["text"]["total"] == 1
    assert set(result["by_subject"]) == {"natural science", "language science", "social science"}
    raw = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert raw[3]["error_reason"] == "image_missing"
    assert raw[0]["prompt"] == "<image>\nWhich animal is shown?\nContext: N/A\nOptions: (A) cat (B) dog"  # QCM-LEA
    assert (
        raw[1]["prompt"] == "Which word rhymes with cat?\nContext: Rhymes end alike.\nOptions: (A) hat (B) dog (C) sun"
    )
    reloaded = load_problems(str(tmp_path / "out" / "questions.parquet"), "test")  # our parquet form, as --data
    assert [p["pid"] for p in reloaded] == ["11", "12", "13", "15"] and reloaded[0]["image"] == png(1)
    assert reloaded[1]["image"] is None and reloaded[1]["hint"] == "Rhymes end alike." and reloaded[2]["answer"] == 1
    assert lea_conversation(reloaded[1])[1]["value"] == (
        "Rhyming words end with the same sound. Hat and cat end with -at. The answer is A."
    )


def _write_bench(tmp_path) -> None:
    """Four questions: three on In-the-Wild-style contexts (one caption), one on a COCO context."""
    images = tmp_path / "images"
    images.mkdir()
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("c.jpg", 3)):
        (images / name).write_bytes(png(seed))
    questions = [
        {"question_id": 0, "image": "a.jpg", "text": "What is shown?", "category": "conv"},
        {"question_id": 1, "image": "a.jpg", "text": "Describe in detail.", "category": "detail"},
        {"question_id": 2, "image": "b.jpg", "text": "Why is it so?", "category": "complex"},
        {"question_id": 3, "image": "c.jpg", "text": "How many?", "category": "conv"},
    ]
    context = [
        {"image": "a.jpg", "caption": "A red square on a table."},
        {"image": "b.jpg", "caption": ["Two dogs running.", "A park."]},
        {
            "id": 7,
            "image": "c.jpg",
            "captions": ["Three cups.", "Cups on a shelf."],
            "instances": [{"category": "cup", "bbox": [0.1, 0.2, 0.3, 0.4]}],
        },
    ]
    references = [{"question_id": i, "text": f"reference answer {i}"} for i in range(4)]
    for name, rows in (("questions.jsonl", questions), ("context.jsonl", context), ("answers_gpt4.jsonl", references)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _bench_config(tmp_path, model: str, url: str, rules=None) -> LlavaBenchConfig:
    config = LlavaBenchConfig(
        infer=InferConfig(model=model, out=str(tmp_path / "out"), max_new_tokens=4, actors=1),
        questions=str(tmp_path / "questions.jsonl"),
        context=str(tmp_path / "context.jsonl"),
        references=str(tmp_path / "answers_gpt4.jsonl"),
        rules=rules,
    )
    config.judge.url, config.judge.model = url, "judge-1"
    return config


def _content(server, question: str) -> str:
    return next(
        r["messages"][-1]["content"]
        for r in server.requests
        if f"[Question]\n{question}" in r["messages"][-1]["content"]
    )


def test_llava_bench_relative_score_by_hand_with_retries_and_cache(ray_local, tiny_checkpoint, tmp_path):
    _write_bench(tmp_path)

    def judge(body, attempt):
        content = body["messages"][-1]["content"]
        if "[Question]\nWhat is shown?" in content:
            return "8 6\nAssistant 2 is vaguer."
        if "[Question]\nDescribe in detail." in content:
            return 500 if attempt == 0 else "7, 7\nBoth equal."
        if "[Question]\nWhy is it so?" in content:
            return 429 if attempt == 0 else "9 3\nAssistant 1 reasons."
        return "I cannot judge this."

    with ScriptedOpenAI(judge) as server:
        config = _bench_config(tmp_path, tiny_checkpoint, server.url)
        first = evaluate_llava_bench(config)
        assert len(server.requests) == 6  # 4 reviews + a retry after the 500 and one after the 429
        scores = first["scores"]
        assert scores["conv"] == {
            "relative_score": 75.0,
            "reference_mean": 8.0,
            "ours_mean": 6.0,
            "reviews": 1,
            "unparsable": 1,
        }
        assert scores["detail"]["relative_score"] == 100.0 and scores["complex"]["relative_score"] == 33.3
        assert scores["overall"]["relative_score"] == 66.7  # (6+7+3)/3 / ((8+7+9)/3) * 100
        assert scores["overall"]["unparsable"] == 1 and first["asked"] == 4
        # The official summary: categories by rule key; "7, 7" and the refusal are [-1, -1], averaged in.
        official = first["official"]
        assert list(official) == ["all", "conv", "llava_bench_complex", "llava_bench_conv", "llava_bench_detail"]
        assert official["llava_bench_conv"]["relative_score"] == 75.0
        assert official["llava_bench_detail"] == {
            "relative_score": 100.0,
            "reference_mean": -1.0,
            "ours_mean": -1.0,
            "reviews": 1,
            "unparsable": 1,
        }
        assert official["all"] == {
            "relative_score": 46.7,
            "reference_mean": 3.75,
            "ours_mean": 1.75,  # 7/4 / (15/4)
            "reviews": 4,
            "unparsable": 2,
        }
        assert json.loads((tmp_path / "out" / "official_scores.json").read_text()) == official
        assert json.loads((tmp_path / "out" / "scores.json").read_text()) == scores

        sent = server.requests[0]
        assert sent["model"] == "judge-1" and sent["messages"][0]["role"] == "system"
        rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
        ours = {row["id"]: row["answer"] for row in rows}
        assert _content(server, "What is shown?") == (
            f"[Context]\nA red square on a table.\n\n[Question]\nWhat is shown?\n\n"
            f"[Assistant 1]\nreference answer 0\n\n[End of Assistant 1]\n\n[Assistant 2]\n{ours['0']}\n\n"
            f"[End of Assistant 2]\n\n[System]\n{DEFAULT_RULES['llava_bench_conv'].prompt}\n\n"
        )
        assert "[Context]\nTwo dogs running.\nA park.\n\n[Question]" in _content(server, "Why is it so?")
        assert "[Context]\nThree cups.\nCups on a shelf.\n\ncup: [0.1, 0.2, 0.3, 0.4]\n\n[Question]" in _content(
            server, "How many?"
        )
        for question, rule in (
            ("Describe in detail.", "llava_bench_detail"),
            ("Why is it so?", "llava_bench_complex"),
            ("How many?", "conv"),
        ):  # each question judged with its category's default rule
            assert _content(server, question).endswith(f"[System]\n{DEFAULT_RULES[rule].prompt}\n\n")

        second = evaluate_llava_bench(config)  # a re-run asks nothing again
        assert len(server.requests) == 6 and second["asked"] == 0 and second["cached"] == 4
        assert second["scores"] == scores and second["official"] == official


def test_llava_bench_judges_each_category_with_the_rule_file(ray_local, tiny_checkpoint, tmp_path):
    """An official-style rule.json: every question is judged with its own category's rule and role."""
    _write_bench(tmp_path)
    rules = {
        key: {"role": "Assistant", "prompt": f"RULE<{key}> first line: two scores."}
        for key in ("conv", "detail", "complex", "llava_bench_conv", "llava_bench_detail", "llava_bench_complex")
    }
    rules["llava_bench_complex"]["role"] = "Reviewer"
    rules["coding"] = {"role": "Assistant", "prompt": "not used"}
    (tmp_path / "rule.json").write_text(json.dumps(rules))
    verdicts = {"conv": "8 6", "llava_bench_conv": "10 5", "llava_bench_detail": "8 4", "llava_bench_complex": "4 4"}

    def judge(body, attempt):
        content = body["messages"][-1]["content"]
        used = [key for key in rules if f"RULE<{key}>" in content]
        return verdicts[used[0]] + "\nreasons" if len(used) == 1 else "no single rule"

    with ScriptedOpenAI(judge) as server:
        result = evaluate_llava_bench(_bench_config(tmp_path, tiny_checkpoint, server.url, str(tmp_path / "rule.json")))
    expected = {
        "What is shown?": "llava_bench_conv",
        "Describe in detail.": "llava_bench_detail",
        "Why is it so?": "llava_bench_complex",
        "How many?": "conv",
    }
    for question, key in expected.items():
        assert _content(server, question).endswith(f"[System]\n{rules[key]['prompt']}\n\n")
    assert "[Reviewer 1]\nreference answer 2\n\n[End of Reviewer 1]\n\n[Reviewer 2]\n" in _content(
        server, "Why is it so?"
    )
    official = result["official"]
    assert {k: v["relative_score"] for k, v in official.items()} == {
        "all": 63.3,
        "conv": 75.0,
        "llava_bench_complex": 100.0,
        "llava_bench_conv": 50.0,
        "llava_bench_detail": 50.0,
    }
    assert result["scores"]["conv"]["relative_score"] == round((6 + 5) / (8 + 10) * 100, 1)  # both conv questions


def test_llava_bench_rule_problems_are_named_before_any_work(tmp_path):
    _write_bench(tmp_path)
    rule = {"role": "Assistant", "prompt": "p"}
    (tmp_path / "partial.json").write_text(
        json.dumps({"conv": rule, "llava_bench_conv": rule, "llava_bench_detail": rule})
    )
    config = _bench_config(tmp_path, "/nonexistent/model", "http://127.0.0.1:9/v1", str(tmp_path / "partial.json"))
    with pytest.raises(ValueError, match="no judge rule for category llava_bench_complex in .*partial.json"):
        evaluate_llava_bench(config)
    (tmp_path / "bad.json").write_text(json.dumps({"conv": {"role": "Assistant"}}))
    with pytest.raises(ValueError, match="rule 'conv' must be an object with string fields"):
        load_rules(str(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_rules(str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match="question 5 has no category"):
        rule_category({"question_id": 5, "text": "?"}, {"caption": "c"})
    with pytest.raises(ValueError, match="neither `caption`"):
        rule_category({"question_id": 5, "category": "conv"}, {"image": "x.jpg"})


def test_default_rules_cover_both_benchmarks_in_our_own_words():
    coco, wild = {"captions": ["c"], "instances": []}, {"caption": "c"}
    assert [rule_category({"category": c}, coco) for c in ("conv", "detail", "complex")] == [
        "conv",
        "detail",
        "complex",
    ]
    assert rule_category({"category": "detail"}, wild) == "llava_bench_detail"
    assert set(DEFAULT_RULES) == {
        "conv",
        "detail",
        "complex",
        "llava_bench_conv",
        "llava_bench_detail",
        "llava_bench_complex",
    }
    for key, rule in DEFAULT_RULES.items():
        assert rule.role == "Assistant"
        assert (
            "On the first line write only the two scores, Assistant 1's first, separated by one space." in rule.prompt
        )
        assert ("bounding box" in rule.prompt) == (key in ("conv", "detail", "complex"))  # COCO contexts carry boxes
    assert len({rule.prompt for rule in DEFAULT_RULES.values()}) == 6
    assert context_text(coco) == "c\n\n"  # as the official COCO script: captions, blank line, boxes (none here)


def test_judge_score_parsing_ours_and_the_official():
    assert parse_scores("8 6\nexplanation") == (8.0, 6.0)
    assert parse_scores("7.5, 9\n") == (7.5, 9.0) and parse_scores(" 8  6 ") == (8.0, 6.0)
    assert parse_scores("Scores: 8 6") is None and parse_scores("8\n6") is None and parse_scores("") is None
    assert relative_scores([{"category": "x", "scores": None}])["overall"]["relative_score"] is None
    # The official parser: first line, commas -> spaces, split on single spaces, exactly two numbers.
    assert official_scores("8 6\nexplanation") == (8.0, 6.0) and official_scores("7.5,9") == (7.5, 9.0)
    for unreadable in ("7, 9", "8  6", " 8 6", "8 6 ", "8\t6", "Scores: 8 6", "8\n6", "", "eight six"):
        assert official_scores(unreadable) == (-1.0, -1.0), unreadable


def test_official_summary_rounds_means_to_3_decimals_before_the_ratio():
    texts = ("2 2\nok", "1 2\nok", "1 1\nok")  # means 4/3 and 5/3
    official = official_relative_scores([{"rule": "conv", "review": t} for t in texts])["conv"]
    assert (official["reference_mean"], official["ours_mean"]) == (1.333, 1.667)
    assert official["relative_score"] == 125.1  # 1.667 / 1.333, as summarize_gpt_review.py prints it
    ours = relative_scores([{"category": "conv", "scores": parse_scores(t)} for t in texts])["conv"]
    assert ours["relative_score"] == 125.0  # the exact ratio of the means
