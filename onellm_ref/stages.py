"""The encoder side of OneLLM as stage functions: the one place its math is written.

`OneLLM.encode` is the composition of these stages, and each exported ONNX graph
(`onellm.export.onnx_encoder`) is one of them, called on the same submodules; the
runtime chains the graphs in the same order:

    embed_patches  tokenizer input -> [N, L, width]: row 0 = pos[0], rows 1.. = patches + pos[1:]
    begin_trunk    + class_embedding on row 0, CLIP's ln_pre
    run_trunk      CLIP's residual blocks, ln_post on every row
    mean_frames    the T frames of each sample averaged (video, rgbd, rgbn)
    resample_input clip_proj1[m], resample_tokens[m] prepended
    mix_experts    sum_e routing[:, e] * expert_e(x)[:, :n_out]
    project        clip_proj2[m], start_tag[m] + rows + end_tag[m]

Spec section 1 writes the CLS step as `cat(cls, patches) + pos`; here the class
embedding is added to row 0 after the positions (pos[0] + cls == cls + pos[0]: float
addition commutes, so the result is bit-identical), which lets CLIP's class embedding
and ln_pre live once, in the shared trunk graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .tokenizers import tokenizer_features
from .upm import run_expert


def embed_patches(kind: str, module: nn.Module, pos: torch.Tensor, x: torch.Tensor, width: int,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tokenizer's input -> [N, L, width] with positions (row 0 holds pos[0] for the CLS slot).

    `x` as the tokenizer graph takes it: clip_patch frames [N, 3, H, W] (conv1 is CLIP's);
    point_patch grouped neighbourhoods [N, C, groups, k]; any other kind the modality's
    input. `dtype`: the features are cast to it (the model's dtype; the point tokenizer
    computes in fp32 whatever it is).
    """
    if kind == "clip_patch":
        feats = module(x)
    elif kind == "point_patch":
        feats = module.embed_groups(x).to(x.dtype)
    else:
        feats = tokenizer_features(kind, module, x, width)
    if dtype is not None:
        feats = feats.to(dtype)
    feats = feats.reshape(feats.shape[0], feats.shape[1], -1).permute(0, 2, 1)
    pos = pos.to(feats.dtype)
    head = pos[:1].expand(feats.shape[0], 1, -1)
    return torch.cat([head, feats + pos[1:]], dim=1)


def begin_trunk(tokens: torch.Tensor, class_embedding: torch.Tensor, ln_pre: nn.Module) -> torch.Tensor:
    """Add CLIP's class embedding to row 0, then CLIP's ln_pre."""
    cls = class_embedding.to(tokens.dtype)
    return ln_pre(torch.cat([tokens[:, :1] + cls, tokens[:, 1:]], dim=1))


def run_trunk(h: torch.Tensor, blocks: Iterable[nn.Module], ln_post: nn.Module) -> torch.Tensor:
    """CLIP's residual blocks, then ln_post on every row."""
    for block in blocks:
        h = block(h)
    return ln_post(h)


def mean_frames(h: torch.Tensor, n_frames: int) -> torch.Tensor:
    """[B*T, L, width] -> [B, L, width], each sample's T frames averaged (T = 1: unchanged)."""
    if n_frames == 1:
        return h
    return h.reshape(-1, n_frames, *h.shape[1:]).mean(dim=1)


def resample_input(h: torch.Tensor, proj1: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """clip_proj1[m], then the modality's resample tokens prepended: [B, n_out + L, width]."""
    h = proj1(h)
    return torch.cat([tokens.to(h.dtype).expand(h.shape[0], -1, -1), h], dim=1)


def mix_experts(experts: Mapping[str, nn.ModuleList], x: torch.Tensor, routing: torch.Tensor, n_out: int,
                full_last_block: bool = False) -> torch.Tensor:
    """sum_e routing[:, e] * expert_e(x)[:, :n_out]; routing is [n_out, n_experts]."""
    routing = routing.to(x.dtype)
    out = None
    for e, blocks in experts.items():
        y = run_expert(blocks, x, n_out, full_last_block) * routing[:, int(e), None]
        out = y if out is None else out + y
    return out


def project(h: torch.Tensor, proj2: nn.Module, start_tag: torch.Tensor, end_tag: torch.Tensor) -> torch.Tensor:
    """clip_proj2[m] of the resampled rows between the modality's start and end tags."""
    h = proj2(h)
    bsz = h.shape[0]
    start = start_tag.to(h.dtype).expand(bsz, -1, -1)
    end = end_tag.to(h.dtype).expand(bsz, -1, -1)
    return torch.cat([start, h, end], dim=1)
