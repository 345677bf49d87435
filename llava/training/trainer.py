"""Driver side of a training job: plan the run, hand it to Ray Train, record where the model went.

    result = train(load_train_config("pretrain", preset="v1_5", overrides=[...]))

The run lives in `<checkpoint.storage_path>/<checkpoint.run_name>` (local or s3://): Ray Train's
checkpoints (`checkpoint_*/{ds,hf}/`, newest K kept), `metrics.jsonl`, and `output.json`, which
names the final model and is what `init_from` / `llava-ray export` accept as the run's model
(the layout: llava/run_format.py).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace

import ray

from llava import storage
from llava.config import ModelConfig, config_to_dict
from llava.data.ingest import close_skip_counter, new_skip_counter
from llava.data.reader import expand_dataset_uris, model_ready_dataset
from llava.data.schema import Manifest, parquet_rows
from llava.model import expected_image_tokens
from llava.model_loading import IMPORTED_DIR, checkpoint_model_config, import_for_training
from llava.run_format import METRICS_FILE, RunOutput, model_dir
from llava.training.config import TrainConfig
from llava.training.engine import StepPlan
from llava.training.loop import train_loop
from llava.training.tracking import log_to_run, start_run

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    model: str  # consolidated weights of the final checkpoint (a llava-ray checkpoint dir)
    checkpoint: str
    steps: int
    metrics: list[dict]
    skipped_rows: dict[str, int]


def count_rows(uris: list[str]) -> int:
    """Rows in the training data, from dataset manifests (or shard footers when there is none)."""
    total = 0
    for uri in uris:
        if not uri.endswith(".parquet") and storage.exists(storage.join(uri, "_manifest.json")):
            total += Manifest.read(uri).rows
        else:
            total += sum(parquet_rows(shard) for shard in expand_dataset_uris([uri]))
    return total


def data_model_config(config: TrainConfig) -> tuple[ModelConfig, int]:
    """(model config the data is prepared for, image tokens per image), without loading weights.

    Starting from a checkpoint, its tokenizer and architecture win; template, length and image
    settings come from this job's config.
    """
    if config.init_from:  # any layout llava.model_loading reads (ours, llava-hf, official LLaVA)
        return checkpoint_model_config(
            config.init_from,
            template=config.model.template,
            max_length=config.model.max_length,
            image=config.model.image,
        )
    return config.model, expected_image_tokens(config.model)


def _run_location(config: TrainConfig) -> tuple[str, object, str]:
    """(storage path for Ray, its filesystem or None, run dir URI)."""
    path = config.checkpoint.storage_path
    if storage.is_s3(path):
        fs, key = storage.filesystem(path)
        return key, fs, storage.join(path, config.checkpoint.run_name)
    path = os.path.abspath(path)
    return path, None, os.path.join(path, config.checkpoint.run_name)


def _checkpoint_uri(checkpoint, storage_path: str) -> str:
    return f"s3://{checkpoint.path}" if storage.is_s3(storage_path) else checkpoint.path


def train(config: TrainConfig) -> TrainResult:
    """Run one training job on the current Ray cluster (call `init_ray` first)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config.validate()
    if config.init_from:  # a llava-hf or official checkpoint is converted once, into the run dir, for the workers
        config = replace(
            config,
            init_from=import_for_training(
                config.init_from, storage.join(_run_location(config)[2], IMPORTED_DIR), config.model.template
            ),
        )
    model_config, image_tokens = data_model_config(config)
    rows = count_rows(config.data.train)
    plan = StepPlan.build(config, rows, config.workers.num_workers)
    log.info(
        "%d training rows, %d workers x micro batch %d x accumulation %d = global batch %d; %d steps/epoch, %d steps",
        rows,
        plan.world_size,
        plan.micro_batch_size,
        plan.accumulation,
        plan.global_batch_size,
        plan.steps_per_epoch,
        plan.total_steps,
    )
    counter = new_skip_counter(5)
    dataset = model_ready_dataset(
        config.data.train, model_config, image_tokens, counter=counter, batch_size=max(8, config.data.micro_batch_size)
    )
    if config.data.cache:
        log.info("preprocessing the training data once into the object store (data.cache=true)")
        dataset = dataset.materialize()

    use_gpu = config.workers.use_gpu
    if use_gpu is None:  # auto: GPUs if the cluster has them now
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": config.workers.cpus_per_worker, **({"GPU": config.workers.gpus_per_worker} if use_gpu else {})}
    storage_path, filesystem, run_dir = _run_location(config)
    tracking = start_run(
        config.tracking,
        run_dir,
        config.checkpoint.storage_path,
        config.checkpoint.run_name,
        {**config_to_dict(config), "plan": asdict(plan), "rows": rows},
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config_to_dict(config),
            "plan": asdict(plan),
            "tracking": asdict(tracking) if tracking else None,
        },
        scaling_config=ScalingConfig(num_workers=plan.world_size, use_gpu=use_gpu, resources_per_worker=resources),
        datasets={"train": dataset},
        run_config=RunConfig(
            name=config.checkpoint.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
        ),
    )
    log.info("training run %s (outputs under %s)", config.checkpoint.run_name, run_dir)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_dir} ended without a checkpoint: {result.error}")
    checkpoint = _checkpoint_uri(result.checkpoint, config.checkpoint.storage_path)
    metrics_text = storage.read_text(storage.join(checkpoint, METRICS_FILE))
    metrics = [json.loads(line) for line in metrics_text.splitlines()]
    skipped, examples = close_skip_counter(counter)
    output = RunOutput(model_dir(checkpoint), checkpoint, result.metrics.get("step"), skipped, config_to_dict(config))
    storage.write_text(storage.join(run_dir, METRICS_FILE), metrics_text)
    kept = [
        (_checkpoint_uri(c, config.checkpoint.storage_path), int(m.get("step", 0)))
        for c, m in getattr(result, "best_checkpoints", None) or []
        if c.path != result.checkpoint.path
    ]
    log_to_run(
        run_dir, checkpoints=[*kept, (checkpoint, int(output.steps or 0))], finished=True
    )  # links in the tracker
    output.write(run_dir)  # last: a run dir with output.json is a finished run
    if skipped:
        log.warning("rows skipped by the reader: %s (e.g. %s)", skipped, examples)
    log.info("run %s done: model at %s", run_dir, output.model)
    return TrainResult(run_dir, output.model, checkpoint, int(result.metrics.get("step", 0)), metrics, skipped)
