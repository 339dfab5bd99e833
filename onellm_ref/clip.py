"""The CLIP ViT visual tower used as OneLLM's universal encoder (spec section 3).

Parameter names follow OpenAI CLIP / open_clip (`visual.conv1`, `visual.transformer.
resblocks.{k}.attn.in_proj_weight`, ...) so the checkpoint's `clip.visual.*` keys load
strictly. Attention is written out with `scaled_dot_product_attention` (equal to
`nn.MultiheadAttention` with a packed in_proj); the MLP uses QuickGELU as ViT-L/14 does.
Only the pieces OneLLM runs are provided: the patch `conv1`, the trunk with `ln_pre` and
`ln_post`, and `proj` (kept for the checkpoint, never applied).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back (stable in bf16 / fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PackedAttention(nn.Module):
    """Self-attention with a packed in_proj [3*width, width] and an out_proj Linear."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(bsz, seqlen, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(bsz, seqlen, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = PackedAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp_dim), gelu=QuickGELU(), c_proj=nn.Linear(mlp_dim, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_dim, cfg.ln_eps) for _ in range(cfg.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # batch-first [B, L, width]
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.grid * cfg.grid + 1, width))
        self.ln_pre = LayerNorm(width, eps=cfg.ln_eps)
        self.transformer = ClipTransformer(cfg)
        self.ln_post = LayerNorm(width, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.zeros(width, cfg.output_dim))  # stored, never applied


class CLIP(nn.Module):
    """Holds `visual` so that parameter names read `clip.visual.*` inside OneLLM."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.visual = VisionTransformer(cfg)
