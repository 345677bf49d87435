"""Training on a real local Ray cluster with real DeepSpeed workers (2 CPU workers, gloo).

What each stage may change is checked on the workers' own weights (checksums written to an
audit dir at every checkpoint); resume after a killed worker is checked on the ids of the
samples every micro-batch trained on.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from llava import storage
from llava.training.config import load_train_config

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # training runs


@pytest.fixture(scope="module")
def digits(ray_local, tmp_path_factory):
    from llava.data.prepare import prepare_digits

    out = tmp_path_factory.mktemp("digits")
    prepare_digits(str(out))
    return out


def demo_config(job, base_models, data_uri, storage_path, run_name, *overrides):
    base = [f"model.vision_tower={base_models['vision_tower']}", f"model.llm={base_models['llm']}"]
    return load_train_config(
        job,
        preset="demo",
        overrides=[
            *(base if job == "pretrain" or not any(o.startswith("init_from=") for o in overrides) else []),
            f"data.train=[{data_uri}]",
            f"checkpoint.storage_path={storage_path}",
            f"checkpoint.run_name={run_name}",
            "log_every_steps=1",
            "data.cache=false",
            *overrides,
        ],
    )


def audit(directory: Path) -> tuple[list[dict], list[dict]]:
    """(micro-batch records, checksum records) from every rank and process."""
    records = [json.loads(line) for f in sorted(directory.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return [r for r in records if "ids" in r], [r for r in records if "checksums" in r]


def base_checksums(base_models) -> dict[str, str]:
    from llava.config import ImageConfig, ModelConfig
    from llava.model import LlavaModel
    from llava.training.engine import component_checksums

    config = ModelConfig(vision_tower=base_models["vision_tower"], llm=base_models["llm"], image=ImageConfig(size=32))
    return component_checksums(LlavaModel.from_config(config).state_dict())


def test_stage1_then_stage2_on_s3_change_only_what_they_train(base_models, s3_server, ray_local, tmp_path):
    from llava.data.prepare import prepare_digits
    from llava.model import LlavaModel
    from llava.training.trainer import train

    bucket = s3_server.make_bucket("training")
    prepare_digits(f"{bucket}/digits")
    base = base_checksums(base_models)

    stage1 = train(
        demo_config(
            "pretrain",
            base_models,
            f"{bucket}/digits/stage1",
            f"{bucket}/runs",
            "stage1",
            "optim.max_steps=8",
            "checkpoint.every_steps=3",
            "checkpoint.keep=2",
            f"audit_dir={tmp_path / 'a1'}",
        )
    )
    assert stage1.run_dir == f"{bucket}/runs/stage1" and stage1.steps == 8
    files = storage.list_files(stage1.run_dir)
    assert sum(f.endswith("hf/projector.safetensors") for f in files) == 2  # steps 3, 6, 8: the newest 2 kept
    assert any("/ds/" in f for f in files) and storage.exists(f"{stage1.run_dir}/output.json")
    assert not any("/hf/llm/" in f for f in files)  # stage 1 saves the projector only
    _, sums1 = audit(tmp_path / "a1")
    assert [s["step"] for s in sums1] == [3, 6, 8]
    assert all(s["checksums"]["vision"] == base["vision"] and s["checksums"]["llm"] == base["llm"] for s in sums1)
    assert sums1[0]["checksums"]["projector"] != sums1[1]["checksums"]["projector"]
    assert stage1.metrics[-1]["loss"] < stage1.metrics[0]["loss"]

    stage2 = train(
        demo_config(
            "finetune",
            base_models,
            f"{bucket}/digits/stage2",
            f"{bucket}/runs",
            "stage2",
            f"init_from={stage1.run_dir}",
            "optim.max_steps=8",
            "optim.epochs=1",
            f"audit_dir={tmp_path / 'a2'}",
        )
    )
    assert stage2.model.startswith(f"{bucket}/runs/stage2/checkpoint_")
    _, sums2 = audit(tmp_path / "a2")
    final = sums2[-1]["checksums"]
    assert final["vision"] == base["vision"]
    assert final["llm"] != base["llm"] and final["projector"] != sums1[-1]["checksums"]["projector"]
    assert stage2.metrics[-1]["loss"] < stage2.metrics[0]["loss"]
    model = LlavaModel.from_pretrained(stage2.model)  # loads from the bucket
    assert model.config.template == "vicuna_v1"


def test_killed_worker_resumes_from_newest_checkpoint_without_gaps(base_models, digits, ray_local, tmp_path):
    from llava.training.trainer import train

    runs, audit_dir = tmp_path / "runs", tmp_path / "audit"
    config = demo_config(
        "pretrain",
        base_models,
        digits / "stage1",
        runs,
        "killed",
        "optim.epochs=1",  # one pass: every sample once, whatever the preset's epochs
        "data.micro_batch_size=8",
        "optim.global_batch_size=16",
        "checkpoint.every_steps=10",
        "checkpoint.keep=2",
        "checkpoint.max_failures=2",
        "log_every_steps=10",
        f"audit_dir={audit_dir}",
    )
    killed = {}

    def registered_checkpoints():  # Ray Train's controller lists a checkpoint once every rank reported it
        snapshot = runs / "killed" / "checkpoint_manager_snapshot.json"
        return json.loads(snapshot.read_text())["checkpoint_results"] if snapshot.exists() else []

    def kill_rank1_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not registered_checkpoints():
            time.sleep(0.1)
        victim = max(audit_dir.glob("rank1-pid*.jsonl"), key=lambda f: f.stat().st_mtime)
        killed["pid"] = int(victim.stem.split("pid")[1])
        os.kill(killed["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank1_after_first_checkpoint, daemon=True)
    killer.start()
    result = train(config)
    killer.join(timeout=5)

    records, _ = audit(audit_dir)
    first_pids = {r["pid"] for r in records if r["step"] < 10}
    after = [r for r in records if r["pid"] not in first_pids]
    assert killed["pid"] in first_pids and after, "the run did not restart its workers"
    resumed_at = min(r["step"] for r in after)
    assert resumed_at >= 10 and resumed_at % 10 == 0  # from a checkpoint, not from scratch
    before_ids = {i for r in records if r["pid"] in first_pids and r["step"] < resumed_at for i in r["ids"]}
    lost_interval = {i for r in records if r["pid"] in first_pids and r["step"] >= resumed_at for i in r["ids"]}
    after_ids = [i for r in after for i in r["ids"]]
    assert len(after_ids) == len(set(after_ids))
    assert not before_ids & set(after_ids)  # nothing trained before the checkpoint is repeated
    assert len(lost_interval) <= 10 * 16  # repeats: at most one checkpoint interval of global batches
    assert 1497 - len(before_ids | set(after_ids)) <= 1  # no gap (the equal split may drop one row of 1,497)
    assert result.steps == max(r["step"] for r in records) + 1
    assert [m["step"] for m in result.metrics] == sorted({m["step"] for m in result.metrics})


def test_rerunning_the_same_run_name_resumes(base_models, digits, ray_local, tmp_path):
    from llava.training.trainer import train

    def run(max_steps):
        return train(
            demo_config(
                "pretrain",
                base_models,
                digits / "stage1",
                tmp_path / "runs",
                "again",
                f"optim.max_steps={max_steps}",
                "checkpoint.every_steps=2",
                f"audit_dir={tmp_path / 'audit'}",
            )
        )

    first = run(4)
    assert first.steps == 4
    second = run(8)
    records, _ = audit(tmp_path / "audit")
    first_pids = {r["pid"] for r in records if r["step"] == 0}
    assert min(r["step"] for r in records if r["pid"] not in first_pids) == 4
    assert second.steps == 8 and [m["step"] for m in second.metrics] == list(range(1, 9))


def test_zero3_runs_and_saves_consolidated_weights(base_models, digits, ray_local, tmp_path):
    from llava.model import LlavaModel
    from llava.training.trainer import train

    result = train(
        demo_config(
            "finetune",
            base_models,
            digits / "stage2",
            tmp_path / "runs",
            "zero3",
            "deepspeed.zero_stage=3",
            "optim.max_steps=3",
            "optim.epochs=1",
            f"audit_dir={tmp_path / 'audit'}",
        )
    )
    assert result.steps == 3 and all(m["loss"] == m["loss"] for m in result.metrics)
    _, sums = audit(tmp_path / "audit")
    base = base_checksums(base_models)
    assert sums[-1]["checksums"]["vision"] == base["vision"] and sums[-1]["checksums"]["llm"] != base["llm"]
    model = LlavaModel.from_pretrained(result.model)
    assert (Path(result.model) / "llm" / "model.safetensors").exists() and model.num_image_tokens == 16


def test_lora_trains_adapters_on_the_llm_and_exports_merged(base_models, digits, ray_local, tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava.data.reader import LengthGroupedBatcher, model_ready_dataset
    from llava.export_hf import export_hf
    from llava.model import LlavaModel
    from llava.training.trainer import train

    result = train(
        demo_config(
            "finetune",
            base_models,
            digits / "stage2",
            tmp_path / "runs",
            "lora",
            "lora.enabled=true",
            "lora.r=8",
            "lora.alpha=16",
            "optim.max_steps=3",
            "optim.epochs=1",
            "optim.lr=5e-3",
            f"audit_dir={tmp_path / 'audit'}",
        )
    )
    checkpoint = Path(result.model)
    assert (checkpoint / "llm_adapter" / "adapter_model.safetensors").exists() and not (checkpoint / "llm").exists()
    adapter = json.loads((checkpoint / "llm_adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and set(adapter["target_modules"]) >= {"q_proj", "v_proj"}

    merged = LlavaModel.from_pretrained(checkpoint)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = base_checksums(base_models)
    from llava.training.engine import component_checksums

    assert component_checksums(merged.state_dict())["llm"] != base["llm"]  # the adapters moved the weights
    export = export_hf(merged, tmp_path / "export")
    hf_model = LlavaForConditionalGeneration.from_pretrained(export.path)
    rows = model_ready_dataset([str(digits / "eval")], merged.config, merged.num_image_tokens).take(4)
    batch = next(LengthGroupedBatcher(4, merged.tokenizer.pad_token_id, 32).batches(rows))
    with torch.no_grad():
        ours = merged(batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values).logits
        theirs = hf_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_lora_never_touches_the_vision_tower(base_models):
    from llava.config import FreezeConfig, ImageConfig, ModelConfig
    from llava.freeze import apply_freeze
    from llava.model import LlavaModel
    from llava.training.config import LoraConfig
    from llava.training.lora import apply_lora

    model = LlavaModel.from_config(
        ModelConfig(vision_tower=base_models["vision_tower"], llm=base_models["llm"], image=ImageConfig(size=32))
    )
    apply_freeze(model, FreezeConfig(preset="stage2"))
    # CLIP also has q_proj/k_proj/v_proj/out_proj: the adapters must still stay inside the LLM.
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    lora = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora and all(name.startswith("llm.") for name in lora)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llm", "projector"}
    assert all("lora_" in name for name, p in model.llm.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="not modules of the LLM"):
        apply_lora(model, LoraConfig(target_modules=["fc1"]))
