"""The v1 and v1.5 presets run what the official scripts run (haotian-liu/LLaVA v1.2.2), and the v1
presets say where the paper differs."""

import pytest

from llava.training.config import PRESETS_DIR, load_train_config

DATA = ["data.train=[s3://bucket/data]"]
GPUS = 8  # the official scripts' per-device batch sizes are for one node of 8 GPUs

# (preset, job): the official script's flags. aspect: `pad` where the script passes --image_aspect_ratio pad,
# else `crop` (the official default: resize the shortest edge, centre crop).
OFFICIAL = {
    ("v1_5", "pretrain"): dict(
        script="scripts/v1_5/pretrain.sh",
        vision_tower="openai/clip-vit-large-patch14-336",
        projector="mlp2x_gelu",
        template="plain",
        size=336,
        aspect="crop",
        lr=1e-3,
        per_device=32,
        epochs=1,
        zero=2,
    ),
    ("v1_5", "finetune"): dict(
        script="scripts/v1_5/finetune.sh",
        vision_tower="openai/clip-vit-large-patch14-336",
        projector="mlp2x_gelu",
        template="vicuna_v1",
        size=336,
        aspect="pad",
        lr=2e-5,
        per_device=16,
        epochs=1,
        zero=3,
    ),
    ("v1", "pretrain"): dict(
        script="scripts/pretrain.sh",
        vision_tower="openai/clip-vit-large-patch14",
        projector="linear",
        template="plain",
        size=224,
        aspect="crop",
        lr=2e-3,
        per_device=16,
        epochs=1,
        zero=2,
    ),
    ("v1", "finetune"): dict(
        script="scripts/finetune_full_schedule.sh",
        vision_tower="openai/clip-vit-large-patch14",
        projector="linear",
        template="vicuna_v1",
        size=224,
        aspect="crop",
        lr=2e-5,
        per_device=16,
        epochs=3,
        zero=None,
    ),  # the script leaves the DeepSpeed config open
}


@pytest.mark.parametrize("preset, job", sorted(OFFICIAL))
def test_preset_runs_the_official_script(preset, job):
    official = OFFICIAL[(preset, job)]
    config = load_train_config(job, preset=preset, overrides=DATA)
    model, optim = config.model, config.optim
    assert (model.vision_tower, model.projector.type, model.template) == (
        official["vision_tower"],
        official["projector"],
        official["template"],
    )
    assert (model.image.size, model.image.aspect) == (official["size"], official["aspect"])
    assert (optim.lr, optim.epochs, optim.global_batch_size) == (
        official["lr"],
        official["epochs"],
        official["per_device"] * GPUS,
    )
    assert (optim.weight_decay, optim.warmup_ratio, model.max_length, model.select_layer) == (0.0, 0.03, 2048, -2)
    assert config.data.micro_batch_size == official["per_device"]
    if official["zero"] is not None:
        assert config.deepspeed.zero_stage == official["zero"]
    assert official["script"] in (PRESETS_DIR / preset / f"{job}.yaml").read_text()


@pytest.mark.parametrize(
    "job, topics",
    [
        ("pretrain", ["template", "LLM", "data", "parallelism"]),
        ("finetune", ["template", "global batch", "LLM", "parallelism"]),
    ],
)
def test_v1_presets_say_where_the_paper_differs_and_what_they_follow(job, topics):
    header = [
        line.lstrip("# ")
        for line in (PRESETS_DIR / "v1" / f"{job}.yaml").read_text().splitlines()
        if line.startswith("#")
    ]
    assert "Follows the scripts where they differ from the paper" in " ".join(header)
    for topic in topics:  # one line per difference: the topic, what the paper did, what this preset does
        line = next(line for line in header if line.startswith(topic))
        assert "paper:" in line and "scripts" in line and "->" in line, line
