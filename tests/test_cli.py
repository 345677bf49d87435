"""The `llava-ray` command line, run as a user would (installed console script)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main


def llava_ray(*args, check=True, timeout=300):
    """Run the installed console script (next to this interpreter, whether or not the venv is activated)."""
    exe = Path(sys.executable).parent / "llava-ray"
    assert exe.exists(), f"the llava-ray console script is not installed at {exe} (pip install -e .)"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=check, timeout=timeout)


def test_show_masks_prints_ids_labels_and_tokens(base_models, tmp_path):
    sample = {
        "id": "000001",
        "image": "coco/train2017/000001.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is on the table?"},
            {"from": "gpt", "value": "A red apple."},
        ],
    }
    (tmp_path / "sample.json").write_text(json.dumps(sample))
    result = llava_ray(
        "show-masks",
        "--tokenizer",
        base_models["llm"],
        "--template",
        "vicuna_v1",
        "--json",
        str(tmp_path / "sample.json"),
        "--image-tokens",
        "5",
    )
    shown = json.loads(result.stdout)
    assert len(shown["input_ids"]) == len(shown["labels"]) == len(shown["tokens"])
    image_positions = [i for i, t in enumerate(shown["tokens"]) if t == "<image>"]
    assert len(image_positions) == 5
    assert all(shown["labels"][i] == -100 for i in image_positions)
    trained = [t for t, label in zip(shown["tokens"], shown["labels"]) if label != -100]
    assert "".join(trained).replace("\u0120", " ") == " A red apple.</s>"


def test_show_masks_refuses_a_bad_sample_with_its_reason(base_models, tmp_path, capsys):
    sample = {
        "id": "x",
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "no image token"}, {"from": "gpt", "value": "hi"}],
    }
    (tmp_path / "bad.json").write_text(json.dumps([sample]))
    code = main(
        [
            "show-masks",
            "--tokenizer",
            base_models["llm"],
            "--template",
            "vicuna_v1",
            "--json",
            str(tmp_path / "bad.json"),
        ]
    )
    assert code == 2
    assert "image_count_mismatch" in capsys.readouterr().err


def test_tiny_model_then_export_from_the_command_line(tmp_path, capsys):
    import torch

    from llava.config import ImageConfig, ModelConfig
    from llava.model import LlavaModel

    assert main(["tiny-model", "--out", str(tmp_path / "base")]) == 0
    paths = json.loads(capsys.readouterr().out)
    model = LlavaModel.from_config(
        ModelConfig(vision_tower=paths["vision_tower"], llm=paths["llm"], image=ImageConfig(size=32))
    )
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == "hf-llava"
    from transformers import LlavaForConditionalGeneration

    hf_model = LlavaForConditionalGeneration.from_pretrained(result["path"])
    ids = torch.tensor([[1] + [model.image_token_id] * model.num_image_tokens + [5, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        diff = (
            (hf_model(input_ids=ids, pixel_values=pixels).logits - model(ids, pixel_values=pixels).logits).abs().max()
        )
    assert diff < 1e-4


def test_unknown_subcommand_fails_cleanly():
    with pytest.raises(SystemExit) as error:
        main(["no-such-command"])
    assert error.value.code == 2


@pytest.mark.slow  # the whole demo: prepare, two training runs, eval, export
def test_demo_runs_both_stages_and_prints_its_summary(tmp_path):
    """The README's main job, shortened to a few steps per stage (the full run is documented in the README)."""
    shortened = ["optim.max_steps=3", "base.clip.steps=3", "base.lm.steps=3", "base.lm.corpus_documents=50"]
    result = llava_ray("demo", "--out", str(tmp_path / "demo"), *shortened, timeout=600)  # 7 stages + report
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("stage1_loss_start", "stage1_loss_end", "stage2_loss_end", "heldout_accuracy", "checkpoint", "export"):
        assert key in summary
    assert 0 <= summary["stage1_caption_accuracy"] <= 1  # the stage-1 model's captions of the held-out images
    assert json.loads((Path(summary["base_models"]["vision_tower"]) / "config.json").read_text())["model_type"] in (
        "clip_vision_model",
        "clip_vision",
    )
    report = Path(summary["report"]).read_text()  # the report's page and its figures, under the demo's root
    assert Path(summary["report"]).parent == tmp_path / "demo" / "report" and "confusion.png" in report
    predictions = [json.loads(line) for line in Path(summary["predictions"]).read_text().splitlines()]
    assert len(predictions) == 300 and all(p["error"] is None for p in predictions)  # via batch inference
    correct = sum(p["answer"] == p["reference"] for p in predictions)
    assert summary["heldout_accuracy"] == round(correct / 300, 4)
    assert (Path(summary["checkpoint"]) / "llm" / "model.safetensors").exists()
    assert (Path(summary["export"]) / "config.json").exists()
    assert (
        json.loads((tmp_path / "demo" / "runs" / "stage2" / "output.json").read_text())["model"]
        == summary["checkpoint"]
    )
    manifest = json.loads((tmp_path / "demo" / "pipeline.json").read_text())  # the demo is the pipeline
    assert [*manifest["stages"]] == ["prepare", "base", "stage1", "stage2", "eval", "export"]
    assert all(s["status"] == "complete" and s["ended"] for s in manifest["stages"].values())
    assert manifest["stages"]["stage2"]["outputs"]["model"] == summary["checkpoint"]
    again = llava_ray("demo", "--out", str(tmp_path / "demo"), *shortened)  # same run: all skipped
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary
    assert again.stderr.count(": skipped, complete since") == 6 and "local Ray" not in again.stderr


@pytest.mark.slow  # a Ray + Ray Serve of its own
def test_serve_runs_the_serve_config_file_until_interrupted(tiny_checkpoint, tmp_path):
    """`llava-ray serve --config serve/config.yaml` (its app args, with overrides) answers, then stops on Ctrl-C."""
    import os
    import signal
    import urllib.request

    import openai
    import yaml

    from tests.serve_fixtures import free_port

    config = yaml.safe_load((Path(__file__).parent.parent / "serve" / "config.yaml").read_text())
    assert config["applications"][0]["import_path"] == "serve.app:build_app"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    exe = Path(sys.executable).parent / "llava-ray"
    env = dict(os.environ, RAY_TMPDIR=os.environ["RAY_TMPDIR"])
    server = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--config",
            str(tmp_path / "serve.yaml"),
            "--model",
            tiny_checkpoint,
            "--port",
            str(port),
            "replica.num_gpus=0",
            "replica.num_cpus=0.5",
            "autoscaling.max_replicas=1",
            "model_name=from-cli",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        ready = json.loads(server.stdout.readline())  # printed once the app is up
        assert ready["openai_base_url"] == f"http://127.0.0.1:{port}/v1" and ready["model"] == "from-cli"
        assert json.loads(urllib.request.urlopen(ready["url"] + "/health", timeout=30).read())["model"] == "from-cli"
        answer = openai.OpenAI(base_url=ready["openai_base_url"], api_key="unused").chat.completions.create(
            model="from-cli", max_tokens=3, messages=[{"role": "user", "content": "hello"}]
        )
        assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens >= 1
        assert "<html" in urllib.request.urlopen(ready["chat_page"], timeout=30).read().decode().lower()
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
