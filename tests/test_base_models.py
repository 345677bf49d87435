"""Pretrained tiny base models (llava/base_models): the CLIP objective, the LM's text, the Ray tasks and their cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llava.base_models.clip import contrastive_loss
from llava.base_models.config import BasePretrainConfig, ClipPretrainConfig, LmPretrainConfig
from llava.base_models.corpus import lm_documents, render_text
from tests.conftest import write_digits


def test_contrastive_loss_is_clips_symmetric_infonce_for_distinct_captions():
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(7.0)
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    clip = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert torch.allclose(contrastive_loss(image, text, torch.arange(6), scale), clip)


def test_contrastive_loss_counts_every_image_of_a_repeated_caption_as_a_positive():
    text = torch.eye(2)  # two distinct captions; images 0, 1 show the first, image 2 the second
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    crossed = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    of_image = torch.tensor([0, 0, 1])
    assert contrastive_loss(aligned, text, of_image, 10.0) < contrastive_loss(crossed, text, of_image, 10.0)
    # images with the same caption are not pushed apart: aligned reaches the optimum, where each text's target is
    # uniform over its images (text -> image: ln 2 for the first text, 0 for the second; image -> text: 0)
    optimum = torch.log(torch.tensor(2.0)) / 2 / 2
    assert abs(contrastive_loss(aligned, text, of_image, 10.0) - optimum) < 1e-3


def test_lm_text_is_the_stages_templates_with_a_written_mention_where_the_image_goes(tmp_path):
    turns = [{"from": "human", "value": "<image>\nWhat digit is this?"}, {"from": "gpt", "value": "7"}]
    text = render_text(turns, "vicuna_v1", "seven", "</s>")
    assert text.endswith("USER: seven\nWhat digit is this? ASSISTANT: 7</s>") and text.startswith("A chat")
    captions = write_digits(tmp_path / "stage1", "stage1", 20)
    docs = lm_documents([captions], [], generated=5, seed=0)
    assert len(docs) == 25
    captioned = [d for d in docs if "A handwritten digit" in d and d.endswith(").\n")]
    assert len(captioned) >= 20  # plain: "<mention>\n<caption>\n", the caption's digit named in the mention too
    for doc in captioned:
        mention, caption = doc.rstrip("\n").split("\n")[-2:]
        digit = caption.split("(")[1][0]
        assert digit in mention or caption.split()[3] in mention


@pytest.mark.slow  # two Ray tasks, then the command line's cached re-run
def test_pretrain_base_writes_hf_models_as_ray_tasks_and_a_rerun_skips_them(ray_local, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPVisionModel, LlamaForCausalLM

    from jobs.cli import main
    from llava.base_models.build import pretrain_base_models
    from llava.config import ImageConfig, ModelConfig
    from llava.model import LlavaModel

    config = BasePretrainConfig(
        out=str(tmp_path / "base"),
        captions=[write_digits(tmp_path / "stage1", "stage1", 48)],
        instructions=[write_digits(tmp_path / "stage2", "stage2", 48)],
        clip=ClipPretrainConfig(steps=3, batch_size=16, warmup_steps=1),
        lm=LmPretrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, corpus_documents=20),
    )
    found = pretrain_base_models(config)
    assert found["cached"] == [] and found["metrics"]["vision"]["images"] == 48
    assert 2 <= found["metrics"]["vision"]["texts"] <= 10  # one caption per digit
    vision = CLIPVisionModel.from_pretrained(found["vision_tower"])  # the paths a real CLIP and Vicuna go through
    assert vision.config.num_hidden_layers == config.sizes.vision_layers
    assert AutoImageProcessor.from_pretrained(found["vision_tower"]).crop_size["height"] == 32
    llm, tokenizer = LlamaForCausalLM.from_pretrained(found["llm"]), AutoTokenizer.from_pretrained(found["llm"])
    assert llm.config.vocab_size == len(tokenizer) and tokenizer.tokenize(" seven") == ["Ġseven"]
    model = LlavaModel.from_config(
        ModelConfig(vision_tower=found["vision_tower"], llm=found["llm"], image=ImageConfig(size=32))
    )
    assert model.num_image_tokens == 16
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "base").rglob("*.safetensors")}

    config.lm.steps = 4  # only the LM's fingerprint changes
    again = pretrain_base_models(config)
    assert again["cached"] == ["vision"]
    assert (tmp_path / "base" / "vision" / "model.safetensors").stat().st_mtime_ns == stamps[
        tmp_path / "base" / "vision" / "model.safetensors"
    ]

    args = [f"captions=[{config.captions[0]}]", f"instructions=[{config.instructions[0]}]"]
    args += ["clip.steps=3", "clip.batch_size=16", "clip.warmup_steps=1", "lm.steps=4", "lm.batch_size=4"]
    args += ["lm.seq_len=32", "lm.warmup_steps=1", "lm.corpus_documents=20"]
    assert main(["pretrain-base", "--out", config.out, *args]) == 0  # same config: nothing runs
    printed = json.loads(capsys.readouterr().out)
    assert printed["cached"] == ["vision", "llm"] and printed["llm"] == found["llm"]
