"""Stage 1, feature alignment: train the projector on image-caption data (vision tower and LLM frozen)."""

from jobs.train_job import add_train_arguments

add_arguments = add_train_arguments


def run(args) -> int:
    from jobs.train_job import run_train

    return run_train("pretrain", args)
