"""Batch inference on a real local Ray (actor pool) against HF `generate`, one prompt at a time."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llava import storage
from tests.conftest import png
from tests.hf_greedy import hf_greedy_answer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_ray_workers_start_without_the_heavy_libraries(ray_local):
    """No worker preloads torch or transformers: Ray Data and Ray Train start many short-lived
    processes (actors included), and each would pay seconds of CPU for imports it never uses.
    The Data tasks that need them import them themselves (llava.ray_runtime.uninterruptible)."""
    import ray

    @ray.remote
    def heavy_modules_loaded():
        return [m for m in ("torch", "transformers") if m in sys.modules]

    assert ray.get([heavy_modules_loaded.remote() for _ in range(4)]) == [[]] * 4


def hf_generate_answers(checkpoint, prompts, max_new_tokens):
    from llava.model import LlavaModel

    model = LlavaModel.from_pretrained(checkpoint).eval()
    return [hf_greedy_answer(model, p, max_new_tokens) for p in prompts]


def test_actor_pool_answers_equal_hf_generate_one_by_one_and_bad_rows_become_error_rows(
    ray_local, checkpoint, tmp_path
):
    from llava.generation import Prompt
    from llava.inference.batch import InferConfig, read_predictions, run_batch_inference

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(png(i, size=30 + 7 * i))
    (images / "corrupt.png").write_bytes(png(9)[:60])
    questions = [
        {"question_id": "q0", "image": "0.png", "text": "What is in the image?", "category": "conv"},
        {"question_id": "q1", "image": "1.png", "text": "Describe it in detail."},
        {"question_id": "q2", "image": "missing.png", "text": "Anything?"},
        {"question_id": "q3", "images": ["2.png", "3.png"], "text": "Compare <image> with <image> please."},
        {"question_id": "q4", "image": "corrupt.png", "text": "And this?"},
        {"question_id": "q5", "text": "A question without an image, a little longer than the others."},
        {"question_id": "q6", "image": "3.png", "text": "What colour dominates?"},
        {"question_id": "q7", "image": "0.png", "text": "word " * 300},  # over max_length=200
    ]
    questions_file = tmp_path / "questions.jsonl"
    questions_file.write_text("".join(json.dumps(q) + "\n" for q in questions))

    result = run_batch_inference(
        InferConfig(
            model=checkpoint,
            questions=str(questions_file),
            out=str(tmp_path / "out"),
            images=str(images),
            max_new_tokens=6,
            batch_size=2,
            actors=2,
        )
    )
    assert result.total == 8 and result.answered == 5
    assert result.errors == {"image_missing": 1, "image_truncated": 1, "prompt_too_long": 1}
    rows = read_predictions(str(tmp_path / "out"))
    assert [r["id"] for r in rows] == [q["question_id"] for q in questions]  # input order
    by_id = {r["id"]: r for r in rows}
    assert by_id["q2"]["error_reason"] == "image_missing" and "missing.png" in by_id["q2"]["error"]
    assert by_id["q4"]["answer"] is None and by_id["q7"]["error_reason"] == "prompt_too_long"
    assert json.loads(by_id["q0"]["meta"]) == {"category": "conv"}

    good = ["q0", "q1", "q3", "q5", "q6"]
    prompts = [
        Prompt(
            [{"from": "human", "value": by_id[q]["prompt"]}],
            [
                (images / name).read_bytes()
                for name in (
                    [questions[int(q[1])]["image"]]
                    if "image" in questions[int(q[1])]
                    else questions[int(q[1])].get("images", [])
                )
            ],
        )
        for q in good
    ]
    assert by_id["q0"]["prompt"].startswith("<image>\n") and by_id["q3"]["prompt"].count("<image>") == 2
    assert [by_id[q]["answer"] for q in good] == hf_generate_answers(checkpoint, prompts, 6)
    assert all(isinstance(by_id[q]["answer"], str) for q in good)


def test_infer_cli_reads_parquet_questions_from_s3(ray_local, checkpoint, s3_server, tmp_path):
    bucket = s3_server.make_bucket("inference")
    rows = [
        {
            "id": f"r{i}",
            "images": [png(i)],
            "source": "test",
            "conversations": json.dumps(
                [{"from": "human", "value": "<image>\nWhich digit?"}, {"from": "gpt", "value": str(i)}]
            ),
        }
        for i in range(5)
    ]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(f"{bucket}/questions/part-0.parquet", buffer.getvalue().to_pybytes())

    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint}
    out = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "llava-ray"),
            "infer",
            "--model",
            checkpoint,
            "--questions",
            f"{bucket}/questions",
            "--out",
            f"{bucket}/answers",
            "max_new_tokens=3",
            "actors=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["total"] == 5 and summary["answered"] == 5 and summary["errors"] == {}
    assert "answered 5/5 question(s); predictions in s3://inference/answers/predictions.jsonl" in out.stderr
    predictions = [json.loads(line) for line in storage.read_text(f"{bucket}/answers/predictions.jsonl").splitlines()]
    assert [p["id"] for p in predictions] == [f"r{i}" for i in range(5)]
    assert [p["reference"] for p in predictions] == [str(i) for i in range(5)]
