"""Serve a model behind an OpenAI-compatible chat API with images (Ray Serve, autoscaled).

`--config` takes a YAML of serve.config.ServeConfig fields or a Serve config file such as
serve/config.yaml (the app's `args` are used), so one file serves with `llava-ray serve`,
`serve run` and a KubeRay RayService. Prints one JSON line with the URLs once the app is up,
then serves until Ctrl-C or SIGTERM, and then drains (in-flight requests finish) and exits 0.
"""

import argparse

from jobs.arguments import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="llava-ray checkpoint, training run dir, HF export, llava-hf or official LLaVA checkpoint "
        "(local or s3://); template=NAME sets the template of a checkpoint that records none",
    )
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", default=None, type=int, help="HTTP port (default 8000)")
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve on a non-loopback --host without an API key (refused otherwise)",
    )
    add_config_arguments(parser, "autoscaling.max_replicas=4 replica.num_gpus=1")


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from jobs.output import emit
    from llava.config import load_config
    from llava.ray_runtime import init_ray
    from serve.app import check_exposure, run_local, wait_until_interrupted
    from serve.config import ServeConfig, serve_config_layer

    # --config: our fields, or a Serve config file (serve/config.yaml) whose app args they are
    layers = [serve_config_layer(args.config)] if args.config else []
    given = {
        "model": args.model,
        "host": args.host,
        "port": args.port,
        "allow_unauthenticated": "true" if args.allow_unauthenticated else None,
    }
    config = load_config(ServeConfig, layers, [f"{k}={v}" for k, v in given.items() if v] + args.overrides)
    try:
        check_exposure(config)  # before starting anything: no API key on a non-loopback host needs the flag
    except ValueError as exc:
        print(f"llava-ray serve: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")  # slow starts on small machines
    init_ray(args.address, s3_endpoint=args.s3_endpoint)
    url = run_local(config)
    emit({"url": url, "openai_base_url": f"{url}/v1", "model": config.model_name, "chat_page": f"{url}/"})
    wait_until_interrupted()
    return 0
