"""A Llama-style tokenizer directory (tokenizer.model + tokenizer_config.json only) through the model:
built for training, saved in a checkpoint, reloaded for inference, with the same whole-string ids."""

import pytest
import torch

from llava.config import ImageConfig, ModelConfig
from llava.model import LlavaModel
from llava.tokenization import IGNORE_INDEX, tokenize_conversation, tokenize_prompt

CONVERSATION = [
    {"from": "human", "value": "What digit is this?\n<image>"},
    {"from": "gpt", "value": "It is a seven."},
    {"from": "human", "value": "Is it odd?"},
    {"from": "gpt", "value": "Yes."},
]


@pytest.mark.parametrize("mode", ["legacy", "non_legacy"])
def test_a_model_on_a_sentencepiece_tokenizer_trains_saves_and_reloads(base_models, sp_tokenizer_dirs, mode, tmp_path):
    config = ModelConfig(
        vision_tower=base_models["vision_tower"],
        llm=base_models["llm"],
        tokenizer=sp_tokenizer_dirs[mode],
        image=ImageConfig(size=32),
        template="vicuna_v1",
        max_length=200,
    )
    torch.manual_seed(0)
    model = LlavaModel.from_config(config)
    assert model.tokenizer.is_fast and model.tokenizer.eos_token == "</s>"
    sample = tokenize_conversation(CONVERSATION, model.tokenizer, "vicuna_v1", model.num_image_tokens, 200, 1)
    tokens = model.tokenizer.convert_ids_to_tokens(sample.input_ids)
    # the non-legacy mode survives loading: no dummy prefix after </s>
    assert tokens[tokens.index("</s>") + 1] == ("▁USER" if mode == "legacy" else "USER")
    input_ids, labels = torch.tensor([sample.input_ids]), torch.tensor([sample.labels])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = model(input_ids, pixel_values=pixels, labels=labels).loss
    assert torch.isfinite(loss) and int((labels != IGNORE_INDEX).sum()) > 0

    reloaded = LlavaModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    again = tokenize_conversation(CONVERSATION, reloaded.tokenizer, "vicuna_v1", reloaded.num_image_tokens, 200, 1)
    assert (again.input_ids, again.labels) == (sample.input_ids, sample.labels)
    prompt, _ = tokenize_prompt(CONVERSATION[:3], reloaded.tokenizer, "vicuna_v1", reloaded.num_image_tokens)
    assert prompt == sample.input_ids[: len(prompt)]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids, pixel_values=pixels, labels=labels).loss, loss)
