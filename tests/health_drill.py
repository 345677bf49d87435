"""A real DeepSpeed engine (one CPU process, gloo) taking four optimizer steps of two micro-batches each,
the second step with a NaN loss (the `inject_nonfinite_steps` drill), through llava.training.health;
prints, as JSON per ZeRO stage: which steps were applied, whether the weights changed at each step, the
learning rates and the health metrics. Run in its own process (it initialises torch.distributed):

    python -m tests.health_drill PORT
"""

import json
import os
import sys


def main(port: int) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    from llava.training.health import HealthConfig, StepHealth

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for zero in (0, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config={
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 2,
                "train_batch_size": 4,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": zero},
                "bf16": {"enabled": False},
            },
        )
        health = StepHealth(HealthConfig(inject_nonfinite_steps=[2]), zero)
        weights = [torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])]
        applied, lrs = [], []
        for step in range(4):
            for _ in range(2):  # micro-batches
                loss = health.loss(engine(torch.randn(2, 4)).pow(2).mean(), step)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.backward(loss)
                if boundary:
                    applied.append(health.optimizer_step(engine, step, [f"sample-{step}"]))
                else:
                    engine.step()
            weights.append(torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()]))
            lrs.append(engine.get_lr()[0])
        results[zero] = {
            "applied": applied,
            "changed": [not torch.equal(a, b) for a, b in zip(weights, weights[1:])],
            "finite": all(bool(torch.isfinite(w).all()) for w in weights),
            "lr": lrs,
            "metrics": health.interval_metrics(),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]))
