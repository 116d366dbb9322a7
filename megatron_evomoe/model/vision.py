"""ViT vision encoder and the projector that maps its patch features into the LLM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VisionBlock(nn.Module):
    """Pre-norm transformer block, bidirectional attention, GELU MLP."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_hidden)
        self.fc2 = nn.Linear(ffn_hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, P, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [N, nh, P, hd]
        x = x + self.proj(a.transpose(1, 2).reshape(N, P, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    """images [N, 3, H, W] -> patch features [N, P, Dv] (no CLS token, as LLaVA uses patches)."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_image_tokens, cfg.hidden_size) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden_size)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed  # [N, P, Dv]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if kind == "mlp2x_gelu":  # LLaVA-1.5's projector
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    raise ValueError(f"vision.projector: unknown projector {kind!r}")
