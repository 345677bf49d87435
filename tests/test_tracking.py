"""Experiment tracking backends (llava/training/tracking.py), each read back with its own library, offline.

The driver-side calls the trainer makes (start_run, then the worker's logger, then log_to_run for
checkpoints and evaluation metrics) against real TensorBoard event files, a real MLflow sqlite
store and real W&B offline run files.
"""

import pytest

from llava.training.tracking import TrackingConfig, TrackingRun, flatten, log_to_run, start_run
from tests.tracking_readers import tensorboard_scalars, tensorboard_texts, wandb_offline_run

PARAMS = {"optim": {"lr": 0.002, "betas": [0.9, 0.999]}, "data": {"train": ["s3://b/d"]}, "init_from": None}


def simulate_run(config: TrackingConfig, run_dir: str, storage_path: str) -> TrackingRun:
    """What a training run does: the driver starts the tracked run, rank 0 logs two steps, the driver logs the
    checkpoint; then the pipeline logs evaluation metrics."""
    run = start_run(config, run_dir, storage_path, "stage1", PARAMS)
    worker = run.logger(resumed_at_step=0)
    for step in (1, 2):
        worker.metrics({"train/loss": 1.0 / step, "train/grad_norm": 0.5 * step}, step)
    worker.close()
    log_to_run(run_dir, checkpoints=[(f"{run_dir}/checkpoint_1", 1), (f"{run_dir}/checkpoint_2", 2)], finished=True)
    log_to_run(run_dir, metrics={"eval/heldout/accuracy": 0.75}, step=2)
    return run


def test_config_checks_backend_and_mode():
    with pytest.raises(ValueError, match="tracking.backend must be one of none, tensorboard, mlflow, wandb"):
        TrackingConfig(backend="comet")
    with pytest.raises(ValueError, match="tracking.mode must be online or offline"):
        TrackingConfig(backend="wandb", mode="cloud")
    assert not TrackingConfig().enabled  # off by default


def test_off_by_default_writes_nothing(tmp_path):
    assert start_run(TrackingConfig(), str(tmp_path / "run"), str(tmp_path), "x", PARAMS) is None
    assert not (tmp_path / "run").exists()
    log_to_run(str(tmp_path / "run"), metrics={"eval/acc": 1.0})  # a run without tracking: nothing to do


def test_flatten_names_nested_fields():
    assert flatten(PARAMS) == {
        "optim.lr": 0.002,
        "optim.betas": "[0.9, 0.999]",
        "data.train": '["s3://b/d"]',
        "init_from": None,
    }


def test_tensorboard_event_files(tmp_path):
    run_dir = str(tmp_path / "runs" / "stage1")
    run = simulate_run(TrackingConfig(backend="tensorboard", tags={"team": "vision"}), run_dir, str(tmp_path / "runs"))
    assert run.location == f"{run_dir}/tensorboard"
    scalars = tensorboard_scalars(run.location)
    assert scalars["train/loss"] == {1: 1.0, 2: 0.5} and scalars["train/grad_norm"] == {1: 0.5, 2: 1.0}
    assert scalars["eval/heldout/accuracy"] == {2: 0.75}
    texts = tensorboard_texts(run.location)
    assert "| optim.lr | 0.002 |" in texts["config"][0][1]
    assert texts["checkpoint"] == [(1, f"{run_dir}/checkpoint_1"), (2, f"{run_dir}/checkpoint_2")]


def test_tensorboard_restart_drops_steps_after_the_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    run = start_run(TrackingConfig(backend="tensorboard"), run_dir, str(tmp_path), "r", PARAMS)
    first = run.logger()
    for step in (1, 2, 3):
        first.metrics({"train/loss": float(step)}, step)
    first.close()
    again = start_run(TrackingConfig(backend="tensorboard"), run_dir, str(tmp_path), "r", PARAMS)  # resumed run
    assert again == run
    second = again.logger(resumed_at_step=2)  # restarted from the checkpoint at step 2: step 3 is trained again
    second.metrics({"train/loss": 30.0}, 3)
    second.close()
    assert tensorboard_scalars(run.location)["train/loss"] == {1: 1.0, 2: 2.0, 3: 30.0}


@pytest.mark.slow  # MLflow creates its database schema; W&B starts its service per run
def test_mlflow_sqlite_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = str(tmp_path / "runs" / "stage1")
    config = TrackingConfig(backend="mlflow", uri=uri, project="llava-test", run_name="s1", tags={"team": "vision"})
    run = simulate_run(config, run_dir, str(tmp_path / "runs"))
    client = MlflowClient(tracking_uri=uri)
    found = client.get_run(run.run_id)
    assert found.info.run_name == "s1" and found.info.status == "FINISHED"
    assert client.get_experiment(found.info.experiment_id).name == "llava-test"
    assert found.data.params["optim.lr"] == "0.002" and found.data.params["data.train"] == '["s3://b/d"]'
    assert found.data.tags["team"] == "vision" and found.data.tags["checkpoint"] == f"{run_dir}/checkpoint_2"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train/loss")] == [(1, 1.0), (2, 0.5)]
    assert found.data.metrics["eval/heldout/accuracy"] == 0.75
    listing = (tmp_path / "mlartifacts").rglob("checkpoints.txt")
    assert next(listing).read_text().splitlines() == [
        "step\turi",
        f"1\t{run_dir}/checkpoint_1",
        f"2\t{run_dir}/checkpoint_2",
    ]
    assert start_run(config, run_dir, str(tmp_path / "runs"), "s1", PARAMS).run_id == run.run_id  # resume: same run


@pytest.mark.slow  # MLflow creates its database schema; W&B starts its service per run
def test_mlflow_defaults_to_a_database_under_the_storage_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage_path = tmp_path / "runs"  # not made yet: a first run
    run = start_run(TrackingConfig(backend="mlflow"), str(storage_path / "r"), str(storage_path), "r", PARAMS)
    assert run.location == f"sqlite:///{storage_path}/mlflow.db" and (storage_path / "mlflow.db").exists()
    with pytest.raises(ValueError, match="needs tracking.uri"):
        start_run(TrackingConfig(backend="mlflow"), "s3://b/runs/r", "s3://b/runs", "r", PARAMS)


@pytest.mark.slow  # MLflow creates its database schema; W&B starts its service per run
def test_wandb_offline_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = str(tmp_path / "runs" / "stage1")
    config = TrackingConfig(backend="wandb", mode="offline", project="llava-test", tags={"team": "vision"})
    run = simulate_run(config, run_dir, str(tmp_path / "runs"))
    logged = wandb_offline_run(run_dir, run.run_id)
    assert logged["history"]["train/loss"] == {1: 1.0, 2: 0.5}
    assert logged["history"]["eval/heldout/accuracy"] == {2: 0.75}
    assert logged["config"]["optim.lr"] == 0.002
    assert logged["summary"]["checkpoint"] == f"{run_dir}/checkpoint_2"
    assert logged["summary"]["checkpoints/step_1"] == f"{run_dir}/checkpoint_1"


def test_pipeline_gives_both_stages_its_tracking_without_changing_what_they_compute(tmp_path):
    from jobs.pipeline_runner import DEMO_CONFIG, Pipeline, load_pipeline_config
    from llava.training.config import PretrainConfig

    def pipeline(*overrides):
        return Pipeline(load_pipeline_config(str(DEMO_CONFIG), [f"root={tmp_path}", *overrides]))

    tracked = pipeline("tracking.backend=mlflow", "tracking.uri=sqlite:////tmp/x.db", "stage2.tracking.backend=wandb")
    assert tracked.stage_tracking("stage1").backend == "mlflow" and tracked.stage_tracking("stage1").uri
    assert tracked.stage_tracking("stage2").backend == "wandb"  # a stage's own section wins
    assert pipeline().stage_tracking("stage1").backend == "none"
    wiring = {"data.train": [str(tmp_path / "data")]}
    assert tracked._train_config("stage1", PretrainConfig, wiring) == pipeline()._train_config(
        "stage1", PretrainConfig, wiring
    )  # the manifest's fingerprint: switching tracking re-runs nothing
