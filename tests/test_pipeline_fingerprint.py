"""Runs are never deleted by a config change: operational fields stay out of a stage's fingerprint, and a re-run
whose results change moves the previous outputs aside (versioned), never deletes them. The stages run the stand-in
jobs of tests/test_pipeline.py (`fake_jobs`); the real pipeline is the demo test in test_cli.py."""

import json
import sys
from pathlib import Path

import pytest

from jobs.run_manifest import RunManifest, result_fields
from tests.test_pipeline import fake_jobs  # noqa: F401  (the stand-in jobs fixture)


def _run(root: Path, *overrides: str) -> dict[str, bool]:
    from jobs.pipeline_runner import DEMO_CONFIG, Pipeline, load_pipeline_config

    pipeline = Pipeline(load_pipeline_config(DEMO_CONFIG, [f"root={root}", *overrides]))
    return {name: r.ran for name, r in pipeline.run().items()}


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in root.rglob("*")
        if p.is_file() and p.name != "pipeline.json"
    }


def test_operational_fields_neither_rerun_nor_clear_a_stage(fake_jobs, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    assert all(_run(root).values())
    fake_jobs.clear()
    ran = _run(
        root,
        "stage1.workers.num_workers=1",
        "stage2.workers.num_workers=4",
        "stage2.workers.use_gpu=false",
        "stage2.log_every_steps=3",
        "stage2.checkpoint.keep=5",
        "stage2.checkpoint.every_steps=7",
        "stage2.checkpoint.max_failures=9",
        "stage2.data.cache=true",
        "stage2.tracking.backend=tensorboard",
        "prepare.ingest.batch_size=7",
    )
    assert ran == dict.fromkeys(ran, False) and fake_jobs == []
    assert not list(root.rglob("*.v1"))


def test_a_result_change_moves_the_previous_outputs_aside(fake_jobs, tmp_path):  # noqa: F811
    root = tmp_path / "run"
    _run(root)
    stage2 = root / "runs" / "stage2"
    (next(stage2.glob("checkpoint_*")) / "weights").write_text("first")  # what the first stage-2 run trained
    (root / "export" / "model.safetensors").write_text("first export")
    before = _files(root)

    fake_jobs.clear()
    ran = _run(root, "stage2.optim.lr=0.01")
    assert ran == {"prepare": False, "base": False, "stage1": False, "stage2": True, "eval": True, "export": True}
    assert fake_jobs[0][3] is False  # the new config starts a fresh run: the old one is not resumed
    after = _files(root)
    for rel, text in before.items():  # every earlier file kept, under its stage's versioned name
        moved = rel.replace("runs/stage2/", "runs/stage2.v1/", 1).replace("export/", "export.v1/", 1)
        assert after.get(rel) == text or after.get(moved) == text, rel
    assert (root / "runs" / "stage2.v1").is_dir() and (root / "export.v1" / "model.safetensors").is_file()

    record = json.loads((root / "pipeline.json").read_text())["stages"]["stage2"]
    assert record["superseded"][0]["moved"] == {str(stage2): str(stage2) + ".v1"}

    _run(root, "stage2.optim.lr=0.02")  # and again: the next version, the first one untouched
    assert (root / "runs" / "stage2.v2").is_dir() and (root / "runs" / "stage2.v1").is_dir()
    record = json.loads((root / "pipeline.json").read_text())["stages"]["stage2"]
    assert [s["moved"][str(stage2)] for s in record["superseded"]] == [str(stage2) + ".v1", str(stage2) + ".v2"]


def test_an_interrupted_run_with_a_new_config_is_moved_aside_not_resumed(fake_jobs, tmp_path, monkeypatch):  # noqa: F811
    root = tmp_path / "run"
    trainer = sys.modules["llava.training.trainer"]
    real_train = trainer.train

    def interrupted(config):
        if config.checkpoint.run_name == "stage2":
            run_dir = Path(config.checkpoint.storage_path, config.checkpoint.run_name)
            (run_dir / "checkpoint_0").mkdir(parents=True)
            (run_dir / "checkpoint_0" / "weights").write_text("half-trained")
            raise KeyboardInterrupt
        return real_train(config)

    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(root)
    monkeypatch.setattr(trainer, "train", real_train)
    fake_jobs.clear()
    _run(root, "stage2.optim.lr=0.01")
    stage2_call = next(c for c in fake_jobs if c[0] == "stage2")
    assert stage2_call[3] is False  # not resumed
    assert (root / "runs" / "stage2.v1" / "checkpoint_0" / "weights").read_text() == "half-trained"


def test_result_fields_and_moving_aside_on_s3(s3_bucket):
    from llava import storage

    assert result_fields({"a": 1, "workers": {"n": 2}, "c": {"keep": 1, "lr": 3}}, ("workers", "c.keep", "x.y")) == {
        "a": 1,
        "c": {"lr": 3},
    }
    root, external = f"{s3_bucket}/runs/exp", f"{s3_bucket}/users/data.txt"
    storage.write_text(external, "the user's")

    def work():
        storage.write_text(f"{root}/out/result.txt", "computed")
        return {"out": f"{root}/out", "external": external}, {}

    RunManifest.load(root).run_stage("s", {"lr": 1, "workers": 2}, work, operational=("workers",))
    again = RunManifest.load(root).run_stage("s", {"lr": 1, "workers": 8}, work, operational=("workers",))
    assert not again.ran
    RunManifest.load(root).run_stage("s", {"lr": 2, "workers": 8}, work, operational=("workers",))
    assert storage.read_text(f"{root}/out.v1/result.txt") == "computed"
    assert storage.read_text(f"{root}/out/result.txt") == "computed"
    assert storage.read_text(external) == "the user's" and not storage.exists(f"{external}.v1")  # outside the root
