"""Stage 2, instruction tuning: train projector + LLM (or LoRA adapters) from the stage-1 output (init_from=URI)."""

from jobs.train_job import add_train_arguments

add_arguments = add_train_arguments


def run(args) -> int:
    from jobs.train_job import run_train

    return run_train("finetune", args)
