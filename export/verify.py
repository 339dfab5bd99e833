"""Re-check an existing bundle against its checkpoint (`onellm verify`).

In: a bundle directory and the checkpoint it was exported from. Out: a report dict
(lines to print, number of checks, failures). Checks: the manifest schema and every
file's sha256; the checkpoint's sha256 against the one recorded at export; every
encoder chain per precision against the PyTorch reference (same cosine floors as at
export); every GGUF's logits against the reference (same tolerances as at export).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from onellm.runtime.bundle import load_manifest, record_verified, sha256_file
from onellm.runtime.errors import ParityError
from onellm.runtime.modalities import get_modality

log = logging.getLogger(__name__)


def verify_bundle(bundle_dir: str | os.PathLike, checkpoint, *, clip_checkpoint=None, progress=None) -> dict[str, Any]:
    import torch

    from onellm.ref.checkpoint import load_model
    from onellm.ref.config import ModelConfig
    from onellm.runtime.encoder import Encoder

    from .bundle import _checkpoint_digest
    from .gguf import validate_gguf
    from .onnx_encoder import PARITY_MIN_COSINE, compare

    bundle_dir = Path(bundle_dir)
    lines: list[str] = []
    failures = 0
    checks = 0
    manifest = load_manifest(bundle_dir, verify=False).manifest
    # Always re-hash here (a verify run must not trust the cached stamp), once per file.
    for rel, digest in manifest.files.items():
        checks += 1
        if sha256_file(bundle_dir / rel) != digest:
            failures += 1
            lines.append(f"FAIL checksum {rel}")
    if not failures:
        lines.append(f"ok   checksums of {len(manifest.files)} files")
        record_verified(bundle_dir, dict(manifest.files))
    cfg = ModelConfig.from_dict(manifest.config, where=f"{bundle_dir}/manifest.json config")
    model, report = load_model(cfg, checkpoint, clip_checkpoint=clip_checkpoint, dtype="fp32")
    checks += 1
    digest = _checkpoint_digest(report.files)
    if digest != manifest.source.sha256:
        failures += 1
        lines.append(f"FAIL checkpoint sha256 {digest[:16]}… differs from the export's {manifest.source.sha256[:16]}…")
    else:
        lines.append("ok   checkpoint is the one the bundle was exported from")
    mods = manifest.modalities
    n_steps = len(manifest.encoder.precisions) * len(mods) + len(manifest.decoder.quants)
    step = 0
    for prec, entries in manifest.encoder.precisions.items():
        floor = PARITY_MIN_COSINE[prec]
        with Encoder(entries, bundle_dir, device="cpu", verify=False) as enc:
            for i, m in enumerate(mods):
                if progress:
                    progress(f"encoder {prec} {m}", step, n_steps)
                step += 1
                x = get_modality(m).dummy_input(np.random.default_rng([7, i])).astype(np.float32)
                with torch.no_grad():
                    ref = model.encode(m, torch.from_numpy(x)[None]).float().numpy()[0]
                fig = compare(ref, enc.encode(m, x))
                checks += 1
                ok = fig["cosine"] >= floor
                failures += not ok
                lines.append(f"{'ok  ' if ok else 'FAIL'} encoder {prec:5s} {m:6s} cosine {fig['cosine']:.7f} "
                             f"(floor {floor}) max-abs {fig['max_abs']:.3g}")
    block_mod = mods[0]
    x = get_modality(block_mod).dummy_input(np.random.default_rng(0))
    with torch.no_grad():
        block = model.encode(block_mod, torch.from_numpy(x)[None])[0].float().numpy()
    for quant, dec in manifest.decoder.quants.items():
        if progress:
            progress(f"decoder {quant}", step, n_steps)
        step += 1
        checks += 1
        try:
            fig = validate_gguf(model, cfg, bundle_dir / dec.file, quant, block=block, seed=1,
                                tolerances=dec.tolerance)
            lines.append(f"ok   decoder {quant:6s} logits cos_min {fig['cos_min']:.6f} top-1 {fig['top1']:.3f}")
        except ParityError as exc:
            failures += 1
            lines.append(f"FAIL decoder {quant}: {exc}")
    if progress:
        progress("done", n_steps, n_steps)
    return {"lines": lines, "checks": checks, "failures": failures, "ok": failures == 0}
