"""Experiment tracking: training metrics, the resolved config and checkpoint links in TensorBoard, MLflow or W&B.

    tracking: {backend: mlflow, uri: "sqlite:////shared/mlflow.db", project: llava, tags: {team: vision}}

One tracked run per training run (one run dir). The driver opens it before Ray Train starts
(`start_run`: creates it, or finds it again through `<run dir>/tracking.json` when the run
resumes), logs the resolved config as parameters and hands a `TrackingRun` (plain data) to the
workers; rank 0 logs the training metrics into it; the driver logs the checkpoint URIs at the
end, and the pipeline the evaluation metrics. Each backend is used through its own client:

- tensorboard: `torch.utils.tensorboard.SummaryWriter` event files in `uri` (default
  `<run dir>/tensorboard`); the config and checkpoints as text summaries.
- mlflow: `MlflowClient` on `uri` (a tracking server `http://...`, or `sqlite:///path.db`;
  default `$MLFLOW_TRACKING_URI`, else `sqlite:///<checkpoint.storage_path>/mlflow.db`), experiment
  = `project`; the config as params, checkpoint URIs as tags and a `checkpoints.txt` artifact.
- wandb: `wandb.init(project=..., id=..., resume="allow")`, files under `uri` (default the run
  dir); `mode: offline` keeps everything on disk (`wandb sync` uploads it later); online needs
  `WANDB_API_KEY` on every node. The config as the run config, checkpoints in the summary.

The clients are optional dependencies: `pip install "llava-ray[tracking]"`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Optional

from llava import storage

log = logging.getLogger(__name__)

BACKENDS = ("none", "tensorboard", "mlflow", "wandb")
RUN_FILE = "tracking.json"  # in the run dir: which tracked run this training run logs to
MAX_PARAM_CHARS = 500  # MLflow's limit on a parameter value


@dataclass
class TrackingConfig:
    backend: str = "none"  # none | tensorboard | mlflow | wandb
    uri: str = ""  # tensorboard: log dir; mlflow: tracking URI; wandb: dir for its files ("": see the module doc)
    project: str = "llava-ray"  # MLflow experiment / W&B project
    run_name: str = ""  # "": the training run's checkpoint.run_name
    tags: dict[str, str] = field(default_factory=dict)
    mode: str = ""  # wandb only: online | offline ("": WANDB_MODE, else online)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"tracking.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.mode not in ("", "online", "offline"):
            raise ValueError(f"tracking.mode must be online or offline, got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.backend != "none"


@dataclass
class TrackingRun:
    """Where one training run's metrics go (plain data: it travels to the Ray Train workers)."""

    backend: str
    location: str  # tensorboard log dir / MLflow tracking URI / W&B files dir
    run_id: str  # MLflow or W&B run id ("" for TensorBoard: the log dir is the run)
    project: str = ""
    run_name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    mode: str = ""

    def logger(self, resumed_at_step: int = 0) -> RunLogger:
        """A logger for this run in this process; `resumed_at_step`: drop what was logged after it (TensorBoard)."""
        return {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger, "wandb": WandbLogger}[self.backend](
            self, resumed_at_step
        )

    def save(self, run_dir: str) -> None:
        storage.write_text(storage.join(run_dir, RUN_FILE), json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: str) -> Optional[TrackingRun]:
        """The tracked run a training run dir logs to, if it has one."""
        uri = storage.join(run_dir, RUN_FILE)
        return cls(**json.loads(storage.read_text(uri))) if storage.exists(uri) else None


def _import(backend: str):
    modules = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking", "wandb": "wandb"}
    try:
        return __import__(modules[backend], fromlist=["_"])
    except ImportError as exc:
        raise ImportError(
            f'tracking.backend={backend} needs its client: pip install "llava-ray[tracking]" ({exc})'
        ) from exc


def default_location(config: TrackingConfig, run_dir: str, storage_path: str) -> str:
    if config.uri:
        return config.uri
    if config.backend == "mlflow":
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if storage.is_s3(storage_path):
            raise ValueError(
                "tracking.backend=mlflow with an s3:// checkpoint.storage_path needs tracking.uri "
                "(an MLflow server http://... or sqlite:///path.db) or MLFLOW_TRACKING_URI"
            )
        return "sqlite:///" + os.path.join(os.path.abspath(storage_path), "mlflow.db")
    if storage.is_s3(run_dir):
        raise ValueError(
            f"tracking.backend={config.backend} writes files: with an s3:// run dir give tracking.uri "
            "(a directory every node can write, or on the machine of rank 0)"
        )
    return os.path.join(run_dir, "tensorboard" if config.backend == "tensorboard" else "")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}; lists as JSON text."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else value
    return flat


def start_run(
    config: TrackingConfig, run_dir: str, storage_path: str, default_name: str, params: dict
) -> Optional[TrackingRun]:
    """Driver side, before training: the run's tracked run (created, or the one it logged to before, on a
    resume), with the resolved config logged as its parameters. None when tracking is off."""
    if not config.enabled:
        return None
    _import(config.backend)  # fail here, not on a worker
    location = default_location(config, run_dir, storage_path)
    previous = TrackingRun.load(run_dir)
    if previous and previous.backend == config.backend and previous.location == location:
        run = previous
        log.info("tracking: resuming %s run %s at %s", run.backend, run.run_id or run.location, run.location)
    else:
        run = TrackingRun(
            config.backend,
            location,
            "",
            config.project,
            config.run_name or default_name,
            dict(config.tags),
            config.mode,
        )
        if config.backend == "mlflow":
            run.run_id = MlflowLogger.create(run)
        elif config.backend == "wandb":
            run.run_id = uuid.uuid4().hex[:16]
        log.info("tracking: %s run %s at %s", run.backend, run.run_id or run.run_name, run.location)
    logger = run.logger(resumed_at_step=0)
    try:
        logger.params(flatten(params))
    finally:
        logger.close()
    run.save(run_dir)
    return run


def log_to_run(
    run_dir: str,
    metrics: dict[str, float] | None = None,
    step: int = 0,
    checkpoints: list[tuple[str, int]] = (),
    finished: bool = False,
) -> None:
    """Log into a training run's tracked run from the driver (checkpoints as (URI, step), evaluation metrics
    after the run); a no-op for a run without tracking."""
    run = TrackingRun.load(run_dir)
    if run is None:
        return
    logger = run.logger()
    try:
        if metrics:
            logger.metrics(metrics, step)
        for uri, at in checkpoints:
            logger.checkpoint(uri, at)
    finally:
        logger.close(finished=finished)


class RunLogger:
    """What rank 0 and the driver call; one subclass per backend."""

    def params(self, params: dict[str, Any]) -> None: ...

    def metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def checkpoint(self, uri: str, step: int) -> None: ...

    def close(self, finished: bool = False) -> None: ...


class TensorBoardLogger(RunLogger):
    def __init__(self, run: TrackingRun, resumed_at_step: int):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(run.location, exist_ok=True)
        # purge_step: after a restart from the checkpoint at step N, events logged past N are dropped
        self.writer = SummaryWriter(run.location, purge_step=resumed_at_step + 1 if resumed_at_step else None)
        self.run = run

    def params(self, params: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", f"| parameter | value |\n|---|---|\n{rows}", 0)
        if self.run.tags:
            self.writer.add_text("tags", json.dumps(self.run.tags), 0)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def checkpoint(self, uri: str, step: int) -> None:
        self.writer.add_text("checkpoint", uri, step)

    def close(self, finished: bool = False) -> None:
        self.writer.close()


class MlflowLogger(RunLogger):
    def __init__(self, run: TrackingRun, resumed_at_step: int):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=run.location), run.run_id

    @staticmethod
    def create(run: TrackingRun) -> str:
        from mlflow.tracking import MlflowClient

        db_dir = os.path.dirname(run.location[len("sqlite:///") :]) if run.location.startswith("sqlite:///") else None
        if db_dir:
            os.makedirs(db_dir, exist_ok=True)  # a first run: the storage path does not exist yet
        client = MlflowClient(tracking_uri=run.location)
        experiment = client.get_experiment_by_name(run.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a local database keeps its artifacts next to it (else they land in the worker's cwd)
            artifacts = os.path.join(db_dir, "mlartifacts") if db_dir else None
            experiment_id = client.create_experiment(run.project, artifact_location=artifacts)
        return client.create_run(experiment_id, run_name=run.run_name, tags=run.tags).info.run_id

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params  # a resumed run keeps its first params
        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items() if k not in have]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def checkpoint(self, uri: str, step: int) -> None:
        self.client.set_tag(self.run_id, "checkpoint", uri)
        self.client.set_tag(self.run_id, f"checkpoint.step_{step}", uri)
        listed = [
            f"{k.removeprefix('checkpoint.step_')}\t{v}"
            for k, v in sorted(self.client.get_run(self.run_id).data.tags.items())
            if k.startswith("checkpoint.step_")
        ]
        self.client.log_text(self.run_id, "step\turi\n" + "\n".join(listed) + "\n", "checkpoints.txt")

    def close(self, finished: bool = False) -> None:
        if finished:
            self.client.set_terminated(self.run_id, "FINISHED")


class WandbLogger(RunLogger):
    def __init__(self, run: TrackingRun, resumed_at_step: int):
        import wandb

        os.makedirs(run.location, exist_ok=True)
        _wait_for_a_new_second(run.location, run.run_id)
        self.wandb_run = wandb.init(
            project=run.project,
            name=run.run_name,
            id=run.run_id,
            resume="allow",
            dir=run.location,
            tags=[f"{k}:{v}" if v else k for k, v in run.tags.items()],
            mode=run.mode or None,
            reinit="create_new",
        )

    def params(self, params: dict[str, Any]) -> None:
        self.wandb_run.config.update(params, allow_val_change=True)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self.wandb_run.log(metrics, step=step)  # W&B drops steps below the newest it has (after a restart)

    def checkpoint(self, uri: str, step: int) -> None:
        self.wandb_run.summary["checkpoint"] = uri
        self.wandb_run.summary[f"checkpoints/step_{step}"] = uri

    def close(self, finished: bool = False) -> None:
        self.wandb_run.finish()


def _wait_for_a_new_second(root: str, run_id: str) -> None:
    """W&B names a run's local dir by its start second and id (`wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>`): a
    second segment of the same run started within the same second would reuse, and overwrite, the first's."""
    while glob.glob(os.path.join(root, "wandb", f"*run-{datetime.now():%Y%m%d_%H%M%S}-{run_id}")):
        time.sleep(0.1)
