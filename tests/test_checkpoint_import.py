"""Checkpoints users bring: official LLaVA (LlavaLlamaForCausalLM) and llava-hf directories, an official
stage-1 mm_projector.bin; each fabricated from the tiny base models in the layout the official code or
transformers writes, then loaded through our one loader and run with the SAME logits as the source model.

The official names written here are spelled out literally, as haotian-liu/LLaVA v1.2.2 writes them
(llava/model/llava_arch.py, llava/model/multimodal_encoder/clip_encoder.py, llava/train/train.py).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava.checkpoint_import import CheckpointError


@pytest.fixture(scope="module")
def sources(base_models):
    """{projector type: a LlavaModel of the tiny base models with a random projector}."""
    from llava.config import ImageConfig, ModelConfig, ProjectorConfig
    from llava.model import LlavaModel

    torch.manual_seed(0)
    models = {}
    for projector in ("mlp2x_gelu", "linear"):
        config = ModelConfig(
            vision_tower=base_models["vision_tower"],
            llm=base_models["llm"],
            max_length=200,
            projector=ProjectorConfig(type=projector),
            image=ImageConfig(size=32, aspect="pad"),
        )
        models[projector] = LlavaModel.from_config(config).eval()
    with torch.no_grad():  # a trained-looking vision tower, so "saved tower" and "base tower" differ
        models["mlp2x_gelu"].vision_tower.post_layernorm.bias.add_(0.5)
        models["mlp2x_gelu"].vision_tower.encoder.layers[0].mlp.fc1.weight.mul_(1.5)
    return models


def logits(model) -> torch.Tensor:
    """Logits of a fixed prompt with one image (image tokens expanded as our tokenizer does)."""
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, 32, 32, generator=generator)
    ids = torch.tensor([[1, 5, *[model.image_token_id] * model.num_image_tokens, 7, 9, 11]])
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits


def official_state_dict(model, with_vision: bool) -> dict[str, torch.Tensor]:
    """Our weights under the official LlavaLlamaForCausalLM names."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("llm."):
            state[key[len("llm.") :]] = value  # model.embed_tokens / model.layers.* / model.norm / lm_head
        elif key.startswith("projector."):
            state["model.mm_projector." + key[len("projector.") :]] = value  # Sequential 0/2, or a bare Linear
        elif key.startswith("vision_tower.") and with_vision:
            # CLIPVisionTower.vision_tower is a CLIPVisionModel, named by transformers 4 with `vision_model.`
            state["model.vision_tower.vision_tower.vision_model." + key[len("vision_tower.") :]] = value
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_official(model, out: Path, base_models, with_vision=True, shards=1, weights="safetensors", **config) -> Path:
    """An official LLaVA checkpoint directory: config.json + weights (+ index) + tokenizer."""
    out.mkdir(parents=True)
    fields = {
        **model.llm.config.to_dict(),
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": base_models["vision_tower"],
        "mm_projector_type": model.config.projector.type,
        "mm_hidden_size": model.vision_tower.config.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "tokenizer_model_max_length": 200,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        **config,
    }
    (out / "config.json").write_text(json.dumps(fields, indent=2))
    state = official_state_dict(model, with_vision)
    names = sorted(state)
    parts = [names[i::shards] for i in range(shards)]
    stem, suffix = ("model", "safetensors") if weights == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}"
        tensors = {k: state[k] for k in part}
        save_file(tensors, str(out / file)) if weights == "safetensors" else torch.save(tensors, out / file)
        weight_map.update({k: file for k in part})
    if shards > 1:
        (out / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.tokenizer.save_pretrained(out)
    return out


# How transformers 5 writes a LlavaForConditionalGeneration to disk (its saved names) -> the two namings users have:
NAMINGS = {
    # transformers 4.52-4.x saved the in-memory names
    "model.language_model": [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ],
    # released llava-hf repos (e.g. llava-hf/llava-1.5-7b-hf), written by transformers 4 with CLIP's `vision_model.`
    "language_model.model": [
        ("language_model.", "language_model."),
        ("vision_tower.", "vision_tower.vision_model."),
        ("multi_modal_projector.", "multi_modal_projector."),
    ],
}


def write_llava_hf(model, out: Path, naming: str) -> Path:
    """A llava-hf LlavaForConditionalGeneration directory as others release it (no llava-ray metadata file)."""
    from safetensors.torch import load_file

    from llava.artifact_manifest import MANIFEST_FILE
    from llava.export_hf import EXPORT_META_FILE, export_hf

    export_hf(model, out)
    (out / EXPORT_META_FILE).unlink()
    (out / MANIFEST_FILE).unlink()  # nor llava-ray's checksum manifest
    for file in out.glob("*.safetensors"):
        renamed = {}
        for key, value in load_file(str(file)).items():
            old, new = next((o, n) for o, n in NAMINGS[naming] if key.startswith(o))
            renamed[new + key[len(old) :]] = value
        save_file(renamed, str(file), metadata={"format": "pt"})
    return out


class RunsCode:
    """A pickle payload that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---- official LlavaLlamaForCausalLM --------------------------------------------------------------------------


@pytest.mark.parametrize("projector,with_vision", [("mlp2x_gelu", True), ("linear", False)])
def test_official_checkpoint_loads_with_equal_logits(sources, base_models, tmp_path, projector, with_vision):
    from llava.model_loading import load_checkpoint

    source = sources[projector]
    path = write_official(source, tmp_path / "official", base_models, with_vision=with_vision)
    loaded = load_checkpoint(str(path))
    assert torch.equal(logits(loaded), logits(source))
    config = loaded.config
    assert (config.projector.type, config.select_layer, config.select_feature) == (projector, -2, "patch")
    assert (config.template, config.max_length, config.image.aspect, config.image.size) == ("vicuna_v1", 200, "pad", 32)
    assert loaded.num_image_tokens == source.num_image_tokens == 16


def test_official_tower_not_saved_comes_from_mm_vision_tower(sources, base_models, tmp_path):
    """mlp2x_gelu source with a changed tower: saved -> that tower; not saved -> the base tower of mm_vision_tower."""
    from llava.model_loading import load_checkpoint

    source = sources["mlp2x_gelu"]
    loaded = load_checkpoint(str(write_official(source, tmp_path / "o", base_models, with_vision=False)))
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(base_models["vision_tower"])
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.vision_tower.state_dict().values(), tower.state_dict().values())
    )
    assert not torch.equal(logits(loaded), logits(source))  # the source's tower was changed, the base one is used
    assert torch.equal(loaded.llm.lm_head.weight, source.llm.lm_head.weight)


def test_official_checkpoint_in_s3_loads_for_answering(sources, base_models, s3_bucket, tmp_path):
    from llava import storage
    from llava.model_loading import load_model

    source = sources["mlp2x_gelu"]
    storage.upload_dir(str(write_official(source, tmp_path / "official", base_models)), f"{s3_bucket}/llava-v1.5")
    loaded = load_model(f"{s3_bucket}/llava-v1.5", device="cpu", dtype=torch.float32)
    assert torch.equal(logits(loaded), logits(source))


def test_official_sharded_weights_are_read_through_the_index_only(sources, base_models, tmp_path):
    from llava.model_loading import load_checkpoint

    source = sources["mlp2x_gelu"]
    path = write_official(source, tmp_path / "official", base_models, shards=3)
    assert (path / "model.safetensors.index.json").exists()
    marker = tmp_path / "ran"
    torch.save({"x": RunsCode(marker)}, path / "pytorch_model.bin")  # safetensors win: never opened
    save_file({"model.junk": torch.zeros(2)}, str(path / "model-extra.safetensors"))  # not in the index: ignored
    assert torch.equal(logits(load_checkpoint(str(path))), logits(source))
    assert not marker.exists()


def test_official_pickle_checkpoint_sharded_loads_with_weights_only(sources, base_models, tmp_path):
    from llava.model_loading import load_checkpoint

    source = sources["linear"]
    path = write_official(source, tmp_path / "official", base_models, shards=2, weights="bin")
    assert (path / "pytorch_model.bin.index.json").exists()
    assert torch.equal(logits(load_checkpoint(str(path))), logits(source))


def test_official_template_override_and_unsupported_variants(sources, base_models, tmp_path):
    from llava.model_loading import checkpoint_model_config, load_model

    source = sources["mlp2x_gelu"]
    path = write_official(source, tmp_path / "official", base_models)
    model = load_model(str(path), device="cpu", dtype=torch.float32, template="llava_llama_2")
    assert model.config.template == "llava_llama_2" and not model.training
    # serve (`template=` of ServeConfig) and infer / eval (`template=`, `infer.template=`) pass it on
    from llava.inference.batch import GreedyAnswerer
    from serve.config import LimitsConfig
    from serve.engine import LlavaEngine

    assert LlavaEngine(str(path), LimitsConfig(), template="llava_v1").model.config.template == "llava_v1"
    assert GreedyAnswerer(str(path), 4, 2, template="llava_v1").model.config.template == "llava_v1"
    assert GreedyAnswerer(str(path), 4, 2).model.config.template == "vicuna_v1"
    config, tokens = checkpoint_model_config(str(path))  # what training prepares its data for, no weights read
    assert (config.template, config.projector.type, tokens) == ("vicuna_v1", "mlp2x_gelu", 16)
    cropped = write_official(source, tmp_path / "square", base_models, image_aspect_ratio="square")
    assert checkpoint_model_config(str(cropped))[0].image.aspect == "crop"  # official: no pad -> resize + centre crop
    for name, fields, message in [
        ("elsewhere", {"mm_vision_tower": str(tmp_path / "gone" / "clip")}, r"vision tower config of .*gone/clip"),
        ("startend", {"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ("anyres", {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type"),
        ("mpt", {"model_type": "llava_mpt"}, "model_type 'llava_mpt'"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            checkpoint_model_config(str(write_official(source, tmp_path / name, base_models, **fields)))


# ---- llava-hf LlavaForConditionalGeneration ------------------------------------------------------------------


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_llava_hf_directory_loads_with_equal_logits(sources, tmp_path, naming):
    from llava.model_loading import load_checkpoint

    source = sources["mlp2x_gelu"]
    path = write_llava_hf(source, tmp_path / "hf", naming)
    loaded = load_checkpoint(str(path))
    assert torch.equal(logits(loaded), logits(source))
    assert (loaded.config.template, loaded.config.select_layer, loaded.config.image.size) == ("vicuna_v1", -2, 32)


def test_llava_hf_with_a_siglip_tower_is_refused(sources, tmp_path):
    from llava.model_loading import load_checkpoint

    path = write_llava_hf(sources["mlp2x_gelu"], tmp_path / "hf", "language_model.model")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"] = {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "image_size": 32,
        "patch_size": 8,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision tower 'siglip_vision_model' is not supported"):
        load_checkpoint(str(path))


# ---- training init, export ------------------------------------------------------------------------------------


def finetune_config(base_models, *overrides):
    from llava.training.config import load_train_config

    return load_train_config(
        "finetune",
        preset="demo",
        overrides=[
            f"model.vision_tower={base_models['vision_tower']}",
            f"model.llm={base_models['llm']}",
            "data.train=[unused]",
            *overrides,
        ],
    )


def test_stage2_init_from_an_official_checkpoint(sources, base_models, tmp_path):
    from llava.training.engine import build_model
    from llava.training.trainer import data_model_config

    source = sources["mlp2x_gelu"]
    path = write_official(source, tmp_path / "official", base_models)
    config = finetune_config(base_models, f"init_from={path}")
    model, trainable = build_model(config)
    assert trainable["llm"] and trainable["projector"]
    assert torch.equal(logits(model.eval()), logits(source))
    data_config, tokens = data_model_config(config)
    assert tokens == 16 and data_config.tokenizer_path == str(path) and data_config.max_length == 256  # the job's


def test_training_converts_a_foreign_init_from_once_into_a_llava_ray_checkpoint(sources, base_models, tmp_path):
    """Workers and the run's own checkpoints need plain HF base components: `init_from` an official dir is
    converted (exactly, in its stored dtype) into the run dir; a second run reuses the conversion."""
    from llava.model import LlavaModel
    from llava.model_loading import import_for_training
    from llava.run_format import LLM_DIR

    source = sources["mlp2x_gelu"]
    official = write_official(source, tmp_path / "official", base_models)
    ours = str(source.save_pretrained(tmp_path / "ours"))
    assert import_for_training(ours, str(tmp_path / "unused")) == ours and not (tmp_path / "unused").exists()
    out = import_for_training(str(official), str(tmp_path / "run" / "imported"), template="llava_v1")
    converted = LlavaModel.from_pretrained(out)
    assert torch.equal(logits(converted.eval()), logits(source))
    assert (
        converted.config.llm == str(tmp_path / "run" / "imported" / LLM_DIR) and converted.config.template == "llava_v1"
    )
    stamp = (Path(out) / LLM_DIR / "model.safetensors").stat().st_mtime_ns
    assert import_for_training(str(official), out) == out
    assert (Path(out) / LLM_DIR / "model.safetensors").stat().st_mtime_ns == stamp  # not written again


def test_a_foreign_init_from_converts_into_an_s3_run_dir(sources, s3_bucket, tmp_path):
    from llava.model import LlavaModel
    from llava.model_loading import import_for_training

    source = sources["mlp2x_gelu"]
    hf = write_llava_hf(source, tmp_path / "hf", "model.language_model")
    out = import_for_training(str(hf), f"{s3_bucket}/runs/lora/imported")
    converted = LlavaModel.from_pretrained(out)  # its base components are read from the bucket too
    assert converted.config.llm == f"{s3_bucket}/runs/lora/imported/llm"
    assert torch.equal(logits(converted.eval()), logits(source))


def test_stage2_projector_from_an_official_mm_projector_bin(sources, base_models, tmp_path):
    """Stage 1 official output -> our stage 2 from the base models: the same model as the stage-1 source."""
    from llava.training.engine import build_model

    source = sources["mlp2x_gelu"]
    projector_file = tmp_path / "mm_projector.bin"
    # llava/train/llava_trainer.py `_save_checkpoint`: the projector's weights under their full model names
    torch.save(
        {"model.mm_projector." + k: v.clone().half() for k, v in source.projector.state_dict().items()}, projector_file
    )
    model, _ = build_model(finetune_config(base_models, f"projector_init={projector_file}"))
    for key, value in source.projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[key], value.half().float())
    wrong = finetune_config(base_models, f"projector_init={projector_file}", "model.projector.type=linear")
    with pytest.raises(CheckpointError, match=r"mm_projector.bin: the linear projector weights do not fit: .*missing"):
        build_model(wrong)


def test_projector_init_from_s3(sources, base_models, s3_bucket, tmp_path):
    from llava import storage
    from llava.model_loading import load_projector

    source = sources["linear"]
    save_file(
        {"model.mm_projector." + k: v.contiguous() for k, v in source.projector.state_dict().items()},
        str(tmp_path / "mm_projector.safetensors"),
    )
    storage.write_bytes(
        f"{s3_bucket}/stage1/mm_projector.safetensors", (tmp_path / "mm_projector.safetensors").read_bytes()
    )
    target = sources["linear"].__class__.from_config(source.config)
    load_projector(target, f"{s3_bucket}/stage1/mm_projector.safetensors")
    assert torch.equal(logits(target.eval()), logits(source))


def test_export_of_an_official_checkpoint_reloads_with_equal_logits(sources, base_models, tmp_path):
    from llava.export_hf import export_hf
    from llava.model_loading import load_checkpoint, load_model

    source = sources["mlp2x_gelu"]
    path = write_official(source, tmp_path / "official", base_models, with_vision=True)
    result = export_hf(load_checkpoint(str(path), template="llava_v1"), tmp_path / "export")
    assert result.format == "hf-llava"
    reloaded = load_model(str(tmp_path / "export"), device="cpu", dtype=torch.float32)
    assert reloaded.config.template == "llava_v1"
    assert torch.equal(logits(reloaded), logits(source))


# ---- refusals ---------------------------------------------------------------------------------------------------


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(sources, base_models, tmp_path):
    from llava.model_loading import load_checkpoint, load_projector

    marker = tmp_path / "ran"
    projector_file = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": RunsCode(marker)}, projector_file)
    with pytest.raises(CheckpointError, match=r"refused .*mm_projector\.bin: .*weights_only=True"):
        load_projector(sources["mlp2x_gelu"], str(projector_file))
    path = write_official(sources["linear"], tmp_path / "official", base_models, weights="bin")
    torch.save({"lm_head.weight": RunsCode(marker)}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused .*pytorch_model\.bin"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_bad_checkpoints_are_refused_naming_the_file_and_the_problem(sources, base_models, tmp_path):
    from safetensors.torch import load_file

    from llava.model_loading import load_checkpoint

    source = sources["linear"]
    missing = write_official(source, tmp_path / "missing", base_models)
    state = load_file(str(missing / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"missing: the language model weights do not fit: 1 missing .*model.norm"
    ):
        load_checkpoint(str(missing))

    shape = write_official(source, tmp_path / "shape", base_models)
    state = load_file(str(shape / "model.safetensors"))
    state["model.mm_projector.weight"] = torch.zeros(3, 3)
    save_file(state, str(shape / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"linear projector weights do not fit: shape mismatch \(weight: \(3, 3\)"
    ):
        load_checkpoint(str(shape))

    extra = write_official(source, tmp_path / "extra", base_models)
    state = load_file(str(extra / "model.safetensors"))
    state["model.image_newline"] = torch.zeros(128)  # LLaVA-NeXT
    save_file(state, str(extra / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"language model weights do not fit: 1 unexpected .*'model.image_newline'"
    ):
        load_checkpoint(str(extra))
    state["vision_resampler.weight"] = torch.zeros(2)
    save_file(state, str(extra / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"not part of an official LLaVA checkpoint: \['vision_resampler.weight'\]"
    ):
        load_checkpoint(str(extra))

    escape = write_official(source, tmp_path / "escape", base_models, shards=2)
    index = json.loads((escape / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../missing/model.safetensors"
    (escape / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lists '../missing/model.safetensors', which is outside"):
        load_checkpoint(str(escape))

    empty = write_official(source, tmp_path / "empty", base_models)
    (empty / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"empty holds no weights: expected one of model.safetensors.index.json"):
        load_checkpoint(str(empty))

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match=r"neither an official LLaVA checkpoint .*model_type 'bert'"):
        load_checkpoint(str(unknown))


# ---- the common journey -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_llava_hf_model_lora_finetune_export_serve_answer_through_openai(sources, base_models, tmp_path):
    """A released-style llava-hf model -> LoRA stage 2 on our parquet (Ray Train) -> HF export -> Ray Serve ->
    an answer through the `openai` client, equal to greedy decoding of the export in this process."""
    import base64

    import openai
    import ray
    from ray import serve

    from llava.data.prepare import prepare_digits
    from llava.decoding import greedy_decode
    from llava.export_hf import export_hf
    from llava.generation import Prompt, encode_prompt
    from llava.model_loading import load_checkpoint, load_model
    from llava.ray_runtime import init_ray
    from llava.run_format import ADAPTER_DIR
    from llava.training.trainer import train
    from serve.app import run_local
    from serve.config import AutoscalingConfig, ReplicaConfig, ServeConfig
    from tests.conftest import png
    from tests.serve_fixtures import free_port

    source = sources["mlp2x_gelu"]
    hf = write_llava_hf(source, tmp_path / "llava-hf", "language_model.model")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")  # a busy 2-core machine starts slowly
    init_ray(num_cpus=4)  # one Ray for training and serving
    try:
        prepare_digits(str(tmp_path / "digits"))
        result = train(
            finetune_config(
                base_models,
                f"init_from={hf}",
                f"data.train=[{tmp_path / 'digits' / 'stage2'}]",
                "lora.enabled=true",
                "lora.r=8",
                "lora.alpha=16",
                "optim.max_steps=3",
                "workers.num_workers=1",
                "data.micro_batch_size=8",
                "optim.global_batch_size=8",
                "data.cache=false",
                "log_every_steps=1",
                f"checkpoint.storage_path={tmp_path / 'runs'}",
                "checkpoint.run_name=lora",
            )
        )
        assert (Path(result.model) / ADAPTER_DIR).is_dir() and result.steps == 3
        assert all(m["loss"] == m["loss"] for m in result.metrics)  # finite losses were logged
        tuned = load_checkpoint(result.run_dir)
        assert not torch.equal(logits(tuned.eval()), logits(source))  # the adapter changed the model

        assert export_hf(tuned, tmp_path / "export").format == "hf-llava"
        config = ServeConfig(
            model=str(tmp_path / "export"),
            model_name="tuned",
            port=free_port(),
            api_key_env="LLAVA_RAY_TEST_NO_KEY",
            autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1),
            replica=ReplicaConfig(num_cpus=0.5, num_gpus=0),
        )
        url = run_local(config)
        image = png(21, size=32)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(
            model="tuned",
            temperature=0,
            max_tokens=8,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
                        },
                        {"type": "text", "text": "What digit is this?"},
                    ],
                }
            ],
        )
        exported = load_model(str(tmp_path / "export"), device="cpu", dtype=torch.float32)
        prompt = encode_prompt(exported, Prompt([{"from": "human", "value": "<image>\nWhat digit is this?"}], [image]))
        answer = response.choices[0].message.content
        assert answer and answer == greedy_decode(exported, [prompt], max_new_tokens=8)[0]
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
