"""The reader feeds Ray Train workers: each worker streams its shard, together they see every row once.

Runs on this 2-core machine without the Train/Data CPU deadlock (PLATFORM.md): the local
Ray from `init_ray` has more logical CPUs than training workers reserve.
"""

import json

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from llava.ray_runtime import init_ray

    init_ray(num_cpus=4)
    yield
    ray.shutdown()


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
    config = ModelConfig(vision_tower=base_models["vision_tower"], llm=base_models["llm"], template="vicuna_v1",
                         image=ImageConfig(size=32), max_length=512)
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
