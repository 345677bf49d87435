"""The exported HF processor gives exactly our prompt ids and pixels.

For every template and three tokenizers (Llama-style SentencePiece in legacy and
non-legacy mode, and the byte-level BPE of the tiny models), the chat template carried
by the export, applied by stock transformers, must give the ids of
`llava.tokenization.tokenize_prompt` on the same conversation (`<image>` expanded as the
HF processor expands it). The exported image processor must give the pixels of
`llava.image_processing.preprocess_image` for each `image.aspect`, on non-square images.
Every processor here went through `save_pretrained` + `AutoProcessor.from_pretrained`.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava.config import ImageConfig, ModelConfig
from llava.export_hf import make_processor
from llava.image_processing import preprocess_image
from llava.templates import TEMPLATES
from llava.tokenization import load_tokenizer, prepare_tokenizer, tokenize_prompt

SIZE, PATCH = 32, 8
N = (SIZE // PATCH) ** 2  # image tokens the HF processor expands <image> to (CLS dropped)


def picture(seed, width=50, height=40):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer_dirs(base_models, sp_tokenizer_dirs):
    return {
        "sp_legacy": sp_tokenizer_dirs["legacy"],
        "sp_non_legacy": sp_tokenizer_dirs["non_legacy"],
        "byte_level": base_models["llm"],
    }


def exported_processor(tmp_path_factory, tokenizer, config: ModelConfig):
    from transformers import AutoProcessor

    out = tmp_path_factory.mktemp("processor")
    make_processor(config, tokenizer, PATCH).save_pretrained(out)
    return AutoProcessor.from_pretrained(out), out


@pytest.fixture(scope="module")
def processors(tokenizer_dirs, tmp_path_factory):
    """(tokenizer kind, template) -> (our prepared tokenizer, the exported processor reloaded, its directory)."""
    cache = {}

    def get(kind, template):
        if (kind, template) not in cache:
            tokenizer = prepare_tokenizer(load_tokenizer(tokenizer_dirs[kind]), template)
            config = ModelConfig(template=template, image=ImageConfig(size=SIZE, aspect="pad"))
            cache[kind, template] = (tokenizer, *exported_processor(tmp_path_factory, tokenizer, config))
        return cache[kind, template]

    return get


def image(seed):
    return {"type": "image", "image": picture(seed)}


def text(value):
    return {"type": "text", "text": value}


# name -> (HF/OpenAI-style messages, the same conversation in LLaVA JSON as our chat server builds it:
# a message's parts joined with "\n", images as <image>)
CASES = {
    "image_first": (
        [{"role": "user", "content": [image(0), text("What is in the photo?")]}],
        [{"from": "human", "value": "<image>\nWhat is in the photo?"}],
    ),
    "image_last": (
        [{"role": "user", "content": [text("What is in the photo?"), image(0)]}],
        [{"from": "human", "value": "What is in the photo?\n<image>"}],
    ),
    "multi_turn": (
        [
            {"role": "user", "content": [image(0), text("What is in the photo?")]},
            {"role": "assistant", "content": "A cat on a sofa."},
            {"role": "user", "content": "What colour is the sofa?"},
        ],
        [
            {"from": "human", "value": "<image>\nWhat is in the photo?"},
            {"from": "gpt", "value": "A cat on a sofa."},
            {"from": "human", "value": "What colour is the sofa?"},
        ],
    ),
    "text_only": (
        [{"role": "user", "content": "What comes after two?"}],
        [{"from": "human", "value": "What comes after two?"}],
    ),
    "two_images": (
        [{"role": "user", "content": [text("Compare"), image(0), text("with"), image(1)]}],
        [{"from": "human", "value": "Compare\n<image>\nwith\n<image>"}],
    ),
    "image_in_later_turn": (
        [
            {"role": "user", "content": "Hi there."},
            {"role": "assistant", "content": [text("Hello.")]},
            {"role": "user", "content": [text("And this?"), image(2)]},
        ],
        [
            {"from": "human", "value": "Hi there."},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "And this?\n<image>"},
        ],
    ),
    "own_system": (
        [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [image(0), text("What?")]}],
        [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat?"}],
    ),
    "empty_system": (
        [{"role": "system", "content": ""}, {"role": "user", "content": [image(0), text("What?")]}],
        [{"from": "system", "value": ""}, {"from": "human", "value": "<image>\nWhat?"}],
    ),
}
PLAIN_CASES = {  # plain (stage 1) keeps only the images of the human turn
    "image_only": ([{"role": "user", "content": [image(0)]}], [{"from": "human", "value": "<image>"}]),
    "image_and_text": (
        [{"role": "user", "content": [text("Describe the image concisely."), image(0)]}],
        [{"from": "human", "value": "Describe the image concisely.\n<image>"}],
    ),
}
KINDS = ["sp_legacy", "sp_non_legacy", "byte_level"]
PAIRS = [(t, c) for t in sorted(TEMPLATES) for c in sorted(PLAIN_CASES if t == "plain" else CASES)]


def images_of(messages):
    return [
        part["image"]
        for m in messages
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part["type"] == "image"
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template, case", PAIRS)
def test_chat_template_gives_our_prompt_ids(processors, kind, template, case):
    tokenizer, processor, _ = processors(kind, template)
    messages, conversation = (PLAIN_CASES if template == "plain" else CASES)[case]
    ours, n_images = tokenize_prompt(conversation, tokenizer, template, N)
    assert n_images == len(images_of(messages))

    # One call: the processor renders, loads the images from the messages and tokenises.
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(inputs["input_ids"][0]) == ours
    # Two steps, as many model cards show: render, then call the processor on the text.
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    two_step = processor(text=rendered, images=images_of(messages) or None)
    assert list(two_step["input_ids"][0]) == ours
    # The tokenizer alone (what vLLM applies on its chat endpoint): one <image> per image, not yet expanded.
    unexpanded, _ = tokenize_prompt(conversation, tokenizer, template, 1)
    assert (
        processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        == unexpanded
    )


@pytest.mark.parametrize("kind", KINDS)
def test_exported_tokenizer_tokenises_like_the_training_one(processors, tokenizer_dirs, kind):
    """The export keeps the tokenizer's behaviour (legacy mode included) and adds no BOS of its own."""
    from transformers import AutoTokenizer

    tokenizer, _, directory = processors(kind, "vicuna_v1")
    reloaded = AutoTokenizer.from_pretrained(directory)
    sample = "USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: And this? ASSISTANT:"
    assert (
        reloaded(sample, add_special_tokens=False)["input_ids"]
        == tokenizer(sample, add_special_tokens=False)["input_ids"]
    )
    assert reloaded("Hi")["input_ids"] == tokenizer("Hi", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
def test_exported_image_processor_gives_our_pixels_on_non_square_images(tmp_path_factory, tokenizer_dirs, aspect):
    config = ModelConfig(template="vicuna_v1", image=ImageConfig(size=SIZE, aspect=aspect))
    tokenizer = prepare_tokenizer(load_tokenizer(tokenizer_dirs["byte_level"]), "vicuna_v1")
    processor, directory = exported_processor(tmp_path_factory, tokenizer, config)
    saved = json.loads((directory / "processor_config.json").read_text())["image_processor"]
    assert saved["image_processor_type"] == "LlavaImageProcessor" and saved["do_pad"] is (aspect == "pad")
    for seed, (width, height) in enumerate([(90, 40), (40, 90), (61, 37), (33, 120)]):
        img = picture(seed, width, height)
        theirs = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
        ours = torch.from_numpy(preprocess_image(img, config.image))
        assert theirs.shape == ours.shape == (3, SIZE, SIZE)
        torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_padding_is_what_distinguishes_pad_from_crop(tmp_path_factory, tokenizer_dirs):
    """On a wide image the padded and the cropped pixels differ (the test above would catch a lost do_pad)."""
    tokenizer = prepare_tokenizer(load_tokenizer(tokenizer_dirs["byte_level"]), "vicuna_v1")
    img = picture(0, 90, 40)
    pixels = {}
    for aspect in ("pad", "crop"):
        config = ModelConfig(image=ImageConfig(size=SIZE, aspect=aspect))
        processor, _ = exported_processor(tmp_path_factory, tokenizer, config)
        pixels[aspect] = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
    assert (pixels["pad"] - pixels["crop"]).abs().max() > 0.5
    # The padded band is the mean colour (int(mean * 255), as official expand2square): about 0 once normalised.
    assert pixels["pad"][:, 0, :].abs().max() < 0.05


def test_export_end_to_end_with_a_sentencepiece_tokenizer_and_padded_images(base_models, sp_tokenizer_dirs, tmp_path):
    """A pad-aspect model with a non-legacy Llama tokenizer: the exported directory, loaded by stock
    transformers, builds our ids and pixels from plain messages and gives our logits."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava.export_hf import export_hf
    from llava.model import LlavaModel

    torch.manual_seed(0)
    config = ModelConfig(
        vision_tower=base_models["vision_tower"],
        llm=base_models["llm"],
        tokenizer=sp_tokenizer_dirs["non_legacy"],
        template="llava_llama_2",
        image=ImageConfig(size=SIZE, aspect="pad"),
        max_length=512,
    )
    model = LlavaModel.from_config(config)
    result = export_hf(model, tmp_path / "hf")
    assert result.format == "hf-llava"
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "llava_llama_2" in readme and "do_pad" in readme and "apply_chat_template" in readme

    processor = AutoProcessor.from_pretrained(result.path)
    hf_model = LlavaForConditionalGeneration.from_pretrained(result.path)
    wide = picture(5, 70, 30)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [text("What is in the photo?"), {"type": "image", "image": wide}]},
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ours_ids, _ = tokenize_prompt(
        [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is in the photo?\n<image>"}],
        model.tokenizer,
        config.template,
        model.num_image_tokens,
    )
    ours_pixels = torch.from_numpy(preprocess_image(wide, config.image))[None]
    assert inputs["input_ids"][0].tolist() == ours_ids
    torch.testing.assert_close(inputs["pixel_values"], ours_pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        theirs = hf_model(**inputs).logits
        ours = model(torch.tensor([ours_ids]), pixel_values=ours_pixels).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
