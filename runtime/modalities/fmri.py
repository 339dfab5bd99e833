"""The fmri modality: NSD subject-1 nsdgeneral fMRI betas (.npy, length 15724).

Reading: `.npy` [15724] or [R,15724] (R repeats of the same stimulus, averaged, as
the reference), float16/32/64. Only subject 1 of the Natural Scenes Dataset, masked
with its "nsdgeneral" ROI, has 15724 voxels; other subjects' masks have other
lengths and other voxels, so any other length is an error.

Integer input: NSD distributes its betas as int16, percent signal change x 300. An
int16 array is therefore divided by 300, with a notice (`meta["rescaled"]` says so).
Betas are not distributed as any other integer or boolean type, so those are refused
with that guidance. Float betas with a median magnitude above 50 look like int16
values saved as float without the division: they are used as given, with a notice.
(The example and the training betas are float; whether raw NSD betas need a further
normalisation to match the training data is not checked here.)

Preprocessing (spec section 7, fmri): mean over repeats, no normalisation ->
[1,15724] float32.

In-memory input: an array [15724] or [R,15724].
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..errors import InputError
from ._io import Source, is_array, load_npy, require_file, require_finite, require_finite_output, source_label
from .base import Example, ModalityInput, ModalitySpec

logger = logging.getLogger(__name__)

N_VOXELS = 15724
NSD_INT16_SCALE = 300.0  # NSD stores betas as int16 = percent signal change x 300
SCALED_MEDIAN = 50.0  # median |beta| above this looks like the x300 storage scale
EXPECTED = f'NSD subject-1 "nsdgeneral" fMRI betas: a .npy of {N_VOXELS} values or [repeats, {N_VOXELS}]'


def preprocess(source: Source) -> ModalityInput:
    """fMRI betas -> [1,15724] float32 (spec section 7, fmri)."""
    t0 = time.perf_counter()
    label = source_label(source)
    if is_array(source):
        arr = source
        meta: dict[str, Any] = {"source": label}
    else:
        path = require_file(source, EXPECTED)
        arr = load_npy(path, EXPECTED)
        label = str(path)
        meta = {"source": label}
    if arr.dtype.kind not in "biuf":
        raise InputError(label, EXPECTED, f"an array of dtype {arr.dtype}")
    if arr.dtype.kind in "biu" and arr.dtype != np.int16:
        raise InputError(label, f"{EXPECTED}, float (or NSD's int16, percent signal change x 300)",
                         f"an array of dtype {arr.dtype}; convert it to float betas (if these are NSD "
                         f"int16 values, divide them by {NSD_INT16_SCALE:g})")
    if arr.ndim == 2 and arr.shape[0] == N_VOXELS and arr.shape[1] != N_VOXELS:
        raise InputError(label, EXPECTED, f"shape {list(arr.shape)} (voxels first: transpose it to "
                         f"[repeats, {N_VOXELS}])")
    if arr.ndim not in (1, 2) or arr.shape[-1] != N_VOXELS:
        other = arr.shape[-1] if arr.ndim in (1, 2) else None
        hint = (f"; {other} voxels is another subject or mask: the model was trained on subject 1 only"
                if other and other != N_VOXELS else "")
        raise InputError(label, EXPECTED, f"shape {list(arr.shape)}{hint}")
    rows = arr.reshape(-1, N_VOXELS)
    if rows.shape[0] == 0:
        raise InputError(label, EXPECTED, "0 repeats")
    require_finite(label, rows, EXPECTED)
    meta.update(dtype=str(arr.dtype), repeats=int(rows.shape[0]))
    values = rows.astype(np.float64)
    if arr.dtype == np.int16:
        values = values / NSD_INT16_SCALE
        meta["rescaled"] = f"int16 / {NSD_INT16_SCALE:g} (NSD's storage scale -> percent signal change)"
        logger.warning("%s: int16 betas read as NSD's storage format and divided by %g "
                       "(pass float betas to use the values as they are)", label, NSD_INT16_SCALE)
    else:
        median = float(np.median(np.abs(values))) if values.size else 0.0
        if median > SCALED_MEDIAN:
            logger.warning("%s: the betas' median magnitude is %.3g; NSD's int16 betas saved as float "
                           "without dividing by %g look like this (used as given)", label, median,
                           NSD_INT16_SCALE)
    with np.errstate(over="ignore", invalid="ignore"):
        array = values.mean(axis=0, keepdims=True).astype(np.float32)
    require_finite_output(label, array, EXPECTED)
    meta["preprocess_s"] = round(time.perf_counter() - t0, 4)
    return ModalityInput("fmri", array, meta)


def dummy_input(rng: np.random.Generator) -> np.ndarray:
    """Betas with the spread of z-scored NSD responses and some spatial smoothness."""
    x = rng.standard_normal(N_VOXELS + 8)
    x = np.convolve(x, np.ones(9) / 3.0, mode="valid")[:N_VOXELS]
    return x[None].astype(np.float32)


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
    example=Example('fmri/betas.npy'),
)
