"""Training job configs: presets load and type-check, the global batch survives any cluster size."""

import copy

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


def test_tri_state_switches_are_typed_booleans_with_none_for_auto(tmp_path):
    config = load_train_config("pretrain", overrides=DATA + ["workers.use_gpu=true", "deepspeed.bf16=False"])
    assert (config.workers.use_gpu, config.deepspeed.bf16) == (True, False)
    assert load_train_config("pretrain", overrides=DATA).workers.use_gpu is None  # default: auto
    # "auto" (the earlier spelling, still in YAML files and command lines) and a quoted "true" keep working
    config = load_train_config("pretrain", overrides=DATA + ["workers.use_gpu=auto", 'deepspeed.bf16="true"'])
    assert (config.workers.use_gpu, config.deepspeed.bf16) == (None, True)
    (tmp_path / "job.yaml").write_text("workers: {use_gpu: true}\ndeepspeed: {bf16: auto}\n")
    config = load_train_config("pretrain", path=str(tmp_path / "job.yaml"), overrides=DATA)
    assert (config.workers.use_gpu, config.deepspeed.bf16) == (True, None)
    with pytest.raises(Exception, match="'maybe' is not a valid bool[\\s\\S]*workers.use_gpu"):
        load_train_config("pretrain", overrides=DATA + ["workers.use_gpu=maybe"])


def test_the_serving_config_takes_auto_the_same_way():
    from llava.config import config_from_dict, load_config
    from serve.config import ServeConfig

    assert load_config(ServeConfig).replica.num_gpus is None  # auto: one GPU when the cluster has GPUs
    assert load_config(ServeConfig, None, ["replica.num_gpus=auto"]).replica.num_gpus is None
    assert load_config(ServeConfig, None, ["replica.num_gpus=-1"]).replica.num_gpus is None  # the earlier spelling
    assert config_from_dict(ServeConfig, {"replica": {"num_gpus": 0}}).replica.num_gpus == 0
    with pytest.raises(ValueError, match="replica.num_gpus must be >= 0"):
        load_config(ServeConfig, None, ["replica.num_gpus=-2"])


def test_a_loaded_config_is_checked_without_being_changed():
    config = load_train_config("finetune", preset="v1_5", overrides=DATA)
    before = copy.deepcopy(config)
    assert config.validate() is config and config == before  # checks only, however often it runs
    with pytest.raises(ValueError, match="deepspeed.zero_stage must be 0-3, got 5"):
        load_train_config("pretrain", overrides=DATA + ["deepspeed.zero_stage=5"])
    with pytest.raises(ValueError, match="workers.num_workers must be positive"):
        load_train_config("pretrain", overrides=DATA + ["workers.num_workers=0"])


def test_the_preset_can_be_named_in_the_file_and_the_flag_wins(tmp_path):
    (tmp_path / "job.yaml").write_text("preset: v1_5\noptim: {epochs: 2}\n")
    config = load_train_config("pretrain", path=str(tmp_path / "job.yaml"), overrides=DATA)
    assert (config.preset, config.optim.global_batch_size, config.optim.epochs) == ("v1_5", 256, 2)
    config = load_train_config("pretrain", preset="demo", path=str(tmp_path / "job.yaml"), overrides=DATA)
    assert config.preset == "demo" and config.workers.use_gpu is False and config.optim.epochs == 2
