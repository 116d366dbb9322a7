"""ViT vision encoder and the projector that maps its patch features into the LLM."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's gelu_pytorch_tanh
}


class VisionBlock(nn.Module):
    """Pre-norm transformer block, bidirectional attention, GELU-family MLP."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, activation: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.act = ACTIVATIONS[activation]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_hidden)
        self.fc2 = nn.Linear(ffn_hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, P, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [N, nh, P, hd]
        x = x + self.proj(a.transpose(1, 2).reshape(N, P, D))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    """images [N, 3, H, W] -> patch features [N, P, Dv] (patches only, as LLaVA uses them).

    The optional parts (`vision.cls_token`, `pre_norm`, `final_norm`, `activation`,
    `norm_eps`) let a CLIP or SigLIP tower load exactly; with the defaults this is the
    project's own ViT: no class token, no pre-LN, a final LayerNorm, erf GELU.
    With a class token it is prepended (position 0 of pos_embed, [P+1, Dv]) and dropped
    from the output, as LLaVA's 'default' feature selection does.
    """

    def __init__(self, cfg):
        super().__init__()
        eps = getattr(cfg, "norm_eps", 1e-5)
        act = getattr(cfg, "activation", "gelu")
        has_cls = getattr(cfg, "cls_token", False)
        self.patch_embed = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        if has_cls:
            self.cls_embed = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)  # [Dv]
        self.pos_embed = nn.Parameter(torch.randn(cfg.num_image_tokens + int(has_cls), cfg.hidden_size) * 0.02)
        if getattr(cfg, "pre_norm", False):
            self.pre_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden_size, act, eps)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=eps) if getattr(cfg, "final_norm", True) else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [N, P, Dv]
        has_cls = hasattr(self, "cls_embed")
        if has_cls:
            x = torch.cat([self.cls_embed.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # [N, 1+P, Dv]
        x = x + self.pos_embed
        if hasattr(self, "pre_norm"):
            x = self.pre_norm(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:] if has_cls else x


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if kind == "mlp2x_gelu":  # LLaVA-1.5's projector
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    raise ValueError(f"vision.projector: unknown projector {kind!r}")
