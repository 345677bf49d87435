"""The serving config: one typed dataclass, loaded from YAML (`serve/config.yaml`'s `args`) or the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llava.config import AUTO


@dataclass
class AutoscalingConfig:  # Ray Serve's autoscaling_config fields
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4  # requests in flight per replica the autoscaler aims for
    upscale_delay_s: float = 10
    downscale_delay_s: float = 60


@dataclass
class ReplicaConfig:
    num_cpus: float = 1
    num_gpus: Optional[float] = field(default=None, metadata=AUTO)  # None / auto: 1 when the cluster has GPUs, else 0
    max_ongoing_requests: int = 32  # beyond this a replica queues no more; the router sends elsewhere
    # torch intra-op threads in the replica; None: Ray's default (num_cpus). On CPU a decode step is many small ops,
    # and on shared or busy cores 1 thread is often faster than several (each op's threads wait for each other)
    torch_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_gpus is not None and self.num_gpus < 0:
            if self.num_gpus != -1:
                raise ValueError(f"replica.num_gpus must be >= 0, or auto (null), got {self.num_gpus}")
            self.num_gpus = None  # -1: how auto was written before
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"replica.torch_threads must be >= 1, or null (Ray's default), got {self.torch_threads}")


@dataclass
class BatchingConfig:  # continuous batching (serve/scheduler.py): requests join the decode loop at any step
    max_batch_size: int = 16  # rows decoded together per replica; more requests wait for a row to finish
    prefill_chunk_tokens: int = 256  # a joining prompt is prefilled this many tokens per decode step

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.prefill_chunk_tokens < 1:
            raise ValueError(
                f"batching.max_batch_size and batching.prefill_chunk_tokens must be >= 1, got "
                f"{self.max_batch_size} and {self.prefill_chunk_tokens}"
            )


@dataclass
class LimitsConfig:
    max_images: int = 4  # images per request
    max_image_bytes: int = 10 * 2**20  # encoded bytes per image (data URL or download)
    max_image_pixels: int = 4096 * 4096  # width x height, read from the header before decoding
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when the request gives none
    max_request_bytes: int = 32 * 2**20  # the whole JSON body (refused on Content-Length, capped while reading)
    max_messages: int = 64  # messages per request
    max_text_chars: int = 100_000  # characters of text over all messages, counted before tokenising
    decode_workers: int = 2  # images decoded at once per replica (bounds decoding memory, see serve/README.md)


@dataclass
class ImageFetchConfig:  # http(s) image URLs
    enabled: bool = True
    timeout_s: float = 10  # one deadline per fetch: DNS, connect, headers and body together
    max_concurrent: int = 8  # downloads at once per replica (their own threads); queued ones share the deadline
    max_redirects: int = 3
    # Hosts or networks (CIDR) that may be fetched even though they are loopback, private or
    # link-local, e.g. ["127.0.0.1/32", "images.internal"]. Everything else of that kind is refused (SSRF).
    allow: list[str] = field(default_factory=list)


@dataclass
class ServeConfig:
    model: str = (
        ""  # llava-ray checkpoint, training run dir, llava-hf or official LLaVA checkpoint (local dir or s3://)
    )
    model_name: str = "llava"  # the id clients pass as `model` and /v1/models lists
    template: Optional[str] = (
        None  # conversation template for a checkpoint that records none (official LLaVA: vicuna_v1)
    )
    engine: str = "llava"  # "llava": our model in the replica (CPU or GPU); "vllm": Ray Serve LLM (GPU, HF export)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str = "LLAVA_RAY_API_KEY"  # when this env var is set, every endpoint but /health needs the bearer key
    # `llava-ray serve` on a non-loopback host refuses to start without an API key unless this is true
    allow_unauthenticated: bool = False
    drain_timeout_s: float = 30  # on SIGTERM: in-flight requests get this long to finish
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    image_fetch: ImageFetchConfig = field(default_factory=ImageFetchConfig)


def serve_config_layer(path: str, app_name: str = "llava") -> dict:
    """The ServeConfig fields in a YAML file: either the fields themselves, or a Serve config file
    (`applications: [{name, import_path: serve.app:build_app, args: {...}}]`) whose app `args` they are."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if "applications" not in data:
        return data
    apps = [a for a in data["applications"] if a.get("import_path") == "serve.app:build_app"]
    chosen = [a for a in apps if a.get("name") == app_name] or apps
    if not chosen:
        raise ValueError(f"{path} is a Serve config file without an application importing serve.app:build_app")
    return chosen[0].get("args") or {}
