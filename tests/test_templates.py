"""Loss masks, token by token, for every template.

The oracle here is independent of llava.templates / llava.tokenization: each template's
rendering is written out again from REFERENCE.md as literal strings with the trained
spans marked; the whole string is tokenised once with character offsets, and a token
is trained iff its characters lie inside a trained span. Our segment-wise labels must
agree with it at every position.
"""

import pytest

from llava.templates import SampleRejected
from llava.tokenization import IGNORE_INDEX, PromptTooLong, tokenize_conversation, tokenize_prompt

N = 3  # placeholder tokens per image in these tests
IMG = "<image>"
SYS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYS_HUMAN = SYS_USER.replace("curious user", "curious human").replace("user's", "human's")
SYS_LLAMA2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
TEMPLATES = ["plain", "vicuna_v1", "llava_v1", "v1_paper", "llama_2", "chatml"]


def expected_chunks(name, turns):
    """[(text, trained)] as REFERENCE.md §1 renders `turns` (role, text) with <image> already expanded."""
    out = []
    if name == "plain":
        out.append(("<s>", False))
        for role, text in turns:
            out.append((IMG * text.count(IMG), False) if role == "user" else (text + "\n", True))
    elif name in ("vicuna_v1", "llava_v1"):
        out.append(("<s>" + (SYS_USER if name == "vicuna_v1" else SYS_HUMAN) + " ", False))
        for role, text in turns:
            out.append((f"USER: {text} ASSISTANT:", False) if role == "user" else (f" {text}</s>", True))
    elif name == "v1_paper":
        out.append(("<s>" + SYS_HUMAN + " ###", False))
        for role, text in turns:
            out.append((f"Human: {text} ###Assistant:", False) if role == "user" else (f" {text} ###", True))
    elif name == "llama_2":
        for i, (role, text) in enumerate(turns):
            if role == "user" and i == 0:
                out.append((f"<s>[INST] <<SYS>>\n{SYS_LLAMA2}\n<</SYS>>\n\n{text} [/INST]", False))
            elif role == "user":
                out.append((f"<s>[INST] {text} [/INST]", False))
            else:
                out.append((f" {text} </s>", True))
    elif name == "chatml":
        out.append(("<|im_start|>system\nAnswer the questions.<|im_end|>\n", False))
        for role, text in turns:
            if role == "user":
                out.append((f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", False))
            else:
                out += [(f"{text}<|im_end|>", True), ("\n", False)]
    return [(t.replace(IMG, IMG * N), trained) for t, trained in out if t]


def oracle(tokenizer, name, turns):
    """(input_ids, labels) from the whole rendered string and character offsets."""
    chunks = expected_chunks(name, turns)
    text, spans, pos = "", [], 0
    for chunk, trained in chunks:
        spans.append((pos, pos + len(chunk), trained))
        text += chunk
        pos += len(chunk)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        owner = [trained for s, e, trained in spans if s <= start and end <= e]
        assert len(owner) == 1, f"token at {start}:{end} straddles a segment boundary"
        labels.append(token_id if owner[0] else IGNORE_INDEX)
    return enc["input_ids"], labels


def conv(*pairs):
    turns = []
    for i, value in enumerate(pairs):
        turns.append({"from": "human" if i % 2 == 0 else "gpt", "value": value})
    return turns


CASES = {
    "single_image_start": conv(f"{IMG}\nWhat digit is this?", "It is a seven."),
    "single_image_end": conv(f"What digit is this?\n{IMG}", "Seven."),
    "multi_turn": conv(f"{IMG}\nWhat digit is this?", "It is seven.", "Is it even or odd?", "It is odd."),
    "text_only": conv("What comes after two?", "Three comes after two."),
    "two_images": conv(f"Compare {IMG} with {IMG} please.", "The first is a cat, the second a dog."),
}


def _turns(conversation):
    return [("user" if t["from"] == "human" else "assistant", t["value"]) for t in conversation]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", TEMPLATES)
def test_labels_match_oracle_token_by_token(tokenizer, name, case):
    conversation = CASES[case]
    images = sum(t["value"].count(IMG) for t in conversation)
    if name == "plain" and images == 0:
        pytest.skip("plain is the image-caption template")
    sample = tokenize_conversation(conversation, tokenizer, name, N, 4096, num_images=images)
    ids, labels = oracle(tokenizer, name, _turns(conversation))
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert sample.num_images == images
    # The trained tokens decode to exactly the answers and their end separators.
    trained = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    expected = "".join(text for text, is_trained in expected_chunks(name, _turns(conversation)) if is_trained)
    assert trained == expected
    # Image placeholders: N per image, never trained.
    image_id = tokenizer.convert_tokens_to_ids(IMG)
    positions = [i for i, t in enumerate(sample.input_ids) if t == image_id]
    assert len(positions) == N * images
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)


@pytest.mark.parametrize("name", TEMPLATES)
def test_truncation_keeps_masks_aligned(tokenizer, name):
    conversation = CASES["multi_turn"] if name != "plain" else CASES["single_image_start"]
    full = tokenize_conversation(conversation, tokenizer, name, N, 4096, num_images=1)
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = first_trained + 2
    short = tokenize_conversation(conversation, tokenizer, name, N, cut, num_images=1)
    assert short.input_ids == full.input_ids[:cut]
    assert short.labels == full.labels[:cut]
    with pytest.raises(SampleRejected) as error:
        tokenize_conversation(conversation, tokenizer, name, N, first_trained, num_images=1)
    assert error.value.reason == "too_long"


def test_truncation_never_splits_an_image(tokenizer):
    conversation = conv(f"{IMG}{IMG}\nDescribe both.", "Two digits.")
    full = tokenize_conversation(conversation, tokenizer, "plain", N, 4096, num_images=2)
    # plain: <s>, image 1 (N), image 2 (N), caption... -> cut inside the second image's run
    second_start = 1 + N
    with pytest.raises(SampleRejected):  # nothing trainable survives before the second image
        tokenize_conversation(conversation, tokenizer, "plain", N, second_start + 1, num_images=2)
    conversation = conv(f"{IMG}\nFirst.", "One.", f"And {IMG}?", "Two.")
    full = tokenize_conversation(conversation, tokenizer, "vicuna_v1", N, 4096, num_images=2)
    image_id = tokenizer.convert_tokens_to_ids(IMG)
    second_start = [i for i, t in enumerate(full.input_ids) if t == image_id][N]
    short = tokenize_conversation(conversation, tokenizer, "vicuna_v1", N, second_start + 1, num_images=2)
    assert short.num_images == 1
    assert short.input_ids == full.input_ids[:second_start]
    assert short.input_ids.count(image_id) == N


@pytest.mark.parametrize(
    "conversation, num_images, reason",
    [
        ([], 0, "empty_conversation"),
        ([{"from": "system", "value": "hi"}], 0, "empty_conversation"),
        (conv("Hello?", "Hi.")[::-1], 0, "bad_roles"),
        ([{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}], 0, "bad_roles"),
        ([{"from": "human", "value": "a"}, {"from": "gpt"}], 0, "bad_roles"),
        (conv("Question only?"), 0, "bad_roles"),
        (conv("a", "b", "c"), 0, "bad_roles"),
        (conv(f"{IMG} what?", "A cat."), 0, "image_count_mismatch"),
        (conv("what?", "A cat."), 1, "image_count_mismatch"),
        (conv(f"{IMG} what?", f"A cat {IMG}."), 1, "image_count_mismatch"),
        (conv(f"{IMG} what?", "   "), 1, "no_trainable_tokens"),
    ],
)
def test_malformed_conversations_are_rejected_with_a_reason(tokenizer, conversation, num_images, reason):
    with pytest.raises(SampleRejected) as error:
        tokenize_conversation(conversation, tokenizer, "vicuna_v1", N, 4096, num_images=num_images)
    assert error.value.reason == reason


def test_system_turn_overrides_the_default_prompt(tokenizer):
    conversation = [{"from": "system", "value": "Be brief."}] + conv("Hi?", "Hello.")
    sample = tokenize_conversation(conversation, tokenizer, "vicuna_v1", N, 4096)
    assert tokenizer.decode(sample.input_ids).startswith("<s>Be brief. USER: Hi? ASSISTANT:")


@pytest.mark.parametrize("name", TEMPLATES)
def test_inference_prompt_is_the_training_prefix(tokenizer, name):
    """The prompt for turn k equals the training ids up to the k-th answer (same segments)."""
    conversation = CASES["multi_turn"] if name != "plain" else CASES["single_image_start"]
    full = tokenize_conversation(conversation, tokenizer, name, N, 4096, num_images=1)
    prompt, images = tokenize_prompt(conversation[:1], tokenizer, name, N)
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert images == 1
    assert prompt == full.input_ids[:first_trained]
    with pytest.raises(PromptTooLong):
        tokenize_prompt(conversation[:1], tokenizer, name, N, max_length=len(prompt) - 1)
