"""Evaluate a trained model: ScienceQA accuracy or LLaVA-Bench relative score (batch inference on Ray Data)."""

import argparse

from jobs.arguments import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    sqa = benchmarks.add_parser("scienceqa", help="ScienceQA accuracy (overall, by context, subject, grade)")
    sqa.add_argument(
        "--data", required=True, help="ScienceQA dir (problems.json, pid_splits.json, images/) or questions.parquet"
    )
    sqa.add_argument("--split", default="test")
    sqa.add_argument(
        "--prompt-format",
        default=None,
        choices=["CQM-A", "QCM-LEA"],
        help="CQM-A (default): LLaVA-1.5's (context, question, lettered options, 'Answer with the option's "
        "letter ...'); QCM-LEA: LLaVA v1's ScienceQA fine-tuning format (answers end 'The answer is X.')",
    )
    bench = benchmarks.add_parser("llava-bench", help="LLaVA-Bench relative score with an OpenAI-compatible judge")
    bench.add_argument("--questions", required=True, help="questions JSONL (question_id, image, text, category)")
    bench.add_argument("--context", required=True, help="context JSONL (image, caption | captions + instances)")
    bench.add_argument("--references", required=True, help="reference answers JSONL (question_id, text)")
    bench.add_argument("--images", default=None, help="image dir (default: images/ next to --questions)")
    bench.add_argument(
        "--judge-endpoint", required=True, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1"
    )
    bench.add_argument("--judge-model", required=True, help="judge model name")
    bench.add_argument(
        "--rules",
        default=None,
        help="judge rules JSON {category: {role, prompt}}, e.g. the official "
        "llava/eval/table/rule.json (default: built-in rules per category)",
    )
    for sub in (sqa, bench):
        sub.add_argument("--model", required=True, help="llava-ray checkpoint or training run dir (local or s3://)")
        sub.add_argument("--out", required=True, help="output dir (predictions, metrics; local or s3://)")
        add_config_arguments(sub, "infer.batch_size=16 infer.max_new_tokens=1024 judge.concurrency=8")


def run(args: argparse.Namespace) -> int:
    from jobs.output import emit
    from llava.config import load_config
    from llava.ray_runtime import init_ray

    given = {"infer.model": args.model, "infer.out": args.out}
    if args.benchmark == "scienceqa":
        from llava.evaluation.scienceqa import ScienceQAConfig as Config, evaluate_scienceqa as evaluate

        given.update({"data": args.data, "split": args.split, "prompt_format": args.prompt_format})
    else:
        from llava.evaluation.llava_bench import LlavaBenchConfig as Config, evaluate_llava_bench as evaluate

        given.update(
            {
                "questions": args.questions,
                "context": args.context,
                "references": args.references,
                "images": args.images,
                "judge.url": args.judge_endpoint,
                "judge.model": args.judge_model,
                "rules": args.rules,
            }
        )
    config = load_config(Config, args.config, [f"{k}={v}" for k, v in given.items() if v] + args.overrides)
    init_ray(args.address, s3_endpoint=args.s3_endpoint)
    emit(evaluate(config))
    return 0
