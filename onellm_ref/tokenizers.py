"""Modality tokenizers: tokenizer kind -> module, and how each kind produces patch features.

A modality declares its kind in its `ModalitySpec` (`runtime/modalities/*.py`); this table
turns the kind into the module stored at `conv1.<modality>` in the checkpoint and into the
[N, width, L] features that OneLLM then flattens, prefixes with CLS, adds positions to and
normalises with CLIP's ln_pre (spec section 4). `clip_patch` has no module of its own: it
is CLIP's patch conv1 with CLIP's positional embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig
from .point_utils import PointPatchEmbed


def _build_conv2d(cfg: ModelConfig) -> nn.Module:
    t = cfg.tokenizers
    return nn.Conv2d(1, cfg.clip.width, kernel_size=t.audio_kernel, stride=t.audio_stride)


def _build_conv1d(cfg: ModelConfig) -> nn.Module:
    t = cfg.tokenizers
    return nn.Conv1d(t.imu_channels, cfg.clip.width, kernel_size=t.imu_kernel, bias=False)


def _build_linear(cfg: ModelConfig) -> nn.Module:
    t = cfg.tokenizers
    return nn.Linear(t.fmri_voxels, cfg.clip.width * t.fmri_tokens)


def _build_point_patch(cfg: ModelConfig) -> nn.Module:
    t = cfg.tokenizers
    return PointPatchEmbed(t.point_channels, cfg.clip.width, t.point_groups, t.point_k)


# kind -> builder of the module stored at conv1.<modality>; None = uses CLIP's own conv1
TOKENIZER_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module] | None] = {
    "clip_patch": None,
    "conv2d": _build_conv2d,
    "conv1d": _build_conv1d,
    "linear": _build_linear,
    "point_patch": _build_point_patch,
}


def expected_input_shape(kind: str, n_frames: int, cfg: ModelConfig) -> tuple[int, ...]:
    """The per-sample input shape (no batch) a tokenizer kind takes under cfg."""
    t, c = cfg.tokenizers, cfg.clip
    if kind == "clip_patch":
        image = (3, c.image_size, c.image_size)
        return (n_frames, *image) if n_frames > 1 else image
    if kind == "conv2d":
        return (1, t.audio_mel_bins, t.audio_frames)
    if kind == "conv1d":
        return (t.imu_channels, t.imu_samples)
    if kind == "linear":
        return (1, t.fmri_voxels)
    if kind == "point_patch":
        return (t.point_points, t.point_channels)
    raise KeyError(kind)


def tokenizer_features(kind: str, module: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
    """Run a modality's own tokenizer module: x [N, ...] -> features [N, width, L]."""
    if kind == "point_patch":
        out = module(x).to(x.dtype)  # fp32 inside, whatever the model dtype
    elif kind == "linear":
        out = module(x).reshape(x.shape[0], width, -1)  # channel c, token t = out[c*tokens + t]
    else:
        out = module(x)
    return out.reshape(out.shape[0], width, -1)
