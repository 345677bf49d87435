"""Token ids and loss masks, token by token, for every template and tokenizer kind.

Three tokenizer kinds: the byte-level BPE of the tiny models, and a Llama-style
SentencePiece model (tokenizer.model only, as Vicuna / Llama-2 ship) in legacy and
non-legacy mode. For every template and sample shape:

- `input_ids` equal the ids of tokenising the whole rendered string in one call (each
  `<image>` then expanded to N placeholder ids), as official training and inference
  servers tokenise; for SentencePiece that is `tokenizer(prompt)` with its BOS;
- the trained tokens decode to exactly the answers and their end separators;
- for the templates whose strings are written out literally below (official
  conversation.py formats), a token is trained iff its characters lie in an answer.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from llava.config import ModelConfig
from llava.templates import EOS, TEMPLATES, SampleRejected, Template, get_template, place_image
from llava.tokenization import (
    IGNORE_INDEX,
    PromptTooLong,
    load_tokenizer,
    prepare_tokenizer,
    tokenize_conversation,
    tokenize_prompt,
)

N = 3  # placeholder tokens per image in these tests
IMG = "<image>"
KINDS = ["bpe", "sp_legacy", "sp_non_legacy"]
SYS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYS_HUMAN = SYS_USER.replace("curious user", "curious human").replace("user's", "human's")
SYS_LLAMA2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


@pytest.fixture(scope="session")
def tokenizers(base_models, sp_tokenizer_dirs):
    """get(kind, template) -> a prepared tokenizer, loaded once per (kind, template) with load_tokenizer."""
    dirs = {
        "bpe": base_models["llm"],
        "sp_legacy": sp_tokenizer_dirs["legacy"],
        "sp_non_legacy": sp_tokenizer_dirs["non_legacy"],
    }
    cache = {}

    def get(kind, template):
        if (kind, template) not in cache:
            cache[kind, template] = prepare_tokenizer(load_tokenizer(dirs[kind]), template)
        return cache[kind, template]

    return get


def conv(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(values)]


CASES = {
    "single_turn_image_first": conv(f"{IMG}\nWhat digit is this?", "It is a seven."),
    "single_turn_image_last": conv(f"What digit is this?\n{IMG}", "Seven."),
    "multi_turn": conv(f"{IMG}\nWhat digit is this?", "It is seven.", "Is it even or odd?", "It is odd."),
    "text_only": conv("What comes after two?", "Three comes after two."),
    "two_images_one_turn": conv(f"Compare {IMG} with {IMG} please.", "The first is a cat, the second a dog."),
    "two_images_two_turns": conv(f"{IMG}\nFirst one?", "One.", f"And {IMG} now?", "Two."),
}


def _images(conversation):
    return sum(t["value"].count(IMG) for t in conversation)


def _turns(conversation):
    return [("user" if t["from"] == "human" else "assistant", t["value"]) for t in conversation]


def _skip_plain(name, conversation):
    if get_template(name).keep_user_text is False and (_images(conversation) == 0 or len(conversation) > 2):
        pytest.skip("plain is the one-turn image-caption template")


# ---- whole-string reference -----------------------------------------------------------------------------
def official_placement(text):
    """haotian-liu/LLaVA train.py preprocess_multimodal, for a turn with one <image>."""
    if text.count(IMG) != 1:
        return text  # several images in one turn keep their places (the official code would drop all but one)
    text = text.replace(IMG, "").strip()
    return (IMG + "\n" + text).strip()


def whole_string_ids(tokenizer, text, leading_bos):
    """Ids of tokenising `text` in one call, BOS first when the template starts with it, each image expanded."""
    if leading_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        if getattr(tokenizer, "add_bos_token", False):  # SentencePiece Llama: exactly the official tokenizer(prompt)
            assert ids == tokenizer(text)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMG)
    return [x for token in ids for x in ([token] * N if token == image_id else [token])]


def rendered_string(tokenizer, name, conversation):
    """(text after the leading BOS, starts with BOS): the template's format strings filled in by hand."""
    t = get_template(name)
    out, first = "", True
    if t.system_format and t.keep_user_text and (t.system or getattr(t, "system_always", False)):
        if not t.first_user_format:
            out += t.system_format.format(system=t.system)
    for role, text in _turns(conversation):
        if role == "user":
            if t.bos and t.bos_each_user_turn and not first:
                out += tokenizer.bos_token
            text = official_placement(text) if t.keep_user_text else IMG * text.count(IMG)
            fmt = t.first_user_format if first and t.first_user_format and t.system else t.user_format
            out += text if not t.keep_user_text else fmt.replace("{system}", t.system).replace("{content}", text)
            first = False
        else:
            end = tokenizer.eos_token if t.assistant_end == EOS else t.assistant_end
            out += t.assistant_format.replace("{content}", text) + end + t.turn_separator
    return out, t.bos


def expected_trained_text(tokenizer, name, conversation):
    t = get_template(name)
    end = tokenizer.eos_token if t.assistant_end == EOS else t.assistant_end
    return "".join(
        t.assistant_format.replace("{content}", text) + end
        for role, text in _turns(conversation)
        if role == "assistant"
    )


def trained_text(tokenizer, ids, labels):
    """The text of the trained tokens, each maximal trained run decoded in the context of what precedes it
    (a SentencePiece decoder drops the leading space of a sequence; in context it keeps it). A legacy
    SentencePiece tokenizer puts a dummy-prefix `▁` on the first word after a special token (`<image>It`
    -> `<image>`, `▁It`): that space is the tokenizer's, not the answer's, and is not counted."""
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(IMG)}
    out, i = "", 0
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    while i < len(ids):
        if labels[i] == IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < len(ids) and labels[j] != IGNORE_INDEX:
            j += 1
        before, through = tokenizer.decode(ids[:i]), tokenizer.decode(ids[:j])
        assert through.startswith(before)
        run = through[len(before) :]
        if getattr(tokenizer, "legacy", False) and i > 0 and ids[i - 1] in special:
            assert tokenizer.convert_ids_to_tokens(ids[i]).startswith("▁") and run.startswith(" ")
            run = run[1:]
        out += run
        i = j
    return out


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_input_ids_are_the_whole_string_tokenised(tokenizers, name, kind, case):
    conversation = CASES[case]
    _skip_plain(name, conversation)
    tokenizer = tokenizers(kind, name)
    images = _images(conversation)
    sample = tokenize_conversation(conversation, tokenizer, name, N, 4096, num_images=images)
    text, leading_bos = rendered_string(tokenizer, name, conversation)
    assert sample.input_ids == whole_string_ids(tokenizer, text, leading_bos)
    assert sample.num_images == images
    assert trained_text(tokenizer, sample.input_ids, sample.labels) == expected_trained_text(
        tokenizer, name, conversation
    )
    image_id = tokenizer.convert_tokens_to_ids(IMG)
    positions = [i for i, token in enumerate(sample.input_ids) if token == image_id]
    assert len(positions) == N * images
    assert all(sample.labels[i] == IGNORE_INDEX for i in positions)


def test_non_legacy_sentencepiece_keeps_user_whole_after_eos(tokenizers):
    """`</s>USER:` is `</s>`, `USER` in one string; tokenised on its own, `USER:` would start with a dummy `▁`."""
    tokenizer = tokenizers("sp_non_legacy", "vicuna_v1")
    sample = tokenize_conversation(CASES["multi_turn"], tokenizer, "vicuna_v1", N, 4096, num_images=1)
    tokens = tokenizer.convert_ids_to_tokens(sample.input_ids)
    after_eos = tokens[tokens.index("</s>") + 1]
    assert after_eos == "USER"
    assert tokenizer.tokenize("USER:")[0] == "▁USER"  # what piece-by-piece tokenisation used to produce
    legacy = tokenizers("sp_legacy", "vicuna_v1")
    tokens = legacy.convert_ids_to_tokens(
        tokenize_conversation(CASES["multi_turn"], legacy, "vicuna_v1", N, 4096, num_images=1).input_ids
    )
    assert tokens[tokens.index("</s>") + 1] == "▁USER"  # legacy mode adds the prefix after a special token


# ---- literal oracle for the official formats ------------------------------------------------------------
ORACLE_TEMPLATES = ["plain", "vicuna_v1", "llava_v1", "llama_2", "chatml"]


def expected_chunks(name, turns):
    """[(text, trained)] as the official formats render `turns` (role, text), <image> already placed."""
    out = []
    if name == "plain":
        out.append(("<s>", False))
        for role, text in turns:
            out.append((IMG * text.count(IMG), False) if role == "user" else (text + "\n", True))
    elif name in ("vicuna_v1", "llava_v1"):
        out.append(("<s>" + (SYS_USER if name == "vicuna_v1" else SYS_HUMAN) + " ", False))
        for role, text in turns:
            out.append((f"USER: {text} ASSISTANT:", False) if role == "user" else (f" {text}</s>", True))
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
    return [(t, trained) for t, trained in out if t]


def oracle(tokenizer, name, turns):
    """(input_ids, labels) from the literal string: tokenised once, a token trained iff its characters are."""
    chunks = expected_chunks(name, [(r, official_placement(t) if r == "user" else t) for r, t in turns])
    leading_bos = chunks[0][0].startswith("<s>")
    if leading_bos:
        chunks[0] = (chunks[0][0][len("<s>") :], chunks[0][1])
    text, spans, pos = "", [], 0
    for chunk, trained in chunks:
        spans.append((pos, pos + len(chunk), trained))
        text += chunk
        pos += len(chunk)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    image_id = tokenizer.convert_tokens_to_ids(IMG)
    ids, labels = ([tokenizer.bos_token_id], [IGNORE_INDEX]) if leading_bos else ([], [])
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        owner = [trained for s, e, trained in spans if (s < end and start < e) or s <= start == end < e]
        assert len(set(owner)) == 1, f"token at {start}:{end} straddles an answer's boundary"
        copies = N if token_id == image_id else 1
        ids += [token_id] * copies
        labels += [token_id if owner[0] else IGNORE_INDEX] * copies
    return ids, labels


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ORACLE_TEMPLATES)
def test_labels_match_the_literal_oracle_token_by_token(tokenizers, name, kind, case):
    conversation = CASES[case]
    _skip_plain(name, conversation)
    tokenizer = tokenizers(kind, name)
    sample = tokenize_conversation(conversation, tokenizer, name, N, 4096, num_images=_images(conversation))
    ids, labels = oracle(tokenizer, name, _turns(conversation))
    assert sample.input_ids == ids
    assert sample.labels == labels


# ---- truncation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_truncation_keeps_ids_and_masks_aligned(tokenizers, name, kind):
    tokenizer = tokenizers(kind, name)
    conversation = CASES["single_turn_image_first" if name == "plain" else "multi_turn"]
    full = tokenize_conversation(conversation, tokenizer, name, N, 4096, num_images=1)
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = first_trained + 2
    short = tokenize_conversation(conversation, tokenizer, name, N, cut, num_images=1)
    assert short.input_ids == full.input_ids[:cut]
    assert short.labels == full.labels[:cut]
    with pytest.raises(SampleRejected) as error:
        tokenize_conversation(conversation, tokenizer, name, N, first_trained, num_images=1)
    assert error.value.reason == "too_long"


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_never_splits_an_image(tokenizers, kind):
    tokenizer = tokenizers(kind, "vicuna_v1")
    conversation = conv(f"{IMG}{IMG}\nDescribe both.", "Two digits.")
    # plain: <s>, image 1 (N), image 2 (N), caption... -> a cut inside the second image's run leaves no caption
    with pytest.raises(SampleRejected):
        tokenize_conversation(conversation, tokenizer, "plain", N, 1 + N + 1, num_images=2)
    conversation = CASES["two_images_two_turns"]
    full = tokenize_conversation(conversation, tokenizer, "vicuna_v1", N, 4096, num_images=2)
    image_id = tokenizer.convert_tokens_to_ids(IMG)
    second_start = [i for i, t in enumerate(full.input_ids) if t == image_id][N]
    short = tokenize_conversation(conversation, tokenizer, "vicuna_v1", N, second_start + 1, num_images=2)
    assert short.num_images == 1
    assert short.input_ids == full.input_ids[:second_start]
    assert short.input_ids.count(image_id) == N


# ---- refusing what cannot be masked exactly ----------------------------------------------------------------
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


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_across_an_answer_boundary_is_refused_not_masked(tokenizers, kind):
    """A template whose cue ends inside a word the answer completes: the whole string has one token for
    " ASSISTANT", half prompt and half answer. It cannot be masked exactly, so the sample is refused."""
    tokenizer = tokenizers(kind, "vicuna_v1")
    glued = Template(name="glued", user_format="USER: {content} ASSIST", assistant_format="{content}")
    assert len(tokenizer.tokenize(" ASSISTANT:")) == 2  # " ASSISTANT" is one token in each tokenizer
    with pytest.raises(SampleRejected) as error:
        tokenize_conversation(conv("Hi?", "ANT: Hello."), tokenizer, glued, N, 4096)
    assert error.value.reason == "mask_boundary"
    assert "cannot be masked exactly" in str(error.value)
    with pytest.raises(SampleRejected, match="mask_boundary"):
        tokenize_prompt(conv("Hi?", "ANT: Hello.", "More?"), tokenizer, glued, N)


def test_system_turn_overrides_the_default_prompt(tokenizer):
    conversation = [{"from": "system", "value": "Be brief."}] + conv("Hi?", "Hello.")
    sample = tokenize_conversation(conversation, tokenizer, "vicuna_v1", N, 4096)
    assert tokenizer.decode(sample.input_ids).startswith("<s>Be brief. USER: Hi? ASSISTANT:")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_inference_prompt_is_the_training_prefix(tokenizers, name, kind):
    """The prompt for turn k equals the training ids up to the k-th answer."""
    tokenizer = tokenizers(kind, name)
    conversation = CASES["single_turn_image_last" if name == "plain" else "multi_turn"]
    full = tokenize_conversation(conversation, tokenizer, name, N, 4096, num_images=1)
    trained = [i for i, label in enumerate(full.labels) if label != IGNORE_INDEX]
    prompt, images = tokenize_prompt(conversation[:1], tokenizer, name, N)
    assert images == 1
    assert prompt == full.input_ids[: trained[0]]
    if name != "plain":
        second_answer = next(i for i in trained if full.labels[i - 1] == IGNORE_INDEX and i > trained[0])
        second_prompt, _ = tokenize_prompt(conversation[:3], tokenizer, name, N)
        assert second_prompt == full.input_ids[:second_answer]
    with pytest.raises(PromptTooLong):
        tokenize_prompt(conversation[:1], tokenizer, name, N, max_length=len(prompt) - 1)


# ---- tokenizers as Llama / Vicuna ship them ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["legacy", "non_legacy"])
def test_a_tokenizer_model_only_directory_loads_as_a_fast_tokenizer(sp_tokenizer_dirs, mode):
    directory = Path(sp_tokenizer_dirs[mode])
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    tokenizer = load_tokenizer(directory)
    assert tokenizer.is_fast
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens(tokenizer("Hello world")["input_ids"])[0] == "<s>"
    assert tokenizer.decode(tokenizer("What is this?", add_special_tokens=False)["input_ids"]) == "What is this?"
    # the same ids as the SentencePiece model itself (byte fallback included)
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    text = "Describe the image in detail, café 7!"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == model.encode(text)


def test_load_tokenizer_reads_an_s3_prefix(sp_tokenizer_dirs, s3_bucket):
    from llava import storage

    uri = f"{s3_bucket}/tokenizers/vicuna"
    storage.upload_dir(sp_tokenizer_dirs["non_legacy"], uri)
    tokenizer = load_tokenizer(uri)
    local = load_tokenizer(sp_tokenizer_dirs["non_legacy"])
    assert tokenizer("USER: hi</s>USER:")["input_ids"] == local("USER: hi</s>USER:")["input_ids"]


# ---- <image> placement -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "written, placed",
    [
        (f"{IMG}\nWhat is the man doing?", f"{IMG}\nWhat is the man doing?"),
        (f"What is the man doing?\n{IMG}", f"{IMG}\nWhat is the man doing?"),
        (f"  What is it? {IMG} ", f"{IMG}\nWhat is it?"),
        (f"Look {IMG} here.", f"{IMG}\nLook  here."),  # official: removed, not re-spaced
        (IMG, IMG),
        ("No image here.", "No image here."),
        (f"Compare {IMG} with {IMG}.", f"Compare {IMG} with {IMG}."),  # several images keep their places
    ],
)
def test_image_placement_start_is_the_official_rewrite(written, placed):
    assert place_image(written, "start") == placed
    assert place_image(written, "keep") == written


def test_image_placement_is_validated():
    with pytest.raises(ValueError, match="start"):
        place_image(f"{IMG} hi", "after")
    with pytest.raises(ValueError, match="image_placement"):
        ModelConfig(image_placement="after")


@pytest.mark.parametrize("kind", KINDS)
def test_llava_instruct_row_with_the_image_after_the_question(tokenizers, kind):
    """About half of LLaVA-Instruct writes `<image>` after the question; training moves it to the start of the
    turn by default (`USER: <image>\\n{question}`), and `image_placement="keep"` keeps it where it was."""
    tokenizer = tokenizers(kind, "vicuna_v1")
    after = conv(f"What is the man doing?\n{IMG}", "He is riding a horse.")
    before = conv(f"{IMG}\nWhat is the man doing?", "He is riding a horse.")
    moved = tokenize_conversation(after, tokenizer, "vicuna_v1", N, 4096, num_images=1)
    assert moved.input_ids == tokenize_conversation(before, tokenizer, "vicuna_v1", N, 4096, 1).input_ids
    text = f"{SYS_USER} USER: {IMG}\nWhat is the man doing? ASSISTANT: He is riding a horse.</s>"
    assert moved.input_ids == whole_string_ids(tokenizer, text, leading_bos=True)
    kept = tokenize_conversation(after, tokenizer, "vicuna_v1", N, 4096, 1, image_placement="keep")
    text = f"{SYS_USER} USER: What is the man doing?\n{IMG} ASSISTANT: He is riding a horse.</s>"
    assert kept.input_ids == whole_string_ids(tokenizer, text, leading_bos=True)
    assert kept.labels[-8:] == moved.labels[-8:]  # the answer is trained either way
    # inference prompts are placed the same way
    prompt, _ = tokenize_prompt(after[:1], tokenizer, "vicuna_v1", N)
    assert prompt == moved.input_ids[: next(i for i, x in enumerate(moved.labels) if x != IGNORE_INDEX)]


def test_generated_instruction_data_keeps_the_papers_random_placement(tokenizer):
    """llava.instruct writes `<image>` before or after the question at random (paper §3); both train alike by
    default, and as written with `keep`."""
    from llava.instruct.parse import to_conversation

    rows = [
        to_conversation("complex", "Question: Why is it here?\n===\nAnswer: To rest.", random.Random(seed), [])
        for seed in range(12)
    ]
    firsts = {row[0]["value"] for row in rows}
    assert firsts == {f"{IMG}\nWhy is it here?", f"Why is it here?\n{IMG}"}
    started = {tuple(tokenize_conversation(row, tokenizer, "vicuna_v1", N, 4096, 1).input_ids) for row in rows}
    kept = {
        tuple(tokenize_conversation(row, tokenizer, "vicuna_v1", N, 4096, 1, image_placement="keep").input_ids)
        for row in rows
    }
    assert len(started) == 1 and len(kept) == 2


def test_show_masks_shows_the_official_placement(sp_tokenizer_dirs, tmp_path):
    """`llava-ray show-masks` on a tokenizer.model-only directory: the image moved to the start of the turn."""
    sample = {
        "id": "1",
        "image": "coco/1.jpg",
        "conversations": conv(f"What is the man doing?\n{IMG}", "He is riding a horse."),
    }
    (tmp_path / "sample.json").write_text(json.dumps(sample))
    exe = str(Path(sys.executable).parent / "llava-ray")

    def shown(*extra):
        result = subprocess.run(
            [
                exe,
                "show-masks",
                "--tokenizer",
                sp_tokenizer_dirs["non_legacy"],
                "--template",
                "vicuna_v1",
                "--json",
                str(tmp_path / "sample.json"),
                "--image-tokens",
                "2",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])["tokens"]

    tokens = shown()
    first_image = tokens.index(IMG)
    assert tokens[first_image - 3 : first_image + 3] == ["▁USER", ":", "▁", IMG, IMG, "<0x0A>"]
    tokens = shown("--image-placement", "keep")
    first_image = tokens.index(IMG)
    assert tokens[first_image - 2 : first_image + 3] == ["?", "<0x0A>", IMG, IMG, "▁ASSISTANT"]
