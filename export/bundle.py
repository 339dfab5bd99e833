"""Checkpoint -> bundle: the one command users run once per model.

In: the release checkpoint (`consolidated.00-of-01.pth` or its ten shards), the LLaMA
SentencePiece `tokenizer.model`, optionally a separate CLIP ViT-L/14 file, a model
config. Out: a directory with

    manifest.json                 the contract with the runtime (runtime/manifest.py, schema v2)
    tokenizer.model               copied verbatim
    encoder/*.onnx                staged encoder graphs per precision (export/onnx_encoder.py)
    decoder-<quant>.gguf          the LLaMA decoder per quantization (export/gguf.py)

Everything is written into a hidden staging directory next to the target and moved
into place only when every validation passed, so a failed export never leaves a
half-written bundle and never touches an existing one (replacing a non-empty target
needs `force`). `build_demo_bundle` makes the `tiny` random-weight bundle the README
and `onellm ask` use when no real bundle is given; its manifest says the weights are random.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from onellm.runtime import __version__
from onellm.runtime.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION, sha256_file
from onellm.runtime.errors import BundleError, ConfigError, OneLLMError
from onellm.runtime.inputs import check_out_dir
from onellm.runtime.manifest import (
    DecoderSection,
    DecoderVariant,
    EncoderSection,
    EncoderVariant,
    Manifest,
    Preprocessing,
    Source,
    TensorRTEngines,
    TokenizerSpec,
)
from onellm.runtime.modalities import get_modality
from onellm.runtime.modalities.base import reader_constants
from onellm.runtime.prompt import V1_PROMPT
from onellm.runtime.registry import DECODER_QUANTS, ENCODER_PRECISIONS, EXECUTION_PROVIDERS
from onellm.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, done, total)

DEMO_SEED = 1234
RANDOM_WEIGHTS_NOTICE = (
    "This bundle has RANDOM weights (the `tiny` demo model): it exercises the whole "
    "pipeline, but its answers are meaningless text."
)


def _tool_versions() -> dict[str, str]:
    out = {"onellm": __version__, "python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "gguf", "llama-cpp-python", "sentencepiece",
                 "tensorrt", "openvino", "nncf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def split_choices(value: str | Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """A comma list (or a sequence) of registry names, each checked against `known`, duplicates dropped."""
    if value is None:
        return []
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in known]
    if bad:
        raise ConfigError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(items))


def check_target(out_dir: Path, force: bool) -> None:
    """Refuse to replace a non-empty directory (or any file) unless forced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out_dir}: directory is not empty; pass --force to replace it, or choose another --out")


def _checkpoint_digest(files: Sequence[str]) -> str:
    """sha256 over the checkpoint file digests, in order (one file: its own sha256)."""
    digests = [sha256_file(f) for f in files]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def build_bundle(
    out_dir: str | os.PathLike,
    cfg,
    checkpoint: str | os.PathLike | Sequence[str],
    tokenizer: str | os.PathLike,
    *,
    clip_checkpoint: str | os.PathLike | None = None,
    modalities: str | Sequence[str] | None = None,
    encoder_precision: str | Sequence[str] = "fp32",
    decoder_quant: str | Sequence[str] = "f16",
    trt: bool = False,
    force: bool = False,
    random_weights: bool = False,
    random_seed: int | None = None,
    progress: Progress | None = None,
    gguf_tolerances: dict[str, dict[str, float]] | None = None,
    low_memory: bool | None = None,
    calibration: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> Manifest:
    """Export encoder graphs and decoder GGUF(s), validate each, write the manifest; return it.

    `gguf_tolerances`: per quant, overrides of `validate_gguf`'s tolerances (the bench
    relaxes them for random-weight models, whose flat logits inflate max|diff|/std).
    `random_seed`: the seed `save_random_checkpoint` made the checkpoint with, recorded so
    `onellm verify` can rebuild that checkpoint (the demo bundle) instead of asking for it.
    `low_memory`: load the checkpoint as stored (memory-mapped, no fp32 copy: a 7B release
    needs ~0.5 GB instead of 27 GB); the encoder graphs are traced from an encoder-only fp32
    copy and each GGUF is checked against the same fp32 reference run one decoder layer at a
    time (`onellm.ref.lowmem`), so the validation is the full one, only slower. Default
    (None): on when the model in fp32 would take over half of this machine's RAM
    (`fp32_exceeds_half_ram`), e.g. the 7B release on 24 GiB.
    `calibration`: per modality, preprocessed arrays (each of the modality's input shape) that
    calibrate the ov-int8 encoder beside the seeded random inputs (`export_encoder_variants`).
    """
    from onellm.ref.checkpoint import load_model

    from .onnx_encoder import export_encoder_variants

    out_dir = Path(out_dir)
    check_target(out_dir, force)
    mods = split_choices(modalities, cfg.modalities, "modality") or list(cfg.modalities)
    precisions = split_choices(encoder_precision, tuple(ENCODER_PRECISIONS), "encoder precision") or ["fp32"]
    quants = split_choices(decoder_quant, tuple(DECODER_QUANTS), "decoder quantization") or ["f16"]
    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise ConfigError(f"{tokenizer}: tokenizer file not found (expected the LLaMA tokenizer.model)")

    def step(what: str, done: int, total: int) -> None:
        if progress:
            progress(what, done, total)

    if low_memory is None:
        low_memory = fp32_exceeds_half_ram(cfg)
        if low_memory:
            log.info("%s in fp32 would take over half the RAM: exporting from the checkpoint as stored", cfg.name)
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    stage.chmod(0o755)  # mkdtemp's 0700 would make the finished bundle private
    try:
        step("load checkpoint", 0, 1)
        model, report = load_model(cfg, checkpoint, clip_checkpoint=clip_checkpoint,
                                   dtype=_stored_dtype(checkpoint) if low_memory else "fp32")
        step("load checkpoint", 1, 1)
        src_digest = _checkpoint_digest(report.files)

        enc = export_encoder_variants(model, cfg, stage / "encoder", mods, precisions,
                                      progress=lambda w, d, t: step(f"encoder: {w}", d, t), relative_to=stage,
                                      calibration=calibration)

        shutil.copyfile(tokenizer, stage / "tokenizer.model")
        decoders = export_decoders(model, cfg, checkpoint, stage, quants, probe=mods[0], tolerances=gguf_tolerances,
                                   step=step, release_files=report.files if low_memory else ())
        trt_entry = _maybe_build_trt(stage, enc, step) if trt else None

        tok = Tokenizer(stage / "tokenizer.model")
        files = {path.relative_to(stage).as_posix(): sha256_file(path)
                 for path in sorted(stage.rglob("*")) if path.is_file()}
        manifest = Manifest(
            schema=SCHEMA,
            schema_version=SCHEMA_VERSION,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            random_weights=bool(random_weights),
            notice=RANDOM_WEIGHTS_NOTICE if random_weights else "",
            preset=cfg.name,
            config=_jsonable(cfg.to_dict()),
            source=Source(
                checkpoint=tuple(Path(f).name for f in report.files),
                sha256=src_digest,
                clip_source=report.clip_source,
                tokenizer_sha256=sha256_file(tokenizer),
                random_seed=None if random_seed is None else int(random_seed),
            ),
            n_embd=cfg.decoder.dim,
            n_inserted=cfg.n_inserted,
            modalities=tuple(mods),
            tokenizer=TokenizerSpec(file="tokenizer.model", bos_id=tok.bos_id, eos_id=tok.eos_id, unk_id=tok.unk_id,
                                    vocab_size=cfg.decoder.vocab_size),
            prompt=V1_PROMPT,
            preprocessing={m: _preprocessing_entry(m) for m in mods},
            encoder=EncoderSection(default=_default_precision(precisions), precisions=enc),
            decoder=DecoderSection(default=quants[0], quants=decoders),
            tensorrt=trt_entry,
            tools=_tool_versions(),
            export_seconds=round(time.perf_counter() - started, 2),
            files=files,
        )
        (stage / MANIFEST).write_text(_dumps(manifest.to_dict()))
        _install(stage, out_dir)
        log.info("bundle written to %s in %.1fs", out_dir, manifest.export_seconds)
        return manifest
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def export_decoders(model, cfg, checkpoint, stage: Path, quants: Sequence[str], *, probe: str,
                    tolerances: dict[str, dict[str, float]] | None = None, step=None,
                    release_files: Sequence[str] = ()) -> dict[str, DecoderVariant]:
    """One GGUF per quantization in `stage`, each validated right after writing against the
    reference's logits on a real encoder block (the `probe` modality's seeded dummy input).

    `release_files`: the checkpoint files whose resident pages are dropped once read (the
    low-memory export; see build_bundle)."""
    from onellm.ref.checkpoint import open_checkpoint
    from onellm.ref.lowmem import page_releaser

    from .gguf import export_gguf, validate_gguf
    from .onnx_encoder import chain_input, fp32_reference, reference_block

    def report(what: str, done: int, total: int) -> None:
        if step:
            step(what, done, total)

    block = reference_block(fp32_reference(model), probe, chain_input(probe, 0))
    tensors = open_checkpoint(checkpoint)
    release = page_releaser(release_files) if release_files else None
    decoders: dict[str, DecoderVariant] = {}
    for quant in quants:
        name = f"decoder-{quant}.gguf"
        info = export_gguf(tensors, cfg, stage / "tokenizer.model", stage / name, quant=quant,
                           progress=lambda d, t, w, q=quant: report(f"decoder {q}: {w}", d, t), release=release)
        report(f"decoder {quant}: validate", 0, 1)
        parity = _jsonable(validate_gguf(model, cfg, stage / name, quant, block=block,
                                         tolerances=(tolerances or {}).get(quant), release_files=release_files))
        report(f"decoder {quant}: validate", 1, 1)
        decoders[quant] = DecoderVariant(quant=quant, file=name, sha256=info["sha256"], bytes=info["bytes"],
                                         n_ctx=cfg.decoder.max_seq_len, tolerance=parity.pop("tolerance"),
                                         parity={"probe_modality": probe, **parity})
    return decoders


def fp32_exceeds_half_ram(cfg) -> bool:
    """Whether the model's parameters in fp32 would take over half of this machine's RAM."""
    from onellm.ref.model import count_parameters

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume a 16 GiB machine
        ram = 16 * 2**30
    return count_parameters(cfg)["total"] * 4 > ram / 2


def _stored_dtype(checkpoint) -> str:
    """The floating dtype most of the checkpoint's tensors are stored in ("fp16" for the release)."""
    from collections import Counter

    from onellm.ref.checkpoint import dtype_name, open_checkpoint

    counts = Counter(dtype_name(t.dtype) for t in open_checkpoint(checkpoint).values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else "fp32"


def _install(stage: Path, out_dir: Path) -> None:
    """Move the finished staging directory into place: the target is replaced whole or not at all."""
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(trash)
        stage.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        stage.rename(out_dir)


def build_demo_bundle(out_dir: str | os.PathLike, *, force: bool = False, progress: Progress | None = None,
                      decoder_quant: str | Sequence[str] = "f32",
                      encoder_precision: str | Sequence[str] = "fp32,int8",
                      calibration: Mapping[str, Sequence[np.ndarray]] | None = None) -> Manifest:
    """The `tiny` random-weight demo bundle (seeded, so every machine builds the same one)."""
    from onellm.ref.config import load_preset
    from onellm.ref.testing import save_random_checkpoint, train_tiny_tokenizer

    cfg = load_preset("tiny")
    check_target(Path(out_dir), force)
    with tempfile.TemporaryDirectory(prefix="onellm-demo-") as tmp:
        if progress:
            progress("random tiny checkpoint", 0, 1)
        ckpt = Path(tmp) / "consolidated.00-of-01.pth"
        save_random_checkpoint(cfg, ckpt, seed=DEMO_SEED)
        tok = train_tiny_tokenizer(tmp, vocab_size=cfg.decoder.vocab_size)
        if progress:
            progress("random tiny checkpoint", 1, 1)
        return build_bundle(out_dir, cfg, ckpt, tok, encoder_precision=encoder_precision,
                            decoder_quant=decoder_quant, force=force, random_weights=True, random_seed=DEMO_SEED,
                            progress=progress, calibration=calibration)


def ensure_demo_bundle(path: str | os.PathLike, *, progress: Progress | None = None,
                       announce: Callable[[str], None] | None = None) -> bool:
    """The demo bundle at `path` (the runtime's default bundle), built there on first use; True when
    built now. Building needs torch (the export extra); without it a BundleError says what to do."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BundleError(f"no --bundle given and no demo bundle at {path}; build one where the export extra is "
                          f"installed (`onellm export --demo --out {path}`) or pass --bundle DIR") from None
    check_out_dir(path, "the demo bundle directory")
    if announce:
        announce(f"building the demo bundle (tiny model, RANDOM weights) in {path} - once")
    build_demo_bundle(path, progress=progress, force=True)
    return True


def _default_precision(precisions: Sequence[str]) -> str:
    # The runtime picks per device; this is the CPU provider's pick (int8 when exported, else fp32).
    return EXECUTION_PROVIDERS["cpu"].pick_precision(precisions, precisions[0])


def _preprocessing_entry(modality: str) -> Preprocessing:
    spec = get_modality(modality)
    return Preprocessing(
        cli_option=spec.cli_option,
        file_types=tuple(spec.file_types),
        input_shape=tuple(spec.input_shape),
        input_dtype=spec.input_dtype,
        n_frames=spec.n_frames,
        n_tokens=spec.n_tokens,
        requires_image=spec.requires_image,
        constants=_jsonable(reader_constants(modality)),
    )


def _maybe_build_trt(stage: Path, enc: dict[str, EncoderVariant],
                     progress: Progress | None = None) -> TensorRTEngines | None:
    """TensorRT engines when TensorRT, onnxruntime's provider and a GPU are here; else a notice."""
    from .tensorrt import build_engines

    try:
        return build_engines(stage, enc, progress)
    except OneLLMError as exc:
        log.warning("--trt: no TensorRT engines built: %s. The ONNX bundle works on its own "
                    "(onnxruntime CPU or CUDA).", exc)
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"
