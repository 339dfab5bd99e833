"""The point modality: coloured point cloud (.npy, .ply, .pcd, .xyz, .txt)."""

from __future__ import annotations

import numpy as np

from .base import ModalityInput, ModalitySpec


def preprocess(source, **options) -> ModalityInput:
    raise NotImplementedError("point reader: pending")


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((8192, 6)).astype(np.float32)


SPEC = ModalitySpec(
    name='point',
    cli_option='--point',
    description='coloured point cloud (.npy, .ply, .pcd, .xyz, .txt)',
    file_types=('.npy', '.ply', '.pcd', '.xyz', '.txt'),
    input_shape=(8192, 6),
    tokenizer_kind='point_patch',
    n_frames=1,
    n_tokens=1025,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='What is this?',
)
