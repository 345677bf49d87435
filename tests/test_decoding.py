"""The one decoding path (serving engine, batch inference, evaluation) against HF `generate`; stops, sampling."""

import re

import pytest

from tests.conftest import png
from tests.hf_greedy import hf_greedy_answer


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from llava.model import LlavaModel

    return LlavaModel.from_pretrained(tiny_checkpoint).eval()


def _prompts():
    from llava.generation import Prompt

    return [
        Prompt([{"from": "human", "value": "<image>\nWhat is in the picture?"}], [png(1)]),
        Prompt([{"from": "human", "value": "Tell me a long story about two cats and a dog."}]),
        Prompt([{"from": "human", "value": "<image>\nand <image>\ncompare"}], [png(2), png(3)]),
    ]


def _run(model, prompts, params):
    from llava.decoding import BatchDecoder
    from llava.generation import encode_prompt

    texts, finals = [""] * len(prompts), [None] * len(prompts)
    for step in BatchDecoder(model, [encode_prompt(model, p) for p in prompts], params).steps():
        for i, out in enumerate(step):
            if out is not None:
                texts[i] += out.delta
                finals[i] = (out.finish_reason, out.completion_tokens)
    return texts, finals


def test_temperature_zero_equals_hf_generate_row_by_row(model):
    from llava.decoding import SamplingParams

    prompts = _prompts()
    lengths = [5, 12, 20]  # rows end at different steps; finished rows must not disturb the others
    texts, finals = _run(model, prompts, [SamplingParams(max_tokens=n, temperature=0) for n in lengths])
    for prompt, n, text, final in zip(prompts, lengths, texts, finals):
        assert text == hf_greedy_answer(model, prompt, max_new_tokens=n)
        assert final == ("length", n)


def test_greedy_decode_in_left_padded_batches_equals_hf_generate_one_by_one(model):
    from llava.decoding import greedy_decode
    from llava.generation import encode_prompt

    prompts = _prompts()  # batch_size 2: a batch of two prompts of different lengths, then a batch of one
    answers = greedy_decode(model, [encode_prompt(model, p) for p in prompts], max_new_tokens=9, batch_size=2)
    assert answers == [hf_greedy_answer(model, p, max_new_tokens=9) for p in prompts]
    assert greedy_decode(model, [], max_new_tokens=9) == []
    with pytest.raises(ValueError, match="max_new_tokens and batch_size must be >= 1"):
        greedy_decode(model, [encode_prompt(model, p) for p in prompts], max_new_tokens=0)


def test_stop_string_cuts_the_answer_and_is_never_sent(model):
    from llava.decoding import SamplingParams

    prompt = _prompts()[1:2]
    full, _ = _run(model, prompt, [SamplingParams(max_tokens=20, temperature=0)])
    stop = re.search(r"[A-Za-z]{3}", full[0][2:]).group(0)  # a stop string that starts mid-answer
    cut, finals = _run(model, prompt, [SamplingParams(max_tokens=20, temperature=0, stop=[stop])])
    assert cut[0] == full[0][: full[0].index(stop)].rstrip()
    assert finals[0][0] == "stop"


def test_stop_strings_are_searched_before_leading_whitespace_is_stripped(model):
    """A stop string in the answer's leading whitespace ends it empty (the official LLaVA stopping criteria
    and the OpenAI API search the generated text as is)."""
    from llava.decoding import SamplingParams

    (space,) = model.tokenizer(" ", add_special_tokens=False)["input_ids"]

    def first_token_is_a_space(module, inputs, logits):  # (B, L, V); the prefill is the first call
        handle.remove()
        logits[:, -1, space] = logits.max() + 100

    prompt = _prompts()[1:2]
    handle = model.llm.get_output_embeddings().register_forward_hook(first_token_is_a_space)
    (stripped,), _ = _run(model, prompt, [SamplingParams(max_tokens=8, temperature=0)])
    assert stripped and not stripped[0].isspace()  # the space is decoded but never sent
    stop = " " + stripped[0]  # in the text as decoded, not in the stripped answer's start
    handle = model.llm.get_output_embeddings().register_forward_hook(first_token_is_a_space)
    texts, finals = _run(model, prompt, [SamplingParams(max_tokens=8, temperature=0, stop=[stop])])
    assert texts == [""] and finals[0][0] == "stop"


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(model):
    from llava.decoding import SamplingParams

    prompts = _prompts()[:2]
    params = [SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, seed=7) for _ in prompts]
    first, _ = _run(model, prompts, params)
    again, _ = _run(model, prompts, params)
    greedy, _ = _run(model, prompts, [SamplingParams(max_tokens=12, temperature=0) for _ in prompts])
    assert first == again
    assert first != greedy


def test_held_back_text_is_a_possible_stop_start_or_a_partial_character():
    from llava.decoding import _held_back

    assert _held_back("hello US", ("USER:",)) == 2
    assert _held_back("hello", ("USER:",)) == 0
    assert _held_back("abc\ufffd", ()) == 1
    assert _held_back("two words  ", ()) == 2
