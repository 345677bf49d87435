"""HF export: stock transformers loads our model and gives the same logits and tokens."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava.config import ImageConfig, ModelConfig, ProjectorConfig
from llava.export_hf import export_hf
from llava.model import LlavaModel
from llava.tokenization import tokenize_prompt

TEMPLATES = ["plain", "vicuna_v1", "llava_v1", "v1_paper", "llama_2", "chatml"]


def make_model(base_models, template="vicuna_v1", projector="mlp2x_gelu"):
    torch.manual_seed(0)
    config = ModelConfig(
        vision_tower=base_models["vision_tower"],
        llm=base_models["llm"],
        template=template,
        projector=ProjectorConfig(type=projector, num_queries=4, qformer_heads=4),
        image=ImageConfig(size=32, aspect="crop"),
        max_length=512,
    )
    model = LlavaModel.from_config(config)
    with torch.no_grad():  # a projector far from init so a wrong mapping would show in the logits
        for p in model.projector.parameters():
            p.normal_(0, 0.3)
    return model


def picture(seed, size=(50, 40)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def exported(base_models, tmp_path_factory):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = make_model(base_models)
    result = export_hf(model, tmp_path_factory.mktemp("export") / "hf")
    assert result.format == "hf-llava"
    return model, AutoProcessor.from_pretrained(result.path), LlavaForConditionalGeneration.from_pretrained(result.path)


def test_stock_transformers_gives_the_same_logits(exported):
    model, processor, hf_model = exported
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is this?"}]},
        {"role": "assistant", "content": "A seven."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
    ]
    text = processor.apply_chat_template(messages)
    inputs = processor(text=text, images=[picture(0), picture(1, (30, 90))], return_tensors="pt")
    ours_ids, n_images = tokenize_prompt(
        [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A seven."},
            {"from": "human", "value": "And this one? <image>"},
        ],
        model.tokenizer,
        model.config.template,
        model.num_image_tokens,
    )
    assert inputs["input_ids"][0].tolist() == ours_ids and n_images == 2
    with torch.no_grad():
        theirs = hf_model(**inputs).logits
        ours = model(inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert (theirs - ours).abs().max().item() < 1e-4


def test_generate_on_the_exported_model_matches_ours(exported):
    model, processor, hf_model = exported
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nDescribe it."}]}]
    inputs = processor(text=processor.apply_chat_template(messages), images=[picture(2)], return_tensors="pt")
    theirs = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    ours = model.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=6, do_sample=False)[0]
    assert theirs.tolist() == ours.tolist()
    assert len(ours) == 6


@pytest.mark.parametrize("template", TEMPLATES)
def test_exported_chat_template_renders_like_training(base_models, template):
    """The processor's Jinja template produces exactly our prompt ids, for every template."""
    from transformers import LlavaProcessor

    from llava.export_hf import build_processor

    model = make_model(base_models, template=template)
    processor: LlavaProcessor = build_processor(model)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat digit?"}]},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Even or odd?" if template != "plain" else [{"type": "image"}]},
    ]
    conversation = [
        {"from": "human", "value": "<image>\nWhat digit?"},
        {"from": "gpt", "value": "Seven."},
        {"from": "human", "value": "Even or odd?" if template != "plain" else "<image>"},
    ]
    images = [picture(3)] if template != "plain" else [picture(3), picture(4)]
    inputs = processor(text=processor.apply_chat_template(messages), images=images, return_tensors="pt")
    ours, _ = tokenize_prompt(conversation, model.tokenizer, template, model.num_image_tokens)
    assert inputs["input_ids"][0].tolist() == ours


def test_other_projectors_export_our_own_format_and_say_so(base_models, tmp_path):
    model = make_model(base_models, projector="qformer")
    result = export_hf(model, tmp_path / "out")
    assert result.format == "llava-ray"
    assert "qformer" in result.message and "mlp2x_gelu" in result.message
    reloaded = LlavaModel.from_pretrained(result.path)
    ids = torch.tensor([[1] + [model.image_token_id] * model.num_image_tokens])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits)
