"""A small BLIP-2 style Q-Former: learnable queries that read the patch features.

Reference: BLIP-2 (Li et al., 2023, arXiv:2301.12597), section 3.1. This is a
compact re-implementation, not the BERT-initialised original: each block is
pre-LayerNorm self-attention over the queries, cross-attention from the queries
to the image patches, and a GELU MLP, all residual. The output is a fixed
`num_queries` tokens per image whatever the number of patches.
"""

from __future__ import annotations

import torch
from torch import nn


class QFormerBlock(nn.Module):
    """Self-attention (queries) -> cross-attention (queries -> patches) -> MLP, pre-LN residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_patches = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        # queries: (n_images, Q, D), patches: (n_images, N, D)
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h, h, need_weights=False)[0]
        q = self.norm_query(queries)
        kv = self.norm_patches(patches)
        queries = queries + self.cross_attn(q, kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))  # (n_images, Q, D)


class QFormer(nn.Module):
    """(n_images, N, vision_dim) -> (n_images, num_queries, llm_dim)."""

    def __init__(
        self, vision_dim: int, llm_dim: int, num_queries: int = 32, num_layers: int = 2, num_heads: int = 8
    ) -> None:
        super().__init__()
        if num_queries <= 0 or num_layers <= 0 or num_heads <= 0:
            raise ValueError(
                f"qformer needs positive num_queries, qformer_layers and qformer_heads, "
                f"got {num_queries}, {num_layers}, {num_heads}"
            )
        if vision_dim % num_heads != 0:
            raise ValueError(
                f"qformer_heads={num_heads} must divide the vision width {vision_dim} "
                f"(each attention head gets vision_dim / qformer_heads channels)"
            )
        self.queries = nn.Parameter(torch.empty(1, num_queries, vision_dim))
        nn.init.normal_(self.queries, std=0.02)
        self.blocks = nn.ModuleList(QFormerBlock(vision_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, llm_dim)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[1]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: (n_images, N, vision_dim)
        queries = self.queries.expand(patches.shape[0], -1, -1)  # (n_images, Q, D_v)
        for block in self.blocks:
            queries = block(queries, patches)
        return self.proj(self.norm(queries))  # (n_images, Q, llm_dim)
