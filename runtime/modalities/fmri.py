"""The fmri modality: NSD subject-1 nsdgeneral fMRI betas (.npy, length 15724)."""

from __future__ import annotations

import numpy as np

from .base import ModalityInput, ModalitySpec


def preprocess(source, **options) -> ModalityInput:
    raise NotImplementedError("fmri reader: pending")


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 15724)).astype(np.float32)


SPEC = ModalitySpec(
    name='fmri',
    cli_option='--fmri',
    description='NSD subject-1 nsdgeneral fMRI betas (.npy, length 15724)',
    file_types=('.npy',),
    input_shape=(1, 15724),
    tokenizer_kind='linear',
    n_frames=1,
    n_tokens=9,
    preprocess=preprocess,
    dummy_input=dummy_input,
    caption_prompt='Provide a one-sentence caption for the provided fMRI data.',
)
