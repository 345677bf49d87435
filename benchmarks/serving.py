"""Serving throughput and latency: our Ray Serve chat endpoint vs. per-request `generate` in one process.

    python benchmarks/serving.py [--concurrency 1 4 16] [--requests 48] [--max-tokens 32]
                                 [--llm-width 128] [--llm-layers 2] [--replicas 1] [--max-batch-size 16]
                                 [--baseline serial|threads] [--torch-threads N] [--out-dir DIR]

Both sides answer the same requests (a question + one PNG each, greedy: temperature 0, the same
max_tokens) with the same model (the tiny offline models of llava.tiny_models, LLM size from the
flags, saved as a llava-ray checkpoint) on this machine:

- ours: `serve.app.run_local` on a local Ray: the `LlavaChat` deployment with a fixed number of
  replicas (autoscaling min = max = --replicas, default 1) of --replica-cpus CPUs each (default: all
  cores; Ray gives the replica that many torch threads), continuous batching (serve/scheduler.py; at most
  --max-batch-size rows decoded together); clients POST /v1/chat/completions (non-streaming, the image as a base64 data URL)
  over HTTP keep-alive (http.client), one client thread per concurrent client.
- baseline: the same client threads call, in this process, per request `encode_prompt` (template,
  image preprocessing) + `LlavaModel.generate` on a batch of one (greedy, the template's stop
  tokens) -- HF `generate`, the way one would answer a single prompt without batching. With `--baseline serial`
  (default) the clients hand their requests to a one-thread pool that runs them one at a time in
  arrival order (a single model behind a simple FIFO worker); with `--baseline threads` the client
  threads call `generate` concurrently themselves.

Per concurrency level each side gets a warm-up, then --requests requests spread over the clients.
Latency is per request as the client sees it (queueing included). The script prints the machine,
the load average, completion tokens on both sides, how many answers agree, and a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

KEY_ENV = "LLAVA_RAY_BENCH_API_KEY"  # never set: the benchmark server needs no key
QUESTIONS = [
    "What is shown in the image?",
    "Describe the image concisely.",
    "What digit is in the image?",
    "Provide a brief description of the given image.",
    "Is the number even or odd?",
]


def png(seed: int, size: int = 48) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_checkpoint(out: Path, width: int, layers: int) -> str:
    from llava.config import ImageConfig, ModelConfig
    from llava.model import LlavaModel
    from llava.tiny_models import TinySizes, build_tiny_base_models

    path = out / f"model-w{width}-l{layers}"
    if not (path / "llava_config.json").exists():
        base = build_tiny_base_models(
            out / f"base-w{width}-l{layers}",
            TinySizes(llm_width=width, llm_layers=layers, llm_heads=max(4, width // 64)),
        )
        config = ModelConfig(
            vision_tower=base["vision_tower"],
            llm=base["llm"],
            image=ImageConfig(size=32),
            template="vicuna_v1",
            max_length=2048,
        )
        LlavaModel.from_config(config).save_pretrained(path)
    return str(path)


def make_requests(n: int) -> list[dict]:
    """n distinct (question, image) requests."""
    return [{"question": QUESTIONS[i % len(QUESTIONS)], "image": png(1000 + i)} for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def drive(call, requests: list[dict], concurrency: int) -> dict:
    """Run `call(request) -> (text, completion_tokens)` for every request from `concurrency` client threads."""
    latencies, answers, tokens = [0.0] * len(requests), [""] * len(requests), [0] * len(requests)
    next_index, lock = [0], threading.Lock()

    def client():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(requests):
                return
            started = time.perf_counter()
            answers[i], tokens[i] = call(requests[i])
            latencies[i] = time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    return {
        "rps": len(requests) / wall,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "wall_s": wall,
        "tokens": sum(tokens),
        "answers": answers,
    }


class Endpoint:
    """Our Serve app on a local Ray; `__call__` is one client request over HTTP."""

    def __init__(self, checkpoint: str, args):
        from llava.ray_runtime import init_ray
        from serve.app import run_local
        from serve.config import AutoscalingConfig, BatchingConfig, ReplicaConfig, ServeConfig

        os.environ.pop(KEY_ENV, None)
        init_ray(num_cpus=max(4, os.cpu_count() or 1))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = ServeConfig(
            model=checkpoint,
            model_name="bench",
            port=port,
            api_key_env=KEY_ENV,
            autoscaling=AutoscalingConfig(min_replicas=args.replicas, max_replicas=args.replicas),
            replica=ReplicaConfig(
                num_cpus=args.replica_cpus, num_gpus=0, max_ongoing_requests=64, torch_threads=args.torch_threads
            ),
            batching=BatchingConfig(max_batch_size=args.max_batch_size),
        )
        run_local(config)
        self.host, self.port = config.host, config.port
        self.max_tokens = args.max_tokens
        self.local = threading.local()

    def __call__(self, request: dict) -> tuple[str, int]:
        import http.client

        url = "data:image/png;base64," + base64.b64encode(request["image"]).decode()
        body = {
            "model": "bench",
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": request["question"]},
                    ],
                }
            ],
        }
        connection = getattr(self.local, "connection", None)
        if connection is None:  # one keep-alive connection per client thread
            connection = self.local.connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        connection.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        reply = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {reply}")
        return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]

    def close(self):
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


class Baseline:
    """Per-request greedy HF `generate` on a batch of one, in this process."""

    def __init__(self, checkpoint: str, args):
        from llava.model_loading import load_model
        from llava.templates import get_template
        from llava.tokenization import stop_token_ids

        self.model = load_model(checkpoint, device="cpu")
        self.template = get_template(self.model.config.template)
        self.stops = stop_token_ids(self.model.tokenizer, self.template)
        self.max_tokens = args.max_tokens
        # serial: one worker thread takes the requests in arrival order (FIFO), one at a time
        self.worker = ThreadPoolExecutor(1) if args.baseline == "serial" else None

    def __call__(self, request: dict) -> tuple[str, int]:
        if self.worker is None:
            return self.answer(request)
        return self.worker.submit(self.answer, request).result()

    def answer(self, request: dict) -> tuple[str, int]:
        import numpy as np
        import torch

        from llava.generation import Prompt, encode_prompt

        model = self.model
        prompt = Prompt([{"from": "human", "value": "<image>\n" + request["question"]}], [request["image"]])
        encoded = encode_prompt(model, prompt)
        input_ids = torch.tensor([encoded.input_ids])  # (1, L)
        pixels = torch.from_numpy(np.stack(encoded.pixel_values))  # (1, 3, S, S)
        with torch.no_grad():
            new = model.generate(
                input_ids,
                pixel_values=pixels,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_tokens,
                do_sample=False,
                eos_token_id=self.stops,
            )[0].tolist()
        cut = next((i for i, token in enumerate(new) if token in self.stops), len(new))
        text = model.tokenizer.decode(new[:cut], skip_special_tokens=True)
        hits = [text.index(s) for s in self.template.stop_strings if s and s in text]
        text = text[: min(hits, default=len(text))].strip()  # cut at the first stop string, as the endpoint does
        return text, min(cut + 1, len(new))  # the stop token counts, as it does in the endpoint's usage


def replica_threads(cpus: float) -> int:
    """torch's thread count in a Ray actor given `cpus` CPUs (what the Serve replica gets)."""
    import ray

    @ray.remote(num_cpus=cpus)
    def threads():
        import torch

        return torch.get_num_threads()

    return ray.get(threads.remote())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="timed requests per side and concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--llm-width", type=int, default=128, help="tiny LLM hidden size (llava.tiny_models: 128)")
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1, help="Serve replicas (autoscaling min = max)")
    parser.add_argument("--replica-cpus", type=float, default=float(os.cpu_count() or 1))
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows the decode loop runs together")
    parser.add_argument("--baseline", choices=["serial", "threads"], default="serial")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads on both sides (replica.torch_threads and the baseline process); default: "
        "the replica gets --replica-cpus threads, the baseline torch's default",
    )
    parser.add_argument("--out-dir", default=str(ROOT / ".cache" / "benchmarks" / "serving"))
    args = parser.parse_args()
    import logging

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    out = Path(args.out_dir)
    checkpoint = build_checkpoint(out, args.llm_width, args.llm_layers)
    requests = make_requests(args.requests)
    warmup = make_requests(args.requests + 4)[args.requests :]  # not timed, not repeated in the timed set

    endpoint = Endpoint(checkpoint, args)
    threads_replica = args.torch_threads or replica_threads(args.replica_cpus)
    baseline = Baseline(checkpoint, args)
    params = sum(p.numel() for p in baseline.model.parameters())
    results = {}
    for c in args.concurrency:  # interleaved per level, so drifting machine load hits both sides alike
        for name, side in (("ours", endpoint), ("baseline", baseline)):
            drive(side, [warmup[i % len(warmup)] for i in range(max(2, c))], c)
            results[(name, c)] = drive(side, requests, c)
            r = results[(name, c)]
            print(
                f"  {name:8s} c={c:<3d} {r['rps']:7.2f} req/s  p50 {r['p50'] * 1000:7.1f} ms  "
                f"p95 {r['p95'] * 1000:7.1f} ms  ({r['tokens']} completion tokens)",
                flush=True,
            )
    endpoint.close()

    total = time.perf_counter() - started
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; {total:.0f} s in all"
    )
    print(
        f"model: {params / 1e6:.2f}M parameters (tiny CLIP 32 px, 16 image tokens; Llama width {args.llm_width}, "
        f"{args.llm_layers} layers), vicuna_v1, fp32 CPU; greedy, max_tokens {args.max_tokens}; "
        f"{args.requests} requests per level (question + one 48 px PNG each)"
    )
    print(
        f"ours: Serve, {args.replicas} replica(s) (autoscaling min = max), {args.replica_cpus:g} CPUs / "
        f"{threads_replica} torch threads each, continuous batching, at most {args.max_batch_size} rows, "
        f"HTTP non-streaming; baseline: per-request generate (batch of one) in the client process, "
        f"{'one at a time, FIFO' if args.baseline == 'serial' else 'concurrent threads'}, "
        f"{torch.get_num_threads()} torch threads\n"
    )
    print(
        "| clients | ours req/s | ours p50 ms | ours p95 ms | baseline req/s | baseline p50 ms | baseline p95 ms "
        "| req/s ours/baseline | p50 ours/baseline | answers equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        o, b = results[("ours", c)], results[("baseline", c)]
        same = sum(x.strip() == y.strip() for x, y in zip(o["answers"], b["answers"]))
        print(
            f"| {c} | {o['rps']:.2f} | {o['p50'] * 1000:.0f} | {o['p95'] * 1000:.0f} | {b['rps']:.2f} | "
            f"{b['p50'] * 1000:.0f} | {b['p95'] * 1000:.0f} | {o['rps'] / b['rps']:.2f}x | "
            f"{o['p50'] / b['p50']:.2f}x | {same}/{len(requests)} |"
        )
    print(
        json.dumps({f"{name}@{c}": {k: v for k, v in r.items() if k != "answers"} for (name, c), r in results.items()})
    )


if __name__ == "__main__":
    main()
