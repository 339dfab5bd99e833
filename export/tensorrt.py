"""TensorRT engines for the encoder graphs (`onellm export --trt`).

In: a staged bundle's fp16 (or fp32) encoder graphs. Out: `trt/` inside the bundle with
the engines and a timing cache, built through onnxruntime's TensorRT execution provider
(its engine cache), and a manifest entry with the fingerprint the engines are only valid
for (GPU name, compute capability, TensorRT and onnxruntime versions).

Each modality's chain is run once with that modality's exact shapes, so each graph gets
an optimization profile per sequence length it serves (the shared CLIP trunk: one per
token count, 257 for image/video/rgbd/rgbn, 1213 audio, 1025 point, 392 IMU, 9 fMRI).
At run time `onellm.runtime.trt.tensorrt_options` points the provider at the same cache
when the fingerprint matches this machine, and at a private rebuild cache otherwise, so a
stale engine is rebuilt rather than loaded.

Without TensorRT, onnxruntime's TensorRT provider or an NVIDIA GPU this raises
`BackendError` with what is missing; the caller keeps the ONNX bundle, which works alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onellm.runtime.errors import BackendError
from onellm.runtime.manifest import EncoderVariant, TensorRTEngines
from onellm.runtime.modalities import get_modality
from onellm.runtime.trt import TRT_DIR, current_fingerprint, tensorrt_options

log = logging.getLogger(__name__)


def build_engines(stage: Path, enc: Mapping[str, EncoderVariant], progress=None) -> TensorRTEngines:
    """Build and cache fp16 engines for every modality chain; returns the manifest entry."""
    from onellm.runtime.encoder import Encoder

    fingerprint = current_fingerprint()  # raises BackendError when something is missing
    source = "fp16" if "fp16" in enc else "fp32"
    entries = enc[source]
    cache = stage / TRT_DIR
    cache.mkdir(parents=True, exist_ok=True)
    options = tensorrt_options(cache, fp16=True)
    mods = list(entries.modalities)
    with Encoder(entries, stage, device="tensorrt", verify=False, provider_options=options) as trt_enc:
        for i, m in enumerate(mods):
            if progress:
                progress(f"tensorrt {m}", i, len(mods))
            x = get_modality(m).dummy_input(np.random.default_rng(i)).astype(np.float32)
            trt_enc.encode(m, x)  # builds (or reuses) the engines for this chain's shapes
    files = sorted(p.relative_to(stage).as_posix() for p in cache.rglob("*") if p.is_file())
    if not files:
        raise BackendError("TensorRT provider ran but wrote no engine files (is the engine cache enabled?)")
    log.info("TensorRT: %d cached engine files for %d modalities", len(files), len(mods))
    return TensorRTEngines(dir=TRT_DIR, source_precision=source, fingerprint=fingerprint, files=tuple(files))
