"""TensorRT engine cache: where it lives, which machine it fits (no torch, no TensorRT import
unless asked).

The provider itself (name, options, fallbacks, availability) is the `tensorrt` entry of
`runtime.registry.EXECUTION_PROVIDERS`; this module adds the engine cache options.

A bundle exported with `--trt` holds engines built by onnxruntime's TensorRT execution
provider in `trt/`, valid only for the GPU model, compute capability and TensorRT version
they were built with (the manifest's `tensorrt.fingerprint`). `engine_cache_for` returns
the bundle's cache when this machine matches, else a per-fingerprint cache in the user's
cache directory where the provider rebuilds them (once) - never loading a stale engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .errors import BackendError
from .manifest import TensorRTEngines

log = logging.getLogger(__name__)

TRT_DIR = "trt"


def _gpu_identity() -> tuple[str, str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise BackendError("TensorRT needs an NVIDIA GPU; nvidia-smi was not found")
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"TensorRT needs an NVIDIA GPU; nvidia-smi failed ({exc})") from None
    if not out:
        raise BackendError("TensorRT needs an NVIDIA GPU; nvidia-smi lists none")
    name, _, cc = out[0].partition(",")
    return name.strip(), cc.strip()


def current_fingerprint() -> dict[str, str]:
    """GPU name, compute capability, TensorRT and onnxruntime versions of this machine."""
    try:
        import tensorrt
    except ImportError:
        raise BackendError("TensorRT is not installed (pip install 'onellm[trt]')") from None
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise BackendError("this onnxruntime has no TensorrtExecutionProvider (install the gpu extra: onnxruntime-gpu)")
    name, cc = _gpu_identity()
    return {"gpu": name, "compute_capability": cc, "tensorrt": tensorrt.__version__, "onnxruntime": ort.__version__}


def tensorrt_options(cache_dir: Path, fp16: bool = True) -> dict[str, Any]:
    """onnxruntime TensorRT provider options with an engine and timing cache in cache_dir."""
    return {
        "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
    }


def engine_cache_for(bundle_dir: Path, entry: TensorRTEngines | None, user_cache: Path) -> Path | None:
    """The engine cache to use on this machine, or None when the bundle has no engines."""
    if not entry:
        return None
    here = current_fingerprint()
    built = dict(entry.fingerprint)
    if here == built:
        return Path(bundle_dir) / entry.dir
    key = hashlib.sha256(json.dumps(here, sort_keys=True).encode()).hexdigest()[:16]
    target = user_cache / "trt" / key
    target.mkdir(parents=True, exist_ok=True)
    log.warning("TensorRT engines in %s were built for %s; this machine is %s - rebuilding into %s",
                bundle_dir, built, here, target)
    return target
