"""GPT-assisted instruction data: symbolic contexts, teacher prompts and strict response parsing."""

import json
import random

import pytest

from llava.instruct.context import load_contexts, normalise_box
from llava.instruct.parse import Unparsable, qa_pairs, to_conversation
from llava.instruct.prompts import TYPES, detail_questions, teacher_messages


def test_coco_annotations_become_the_papers_symbolic_context(tmp_path):
    images = [
        {"id": 7, "file_name": "000007.jpg", "width": 640, "height": 480},
        {"id": 3, "file_name": "000003.jpg", "width": 100, "height": 200},
        {"id": 9, "file_name": "no_captions.jpg", "width": 10, "height": 10},
    ]
    captions = {
        "images": images,
        "annotations": [
            {"image_id": 7, "caption": "A dog on a sofa. "},
            {"image_id": 7, "caption": "A brown dog resting."},
            {"image_id": 3, "caption": "An empty room."},
        ],
    }
    instances = {
        "images": images,
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "couch"}],
        "annotations": [
            {"image_id": 7, "category_id": 1, "bbox": [64, 48, 320, 240]},
            {"image_id": 7, "category_id": 2, "bbox": [0, 200, 700, 300]},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    contexts = load_contexts(str(tmp_path / "captions.json"), str(tmp_path / "instances.json"))
    assert [c.image_id for c in contexts] == [3, 7]  # images without captions are left out
    assert contexts[0].text() == "An empty room."
    assert contexts[1].text() == (
        "A dog on a sofa.\nA brown dog resting.\n\n"
        "dog: [0.100, 0.100, 0.600, 0.600]\ncouch: [0.000, 0.417, 1.000, 1.000]"
    )
    assert normalise_box([10, 20, 30, 40], 100, 100) == [0.1, 0.2, 0.4, 0.6]
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="bad.json: not a COCO annotation file"):
        load_contexts(str(tmp_path / "bad.json"))


def test_teacher_messages_come_from_the_data_files():
    for kind in TYPES:
        messages = teacher_messages(kind, "CONTEXT")
        assert messages[0]["role"] == "system" and len(messages[0]["content"]) > 200
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * ((len(messages) - 2) // 2) + ["user"]
        assert messages[-1]["content"] == "CONTEXT"
    assert len(detail_questions()) == 16 and "Describe the following image in detail." in detail_questions()
    with pytest.raises(ValueError, match="unknown request type"):
        teacher_messages("poem", "x")


def test_well_formed_responses_become_llava_conversations():
    response = "Question:\nWhat is it?\n===\nAnswer:\nA dog.\n===\nQuestion:\nHow many?\n===\nAnswer:\nOne.\n==="
    assert qa_pairs(response) == [("What is it?", "A dog."), ("How many?", "One.")]
    turns = to_conversation("conversation", response, random.Random(0), detail_questions())
    assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    assert turns[0]["value"] in ("<image>\nWhat is it?", "What is it?\n<image>") and "<image>" not in turns[2]["value"]
    detail = to_conversation("detail", "  A dog lies on a brown sofa.  ", random.Random(1), detail_questions())
    assert detail[0]["value"].replace("<image>", "").strip() in detail_questions()
    assert detail[1] == {"from": "gpt", "value": "A dog lies on a brown sofa."}
    complex_turns = to_conversation("complex", "Question:\nWhy?\n===\nAnswer:\nBecause.", random.Random(2), [])
    assert complex_turns[1]["value"] == "Because."


@pytest.mark.parametrize(
    "kind, response, reason",
    [
        ("conversation", "", "empty"),
        ("conversation", "Sure! Here are some questions.", "bad_format"),
        (
            "conversation",
            "Question:\nWhat?\n===\nAnswer:\nThis.\n===\nQuestion:\nAnd?\n===",
            "bad_format",
        ),  # no last answer
        ("conversation", "Answer:\nThis.\n===\nQuestion:\nWhat?", "bad_format"),
        ("conversation", "Question:\n\n===\nAnswer:\nThis.", "bad_format"),
        ("complex", "Question:\nA?\n===\nAnswer:\nX.\n===\nQuestion:\nB?\n===\nAnswer:\nY.", "bad_format"),
        ("detail", "Question:\nWhat?\n===\nAnswer:\nThis.", "bad_format"),
        ("detail", "   ", "empty"),
    ],
)
def test_malformed_responses_are_rejected_whole(kind, response, reason):
    with pytest.raises(Unparsable) as error:
        to_conversation(kind, response, random.Random(0), detail_questions())
    assert error.value.reason == reason


def test_generate_job_against_a_scripted_teacher_retries_drops_and_resumes(ray_local, tmp_path):
    from llava.instruct.generate import GenerateConfig, generate
    from tests.conftest import png
    from tests.openai_stub import ScriptedOpenAI

    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 40} for i in (1, 2, 3)]
    captions = {
        "images": images,
        "annotations": [
            {"image_id": 1, "caption": "A cat on a mat."},
            {"image_id": 2, "caption": "A dog in a park."},
            {"image_id": 3, "caption": "Two birds."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "images").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(i))
    good_qa = "Question:\nWhat is it?\n===\nAnswer:\nAn animal.\n==="

    def teacher(body, attempt):
        system, context = body["messages"][0]["content"], body["messages"][-1]["content"]
        kind = (
            "conversation"
            if "Design a conversation" in system
            else "detail"
            if "detailed paragraph" in system
            else "complex"
        )
        image = {"A cat on a mat.": 1, "A dog in a park.": 2, "Two birds.": 3}[context]
        if (image, kind) == (1, "complex") and attempt == 0:
            return 429
        if (image, kind) == (2, "detail") and attempt == 0:
            return 500
        if (image, kind) == (2, "conversation"):
            return "Sure! Here are some questions about the image."  # malformed
        if (image, kind) == (3, "complex"):
            return good_qa + "\nQuestion:\nAnd?\n===\nAnswer:\nMore.\n==="  # two questions: malformed for complex
        if (image, kind) == (2, "complex"):
            return ("sleep", 1.0, good_qa)  # slow
        return "A calm scene with an animal." if kind == "detail" else good_qa

    with ScriptedOpenAI(teacher) as server:
        config = GenerateConfig(
            captions=str(tmp_path / "captions.json"),
            images=str(tmp_path / "images"),
            out=str(tmp_path / "out"),
            actors=2,
        )
        config.endpoint.url, config.endpoint.model, config.endpoint.concurrency = server.url, "teacher-1", 2
        summary = generate(config)
        assert len(server.requests) == 11  # 9 requests + the retries after the 429 and the 500
        assert summary["planned"] == 9 and summary["kept"] == 7 and summary["not_done"] == 0
        assert summary["failures"] == {"unparsable_bad_format": 2}
        assert summary["by_type"] == {"conversation": 2, "detail": 3, "complex": 2}
        assert summary["parquet_rows"] == 7
        records = json.loads((tmp_path / "out" / "llava.json").read_text())
        assert {r["id"] for r in records} == {
            "1-conversation",
            "3-conversation",
            "1-detail",
            "2-detail",
            "3-detail",
            "1-complex",
            "2-complex",
        }
        assert all(r["teacher"] == "teacher-1" and "<image>" in r["conversations"][0]["value"] for r in records)

        built = (tmp_path / "out" / "parquet" / "_manifest.json").stat().st_mtime_ns
        again = generate(config)  # a re-run asks nothing it has an answer or a rejection for
        assert len(server.requests) == 11 and again["kept"] == 7 and again["parquet_rows"] == 7
        assert (tmp_path / "out" / "parquet" / "_manifest.json").stat().st_mtime_ns == built  # not rebuilt


def _coco(tmp_path, n: int) -> tuple[str, str]:
    """A COCO captions file with `n` images (captions "Scene i."), and the image folder."""
    from tests.conftest import png

    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 40} for i in range(n)]
    annotations = [{"image_id": i, "caption": f"Scene {i}."} for i in range(n)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(n):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(i))
    return str(tmp_path / "captions.json"), str(tmp_path / "images")


def test_llava158k_mixture_gives_one_type_per_image_in_the_papers_proportions(tmp_path):
    from llava.instruct.generate import GenerateConfig, request_plan

    captions, images = _coco(tmp_path, 0)
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 9, "height": 9} for i in range(3000)],
        "annotations": [{"image_id": i, "caption": f"c{i}"} for i in range(3000)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    config = GenerateConfig(captions=captions, images=images, out=str(tmp_path / "out"), mixture="llava158k")
    plan = request_plan(config)
    assert len(plan) == 3000 and len({r["image_id"] for r in plan}) == 3000  # one request per image
    shares = {kind: sum(r["kind"] == kind for r in plan) / 3000 for kind in ("conversation", "detail", "complex")}
    for kind, paper in {"conversation": 58 / 158, "detail": 23 / 158, "complex": 77 / 158}.items():
        assert abs(shares[kind] - paper) < 0.03, shares
    assert [r["kind"] for r in request_plan(config)] == [r["kind"] for r in plan]  # seeded: the same every run
    config.seed = 1
    assert [r["kind"] for r in request_plan(config)] != [r["kind"] for r in plan]


def test_requests_per_minute_cap_spaces_the_teacher_requests():
    """The teacher client the generation actors use (each with its share of the cap) paces its sends."""
    from concurrent.futures import ThreadPoolExecutor

    from llava.chat_client import ChatClient, EndpointConfig
    from tests.openai_stub import ScriptedOpenAI

    with ScriptedOpenAI(lambda body, attempt: "A quiet scene.") as server:
        client = ChatClient(EndpointConfig(url=server.url, model="teacher", requests_per_minute=300))  # 1 per 0.2 s
        with ThreadPoolExecutor(3) as pool:  # three threads, as an actor with concurrency 3 has
            answers = list(pool.map(lambda i: client.complete([{"role": "user", "content": f"scene {i}"}]), range(8)))
    assert answers == ["A quiet scene."] * 8 and len(server.arrivals) == 8
    # Sends are 0.2 s apart, so the 8 arrivals span about 1.4 s (less only by the first request's own
    # delay); three threads against an instant server would finish in well under 0.1 s without the cap.
    assert server.arrivals[-1] - server.arrivals[0] > 0.9, server.arrivals


def test_generate_killed_halfway_resumes_without_asking_twice(ray_local, tmp_path):
    """`llava-ray generate` is SIGKILLed after some answers; the re-run asks only what was not recorded."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.openai_stub import ScriptedOpenAI

    captions, images = _coco(tmp_path, 10)
    out = tmp_path / "out"
    with ScriptedOpenAI(lambda body, attempt: ("sleep", 0.3, "A quiet scene.")) as server:
        command = [
            str(Path(sys.executable).parent / "llava-ray"),
            "generate",
            "--annotations",
            captions,
            "--images",
            images,
            "--out",
            str(out),
            "--endpoint",
            server.url,
            "--model",
            "teacher",
            "--types",
            "detail",
            "--concurrency",
            "1",
            "actors=1",
        ]
        first = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )  # its own process group: the job and its local Ray
        deadline = time.monotonic() + 180
        while len(server.requests) < 4 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        recorded = -1  # a worker may finish the request in flight and record it before it notices: wait for that
        while recorded != len(list((out / "parts").glob("*.jsonl"))):
            recorded = len(list((out / "parts").glob("*.jsonl")))
            time.sleep(3)
        asked_first = [r["messages"][-1]["content"] for r in server.requests]
        assert 4 <= len(asked_first) < 10 and recorded >= 3, "the kill should land halfway"

        from llava.instruct.generate import GenerateConfig, generate  # the re-run: same job, same --out

        config = GenerateConfig(captions=captions, images=images, out=str(out), types=["detail"], actors=1)
        config.endpoint.url, config.endpoint.model, config.endpoint.concurrency = server.url, "teacher", 1
        summary = generate(config)
    asked_again = [r["messages"][-1]["content"] for r in server.requests[len(asked_first) :]]
    twice = set(asked_first) & set(asked_again)
    assert len(twice) <= 1, "only a request in flight at the kill (1 actor x concurrency 1) may be asked again"
    assert len(asked_first) + len(asked_again) - len(twice) == 10 and len(set(asked_again)) == len(asked_again)
    assert len(asked_again) == 10 - recorded
    assert summary["planned"] == summary["kept"] == summary["parquet_rows"] == 10 and summary["not_done"] == 0
    records = json.loads((out / "llava.json").read_text())
    assert sorted(r["id"] for r in records) == sorted(f"{i}-detail" for i in range(10))
