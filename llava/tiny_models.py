"""Tiny, randomly initialised base models built offline.

`build_tiny_base_models(out)` writes three ordinary Hugging Face directories:

    out/vision/   a CLIP vision model + its image processor config   (stands in for openai/clip-vit-*)
    out/llm/      a Llama-style causal LM + a byte-level BPE tokenizer (stands in for lmsys/vicuna-*)

Everything downstream loads them with the same `from_pretrained` calls a real
checkpoint goes through, so tests and the demo exercise the real loading paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llava.config import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN
from llava.templates import TEMPLATES

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]

# A small English corpus so the BPE learns real words; the templates' own strings are added below.
_CORPUS = """\
the quick brown fox jumps over the lazy dog. a picture of a cat sitting on a red sofa.
what is shown in the image? describe the image concisely. provide a brief description of the given image.
the digit in the image is zero one two three four five six seven eight nine.
is the number even or odd? the number is even. the number is odd. what digit comes next?
a man riding a bicycle down a city street next to tall buildings and parked cars.
two dogs playing with a frisbee on green grass in a park on a sunny day.
answer with the option's letter from the given choices directly. the answer is A. B. C. D.
question: how many people are in the photo? answer: there are three people in the photo.
a plate of food with rice, vegetables and chicken on a wooden table.
the assistant gives helpful, detailed, and polite answers to the user's questions.
"""


@dataclass
class TinySizes:
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    llm_width: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    vocab_size: int = 1024  # BPE target; the real size comes out of training
    max_positions: int = 2048


def build_tokenizer(vocab_size: int = 1024, extra_texts: tuple[str, ...] | list[str] = ()):
    """A byte-level BPE trained in memory (on `extra_texts` too), wrapped as a normal HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [_CORPUS, *extra_texts]
    for template in TEMPLATES.values():
        corpus += [template.system, template.system_format, template.user_format, template.first_user_format or ""]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
    )


def vision_config(sizes: TinySizes):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.vision_width,
        intermediate_size=sizes.vision_width * 4,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=4,
        projection_dim=sizes.vision_width,
    )


def write_image_processor(vision_dir: str | Path, image_size: int) -> None:
    """The CLIP image processor config next to a vision tower (CLIP normalisation, `image_size` square)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(vision_dir)


def llama_config(sizes: TinySizes, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.llm_width,
        intermediate_size=sizes.llm_width * 2,
        num_hidden_layers=sizes.llm_layers,
        num_attention_heads=sizes.llm_heads,
        num_key_value_heads=sizes.llm_heads,
        max_position_embeddings=sizes.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_base_models(out: str | Path, sizes: TinySizes | None = None, seed: int = 0) -> dict[str, str]:
    """Write out/vision and out/llm (model + tokenizer). Returns their paths."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    sizes = sizes or TinySizes()
    out = Path(out)
    torch.manual_seed(seed)

    vision_dir = out / "vision"
    CLIPVisionModel(vision_config(sizes)).save_pretrained(vision_dir)
    write_image_processor(vision_dir, sizes.image_size)

    llm_dir = out / "llm"
    tokenizer = build_tokenizer(sizes.vocab_size)
    llm = LlamaForCausalLM(llama_config(sizes, tokenizer))
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    log.info("tiny base models written: vision=%s llm=%s (vocab %d)", vision_dir, llm_dir, len(tokenizer))
    return {"vision_tower": str(vision_dir), "llm": str(llm_dir)}
