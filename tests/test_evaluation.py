"""ScienceQA and LLaVA-Bench evaluation: parsing rules, metrics by hand, and both jobs end to end on real Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava.evaluation.llava_bench import LlavaBenchConfig, evaluate_llava_bench, parse_scores, relative_scores
from llava.evaluation.scienceqa import build_prompt, load_problems, parse_answer, score
from llava.inference.batch import InferConfig
from tests.conftest import png
from tests.openai_stub import ScriptedOpenAI

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("reply, choices, expected", [
    ("B", 3, 1),                               # the bare letter
    ("  C  ", 3, 2),                           # surrounding whitespace is stripped
    ("A. a cat", 3, 0),                        # "X. " prefix
    ("B.", 3, -1),                             # a letter and a dot without the space: not a rule
    ("The answer is C.", 3, 2),                # exactly one "The answer is X."
    ("I think so. The answer is A. Yes.", 3, 0),
    ("The answer is A. The answer is B.", 3, -1),  # two matches: failure
    ("D", 3, -1),                              # a letter beyond the choices
    ("The answer is D.", 3, -1),
    ("b", 3, -1),                              # lower case is not accepted
    ("", 2, -1), (None, 2, -1),                # no answer (e.g. an error row)
    ("cat", 2, -1),
])
def test_scienceqa_answer_parsing_follows_the_official_rules(reply, choices, expected):
    assert parse_answer(reply, choices) == expected


def test_scienceqa_prompt_is_llavas():
    problem = {"question": "Which is a mammal?", "choices": ["frog", "whale"], "hint": "Look at the animals.",
               "image": b"png"}
    assert build_prompt(problem) == ("<image>\nContext: Look at the animals.\nWhich is a mammal?\nA. frog\nB. whale\n"
                                     "Answer with the option's letter from the given choices directly.")
    assert build_prompt({**problem, "hint": "", "image": None}) == (
        "Which is a mammal?\nA. frog\nB. whale\nAnswer with the option's letter from the given choices directly.")


def test_scienceqa_metrics_by_context_subject_and_grade():
    def problem(pid, answer, image, hint, subject, grade):
        return {"pid": pid, "choices": ["x", "y", "z"], "answer": answer, "image": b"i" if image else None,
                "hint": hint, "subject": subject, "grade": grade}

    problems = [problem("1", 0, True, "", "natural science", "grade2"),
                problem("2", 1, True, "a hint", "natural science", "grade2"),
                problem("3", 2, False, "a hint", "social science", "grade7"),
                problem("4", 0, False, "", "language science", "grade7")]
    answers = {"1": "A", "2": "The answer is C.", "3": "C. z", "4": "no idea"}
    metrics, predictions = score(problems, answers)
    assert (metrics["correct"], metrics["total"], metrics["accuracy"], metrics["parse_failures"]) == (2, 4, 0.5, 1)
    assert metrics["by_context"] == {"image": {"accuracy": 0.5, "correct": 1, "total": 2},
                                     "none": {"accuracy": 0.0, "correct": 0, "total": 1},
                                     "text": {"accuracy": 0.5, "correct": 1, "total": 2}}
    assert metrics["by_subject"]["natural science"]["total"] == 2 and metrics["by_grade"]["grade7"]["correct"] == 1
    assert [p["pred"] for p in predictions] == [0, 2, 2, -1]


@pytest.fixture(scope="module")
def ray_local(s3_server):
    import ray

    from llava.ray_runtime import init_ray

    init_ray(num_cpus=4, s3_endpoint=s3_server.endpoint)
    yield
    ray.shutdown()


def test_eval_scienceqa_cli_on_the_released_layout(tiny_checkpoint, tmp_path):
    data = tmp_path / "scienceqa"
    problems = {
        "11": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 0, "hint": "",
               "image": "image.png", "subject": "natural science", "grade": "grade3"},
        "12": {"question": "Which word rhymes with cat?", "choices": ["hat", "dog", "sun"], "answer": 0,
               "hint": "Rhymes end alike.", "image": None, "subject": "language science", "grade": "grade1"},
        "13": {"question": "What is the capital?", "choices": ["Paris", "Rome"], "answer": 1, "hint": "",
               "image": "image.png", "subject": "social science", "grade": "grade8"},
        "14": {"question": "Not in the test split", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
               "subject": "x", "grade": "grade1"},
        "15": {"question": "Its image is missing", "choices": ["a", "b"], "answer": 0, "hint": "",
               "image": "image.png", "subject": "natural science", "grade": "grade3"},
    }
    (data / "images" / "test" / "11").mkdir(parents=True)
    (data / "images" / "test" / "13").mkdir(parents=True)
    (data / "images" / "test" / "11" / "image.png").write_bytes(png(1))
    (data / "images" / "test" / "13" / "image.png").write_bytes(png(2))
    (data / "problems.json").write_text(json.dumps(problems))
    (data / "pid_splits.json").write_text(json.dumps({"train": ["14"], "test": ["11", "12", "13", "15"]}))

    exe = Path(sys.executable).parent / "llava-ray"
    out = subprocess.run([str(exe), "eval", "scienceqa", "--model", tiny_checkpoint, "--data", str(data),
                          "--out", str(tmp_path / "out"), "infer.max_new_tokens=3", "infer.actors=1"],
                         capture_output=True, text=True, timeout=300, env=os.environ)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["total"] == 4  # the test split only
    predictions = [json.loads(line) for line in (tmp_path / "out" / "scienceqa_predictions.jsonl").read_text().splitlines()]
    assert [p["pid"] for p in predictions] == ["11", "12", "13", "15"]
    assert result["correct"] == sum(p["correct"] for p in predictions)
    assert result["parse_failures"] == sum(parse_answer(p["text"], 3) == -1 and p["pred"] == -1 for p in predictions)
    assert predictions[3]["text"] is None and predictions[3]["pred"] == -1  # the missing image: an error row, wrong
    assert result["by_context"]["image"]["total"] == 3 and result["by_context"]["text"]["total"] == 1
    assert set(result["by_subject"]) == {"natural science", "language science", "social science"}
    raw = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert raw[3]["error_reason"] == "image_missing"
    assert raw[1]["prompt"].startswith("Context: Rhymes end alike.\nWhich word rhymes with cat?\nA. hat\n")
    reloaded = load_problems(str(tmp_path / "out" / "questions.parquet"), "test")  # our parquet form, as --data
    assert [p["pid"] for p in reloaded] == ["11", "12", "13", "15"] and reloaded[0]["image"] == png(1)
    assert reloaded[1]["image"] is None and reloaded[1]["hint"] == "Rhymes end alike." and reloaded[2]["answer"] == 1


def test_llava_bench_relative_score_by_hand_with_retries_and_cache(ray_local, tiny_checkpoint, tmp_path):
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
    context = [{"image": "a.jpg", "caption": "A red square on a table."},
               {"image": "b.jpg", "caption": "Two dogs running."},
               {"id": 7, "image": "c.jpg", "captions": ["Three cups.", "Cups on a shelf."],
                "instances": [{"category": "cup", "bbox": [0.1, 0.2, 0.3, 0.4]}]}]
    references = [{"question_id": i, "text": f"reference answer {i}"} for i in range(4)]
    for name, rows in (("questions.jsonl", questions), ("context.jsonl", context), ("answers_gpt4.jsonl", references)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

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
        config = LlavaBenchConfig(
            infer=InferConfig(model=tiny_checkpoint, out=str(tmp_path / "out"), max_new_tokens=4, actors=1),
            questions=str(tmp_path / "questions.jsonl"), context=str(tmp_path / "context.jsonl"),
            references=str(tmp_path / "answers_gpt4.jsonl"))
        config.judge.url, config.judge.model = server.url, "judge-1"
        first = evaluate_llava_bench(config)
        assert len(server.requests) == 6  # 4 reviews + a retry after the 500 and one after the 429
        scores = first["scores"]
        assert scores["conv"] == {"relative_score": 75.0, "reference_mean": 8.0, "ours_mean": 6.0, "reviews": 1,
                                  "unparsable": 1}
        assert scores["detail"]["relative_score"] == 100.0 and scores["complex"]["relative_score"] == 33.3
        assert scores["overall"]["relative_score"] == 66.7  # (6+7+3)/3 / ((8+7+9)/3) * 100
        assert scores["overall"]["unparsable"] == 1 and first["asked"] == 4

        sent = server.requests[0]
        assert sent["model"] == "judge-1" and sent["messages"][0]["role"] == "system"
        ours = {json.loads(l)["id"]: json.loads(l)["answer"] for l in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()}
        request_for = {q["text"]: next(r["messages"][-1]["content"] for r in server.requests
                                       if f"[Question]\n{q['text']}" in r["messages"][-1]["content"]) for q in questions}
        assert "[Context]\nA red square on a table.\n" in request_for["What is shown?"]
        assert f"[Assistant 1]\nreference answer 0\n\n[End of Assistant 1]\n\n[Assistant 2]\n{ours['0']}\n" in request_for["What is shown?"]
        assert "Three cups.\nCups on a shelf.\n\ncup: [0.1, 0.2, 0.3, 0.4]" in request_for["How many?"]

        second = evaluate_llava_bench(config)  # a re-run asks nothing again
        assert len(server.requests) == 6 and second["asked"] == 0 and second["cached"] == 4
        assert second["scores"] == scores


def test_judge_score_parsing():
    assert parse_scores("8 6\nexplanation") == (8.0, 6.0)
    assert parse_scores("7.5, 9\n") == (7.5, 9.0)
    assert parse_scores("Scores: 8 6") is None and parse_scores("8\n6") is None and parse_scores("") is None
    assert relative_scores([{"category": "x", "scores": None}])["overall"]["relative_score"] is None
