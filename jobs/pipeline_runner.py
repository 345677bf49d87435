"""`llava-ray pipeline`: one YAML runs the whole recipe, prepare -> stage 1 -> stage 2 -> eval -> export -> serve.

    config = load_pipeline_config("pipeline.yaml", ["root=s3://bucket/runs/exp1", "stage2.optim.lr=1e-5"])
    result = Pipeline(config).run()

Everything goes under `root` (local dir or s3://): `data/<split>`, `base/` (tiny base models), `runs/stage{1,2}`
(every training stage's `checkpoint.storage_path` is `<root>/runs`), `eval/`, `export/`, and the run manifest
`pipeline.json` (jobs/run_manifest.py), which makes a re-run skip the stages already complete, resume the
interrupted one and re-run whatever changed, with everything downstream of it.

The stages' configs are the jobs' own dataclasses: `stage1` is a PretrainConfig, `stage2` a FinetuneConfig
(each over its `preset`), `eval.scienceqa` / `eval.llava_bench` the eval jobs' configs, `serve` a ServeConfig.
Left empty, the pipeline wires them: stage 1 trains on `data/stage1` (and on the tiny base models when
`prepare.base_models=tiny`, which replace `stage1.model.vision_tower` / `llm`), stage 2 starts from the stage-1
run on `data/stage2`, eval and export take stage 2's model, serve the export (else stage 2's model). Serving is
never skipped; the manifest records it as `serving` (then `stopped` after Ctrl-C) with its URLs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

from jobs.run_manifest import COMPLETE, RunManifest, StageRecord, code_version, fingerprint, now
from llava import storage
from llava.base_models.config import BasePretrainConfig
from llava.config import config_from_dict, config_to_dict, load_config
from llava.data.ingest import IngestConfig
from llava.evaluation.llava_bench import LlavaBenchConfig
from llava.evaluation.scienceqa import ScienceQAConfig
from llava.training.config import PRESETS, PRESETS_DIR, FinetuneConfig, PretrainConfig
from llava.training.tracking import TrackingConfig, flatten, log_to_run
from serve.config import ServeConfig

log = logging.getLogger(__name__)

DEMO_CONFIG = PRESETS_DIR / "demo" / "pipeline.yaml"
SPLITS = ("stage1", "stage2", "eval")
# Config fields that change how a stage runs, not what it computes: recorded, but left out of the stage's
# fingerprint (jobs/run_manifest.py), so changing one resumes or skips the stage instead of re-running it.
# The global batch size is kept by gradient accumulation whatever the worker count (optim.global_batch_size).
TRAINING_OPERATIONAL = (
    "workers",
    "log_every_steps",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.max_failures",
    "audit_dir",
    "data.cache",
    "deepspeed.offload_optimizer",
    "deepspeed.offload_params",
)
PREPARE_OPERATIONAL = ("ingest.batch_size", "ingest.examples_per_reason", "ingest.shard_mb")
EVAL_OPERATIONAL = tuple(
    f"{bench}.infer.{name}"
    for bench in ("scienceqa", "llava_bench")
    for name in ("actors", "gpus_per_actor", "cpus_per_actor", "log_every_s")
)
SOURCE_KINDS = ("digits", "llava-json", "captions", "prepared", "none")


@dataclass
class SourceConfig:
    """Where one split's data comes from (the fields of `llava-ray prepare KIND`)."""

    kind: str = "none"  # digits | llava-json | captions | prepared (an existing dataset: uri) | none
    json: str = ""  # llava-json: the JSON array
    pairs: str = ""  # captions: .jsonl / .csv / .parquet of image + caption
    images: str = ""  # llava-json, captions: the image folder
    source: Optional[str] = None
    seed: int = 0  # digits (all digits splits are built together, with the first one's seed), captions
    image_column: str = "image"
    caption_column: str = "caption"
    uri: str = ""  # prepared


@dataclass
class PrepareStageConfig:
    stage1: SourceConfig = field(default_factory=SourceConfig)
    stage2: SourceConfig = field(default_factory=SourceConfig)
    eval: SourceConfig = field(default_factory=SourceConfig)  # held-out split for eval.heldout
    ingest: IngestConfig = field(default_factory=IngestConfig)
    # given (stage1.model.*) | tiny (random offline CLIP + Llama built under <root>/base) | pretrained (the `base`
    # stage pretrains a tiny CLIP and Llama on the prepared data, llava/base_models, under <root>/base)
    base_models: str = "given"


@dataclass
class HeldoutConfig:
    """Exact-match accuracy of greedy answers on the prepared eval split (the digits demo's metric)."""

    enabled: bool = True
    batch_size: int = 32
    stage1_captions: bool = False  # also caption the held-out images with the stage-1 model: does it name the digit?


@dataclass
class EvalStageConfig:
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    scienceqa: Optional[ScienceQAConfig] = None  # infer.model / infer.out default to stage 2's model / <root>/eval/...
    llava_bench: Optional[LlavaBenchConfig] = None


@dataclass
class ExportStageConfig:
    enabled: bool = True  # stage 2's model as a stock HF Llava directory under <root>/export


@dataclass
class ServeStageConfig(ServeConfig):
    enabled: bool = False  # deploy with Ray Serve after the other stages and serve until Ctrl-C


@dataclass
class PipelineConfig:
    root: str = "runs/pipeline"  # local dir or s3://bucket/prefix: every output and pipeline.json
    prepare: PrepareStageConfig = field(default_factory=PrepareStageConfig)
    base: BasePretrainConfig = field(default_factory=BasePretrainConfig)  # prepare.base_models=pretrained; out,
    # captions, instructions and the templates default to <root>/base, data/stage1, data/stage2 and the stages' own
    stage1: PretrainConfig = field(default_factory=PretrainConfig)  # `preset: NAME` layers presets/NAME/pretrain.yaml
    stage2: FinetuneConfig = field(default_factory=FinetuneConfig)  # `preset: NAME` layers presets/NAME/finetune.yaml
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
    export: ExportStageConfig = field(default_factory=ExportStageConfig)
    serve: ServeStageConfig = field(default_factory=ServeStageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # both training stages (unless one sets its own)


def load_pipeline_config(path: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """defaults <- stage presets (stage1.preset / stage2.preset) <- YAML file <- `a.b=value` overrides."""
    config = load_config(
        PipelineConfig, path, overrides, presets={"stage1": PRESETS["pretrain"], "stage2": PRESETS["finetune"]}
    )
    for split in SPLITS:
        if getattr(config.prepare, split).kind not in SOURCE_KINDS:
            raise ValueError(f"prepare.{split}.kind must be one of {SOURCE_KINDS}")
    if config.prepare.base_models not in ("given", "tiny", "pretrained"):
        raise ValueError(f"prepare.base_models must be given, tiny or pretrained, got {config.prepare.base_models!r}")
    if not storage.is_s3(config.root):
        config.root = os.path.abspath(os.path.expanduser(config.root))
    return config


def _dataset_metrics(manifest) -> dict:
    return {"rows": manifest.rows, "skipped": manifest.skipped}


def _write_dir(uri: str, build) -> str:
    """Run `build(local_dir)` into `uri` directly (local) or through a temp dir uploaded after (s3://)."""
    if not storage.is_s3(uri):
        build(uri)
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp)
        storage.upload_dir(tmp, uri)
    return uri


class Pipeline:
    def __init__(self, config: PipelineConfig, address: str | None = None, s3_endpoint: str | None = None):
        if s3_endpoint:  # before the manifest is read; init_ray passes it on to the workers
            os.environ["AWS_ENDPOINT_URL"] = s3_endpoint
        self.config, self.address, self.s3_endpoint = config, address, s3_endpoint
        self.root = config.root
        self.manifest = RunManifest.load(self.root)
        self.records: dict[str, StageRecord] = {}

    def uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def ray(self) -> None:
        """Start (or join) Ray on first need: a re-run whose stages are all complete never starts it."""
        from llava.ray_runtime import init_ray

        init_ray(self.address, s3_endpoint=self.s3_endpoint)

    def run(self) -> dict[str, StageRecord]:
        log.info("pipeline under %s (manifest %s)", self.root, self.manifest.uri)
        for name in self.stage_names():
            self.records[name] = getattr(self, f"_{name}")()
        return self.records

    def stage_names(self) -> list[str]:
        base = ["base"] if self.config.prepare.base_models == "pretrained" else []
        return ["prepare", *base, "stage1", "stage2", "eval", "export"]

    # -- stages ---------------------------------------------------------------------------------

    def _prepare(self) -> StageRecord:
        c = self.config.prepare
        outputs = {
            split: (getattr(c, split).uri or None)
            if getattr(c, split).kind == "prepared"
            else None
            if getattr(c, split).kind == "none"
            else self.uri("data", split)
            for split in SPLITS
        }
        config = {
            **config_to_dict(c),
            "outputs": outputs,
            "base_dir": self.uri("base") if c.base_models == "tiny" else None,
        }

        def work():
            from llava.data.prepare import prepare_captions, prepare_digits, prepare_llava_json
            from llava.data.schema import Manifest

            self.ray()
            manifests, sources = {}, {split: getattr(c, split) for split in SPLITS}
            digits = [split for split, s in sources.items() if s.kind == "digits"]
            if digits:
                log.info("prepare: digits data set -> %s", self.uri("data"))
                built = prepare_digits(self.uri("data"), sources[digits[0]].seed, c.ingest, overwrite=True)
                manifests.update({split: built[split] for split in digits})
            for split, s in sources.items():
                if s.kind == "llava-json":
                    manifests[split] = prepare_llava_json(
                        s.json, s.images, outputs[split], s.source, c.ingest, overwrite=True
                    )  # a re-run replaces the data as a whole
                elif s.kind == "captions":
                    manifests[split] = prepare_captions(
                        s.pairs,
                        s.images,
                        outputs[split],
                        s.seed,
                        s.source or "captions",
                        s.image_column,
                        s.caption_column,
                        c.ingest,
                        overwrite=True,
                    )
                elif s.kind == "prepared" and storage.exists(storage.join(s.uri, "_manifest.json")):
                    manifests[split] = Manifest.read(s.uri)
            out = {"data": {k: v for k, v in outputs.items() if v}}
            if c.base_models == "tiny":
                from llava.tiny_models import build_tiny_base_models

                log.info("prepare: tiny offline base models -> %s", config["base_dir"])
                _write_dir(config["base_dir"], build_tiny_base_models)
                out["base_models"] = {"vision_tower": self.uri("base", "vision"), "llm": self.uri("base", "llm")}
            return out, {"data": {split: _dataset_metrics(m) for split, m in manifests.items()}}

        return self.manifest.run_stage("prepare", config, work, operational=PREPARE_OPERATIONAL)

    def _base(self) -> StageRecord:
        prep = self.records["prepare"]
        data = prep.outputs["data"]
        c = self.config.base
        c.out = c.out or self.uri("base")
        c.captions = c.captions or ([data["stage1"]] if data.get("stage1") else [])
        c.instructions = c.instructions or ([data["stage2"]] if data.get("stage2") else [])
        c.caption_template = self.config.stage1.model.template or c.caption_template
        c.instruction_template = self.config.stage2.model.template or c.instruction_template
        config = config_to_dict(c.validate())

        def work():
            from llava.base_models.build import pretrain_base_models

            found = pretrain_base_models(c, self.ray)
            return {"base_models": {"vision_tower": found["vision_tower"], "llm": found["llm"]}}, found["metrics"]

        keep = lambda old: []  # noqa: E731 -- never moved aside: build.py replaces a model whose fingerprint changed
        return self.manifest.run_stage("base", config, work, {"data": data}, {"prepare": prep}, keep, ("threads",))

    def _train_config(self, stage: str, job_cls, defaults: dict, forced: dict | None = None) -> dict:
        """The stage's resolved training config (plain dict): pipeline wiring where the YAML left fields empty."""
        d = config_to_dict(getattr(self.config, stage))
        d.pop("preset")
        d.pop("tracking")  # where metrics go is no part of what a stage computes: set in _train, not fingerprinted
        for key, value in [*defaults.items(), *(forced or {}).items()]:
            section, _, name = key.rpartition(".")
            target = d[section] if section else d
            if value and (not target.get(name) or key in (forced or {})):
                target[name] = value
        d["checkpoint"]["storage_path"] = self.uri("runs")
        config_from_dict(job_cls, d).validate()  # fail before anything runs
        return d

    def stage_tracking(self, stage: str) -> TrackingConfig:
        """Where a training stage logs: its own `tracking` if it sets a backend, else the pipeline's."""
        own = getattr(self.config, stage).tracking
        return own if own.enabled else self.config.tracking

    def _train(self, stage: str, job_cls, config: dict, inputs: dict, upstream: dict) -> StageRecord:
        def work():
            from llava.training.trainer import train

            self.ray()
            tracking = config_to_dict(self.stage_tracking(stage))
            result = train(config_from_dict(job_cls, {**config, "tracking": tracking}))
            losses = [m["loss"] for m in result.metrics if "loss" in m]
            return (
                {"run_dir": result.run_dir, "model": result.model, "checkpoint": result.checkpoint},
                {
                    "steps": result.steps,
                    "loss_start": losses[0] if losses else None,
                    "loss_end": losses[-1] if losses else None,
                    "skipped_rows": result.skipped_rows,
                },
            )

        def reset(old: StageRecord) -> list[str]:  # a new config must not resume the old run: moved aside
            checkpoint = old.config.get("checkpoint", {})  # also when it was interrupted (no outputs recorded)
            planned = (
                [storage.join(checkpoint["storage_path"], checkpoint["run_name"])]
                if checkpoint.get("storage_path") and checkpoint.get("run_name")
                else []
            )
            return [*planned, *([old.outputs["run_dir"]] if old.outputs.get("run_dir") else [])]

        return self.manifest.run_stage(stage, config, work, inputs, upstream, reset, TRAINING_OPERATIONAL)

    def _stage1(self) -> StageRecord:
        prep = self.records["prepare"]
        built = self.records["base"] if "base" in self.records else prep
        base = built.outputs.get("base_models", {})
        config = self._train_config(
            "stage1",
            PretrainConfig,
            {"data.train": [prep.outputs["data"]["stage1"]] if prep.outputs["data"].get("stage1") else None},
            {"model.vision_tower": base["vision_tower"], "model.llm": base["llm"]} if base else None,
        )
        upstream = {"prepare": prep, **({"base": built} if built is not prep else {})}
        return self._train("stage1", PretrainConfig, config, {"data.train": config["data"]["train"], **base}, upstream)

    def _stage2(self) -> StageRecord:
        prep, stage1 = self.records["prepare"], self.records["stage1"]
        config = self._train_config(
            "stage2",
            FinetuneConfig,
            {
                "init_from": stage1.outputs["run_dir"],
                "data.train": [prep.outputs["data"]["stage2"]] if prep.outputs["data"].get("stage2") else None,
            },
        )
        inputs = {
            "data.train": config["data"]["train"],
            "init_from": config["init_from"],
            "stage1_model": stage1.outputs["model"],
        }  # a re-run stage 1 (new checkpoint) re-runs stage 2
        return self._train("stage2", FinetuneConfig, config, inputs, {"prepare": prep, "stage1": stage1})

    def _eval(self) -> StageRecord:
        c, prep, stage1, stage2 = (
            self.config.eval,
            self.records["prepare"],
            self.records["stage1"],
            self.records["stage2"],
        )
        model, heldout_data = stage2.outputs["model"], prep.outputs["data"].get("eval")
        benchmarks = {}
        for name in ("scienceqa", "llava_bench"):
            bench = getattr(c, name)
            if bench is not None:
                bench.infer.model = bench.infer.model or model
                bench.infer.out = bench.infer.out or self.uri("eval", name)
                benchmarks[name] = config_to_dict(bench)
        heldout = c.heldout.enabled and heldout_data is not None
        captions = heldout and c.heldout.stage1_captions
        config = {
            "heldout": {**config_to_dict(c.heldout), "enabled": heldout, "data": heldout_data, "out": self.uri("eval")},
            **benchmarks,
        }

        def work():
            self.ray()
            outputs, metrics = {}, {}
            if heldout:
                from llava.evaluation.digits import heldout_accuracy

                log.info("eval: held-out accuracy on %s -> %s", heldout_data, self.uri("eval"))
                acc = heldout_accuracy(model, heldout_data, self.uri("eval"), c.heldout.batch_size)
                log.info("held-out accuracy %.3f (%d/%d)", acc["accuracy"], acc["correct"], acc["total"])
                outputs["heldout_predictions"] = acc.pop("predictions")
                metrics["heldout"] = acc
            if captions:
                from llava.evaluation.digits import caption_accuracy

                out = self.uri("eval", "stage1_captions")
                log.info("eval: stage-1 captions of the held-out images (%s) -> %s", stage1.outputs["model"], out)
                acc = caption_accuracy(stage1.outputs["model"], heldout_data, out, c.heldout.batch_size)
                log.info("stage-1 caption accuracy %.3f (%d/%d)", acc["accuracy"], acc["correct"], acc["total"])
                outputs["stage1_captions"] = acc.pop("predictions")
                metrics["stage1_captions"] = acc
            for name, bench in benchmarks.items():
                if name == "scienceqa":
                    from llava.evaluation.scienceqa import evaluate_scienceqa as evaluate
                else:
                    from llava.evaluation.llava_bench import evaluate_llava_bench as evaluate
                log.info("eval: %s -> %s", name, bench["infer"]["out"])
                metrics[name] = evaluate(
                    config_from_dict(ScienceQAConfig if name == "scienceqa" else LlavaBenchConfig, bench)
                )
                outputs[name] = bench["infer"]["out"]
            numbers = {f"eval/{k}": v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
            log_to_run(stage2.outputs["run_dir"], numbers, step=stage2.metrics.get("steps") or 0)  # if tracked
            return outputs, metrics

        inputs = {"model": model, **({"stage1_model": stage1.outputs["model"]} if captions else {})}
        upstream = {"stage2": stage2, **({"stage1": stage1} if captions else {})}
        return self.manifest.run_stage("eval", config, work, inputs, upstream, operational=EVAL_OPERATIONAL)

    def _export(self) -> StageRecord:
        stage2 = self.records["stage2"]
        config = {"enabled": self.config.export.enabled, "out": self.uri("export")}

        def work():
            if not self.config.export.enabled:
                return {}, {}
            from llava.export_hf import export_hf
            from llava.model import LlavaModel

            model = LlavaModel.from_pretrained(stage2.outputs["model"])
            found = vars(export_hf(model, config["out"]))  # local or s3://, replaced as a whole (old one moved aside)
            return {"path": config["out"]}, {"format": found["format"], "message": found["message"]}

        return self.manifest.run_stage("export", config, work, {"model": stage2.outputs["model"]}, {"stage2": stage2})

    def serve(self) -> dict:
        """Deploy the export (else stage 2's model) with Ray Serve and return its URLs; then `wait_until_interrupted`."""
        from serve.app import run_local

        c = self.config.serve
        export = self.records.get("export")
        c.model = (
            c.model
            or (export.outputs.get("path") if export and export.outputs else None)
            or self.records["stage2"].outputs["model"]
        )
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
        self.ray()
        log.info("stage serve: serving %s (never skipped: it runs until Ctrl-C)", c.model)
        config = {k: v for k, v in config_to_dict(c).items() if k != "enabled"}
        url = run_local(config_from_dict(ServeConfig, config))
        urls = {"url": url, "openai_base_url": f"{url}/v1", "model": c.model_name, "chat_page": f"{url}/"}
        self.manifest.stages["serve"] = StageRecord(
            "serving", fingerprint(config), config, {"model": c.model}, code=code_version(), outputs=urls, started=now()
        )
        self.manifest.save()
        return urls

    def serve_stopped(self) -> None:
        self.manifest.stages["serve"].status, self.manifest.stages["serve"].ended = "stopped", now()
        self.manifest.save()


def summary(pipeline: Pipeline) -> dict:
    """The pipeline command's JSON line: per stage, whether it ran (and why), its outputs and metrics."""
    return {
        "root": pipeline.root,
        "manifest": pipeline.manifest.uri,
        "stages": {
            name: {"status": r.status, "ran": r.ran, "reason": r.reason, "outputs": r.outputs, "metrics": r.metrics}
            for name, r in pipeline.records.items()
        },
        "complete": all(r.status == COMPLETE for r in pipeline.records.values()),
    }
