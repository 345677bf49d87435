"""The pipeline's run manifest and stage wiring, without training: the real run is the demo test in test_cli.py."""

import json
import sys
import types
from pathlib import Path

import pytest

from jobs.run_manifest import COMPLETE, RUNNING, RunManifest, code_version


def _work(calls: list, name: str, out: Path):
    def work():
        calls.append(name)
        out.mkdir(parents=True, exist_ok=True)
        return {"dir": str(out)}, {"n": len(calls)}

    return work


def _chain(manifest: RunManifest, tmp_path: Path, calls: list, a_config: dict, b_config: dict):
    a = manifest.run_stage("a", a_config, _work(calls, "a", tmp_path / "a"))
    b = manifest.run_stage("b", b_config, _work(calls, "b", tmp_path / "b"), {"from_a": a.outputs["dir"]}, {"a": a})
    return a, b


def test_manifest_skips_complete_stages_and_reruns_what_changed(tmp_path):
    calls: list[str] = []
    a, b = _chain(RunManifest.load(str(tmp_path)), tmp_path, calls, {"x": 1}, {"y": 1})
    assert calls == ["a", "b"] and a.ran and b.ran
    saved = json.loads((tmp_path / "pipeline.json").read_text())
    assert saved["code"] == code_version() and saved["code"]["package"]
    rec = saved["stages"]["b"]
    assert rec["status"] == COMPLETE and rec["started"] <= rec["ended"] and rec["metrics"] == {"n": 2}
    assert rec["inputs"] == {"from_a": str(tmp_path / "a")} and rec["upstream"] == {"a": a.fingerprint}
    assert rec["outputs"] == {"dir": str(tmp_path / "b")} and rec["config"] == {"y": 1}

    a2, b2 = _chain(RunManifest.load(str(tmp_path)), tmp_path, calls, {"x": 1}, {"y": 1})  # same: all skipped
    assert calls == ["a", "b"] and not a2.ran and not b2.ran and "complete" in b2.reason
    assert b2.fingerprint == b.fingerprint

    _chain(RunManifest.load(str(tmp_path)), tmp_path, calls, {"x": 1}, {"y": 2})  # downstream config only
    assert calls == ["a", "b", "b"]

    _, b4 = _chain(RunManifest.load(str(tmp_path)), tmp_path, calls, {"x": 2}, {"y": 2})  # upstream: both
    assert calls == ["a", "b", "b", "a", "b"] and "changed" in b4.reason

    (tmp_path / "b").rmdir()  # an output gone: that stage again
    _chain(RunManifest.load(str(tmp_path)), tmp_path, calls, {"x": 2}, {"y": 2})
    assert calls[-1:] == ["b"] and len(calls) == 6


def test_manifest_reruns_an_interrupted_or_failed_stage(tmp_path):
    calls: list[str] = []
    manifest = RunManifest.load(str(tmp_path))

    def interrupted():
        calls.append("stopped")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        manifest.run_stage("a", {"x": 1}, interrupted)
    rec = json.loads((tmp_path / "pipeline.json").read_text())["stages"]["a"]
    assert rec["status"] == RUNNING and rec["ended"] is None
    again = RunManifest.load(str(tmp_path)).run_stage("a", {"x": 1}, _work(calls, "a", tmp_path / "a"))
    assert again.ran and "interrupted" in again.reason and calls == ["stopped", "a"]

    with pytest.raises(ValueError):
        manifest.run_stage("b", {}, lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert json.loads((tmp_path / "pipeline.json").read_text())["stages"]["b"]["status"] == "failed"
    b = RunManifest.load(str(tmp_path)).run_stage("b", {}, _work(calls, "b", tmp_path / "b"))
    assert b.ran and "boom" in b.reason


def test_manifest_under_an_s3_root(s3_bucket):
    from llava import storage

    root, calls = f"{s3_bucket}/runs/exp1", []

    def work():
        calls.append("prepare")
        storage.write_text(f"{root}/data/stage1/part-0.parquet", "x")
        return {"stage1": f"{root}/data/stage1"}, {}

    RunManifest.load(root).run_stage("prepare", {"k": 1}, work)
    again = RunManifest.load(root).run_stage("prepare", {"k": 1}, work)  # its output prefix exists: skipped
    assert calls == ["prepare"] and not again.ran and storage.exists(f"{root}/pipeline.json")
    storage.remove(f"{root}/data")
    assert RunManifest.load(root).run_stage("prepare", {"k": 1}, work).ran and calls == ["prepare"] * 2


def test_pipeline_config_layers_presets_file_and_overrides(tmp_path):
    from jobs.pipeline_runner import DEMO_CONFIG, load_pipeline_config

    config = load_pipeline_config(DEMO_CONFIG, ["root=rel/dir", "stage2.optim.max_steps=2", "serve.port=9000"])
    assert config.root == str(Path("rel/dir").absolute())
    assert config.stage1.checkpoint.run_name == "stage1" and config.stage1.optim.lr == 2e-3  # demo pretrain preset
    assert config.stage2.optim.epochs == 5 and config.stage2.optim.max_steps == 2  # preset, then override
    assert config.stage2.freeze.preset == "stage2" and config.serve.port == 9000 and not config.serve.enabled
    with pytest.raises(ValueError, match="unknown stage1.preset"):
        load_pipeline_config(None, ["stage1.preset=nope"])
    with pytest.raises(ValueError, match="prepare.eval.kind"):
        load_pipeline_config(DEMO_CONFIG, ["prepare.eval.kind=csv"])
    with pytest.raises(Exception, match="lrr"):  # a typo in a key is an error, naming it  # noqa: B017
        load_pipeline_config(DEMO_CONFIG, ["stage1.optim.lrr=1"])


@pytest.fixture
def fake_jobs(monkeypatch):
    """The heavy functions the stages call, replaced by fakes that write placeholder outputs and count calls."""
    calls: list[tuple] = []

    def prepare_digits(out, seed, ingest, overwrite=False):
        calls.append(("prepare", seed))
        for split in ("stage1", "stage2", "eval"):
            Path(out, split).mkdir(parents=True, exist_ok=True)
        return {s: types.SimpleNamespace(rows=10, skipped={}) for s in ("stage1", "stage2", "eval")}

    def build_tiny_base_models(out):
        for part in ("vision", "llm"):
            Path(out, part).mkdir(parents=True, exist_ok=True)

    def pretrain_base_models(config, start_ray):
        calls.append(("base", config.seed, config.captions, config.caption_template, config.instruction_template))
        for part in ("vision", "llm"):
            Path(config.out, part).mkdir(parents=True, exist_ok=True)
        return {"vision_tower": f"{config.out}/vision", "llm": f"{config.out}/llm", "metrics": {}, "cached": []}

    def train(config):
        run_dir = Path(config.checkpoint.storage_path, config.checkpoint.run_name)
        calls.append((config.checkpoint.run_name, config.optim.lr, config.init_from, run_dir.exists()))
        model = run_dir / f"checkpoint_{len(calls)}" / "hf"
        model.mkdir(parents=True)
        return types.SimpleNamespace(
            run_dir=str(run_dir),
            model=str(model),
            checkpoint=str(model.parent),
            steps=1,
            metrics=[{"loss": 2.0}, {"loss": 1.0}],
            skipped_rows={},
        )

    def heldout_accuracy(model, data, out, batch_size):
        calls.append(("eval", model))
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "predictions.jsonl").write_text("")
        return {"accuracy": 0.5, "correct": 1, "total": 2, "predictions": f"{out}/predictions.jsonl", "examples": []}

    def caption_accuracy(model, data, out, batch_size):
        calls.append(("captions", model))
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "predictions.jsonl").write_text("")
        return {"accuracy": 0.75, "correct": 3, "total": 4, "predictions": f"{out}/predictions.jsonl", "examples": []}

    def export_hf(model, out):
        calls.append(("export", model))
        Path(out).mkdir(parents=True, exist_ok=True)
        return types.SimpleNamespace(path=str(out), format="hf-llava", message="ok")

    fakes = {
        "llava.data.prepare": {"prepare_digits": prepare_digits, "prepare_captions": None, "prepare_llava_json": None},
        "llava.tiny_models": {"build_tiny_base_models": build_tiny_base_models},
        "llava.training.trainer": {"train": train},
        "llava.evaluation.digits": {"heldout_accuracy": heldout_accuracy, "caption_accuracy": caption_accuracy},
        "llava.base_models.build": {"pretrain_base_models": pretrain_base_models},
        "llava.export_hf": {"export_hf": export_hf},
        "llava.model": {"LlavaModel": types.SimpleNamespace(from_pretrained=lambda uri: uri)},
    }
    for name, attrs in fakes.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    monkeypatch.setattr("jobs.pipeline_runner.Pipeline.ray", lambda self: None)
    return calls


def test_pipeline_command_wires_the_stages_and_reruns_only_what_changed(fake_jobs, tmp_path, capsys):
    from jobs.cli import main
    from jobs.pipeline_runner import DEMO_CONFIG, Pipeline, load_pipeline_config

    root = tmp_path / "run"
    assert main(["pipeline", "--config", str(DEMO_CONFIG), f"root={root}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stages = result["stages"]
    assert [*stages] == ["prepare", "base", "stage1", "stage2", "eval", "export"] and result["complete"]
    assert all(s["ran"] for s in stages.values()) and result["manifest"] == str(root / "pipeline.json")
    stage1_run = str(root / "runs" / "stage1")
    model = stages["stage2"]["outputs"]["model"]
    assert fake_jobs == [
        ("prepare", 0),
        ("base", 0, [str(root / "data" / "stage1")], "plain", "vicuna_v1"),  # the stages' own templates
        ("stage1", 2e-3, None, False),
        ("stage2", 1e-3, stage1_run, False),
        ("eval", model),
        ("captions", stages["stage1"]["outputs"]["model"]),  # the stage-1 model captions the held-out images
        ("export", model),
    ]
    assert stages["eval"]["metrics"]["heldout"]["accuracy"] == 0.5
    assert stages["eval"]["metrics"]["stage1_captions"]["accuracy"] == 0.75
    assert stages["export"]["outputs"]["path"] == str(root / "export")
    manifest = json.loads((root / "pipeline.json").read_text())["stages"]
    assert manifest["stage1"]["config"]["model"]["llm"] == str(root / "base" / "llm")  # the base stage's models
    assert manifest["stage1"]["config"]["data"]["train"] == [str(root / "data" / "stage1")]
    assert manifest["stage2"]["config"]["checkpoint"]["storage_path"] == str(root / "runs")

    def run(*overrides):
        fake_jobs.clear()
        pipeline = Pipeline(load_pipeline_config(DEMO_CONFIG, [f"root={root}", *overrides]))
        return {name: r.ran for name, r in pipeline.run().items()}

    assert run() == dict.fromkeys(stages, False) and fake_jobs == []  # all complete: nothing runs
    # stage 2's config changed: its old run is cleared (not resumed), and eval + export follow
    assert run("stage2.optim.lr=0.01") == {
        "prepare": False,
        "base": False,
        "stage1": False,
        "stage2": True,
        "eval": True,
        "export": True,
    }
    assert fake_jobs[0] == ("stage2", 0.01, stage1_run, False)
    # the data changed: everything again
    assert all(run("stage2.optim.lr=0.01", "prepare.stage1.seed=3").values()) and fake_jobs[0] == ("prepare", 3)
