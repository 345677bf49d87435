"""Training health and tracking on a real Ray Train run (2 DeepSpeed CPU workers, gloo).

A step with a non-finite loss is made with the `health.inject_nonfinite_steps` drill (that step's loss
becomes NaN on every rank, as a corrupt batch or an overflow would make it). The weights are checked
through the audit dir's per-checkpoint checksums (a checkpoint after every step): a skipped step
leaves them as they were.
"""

import math
from pathlib import Path

import pytest

from tests.test_training import audit, demo_config
from tests.tracking_readers import tensorboard_scalars, tensorboard_texts

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # training runs


@pytest.fixture(scope="module")
def digits(ray_local, tmp_path_factory):
    from llava.data.prepare import prepare_digits

    out = tmp_path_factory.mktemp("digits")
    prepare_digits(str(out))
    return out


def projector_by_step(audit_dir) -> dict[int, str]:
    _, sums = audit(audit_dir)
    return {s["step"]: s["checksums"]["projector"] for s in sums}


def test_nonfinite_step_is_skipped_counted_and_tracked(base_models, digits, ray_local, tmp_path):
    from llava.training.trainer import train

    runs, audit_dir = tmp_path / "runs", tmp_path / "audit"
    result = train(
        demo_config(
            "pretrain",
            base_models,
            digits / "stage1",
            runs,
            "nan",
            "optim.max_steps=4",
            "checkpoint.every_steps=1",
            "checkpoint.keep=5",
            f"audit_dir={audit_dir}",
            "health.inject_nonfinite_steps=[2]",
            "tracking.backend=tensorboard",
        )
    )
    assert result.steps == 4  # the run completes
    by_step = {m["step"]: m for m in result.metrics}
    assert [by_step[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 0, 0]
    assert by_step[4]["skipped_steps_total"] == 1
    assert math.isnan(by_step[2]["loss"]) and "grad_norm" not in by_step[2]
    assert all(by_step[s]["grad_norm"] > 0 and math.isfinite(by_step[s]["loss"]) for s in (1, 3, 4))
    weights = projector_by_step(audit_dir)
    assert weights[2] == weights[1] and weights[3] != weights[2]  # step 2 changed nothing; training went on
    assert by_step[2]["lr"] == by_step[1]["lr"] != by_step[3]["lr"]  # nor did it advance the schedule

    log_dir = runs / "nan" / "tensorboard"  # what rank 0 and the driver sent to TensorBoard
    scalars = tensorboard_scalars(str(log_dir))
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4] and scalars["train/skipped_steps"][2] == 1
    for name in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "data_wait_s", "padding_fraction"):
        assert scalars[f"train/{name}"][4] == pytest.approx(by_step[4][name]), name
    texts = tensorboard_texts(str(log_dir))
    assert "| optim.max_steps | 4 |" in texts["config"][0][1]
    assert (4, result.checkpoint) in texts["checkpoint"]


def test_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_error(base_models, digits, ray_local, tmp_path):
    from llava.training.trainer import train

    audit_dir = tmp_path / "audit"
    config = demo_config(
        "pretrain",
        base_models,
        digits / "stage1",
        tmp_path / "runs",
        "diverged",
        "optim.max_steps=6",
        "checkpoint.every_steps=1",
        "checkpoint.keep=5",
        "checkpoint.max_failures=0",
        f"audit_dir={audit_dir}",
        "deepspeed.zero_stage=0",
        "health.inject_nonfinite_steps=[2,3]",
        "health.max_consecutive_skips=2",
    )
    with pytest.raises(Exception, match="training diverged: 2 optimizer steps in a row"):
        train(config)
    weights = projector_by_step(audit_dir)  # ZeRO-0: our own check dropped the gradients of step 2
    assert sorted(weights) == [1, 2] and weights[2] == weights[1]


def test_deepspeed_skips_a_nonfinite_step_in_zero0_and_zero2():
    """One process, a real DeepSpeed engine: the NaN step changes no weight and no learning rate, in ZeRO-0 (our
    own check) and ZeRO-2 (DeepSpeed's), and both count it and report the same gradient norms."""
    import json
    import subprocess
    import sys

    from tests.serve_fixtures import free_port

    run = subprocess.run(
        [sys.executable, "-m", "tests.health_drill", str(free_port())],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for zero in ("0", "2"):
        r = results[zero]
        assert r["applied"] == [True, False, True, True] and r["changed"] == [True, False, True, True], zero
        assert r["finite"] and r["lr"][1] == r["lr"][0] and r["lr"][2] < r["lr"][1], zero
        assert r["metrics"]["skipped_steps"] == 1 and r["metrics"]["grad_norm"] > 0, zero
    assert results["0"]["metrics"]["grad_norm"] == pytest.approx(results["2"]["metrics"]["grad_norm"], rel=1e-5)
