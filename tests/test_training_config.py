"""Training job configs: presets load and type-check, the global batch survives any cluster size."""

import pytest

from llava.training.config import FinetuneConfig, PretrainConfig, load_train_config, preset_names
from llava.training.engine import StepPlan, cosine_with_warmup, deepspeed_config

DATA = ["data.train=[s3://bucket/data]"]


@pytest.mark.parametrize("preset", ["v1", "v1_5", "demo"])
@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_every_preset_loads_as_its_jobs_dataclass(job, preset):
    config = load_train_config(job, preset=preset, overrides=DATA)
    assert isinstance(config, PretrainConfig if job == "pretrain" else FinetuneConfig)
    assert config.freeze.preset == ("stage1" if job == "pretrain" else "stage2")
    assert config.optim.weight_decay == 0.0 and config.optim.warmup_ratio == 0.03


def test_presets_follow_the_recipes():
    assert preset_names() == ["demo", "v1", "v1_5"]
    v1_5_1 = load_train_config("pretrain", preset="v1_5", overrides=DATA)
    assert (v1_5_1.optim.lr, v1_5_1.optim.global_batch_size, v1_5_1.model.template) == (1e-3, 256, "plain")
    assert v1_5_1.model.projector.type == "mlp2x_gelu"
    v1_5_2 = load_train_config("finetune", preset="v1_5", overrides=DATA)
    assert (v1_5_2.optim.lr, v1_5_2.optim.global_batch_size, v1_5_2.model.template) == (2e-5, 128, "vicuna_v1")
    assert v1_5_2.model.image.aspect == "pad"
    v1_2 = load_train_config("finetune", preset="v1", overrides=DATA)
    assert (v1_2.optim.lr, v1_2.optim.global_batch_size, v1_2.optim.epochs) == (2e-5, 128, 3)  # the scripts' batch


def test_file_then_overrides_win_over_the_preset(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optim: {lr: 0.5}\nworkers: {num_workers: 4}\n")
    config = load_train_config("pretrain", preset="v1_5", path=str(path), overrides=DATA + ["optim.lr=0.25"])
    assert config.optim.lr == 0.25 and config.workers.num_workers == 4 and config.optim.global_batch_size == 256


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(Exception, match="optim.lrr|lrr"):
        load_train_config("pretrain", overrides=DATA + ["optim.lrr=1"])
    with pytest.raises(ValueError, match="data.train is empty"):
        load_train_config("pretrain")
    with pytest.raises(ValueError, match="unknown preset 'v9'"):
        load_train_config("pretrain", preset="v9", overrides=DATA)
    with pytest.raises(ValueError, match="offload_params needs"):
        load_train_config("finetune", overrides=DATA + ["deepspeed.offload_params=true"])


@pytest.mark.parametrize("workers,micro,accumulation", [(1, 16, 8), (2, 16, 4), (8, 16, 1), (4, 8, 4)])
def test_global_batch_is_kept_by_gradient_accumulation(workers, micro, accumulation):
    config = load_train_config("pretrain", preset="v1", overrides=DATA + [f"data.micro_batch_size={micro}"])
    plan = StepPlan.build(config, rows=12_800, world_size=workers)
    assert plan.accumulation == accumulation
    assert plan.global_batch_size == 128
    assert plan.total_steps == 100 and plan.stop_step is None  # 12,800 rows / 128, one epoch
    ds = deepspeed_config(config, plan)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * workers


def test_max_steps_and_fractional_epochs_stop_inside_an_epoch():
    config = load_train_config("pretrain", preset="v1", overrides=DATA + ["optim.max_steps=10"])
    assert StepPlan.build(config, 12_800, 8).stop_step == 10
    config = load_train_config("pretrain", preset="v1", overrides=DATA + ["optim.epochs=1.5"])
    plan = StepPlan.build(config, 12_800, 8)
    assert (plan.epochs, plan.stop_step, plan.total_steps) == (2, 150, 150)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_with_warmup(optimizer, total_steps=100, warmup_ratio=0.03)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] == 1.0  # 3 warm-up steps, then the peak
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] < 0.001


def test_boolean_switches_take_true_and_false_as_typed_on_the_command_line(tmp_path):
    config = load_train_config("pretrain", overrides=DATA + ["workers.use_gpu=true", "deepspeed.bf16=False"])
    assert (config.workers.use_gpu, config.deepspeed.bf16) == ("true", "false")
    (tmp_path / "job.yaml").write_text("workers: {use_gpu: true}\n")
    assert load_train_config("pretrain", path=str(tmp_path / "job.yaml"), overrides=DATA).workers.use_gpu == "true"
    with pytest.raises(ValueError, match="workers.use_gpu must be auto, true or false, got 'maybe'"):
        load_train_config("pretrain", overrides=DATA + ["workers.use_gpu=maybe"])
