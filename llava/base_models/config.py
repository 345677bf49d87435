"""Typed configuration of base-model pretraining (`llava-ray pretrain-base`, the pipeline's `base` stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llava.tiny_models import TinySizes


@dataclass
class ClipPretrainConfig:
    """Contrastive image-text pretraining of the tiny CLIP (Radford et al. 2021) on the captioned images."""

    steps: int = 500
    batch_size: int = 128
    lr: float = 2.0e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    text_width: int = 64
    text_layers: int = 2
    max_text_tokens: int = 24
    shift_pixels: int = 2  # augmentation: random translation by up to this many pixels

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 1:
            raise ValueError(
                f"clip.steps must be positive and clip.batch_size > 1, got {self.steps}, {self.batch_size}"
            )


@dataclass
class LmPretrainConfig:
    """Causal language modelling of the tiny Llama on text: captions, instruction turns, a generated corpus."""

    steps: int = 300
    batch_size: int = 32
    seq_len: int = 96
    lr: float = 3.0e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    corpus_documents: int = 6000  # generated documents (llava.base_models.corpus) besides the datasets' own text

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.seq_len < 8:
            raise ValueError("lm.steps and lm.batch_size must be positive and lm.seq_len at least 8")


@dataclass
class BasePretrainConfig:
    """Both base models; `captions` trains CLIP (and the LM), `instructions` adds text for the LM only."""

    out: str = ""  # directory: out/vision (CLIPVisionModel + image processor), out/llm (LlamaForCausalLM + tokenizer)
    captions: list[str] = field(default_factory=list)  # datasets of image + caption conversations (stage-1 data)
    instructions: list[str] = field(default_factory=list)  # datasets of instruction conversations (text only used)
    # 3 vision layers: LLaVA's image features are the penultimate layer's patches, which then have mixed in the whole
    # image over 2 attention layers (a linear probe on their mean, held-out digits: 0.75 with 2 layers, 0.91 with 3;
    # 4 layers and 800 steps gave 0.96, but the demo's held-out accuracy was no better: 0.953 vs 0.957-0.963)
    sizes: TinySizes = field(default_factory=lambda: TinySizes(vision_layers=3))
    caption_template: str = "plain"  # how stage 1 will show the LM a caption (its conversations as LM text)
    instruction_template: str = "vicuna_v1"  # how stage 2 will show it an instruction conversation
    clip: ClipPretrainConfig = field(default_factory=ClipPretrainConfig)
    lm: LmPretrainConfig = field(default_factory=LmPretrainConfig)
    seed: int = 0
    threads: int = 1  # torch threads per pretraining task (the two run side by side as Ray tasks)

    def validate(self) -> BasePretrainConfig:
        if not self.out:
            raise ValueError("out is empty: give the directory the base models go to (out=DIR)")
        if not self.captions:
            raise ValueError("captions is empty: give at least one image-caption dataset (captions=[URI,...])")
        return self
