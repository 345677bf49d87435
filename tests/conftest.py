"""Shared fixtures: tiny offline base models built once per test session."""

import functools
import os
from pathlib import Path

# Tests run offline and keep every cache and temp dir inside the clone's .cache/.
_CACHE = Path(__file__).resolve().parent.parent / ".cache"
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HOME": str(_CACHE / "huggingface"),
    "TORCH_EXTENSIONS_DIR": str(_CACHE / "torch_extensions"),
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
}.items():
    os.environ.setdefault(_name, _value)
# Ray's unix sockets live under RAY_TMPDIR and their paths must stay short (~107 bytes).
_RAY_TMP = _CACHE / "ray" if len(str(_CACHE)) < 48 else Path("/tmp") / f"llava-ray-{os.getuid()}"
os.environ.setdefault("RAY_TMPDIR", str(_RAY_TMP))
_RAY_TMP.mkdir(parents=True, exist_ok=True)

import pytest  # noqa: E402

pytest_plugins = ["tests.s3_server", "tests.serve_fixtures"]  # real S3 server; the chat API on Ray Serve


# Tests that use these fixtures, directly or through other fixtures, are `slow` (see pyproject.toml): a local Ray
# cluster takes tens of seconds to start and warm up on 2 cores, and its jobs seconds each; the Serve app more.
SLOW_FIXTURES = {"ray_local", "chat_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def base_models(tmp_path_factory):
    """{"vision_tower": dir, "llm": dir}: tiny CLIP + Llama + BPE tokenizer saved as HF directories."""
    from llava.tiny_models import build_tiny_base_models

    return build_tiny_base_models(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def tokenizer(base_models):
    from transformers import AutoTokenizer

    from llava.tokenization import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(base_models["llm"]), "chatml")


@pytest.fixture(scope="session")
def sp_tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    """{"legacy": dir, "non_legacy": dir}: Llama-style SentencePiece tokenizers (tokenizer.model +
    tokenizer_config.json only, as Vicuna / Llama-2 ship), trained offline."""
    from tests.sentencepiece_tokenizers import build_sentencepiece_tokenizer_dirs

    return build_sentencepiece_tokenizer_dirs(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def tiny_checkpoint(base_models, tmp_path_factory) -> str:
    """A saved llava-ray checkpoint (vicuna_v1 template, 32 px images, 200-token context) of the tiny models."""
    from llava.config import ImageConfig, ModelConfig
    from llava.model import LlavaModel

    config = ModelConfig(
        vision_tower=base_models["vision_tower"],
        llm=base_models["llm"],
        image=ImageConfig(size=32),
        template="vicuna_v1",
        max_length=200,
    )
    return str(LlavaModel.from_config(config).save_pretrained(tmp_path_factory.mktemp("ckpt") / "model"))


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down the session's Ray (see `ray_local`) when the test run ends."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(s3_server, _ray_session):
    """The session's local Ray, shared by every module that uses it (one start-up, not one per module).

    Started on first use with 4 logical CPUs (Ray Train workers and Ray Data tasks must both find a
    CPU slot, or a run deadlocks on a 2-core machine) and the test S3 server's endpoint exported to
    its workers; then kept. Module-scoped only so that it can come back: a module that needs a
    cluster of its own (Ray Serve, `tests/serve_fixtures.py`) shuts it down, and the next module
    that asks for `ray_local` starts it again; `init_ray` does nothing while Ray is up.
    """
    _ensure_session_ray(s3_server.endpoint)


_SESSION_RAY: dict[str, str] = {}  # the GCS address of the Ray that `ray_local` started


def _ensure_session_ray(s3_endpoint: str) -> None:
    import ray

    from llava.ray_runtime import init_ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _SESSION_RAY.get("gcs"):
        ray.shutdown()  # not ours (e.g. a default Ray that Ray Data started): 2 CPUs, no S3 endpoint
    init_ray(num_cpus=4, s3_endpoint=s3_endpoint)
    _SESSION_RAY["gcs"] = ray.get_runtime_context().gcs_address


def _ray_is_up() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(autouse=True)
def _no_stray_ray(request):
    """A test that starts Ray without asking for `ray_local` fails: Ray Data and Serve start a default Ray
    on first use (2 CPUs, no S3 endpoint) and later modules would silently share it."""
    if "ray_local" in request.fixturenames:  # module-scoped: make sure an earlier test did not stop or replace it
        _ensure_session_ray(request.getfixturevalue("s3_server").endpoint)
    was_up = _ray_is_up()
    yield
    if not was_up and _ray_is_up() and not SLOW_FIXTURES & set(request.fixturenames):
        import ray

        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} left a Ray of its own running: use the `ray_local` fixture", pytrace=False)


def png(seed: int, size: int = 40) -> bytes:
    """A random RGB PNG."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _digits() -> dict:
    from llava.data.digits import build_digits

    return build_digits()


def write_digits(path, split: str, rows: int) -> str:
    """A prepared dataset (one parquet shard, no manifest) with the first `rows` rows of a digits split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava.data.schema import SCHEMA

    chosen = _digits()[split][:rows]
    path.mkdir(parents=True)
    table = pa.Table.from_pylist([{**r, "image_paths": None} for r in chosen], schema=SCHEMA)
    pq.write_table(table, path / "part-0.parquet")
    return str(path)
