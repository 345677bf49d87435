"""The per-worker training loop: Ray Train runs `train_loop` on every worker.

Each worker builds the model and its DeepSpeed engine, restores the newest checkpoint if
Ray hands it one (after a worker failure or when a run with the same name is re-submitted),
then streams its Ray Data shard through the length-grouped batcher, epoch after epoch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from llava.artifact_manifest import write_manifest
from llava.config import config_from_dict
from llava.data.reader import Batch, LengthGroupedBatcher
from llava.run_format import DS_DIR, DS_TAG, HF_DIR
from llava.tokenization import IGNORE_INDEX
from llava.training.config import TrainConfig
from llava.training.engine import StepPlan, build_engine, build_model, component_checksums, full_state_dict
from llava.training.health import StepHealth
from llava.training.state import IntervalMetrics, SampleRecorder, TrainState, gather_ids, verify_resume
from llava.training.tracking import TrackingRun

log = logging.getLogger("llava.train")

TRACKED = (
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "samples_per_s",
    "step_time_s",
    "data_wait_s",
    "padding_fraction",
    "skipped_steps",
    "skipped_steps_total",
    "epoch",
)  # sent to the tracking backend as train/<name>


def train_loop(loop_config: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    config = config_from_dict(TrainConfig, loop_config["config"])
    tracking = loop_config.get("tracking")
    WorkerLoop(config, StepPlan(**loop_config["plan"]), TrackingRun(**tracking) if tracking else None).run()


def dummy_batch(pad_token_id: int) -> Batch:
    """A one-row text batch for a worker whose shard ran dry while others still train (loss is zeroed)."""
    ids = torch.tensor([[pad_token_id, pad_token_id]])
    labels = torch.tensor([[IGNORE_INDEX, pad_token_id]])
    return Batch([], ids, labels, torch.ones_like(ids), None, 0, 0)


class WorkerLoop:
    def __init__(self, config: TrainConfig, plan: StepPlan, tracking: TrackingRun | None = None):
        self.config, self.plan = config, plan
        self.rank = ray.train.get_context().get_world_rank()
        torch.manual_seed(config.data.seed)
        self.model, self.trainable = build_model(config)
        self.engine = build_engine(self.model, config, plan)
        self.state = TrainState()
        self.health = StepHealth(config.health, config.deepspeed.zero_stage)
        self.tracking, self.tracker = tracking, None  # the tracker: rank 0 only, opened once the start step is known
        self.new_ids: list[str] = []  # consumed since the last checkpoint (this rank)
        self.recorder = SampleRecorder(config.audit_dir, self.rank)
        self.image_size = self.model.config.image.size
        self.batcher = LengthGroupedBatcher(
            plan.micro_batch_size,
            self.model.tokenizer.pad_token_id,
            self.image_size,
            window_batches=config.data.window_batches,
            seed=config.data.seed,
            group_by_length=config.data.group_by_length,
        )

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            self._restore(checkpoint)
        if self.tracking and self.rank == 0:
            self.tracker = self.tracking.logger(resumed_at_step=self.state.step)
        try:
            self._train(resumed=checkpoint is not None)
        finally:
            if self.tracker:
                self.tracker.close()

    def _train(self, resumed: bool) -> None:
        shard = ray.train.get_dataset_shard("train")
        last_saved = self.state.step if resumed else -1
        interval, interval_start = IntervalMetrics(), self.state.step
        stop = self.plan.stop_step
        while self.state.epoch < self.plan.epochs and (stop is None or self.state.step < stop):
            rows = (row for row in shard.iter_rows() if row["id"] not in self.state.consumed)
            for batch, wait in self._synchronized(self.batcher.batches(rows, self.state.epoch)):
                loss, stepped = self._micro_step(batch)
                if batch.ids:
                    interval.add(loss, batch, wait)
                    self.new_ids += batch.ids
                    self.recorder.record(self.state.epoch, self.state.step, batch.ids)
                if not stepped:
                    continue
                self.state.step += 1
                if self.state.step % self.config.log_every_steps == 0 or self.state.step == stop:
                    self._log(interval.reduce(self.state.step - interval_start))
                    interval, interval_start = IntervalMetrics(), self.state.step
                every = self.config.checkpoint.every_steps
                if every and self.state.step % every == 0 and self.state.step != stop:
                    self._save()
                    last_saved = self.state.step
                if self.state.step == stop:
                    break
            else:  # the epoch ran out of data on every worker
                self.state.epoch += 1
                self.state.consumed, self.new_ids = set(), []
        if self.state.step != interval_start:  # same decision on every rank (the reduce is collective)
            self._log(interval.reduce(self.state.step - interval_start))
        if last_saved != self.state.step:
            self._save()

    def _synchronized(self, batches):
        """Yield (batch, data wait) until every worker is out of data; a worker out early runs zero-loss dummies
        so the collectives (gradient all-reduce, ZeRO gathers) stay matched across workers."""
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            batch = next(iterator, None)
            wait = time.perf_counter() - started
            active = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(active)
            if int(active) == 0:
                return
            yield (batch if batch is not None else dummy_batch(self.model.tokenizer.pad_token_id)), wait

    def _micro_step(self, batch: Batch) -> tuple[float, bool]:
        """Forward + backward of one micro-batch; returns (loss, whether the optimizer stepped)."""
        output = self.engine(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            labels=batch.labels,
        )
        loss = output.loss
        if batch.pixel_values is None:
            # Text-only batch: run the image path on a blank image with zero weight so every trainable
            # parameter gets a gradient on every rank (DeepSpeed's reductions expect it; LLaVA does the same).
            blank = torch.zeros(1, 3, self.image_size, self.image_size)
            loss = loss + 0.0 * self.engine.module.encode_images(blank).sum()
        # a non-finite loss (or gradient) makes the optimizer skip this step on every rank (llava/training/health.py)
        loss = self.health.loss(loss, self.state.step) if batch.ids else loss * 0.0
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        if boundary:  # the optimizer step, unless the loss or gradient is not finite (then skipped and counted)
            self.health.optimizer_step(self.engine, self.state.step, batch.ids)
        else:
            self.engine.step()
        return float(loss.detach()), boundary

    # ---- logging, checkpoints -----------------------------------------------------------------------
    def _log(self, metrics: dict) -> None:
        metrics = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "lr": self.engine.get_lr()[0],
            **metrics,
            **self.health.interval_metrics(),
            "time": time.time(),
        }
        self.state.metrics.append(metrics)
        if self.rank == 0:
            log.info(
                "step %d/%d epoch %d loss %.4f lr %.3g grad norm %s | %.0f tok/s %.1f samples/s %.3fs/step "
                "(data wait %.3fs) padding %.3f%s",
                metrics["step"],
                self.plan.total_steps,
                metrics["epoch"],
                metrics["loss"],
                metrics["lr"],
                f"{metrics['grad_norm']:.3g}" if "grad_norm" in metrics else "-",
                metrics["tokens_per_s"],
                metrics["samples_per_s"],
                metrics["step_time_s"],
                metrics["data_wait_s"],
                metrics["padding_fraction"],
                f" | {metrics['skipped_steps']:.0f} step(s) skipped (non-finite)" if metrics["skipped_steps"] else "",
            )
        if self.tracker:
            self.tracker.metrics({f"train/{k}": metrics[k] for k in TRACKED if k in metrics}, self.state.step)

    def _save(self) -> None:
        """Every rank: its DeepSpeed shard; rank 0: consolidated weights + data position; Ray merges the dirs."""
        self.state.consumed |= gather_ids(self.new_ids)
        self.new_ids = []
        with tempfile.TemporaryDirectory(prefix="llava-ckpt-") as tmp:
            directory = Path(tmp)
            self.engine.save_checkpoint(str(directory / DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
            weights = full_state_dict(self.engine, self.config.deepspeed.zero_stage)
            if self.rank == 0:
                self.model.save_pretrained(
                    directory / HF_DIR, llm=self.trainable["llm"], vision=self.trainable["vision"], state_dict=weights
                )
                self.state.save(directory)
                if self.config.audit_dir:
                    self.recorder.checksums(self.state.step, component_checksums(weights))
            write_manifest(directory, part=(self.rank, dist.get_world_size()))  # this rank's files, verified on resume
            metrics = {
                "step": self.state.step,
                "epoch": self.state.epoch,
                **({"loss": self.state.metrics[-1]["loss"]} if self.state.metrics else {}),
            }
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.rank == 0:
            log.info(
                "checkpoint at step %d saved (epoch %d, %d samples of this epoch done)",
                self.state.step,
                self.state.epoch,
                len(self.state.consumed),
            )

    def _restore(self, checkpoint) -> None:
        with checkpoint.as_directory() as tmp:
            directory = Path(tmp)
            verify_resume(directory)  # every file against its sha256 before DeepSpeed unpickles anything
            self.engine.load_checkpoint(str(directory / DS_DIR), tag=DS_TAG, load_module_strict=False)
            self.state = TrainState.load(directory)
        if self.rank == 0:
            log.info(
                "resumed from %s: step %d, epoch %d, %d samples of this epoch already trained on",
                checkpoint.path,
                self.state.step,
                self.state.epoch,
                len(self.state.consumed),
            )
