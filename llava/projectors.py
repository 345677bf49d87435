"""The vision -> LLM connector ("projector") registry.

Every projector maps CLIP patch features to LLM embeddings:

    (n_images, N_patches, vision_dim) -> (n_images, N_out, llm_dim)

with N_out == N_patches for every type except `qformer`, which emits a fixed
`num_queries` tokens per image. `num_image_tokens` tells the rest of the code
how many `<image>` positions each image occupies in the LLM sequence.

Types (`ProjectorConfig.type`):
    linear        LLaVA v1 (Liu et al., 2023, arXiv:2304.08485, eq. 1): H_v = W Z_v.
    mlp{N}x_gelu  LLaVA-1.5 (Liu et al., 2023, arXiv:2310.03744): Linear-GELU-...-Linear, N linears.
    identity      No projection; the vision width must equal the LLM width.
    qformer       BLIP-2 (Li et al., 2023, arXiv:2301.12597): learnable queries cross-attend to patches.

The MLP is a plain `nn.Sequential`, so its parameters are named `0.weight`,
`0.bias`, `2.weight`, ... exactly like the official LLaVA `mm_projector`; HF's
`LlavaForConditionalGeneration` calls the same two layers
`multi_modal_projector.linear_1` / `linear_2`.
"""

from __future__ import annotations

import re

from torch import nn

from llava.config import ProjectorConfig
from llava.qformer import QFormer

_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")

# Documentation-friendly listing; `mlp{N}x_gelu` stands for any N >= 1 (mlp1x_gelu, mlp2x_gelu, ...).
PROJECTOR_TYPES: tuple[str, ...] = ("linear", "mlp{N}x_gelu", "identity", "qformer")


def _mlp_depth(type_: str) -> int | None:
    """N for `mlp{N}x_gelu`, else None."""
    match = _MLP_PATTERN.match(type_)
    return int(match.group(1)) if match else None


def _unknown(type_: str) -> ValueError:
    return ValueError(
        f"unknown projector type {type_!r}; valid types are {', '.join(PROJECTOR_TYPES)} "
        f"(mlp{{N}}x_gelu with N >= 1, e.g. mlp2x_gelu)"
    )


def _build_mlp(depth: int, vision_dim: int, llm_dim: int) -> nn.Sequential:
    # (n_images, N, D_v) -> Linear -> (n_images, N, D_llm) -> [GELU -> Linear] * (depth - 1)
    layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]  # default GELU is erf, same as HF's "gelu"
    return nn.Sequential(*layers)


def build_projector(config: ProjectorConfig, vision_dim: int, llm_dim: int) -> nn.Module:
    """Build the connector; forward maps (n_images, N, vision_dim) -> (n_images, N_out, llm_dim)."""
    type_ = config.type
    if type_ == "linear":
        # LLaVA v1: H_v = W Z_v; (n_images, N, D_v) -> (n_images, N, D_llm)
        return nn.Linear(vision_dim, llm_dim)
    depth = _mlp_depth(type_)
    if depth is not None:
        # LLaVA-1.5: two-layer MLP with GELU; (n_images, N, D_v) -> (n_images, N, D_llm)
        if depth < 1:
            raise ValueError(f"projector type {type_!r} needs at least one linear layer (mlp{{N}}x_gelu with N >= 1)")
        return _build_mlp(depth, vision_dim, llm_dim)
    if type_ == "identity":
        # No projection; (n_images, N, D) -> (n_images, N, D)
        if vision_dim != llm_dim:
            raise ValueError(
                f"identity projector needs equal widths, but vision_dim={vision_dim} != llm_dim={llm_dim}; "
                f"use linear or mlp2x_gelu instead"
            )
        return nn.Identity()
    if type_ == "qformer":
        # BLIP-2 Q-Former; (n_images, N, D_v) -> (n_images, num_queries, D_llm)
        return QFormer(
            vision_dim,
            llm_dim,
            num_queries=config.num_queries,
            num_layers=config.qformer_layers,
            num_heads=config.qformer_heads,
        )
    raise _unknown(type_)


def num_image_tokens(config: ProjectorConfig, num_patch_features: int) -> int:
    """Visual tokens one image occupies in the LLM sequence after projection."""
    type_ = config.type
    if type_ == "qformer":
        return config.num_queries
    depth = _mlp_depth(type_)
    if depth is not None and depth < 1:
        raise ValueError(f"projector type {type_!r} needs at least one linear layer (mlp{{N}}x_gelu with N >= 1)")
    if type_ in ("linear", "identity") or depth is not None:
        return num_patch_features
    raise _unknown(type_)
