"""The reader feeds Ray Train workers: each worker streams its shard, together they see every row once.

Runs on a 2-core machine without the Train/Data CPU deadlock (with `ray.init(num_cpus=2)`, two
1-CPU training workers leave Ray Data no CPU and it waits forever): the session's Ray
(`ray_local`, started by `init_ray`) has 4 logical CPUs, more than the training workers reserve.
"""

import json

import pytest

pytestmark = pytest.mark.slow  # a Ray Train run


def _loop(config):
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    ids = []
    for batch in shard.iter_batches(batch_size=16, batch_format="pyarrow"):
        ids += batch.column("id").to_pylist()
    rank = ray.train.get_context().get_world_rank()
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(ids, f)
    ray.train.report({"rows": len(ids)})


def test_two_workers_stream_disjoint_shards_covering_all_rows(ray_local, base_models, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llava.config import ImageConfig, ModelConfig
    from llava.data.prepare import prepare_digits
    from llava.data.reader import model_ready_dataset

    manifests = prepare_digits(str(tmp_path / "digits"))
    config = ModelConfig(
        vision_tower=base_models["vision_tower"],
        llm=base_models["llm"],
        template="vicuna_v1",
        image=ImageConfig(size=32),
        max_length=512,
    )
    dataset = model_ready_dataset([str(tmp_path / "digits" / "eval")], config, 16)
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": dataset},
        run_config=RunConfig(name="reader-feeds-train", storage_path=str(tmp_path / "ray_results")),
    )
    trainer.fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(len(ids) > 0 for ids in seen)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == manifests["eval"].rows == 300
