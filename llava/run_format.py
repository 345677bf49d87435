"""Where things are on disk: a training run directory and a llava-ray checkpoint directory, by name.

Training, inference, serving, export and the pipeline all read these names from here, so the format
has one definition. Only `llava.storage` is imported: serving reads run dirs without importing training.

A training run dir, `<checkpoint.storage_path>/<checkpoint.run_name>` (local or s3://):

    output.json                  RUN_OUTPUT_FILE, written last by the driver (RunOutput): where the final
                                 model is; `init_from`, `infer`, `serve` and `export` accept the run dir for it
    metrics.jsonl                METRICS_FILE: one JSON line per logging step, the whole run
    checkpoint_<time>/           Ray Train checkpoints, the newest `checkpoint.keep` kept; each holds
        ds/state/                  DS_DIR/DS_TAG: DeepSpeed engine state (optimizer, ...) for resume
        hf/                        HF_DIR: the model as a llava-ray checkpoint dir (below)
        train_state.json           STATE_FILE: epoch, optimizer step, sample ids consumed this epoch
        metrics.jsonl              METRICS_FILE: the metrics up to this checkpoint
        _checksums.rank<R>-of-<W>.json  each worker's files with their sha256, verified before a resume

A llava-ray checkpoint dir (llava.model.LlavaModel.save_pretrained / from_pretrained):

    llava_config.json            CONFIG_FILE: {"format_version", "model": ModelConfig fields, "num_image_tokens"}
    projector.safetensors        PROJECTOR_FILE: always
    llm/                         LLM_DIR: HF causal LM + tokenizer, when saved (stage 2); else the base `model.llm`
    llm_adapter/                 ADAPTER_DIR: peft LoRA adapter of the LLM (LoRA stage 2), merged on load
    vision/                      VISION_DIR: HF CLIP vision model, when saved; else the base `model.vision_tower`
    _checksums.json              every file above with its sha256, written last (llava/artifact_manifest.py)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from llava import storage

# training run dir
RUN_OUTPUT_FILE = "output.json"
METRICS_FILE = "metrics.jsonl"
# one Ray Train checkpoint of a run
DS_DIR, DS_TAG = "ds", "state"
HF_DIR = "hf"
STATE_FILE = "train_state.json"
# llava-ray checkpoint dir
CONFIG_FILE = "llava_config.json"
PROJECTOR_FILE = "projector.safetensors"
LLM_DIR, ADAPTER_DIR, VISION_DIR = "llm", "llm_adapter", "vision"
FORMAT_VERSION = 1


@dataclass
class RunOutput:
    """`<run dir>/output.json`: what a finished training run produced."""

    model: str  # the final checkpoint's HF_DIR: a llava-ray checkpoint dir
    checkpoint: str  # the final Ray Train checkpoint dir
    steps: int | None
    skipped_rows: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the training config, as plain fields

    def write(self, run_dir: str) -> str:
        uri = storage.join(run_dir, RUN_OUTPUT_FILE)
        storage.write_text(uri, json.dumps(asdict(self), indent=2))
        return uri

    @classmethod
    def read(cls, run_dir: str) -> RunOutput:
        data = json.loads(storage.read_text(storage.join(run_dir, RUN_OUTPUT_FILE)))
        return cls(**{k: data[k] for k in ("model", "checkpoint", "steps", "skipped_rows", "config") if k in data})


def model_dir(checkpoint: str) -> str:
    """The llava-ray checkpoint dir inside a Ray Train checkpoint of a run."""
    return storage.join(checkpoint, HF_DIR)


def is_run_dir(uri: str) -> bool:
    return storage.exists(storage.join(uri, RUN_OUTPUT_FILE))


def resolve_model_uri(uri: str) -> str:
    """A checkpoint dir (or export) as is; a training run dir -> the model its run produced (output.json)."""
    return RunOutput.read(uri).model if is_run_dir(uri) else uri
