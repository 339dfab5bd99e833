"""The imu modality: 6-axis IMU recording (CSV or .npy)."""

from __future__ import annotations

import numpy as np

from .base import ModalityInput, ModalitySpec


def preprocess(source, **options) -> ModalityInput:
    raise NotImplementedError("imu reader: pending")


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((6, 400)).astype(np.float32)


SPEC = ModalitySpec(
    name='imu',
    cli_option='--imu',
    description='6-axis IMU recording (CSV or .npy)',
    file_types=('.csv', '.tsv', '.txt', '.npy'),
    input_shape=(6, 400),
    tokenizer_kind='conv1d',
    n_frames=1,
    n_tokens=392,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Describe the scene.',
)
