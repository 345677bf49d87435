"""Shared fixtures: tiny offline base models built once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402


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
