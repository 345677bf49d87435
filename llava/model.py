"""The LLaVA model: CLIP vision tower -> projector -> causal LM (Liu et al., 2023, Fig. 1).

The tokenizer has already expanded every `<image>` into `num_image_tokens` copies of
the image token id (llava.tokenization), so the model's only multimodal step is to
scatter the projected patch features into those positions of the embedded sequence.

On-disk format of a checkpoint directory (see `save_pretrained`; the names are in llava/run_format.py):

    llava_config.json       ModelConfig + format version
    projector.safetensors   always
    llm/                    HF causal LM + tokenizer, when saved (stage 2); else the base `config.llm` is used
    llm_adapter/            peft LoRA adapter of the LLM (LoRA stage 2); merged into the LLM on load
    vision/                 HF CLIP vision model, when saved; else the base `config.vision_tower` is used
    _checksums.json         every file above with its size and sha256, written last and verified on load
                            (llava/artifact_manifest.py)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava.artifact_manifest import verify_or_warn, write_manifest
from llava.config import ModelConfig, config_from_dict, config_to_dict
from llava.projectors import build_projector, num_image_tokens
from llava.run_format import ADAPTER_DIR, CONFIG_FILE, FORMAT_VERSION, LLM_DIR, PROJECTOR_FILE, VISION_DIR
from llava.tokenization import image_token_id, load_tokenizer, prepare_tokenizer

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name; its pickled adapter_model.bin is refused


def _from_pretrained(cls, path: str, **kwargs):
    """`cls.from_pretrained` that refuses pickle weights (safetensors only); s3:// URIs are mirrored locally."""
    return cls.from_pretrained(_local(path), use_safetensors=True, **kwargs)


def _local(path: str) -> str:
    from llava import storage

    return storage.local_copy(path) if storage.is_s3(str(path)) else str(path)


def image_tokens_per_image(config: ModelConfig, vision_config) -> int:
    """Tokens one image becomes: patch features (+ CLS if selected) mapped by the projector."""
    vision_config = getattr(vision_config, "vision_config", vision_config)  # a CLIPConfig holds its vision part
    features = (vision_config.image_size // vision_config.patch_size) ** 2 + (config.select_feature == "cls_patch")
    return num_image_tokens(config.projector, features)


def expected_image_tokens(config: ModelConfig) -> int:
    """`image_tokens_per_image` from the vision tower's config alone (no weights loaded)."""
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(_local(config.vision_tower))
    vision = getattr(vision, "vision_config", vision)
    if vision.image_size != config.image.size:
        raise ValueError(f"model.image.size={config.image.size} but the vision tower takes {vision.image_size} px")
    return image_tokens_per_image(config, vision)


def _split_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def resize_embeddings_deterministically(llm: nn.Module, new_size: int) -> None:
    """Grow the vocabulary; new rows start at the mean of the old ones (reproducible across loads)."""
    old = llm.get_input_embeddings().weight.shape[0]
    if new_size <= old:
        return
    llm.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        for matrix in {
            id(m): m for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None
        }.values():
            matrix.weight[old:] = matrix.weight[:old].mean(dim=0, keepdim=True)
    log.info("resized the LLM vocabulary from %d to %d tokens", old, new_size)


class LlavaModel(nn.Module):
    def __init__(self, config: ModelConfig, vision_tower: nn.Module, projector: nn.Module, llm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower  # transformers CLIPVisionModel
        self.projector = projector
        self.llm = llm  # any AutoModelForCausalLM
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id(tokenizer)
        vision = vision_tower.config
        self.num_patches = (vision.image_size // vision.patch_size) ** 2
        self.num_image_tokens = image_tokens_per_image(config, vision)
        self.vision_tower.requires_grad_(False)  # frozen unless a freeze policy says otherwise

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32) -> LlavaModel:
        """Pretrained vision tower + pretrained LLM + a freshly initialised projector."""
        from transformers import AutoModelForCausalLM, CLIPVisionModel

        vision = _from_pretrained(CLIPVisionModel, config.vision_tower, dtype=dtype)
        llm = _from_pretrained(AutoModelForCausalLM, config.llm, dtype=dtype)
        tokenizer = prepare_tokenizer(load_tokenizer(config.tokenizer_path), config.template)
        resize_embeddings_deterministically(llm, len(tokenizer))
        projector = build_projector(
            config.projector, vision.config.hidden_size, llm.get_input_embeddings().embedding_dim
        )
        log.info("built LLaVA: vision=%s llm=%s projector=%s", config.vision_tower, config.llm, config.projector.type)
        return cls(config, vision, projector.to(dtype), llm, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, **overrides) -> LlavaModel:
        """Load a checkpoint directory written by `save_pretrained` (local or s3://).

        `overrides` replace data-side fields of the saved config (template, max_length, image),
        e.g. stage 2 with another conversation template than stage 1.
        """
        from transformers import AutoModelForCausalLM, CLIPVisionModel

        path = Path(_local(str(path)))
        config_file = path / CONFIG_FILE
        if not config_file.exists():
            raise FileNotFoundError(f"{path} is not a llava-ray checkpoint: {CONFIG_FILE} is missing")
        verify_or_warn(path, "checkpoint")  # every file against its sha256 before any is read
        saved = json.loads(config_file.read_text())
        unknown = set(overrides) - {"template", "max_length", "image"}
        if unknown:
            raise ValueError(f"only template, max_length and image can be overridden on load, got {sorted(unknown)}")
        config = config_from_dict(ModelConfig, {**saved["model"], **overrides})
        vision_path = str(path / VISION_DIR) if (path / VISION_DIR).is_dir() else config.vision_tower
        llm_path = str(path / LLM_DIR) if (path / LLM_DIR).is_dir() else config.llm
        tokenizer_path = (
            str(path / LLM_DIR) if (path / LLM_DIR / "tokenizer_config.json").exists() else config.tokenizer_path
        )
        vision = _from_pretrained(CLIPVisionModel, vision_path, dtype=dtype)
        llm = _from_pretrained(AutoModelForCausalLM, llm_path, dtype=dtype)
        tokenizer = prepare_tokenizer(load_tokenizer(tokenizer_path), config.template)
        resize_embeddings_deterministically(llm, len(tokenizer))
        if (path / ADAPTER_DIR).is_dir():  # LoRA stage 2: merge the adapter into the base LLM
            from peft import PeftModel

            adapter = path / ADAPTER_DIR
            if not (adapter / ADAPTER_WEIGHTS).is_file():  # peft reads it first, else falls back to a pickled .bin
                raise FileNotFoundError(f"{adapter}: no {ADAPTER_WEIGHTS} (LoRA adapters load from safetensors only)")
            llm = PeftModel.from_pretrained(llm, str(adapter)).merge_and_unload()
            log.info("merged the LoRA adapter %s into the LLM", path / ADAPTER_DIR)
        projector = build_projector(
            config.projector, vision.config.hidden_size, llm.get_input_embeddings().embedding_dim
        )
        projector.load_state_dict(load_file(str(path / PROJECTOR_FILE)))
        log.info("loaded LLaVA checkpoint %s (llm from %s, vision from %s)", path, llm_path, vision_path)
        return cls(config, vision, projector.to(dtype), llm, tokenizer)

    def save_pretrained(
        self,
        path: str | Path,
        llm: bool = True,
        vision: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> Path:
        """Write the checkpoint. Components not saved are reloaded from the base ids in the config.

        `state_dict` (this module's full state dict) replaces the live weights, for callers whose
        parameters are sharded (DeepSpeed ZeRO-3 consolidates them on one rank). An LLM wrapped by
        peft is saved as its LoRA adapter (`llm_adapter/`).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state_dict = self.state_dict() if state_dict is None else state_dict
        projector = {k: v.detach().contiguous().cpu() for k, v in _split_state_dict(state_dict, "projector.").items()}
        save_file(projector, str(path / PROJECTOR_FILE))
        if llm and hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(
                path / ADAPTER_DIR,
                state_dict=_split_state_dict(state_dict, "llm."),
                save_embedding_layers=False,
                safe_serialization=True,
            )
        elif llm:
            self.llm.save_pretrained(
                path / LLM_DIR, state_dict=_split_state_dict(state_dict, "llm."), safe_serialization=True
            )
            self.tokenizer.save_pretrained(path / LLM_DIR)
        if vision:
            self.vision_tower.save_pretrained(
                path / VISION_DIR, state_dict=_split_state_dict(state_dict, "vision_tower."), safe_serialization=True
            )
        meta = {
            "format_version": FORMAT_VERSION,
            "model": config_to_dict(self.config),
            "num_image_tokens": self.num_image_tokens,
        }
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        write_manifest(path)  # last: every file with its sha256, checked on load
        return path

    # ---- forward ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) -> (n_images, num_image_tokens, D_llm)."""
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
            features = out.hidden_states[self.config.select_layer]  # (n, 1 + N_patches, D_v); LLaVA: layer -2
        if self.config.select_feature == "patch":
            features = features[:, 1:]  # drop CLS: (n, N_patches, D_v)
        return self.projector(features.to(next(self.projector.parameters(), features).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings with image features scattered into the image positions: (B, L, D)."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, L, D)
        image_mask = input_ids == self.image_token_id  # (B, L)
        n_positions = int(image_mask.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_positions != n_images * self.num_image_tokens:
            raise ValueError(
                f"{n_positions} image-token positions in input_ids but {n_images} image(s) x "
                f"{self.num_image_tokens} tokens each were given"
            )
        if n_images == 0:
            return embeds
        features = self.encode_images(pixel_values).reshape(-1, embeds.shape[-1])  # (n * N, D)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        """Causal-LM output of the underlying LLM (loss when `labels` is given, -100 ignored)."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, attention_mask=None, **kwargs
    ):
        """New token ids only, (B, new_tokens), via the LLM's own `generate` on spliced embeddings."""
        inputs_embeds = self.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
