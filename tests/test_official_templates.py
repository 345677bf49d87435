"""Every template renders byte for byte what official LLaVA builds (haotian-liu/LLaVA v1.2.2).

The expected strings are written out by hand from the official code:
`llava/conversation.py` (`Conversation.get_prompt` per separator style, and the conv_*
definitions) and `llava/train/train.py` (`preprocess_multimodal` puts the image first as
`<image>\\n`, `preprocess` / `_add_speaker_and_signal` for v0 training). `<s>` stands for the
tokenizer's BOS, which official tokenisation (`tokenizer_image_token`) puts first for a
Llama tokenizer. A training string is the whole conversation; an inference prompt is what
`get_prompt()` gives after `conv.append_message(conv.roles[1], None)`.
"""

import pytest

from llava.templates import TEMPLATES, get_template, normalise_turns, render, template_names

VICUNA = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
MPT = "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."


def turns(*values, system=None):
    """LLaVA-JSON turns: human, gpt, human, ... (a leading system turn when `system` is given)."""
    out = [] if system is None else [{"from": "system", "value": system}]
    return out + [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# The samples. The first question writes its image last: official training moves it to the front.
Q1, A1, Q2, A2 = "What is in the photo? <image>", "A cat on a sofa.", "What colour is the sofa?", "Red."
SAMPLES = {
    "train_single": turns(Q1, A1),
    "train_multi": turns(Q1, A1, Q2, A2),
    "prompt_single": turns(Q1),
    "prompt_multi": turns(Q1, A1, Q2),
    "train_multi_own_system": turns(Q1, A1, Q2, A2, system="Be brief."),
    "prompt_single_no_system": turns(Q1, system=""),
}

q1 = "<image>\nWhat is in the photo?"  # Q1 as official preprocess_multimodal rewrites it
EXPECTED = {
    # conv_vicuna_v1, SeparatorStyle.TWO: system + " ", then role + ": " + message + (" " | "</s>")
    "vicuna_v1": {
        "train_single": f"<s>{VICUNA} USER: {q1} ASSISTANT: A cat on a sofa.</s>",
        "train_multi": f"<s>{VICUNA} USER: {q1} ASSISTANT: A cat on a sofa.</s>"
        "USER: What colour is the sofa? ASSISTANT: Red.</s>",
        "prompt_single": f"<s>{VICUNA} USER: {q1} ASSISTANT:",
        "prompt_multi": f"<s>{VICUNA} USER: {q1} ASSISTANT: A cat on a sofa.</s>USER: What colour is the sofa? ASSISTANT:",
        "train_multi_own_system": f"<s>Be brief. USER: {q1} ASSISTANT: A cat on a sofa.</s>"
        "USER: What colour is the sofa? ASSISTANT: Red.</s>",
        "prompt_single_no_system": f"<s> USER: {q1} ASSISTANT:",
    },
    "llava_v1": {
        "train_single": f"<s>{HUMAN} USER: {q1} ASSISTANT: A cat on a sofa.</s>",
        "train_multi": f"<s>{HUMAN} USER: {q1} ASSISTANT: A cat on a sofa.</s>"
        "USER: What colour is the sofa? ASSISTANT: Red.</s>",
        "prompt_single": f"<s>{HUMAN} USER: {q1} ASSISTANT:",
        "prompt_multi": f"<s>{HUMAN} USER: {q1} ASSISTANT: A cat on a sofa.</s>USER: What colour is the sofa? ASSISTANT:",
        "train_multi_own_system": f"<s>Be brief. USER: {q1} ASSISTANT: A cat on a sofa.</s>"
        "USER: What colour is the sofa? ASSISTANT: Red.</s>",
        "prompt_single_no_system": f"<s> USER: {q1} ASSISTANT:",
    },
    # `--version v0` training: header f"{system}\n\n", each turn "### " + role + ": " + value + "\n", then "### "
    "v0": {
        "train_single": f"<s>{HUMAN}\n\n### Human: {q1}\n### Assistant: A cat on a sofa.\n### ",
        "train_multi": f"<s>{HUMAN}\n\n### Human: {q1}\n### Assistant: A cat on a sofa.\n"
        "### Human: What colour is the sofa?\n### Assistant: Red.\n### ",
        "prompt_single": f"<s>{HUMAN}\n\n### Human: {q1}\n### Assistant:",
        "prompt_multi": f"<s>{HUMAN}\n\n### Human: {q1}\n### Assistant: A cat on a sofa.\n"
        "### Human: What colour is the sofa?\n### Assistant:",
        "train_multi_own_system": f"<s>Be brief.\n\n### Human: {q1}\n### Assistant: A cat on a sofa.\n"
        "### Human: What colour is the sofa?\n### Assistant: Red.\n### ",
        "prompt_single_no_system": f"<s>\n\n### Human: {q1}\n### Assistant:",
    },
    # conv_llava_v0, SeparatorStyle.SINGLE: system + "###", then role + ": " + message + "###"
    "llava_v0": {
        "train_single": f"<s>{HUMAN}###Human: {q1}###Assistant: A cat on a sofa.###",
        "train_multi": f"<s>{HUMAN}###Human: {q1}###Assistant: A cat on a sofa.###"
        "Human: What colour is the sofa?###Assistant: Red.###",
        "prompt_single": f"<s>{HUMAN}###Human: {q1}###Assistant:",
        "prompt_multi": f"<s>{HUMAN}###Human: {q1}###Assistant: A cat on a sofa.###"
        "Human: What colour is the sofa?###Assistant:",
        "train_multi_own_system": f"<s>Be brief.###Human: {q1}###Assistant: A cat on a sofa.###"
        "Human: What colour is the sofa?###Assistant: Red.###",
        "prompt_single_no_system": f"<s>###Human: {q1}###Assistant:",
    },
    # conv_llava_llama_2, SeparatorStyle.LLAMA_2 (sep "<s>", sep2 "</s>"; the leading "<s>" is stripped
    # from the string and comes back as the tokenizer's BOS); wrap_sys("") is ""
    "llava_llama_2": {
        "train_single": f"<s>[INST] <<SYS>>\n{LLAVA_LLAMA_2}\n<</SYS>>\n\n{q1} [/INST] A cat on a sofa. </s>",
        "train_multi": f"<s>[INST] <<SYS>>\n{LLAVA_LLAMA_2}\n<</SYS>>\n\n{q1} [/INST] A cat on a sofa. </s>"
        "<s>[INST] What colour is the sofa? [/INST] Red. </s>",
        "prompt_single": f"<s>[INST] <<SYS>>\n{LLAVA_LLAMA_2}\n<</SYS>>\n\n{q1} [/INST]",
        "prompt_multi": f"<s>[INST] <<SYS>>\n{LLAVA_LLAMA_2}\n<</SYS>>\n\n{q1} [/INST] A cat on a sofa. </s>"
        "<s>[INST] What colour is the sofa? [/INST]",
        "train_multi_own_system": f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{q1} [/INST] A cat on a sofa. </s>"
        "<s>[INST] What colour is the sofa? [/INST] Red. </s>",
        "prompt_single_no_system": f"<s>[INST] {q1} [/INST]",
    },
    # conv_mistral_instruct: LLAMA_2 style with sep "" (so no <s> between rounds) and system ""
    "mistral_instruct": {
        "train_single": f"<s>[INST] {q1} [/INST] A cat on a sofa. </s>",
        "train_multi": f"<s>[INST] {q1} [/INST] A cat on a sofa. </s>[INST] What colour is the sofa? [/INST] Red. </s>",
        "prompt_single": f"<s>[INST] {q1} [/INST]",
        "prompt_multi": f"<s>[INST] {q1} [/INST] A cat on a sofa. </s>[INST] What colour is the sofa? [/INST]",
        "train_multi_own_system": f"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{q1} [/INST] A cat on a sofa. </s>"
        "[INST] What colour is the sofa? [/INST] Red. </s>",
        "prompt_single_no_system": f"<s>[INST] {q1} [/INST]",
    },
    # conv_chatml_direct, SeparatorStyle.MPT: system + "<|im_end|>", then role + message + "<|im_end|>";
    # the system text carries its own "<|im_start|>system\n" header; no BOS (see llava/templates.py)
    "chatml_direct": {
        "train_single": "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>",
        "train_multi": "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|><|im_start|>assistant\nRed.<|im_end|>",
        "prompt_single": "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\n",
        "prompt_multi": "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|><|im_start|>assistant\n",
        "train_multi_own_system": "<|im_start|>system\nBe brief.<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|><|im_start|>assistant\nRed.<|im_end|>",
        # Ours, not official: officially "no system" would leave a bare "<|im_end|>" first.
        "prompt_single_no_system": f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\n",
    },
    "mpt": {
        "train_single": f"<|im_start|>system\n{MPT}<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>",
        "train_multi": f"<|im_start|>system\n{MPT}<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|><|im_start|>assistant\nRed.<|im_end|>",
        "prompt_single": f"<|im_start|>system\n{MPT}<|im_end|><|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\n",
        "prompt_multi": f"<|im_start|>system\n{MPT}<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|><|im_start|>assistant\n",
        "train_multi_own_system": "<|im_start|>system\nBe brief.<|im_end|>"
        f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\nA cat on a sofa.<|im_end|>"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|><|im_start|>assistant\nRed.<|im_end|>",
        "prompt_single_no_system": f"<|im_start|>user\n{q1}<|im_end|><|im_start|>assistant\n",
    },
    # Not an official LLaVA format: the standard ChatML of Qwen / HF chat templates, "\n" after every <|im_end|>.
    "chatml": {
        "train_single": "<|im_start|>system\nAnswer the questions.<|im_end|>\n"
        f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\nA cat on a sofa.<|im_end|>\n",
        "train_multi": "<|im_start|>system\nAnswer the questions.<|im_end|>\n"
        f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\nA cat on a sofa.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n",
        "prompt_single": "<|im_start|>system\nAnswer the questions.<|im_end|>\n"
        f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n",
        "prompt_multi": "<|im_start|>system\nAnswer the questions.<|im_end|>\n"
        f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\nA cat on a sofa.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|>\n<|im_start|>assistant\n",
        "train_multi_own_system": "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\nA cat on a sofa.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the sofa?<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n",
        "prompt_single_no_system": f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n",
    },
}


def rendered_string(template_name: str, conversation: list[dict]) -> str:
    """Our rendering as one string: BOS as <s>, EOS as </s>, images as <image>."""
    system, normalised = normalise_turns(conversation)
    pieces = render(get_template(template_name), normalised, system)
    marks = {"bos": "<s>", "eos": "</s>", "image": "<image>"}
    return "".join(marks.get(piece.kind, piece.text) for piece in pieces)


@pytest.mark.parametrize("sample", sorted(SAMPLES))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendering_is_byte_exact_with_the_official_string(name, sample):
    assert rendered_string(name, SAMPLES[sample]) == EXPECTED[name][sample]


def test_plain_is_the_official_stage_one_string():
    """preprocess_plain: the human turn becomes `<image>` alone, then caption + "\\n"."""
    assert rendered_string("plain", turns("Describe the image concisely.\n<image>", "A cat.")) == "<s><image>A cat.\n"
    assert rendered_string("plain", turns("<image>\nDescribe it.")) == "<s><image>"


def test_training_string_extends_the_inference_prompt():
    """The answer follows the prompt directly: no template puts text the prompt lacks before an answer."""
    for name in EXPECTED:
        assert EXPECTED[name]["train_multi"].startswith(EXPECTED[name]["prompt_multi"])
        assert rendered_string(name, SAMPLES["train_multi"]).startswith(rendered_string(name, SAMPLES["prompt_multi"]))


OFFICIAL_NAMES = {  # official --version / --conv-mode value -> the template it selects here
    "plain": "plain",
    "v0_plain": "plain",
    "v0": "v0",
    "llava_v0": "llava_v0",
    "v1": "vicuna_v1",
    "vicuna_v1": "vicuna_v1",
    "llava_v1": "llava_v1",
    "llava_llama_2": "llava_llama_2",
    "mistral_instruct": "mistral_instruct",
    "chatml_direct": "chatml_direct",
    "mistral_direct": "chatml_direct",
    "mpt": "mpt",
}


@pytest.mark.parametrize("official, ours", sorted(OFFICIAL_NAMES.items()))
def test_official_version_strings_work_as_template_names(official, ours):
    assert get_template(official) is TEMPLATES[ours]
    assert official in template_names()


def test_earlier_names_stay_aliases():
    assert get_template("llama_2") is TEMPLATES["llava_llama_2"]
    assert get_template("v1_paper") is TEMPLATES["v0"]
    assert get_template("chatml").name == "chatml"


def test_unknown_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown conversation template 'vicuna_v2'.*chatml_direct.*llava_v1"):
        get_template("vicuna_v2")


def test_chatml_markers_become_special_tokens(sp_tokenizer_dirs):
    """prepare_tokenizer adds <|im_start|>/<|im_end|> for every ChatML-family template (a Llama tokenizer
    has neither), so each marker is one token as in the models these templates were trained on."""
    from llava.tokenization import load_tokenizer, prepare_tokenizer

    for name in ("chatml_direct", "mpt", "chatml"):
        tokenizer = load_tokenizer(sp_tokenizer_dirs["non_legacy"])
        assert "<|im_start|>" not in tokenizer.get_vocab()
        prepare_tokenizer(tokenizer, name)
        for marker in ("<|im_start|>", "<|im_end|>"):
            assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
