"""Re-check an existing bundle against its checkpoint (`onellm verify`).

In: a bundle directory and the checkpoint it was exported from (for a bundle made from
a seeded random checkpoint, such as the demo bundle, none: it is rebuilt from the seed
the manifest records). Out: a report dict (lines to print, number of checks, failures).
Checks: the manifest schema and every file's sha256; the checkpoint's sha256 against the
one recorded at export, before anything slow (a different checkpoint stops the run);
every encoder chain per precision against the PyTorch reference (same cosine floors as
at export); every GGUF's logits against the reference (same tolerances as at export).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any


from onellm.runtime.bundle import load_manifest, verify_checksums
from onellm.runtime.errors import ConfigError, ParityError

log = logging.getLogger(__name__)


def verify_bundle(bundle_dir: str | os.PathLike, checkpoint=None, *, clip_checkpoint=None, progress=None,
                  checksums_only: bool = False) -> dict[str, Any]:
    """Checksums, then (unless `checksums_only`) the checkpoint's identity, then parity."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir, verify=False).manifest
    # Always re-hash here (a verify run must not trust the cached stamp), once per file.
    lines, checks, failures = verify_checksums(bundle_dir)
    if checksums_only:
        return {"lines": lines, "checks": checks, "failures": failures, "ok": failures == 0}
    seed = manifest.source.random_seed
    if checkpoint is None and seed is None:
        raise ConfigError(f"{bundle_dir}: --checkpoint is needed (the bundle records no random seed to rebuild "
                          "its checkpoint from); or pass --checksums-only")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onellm-verify-") as tmp:
        if checkpoint is None:
            from onellm.ref.config import ModelConfig
            from onellm.ref.testing import save_random_checkpoint

            cfg = ModelConfig.from_dict(manifest.config, where=f"{bundle_dir}/manifest.json config")
            checkpoint = Path(tmp) / "consolidated.00-of-01.pth"
            if progress:
                progress(f"random checkpoint (seed {seed})", 0, 1)
            save_random_checkpoint(cfg, checkpoint, seed=int(seed))
            lines.append(f"ok   rebuilt the random checkpoint from seed {seed}")
        return _verify_against(bundle_dir, manifest, checkpoint, clip_checkpoint, progress, lines, checks, failures)


def _verify_against(bundle_dir: Path, manifest, checkpoint, clip_checkpoint, progress, lines: list[str], checks: int,
                    failures: int) -> dict[str, Any]:
    from onellm.ref.checkpoint import find_checkpoint_files, load_model
    from onellm.ref.config import ModelConfig
    from onellm.runtime.encoder import Encoder
    from onellm.runtime.registry import ENCODER_PRECISIONS, OPENVINO_HINT

    from .bundle import _checkpoint_digest
    from .gguf import validate_gguf
    from .onnx_encoder import PARITY_MIN_COSINE, chain_input, check_chain, reference_block

    cfg = ModelConfig.from_dict(manifest.config, where=f"{bundle_dir}/manifest.json config")
    # The checkpoint's identity first: hashing is quick next to loading it and the parity runs.
    checks += 1
    digest = _checkpoint_digest(find_checkpoint_files(checkpoint))
    if digest != manifest.source.sha256:
        failures += 1
        lines.append(f"FAIL checkpoint sha256 {digest[:16]}… differs from the export's {manifest.source.sha256[:16]}…; "
                     "parity checks skipped (pass the checkpoint the bundle was exported from)")
        return {"lines": lines, "checks": checks, "failures": failures, "ok": False}
    lines.append("ok   checkpoint is the one the bundle was exported from")
    model, _report = load_model(cfg, checkpoint, clip_checkpoint=clip_checkpoint, dtype="fp32")
    mods = manifest.modalities
    n_steps = len(manifest.encoder.precisions) * len(mods) + len(manifest.decoder.quants)
    step = 0
    for prec, entries in manifest.encoder.precisions.items():
        floor = PARITY_MIN_COSINE[prec]
        if not ENCODER_PRECISIONS[prec].is_available():
            step += len(mods)
            lines.append(f"skip encoder {prec}: {ENCODER_PRECISIONS[prec].runtime} is not installed here "
                         f"({OPENVINO_HINT})")
            continue
        with Encoder(entries, bundle_dir, device="cpu", verify=False) as enc:
            for i, m in enumerate(mods):
                if progress:
                    progress(f"encoder {prec} {m}", step, n_steps)
                step += 1
                x = chain_input(m, [7, i])
                fig, ok = check_chain(enc, m, x, reference_block(model, m, x), prec)
                checks += 1
                failures += not ok
                lines.append(f"{'ok  ' if ok else 'FAIL'} encoder {prec:5s} {m:6s} cosine {fig['cosine']:.7f} "
                             f"(floor {floor}) max-abs {fig['max_abs']:.3g}")
    block_mod = mods[0]
    block = reference_block(model, block_mod, chain_input(block_mod, 0))
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
