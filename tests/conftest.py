"""Shared fixtures: tiny offline base models built once per test session."""

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

pytest_plugins = ["tests.s3_server"]  # the real S3-compatible server fixtures


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
