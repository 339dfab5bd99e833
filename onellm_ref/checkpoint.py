"""Reading the released OneLLM checkpoint into the PyTorch reference model.

In: the release's `consolidated.00-of-01.pth` (every key prefixed `llma.`), or the web
demo's ten shards `consolidated.00-of-01.s{0..9}.pth`; when the checkpoint carries no
`clip.visual.*` weights, also an OpenAI / open_clip CLIP ViT-L/14 file.
Out: an `OneLLM` module (eval mode, no grad) plus a `LoadReport`.

Memory: the model is built on the meta device and the memory-mapped tensors are
*assigned* as its parameters (`load_state_dict(assign=True)`), so the ~15 GB fp16
release is never copied into RAM; its pages are read from the file (page cache) when
first used. Only a dtype cast copies, one tensor at a time (loading an fp16 file as
fp16, or an fp32 file as fp32, copies nothing).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from onellm.runtime.errors import CheckpointError

from .config import ModelConfig

log = logging.getLogger(__name__)

PREFIX = "llma."  # every key of the release is under the `llma` attribute of its wrapper
SINGLE_FILE = "consolidated.00-of-01.pth"
_SHARD_RE = re.compile(r"^(?P<base>.+)\.s(?P<index>\d+)\.pth$")

# CLIP text-tower leftovers in the release: present or not, never used.
_IGNORED_RE = re.compile(
    r"^clip\.(token_embedding\.|positional_embedding$|ln_final\.|text_projection$|"
    r"logit_scale$|transformer\.)"
)
CLIP_VISUAL = "clip.visual."

# Top-level names whose second component is a modality name (spec section 6).
_PER_MODALITY = (
    "routers", "resample_tokens", "clip_proj1", "clip_proj2", "start_tag", "end_tag",
    "conv1", "positional_embedding",
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"fp32" | "bf16" | "fp16"` (or a torch floating dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def key_modality(key: str) -> str | None:
    """The modality a (prefix-free) key belongs to, or None for shared weights."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[0] in _PER_MODALITY:
        return parts[1]
    return None


def is_ignored_key(key: str) -> bool:
    """True for the CLIP text-tower keys the model never uses."""
    return bool(_IGNORED_RE.match(key))


# --------------------------------------------------------------------------- files


def find_checkpoint_files(path_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The file(s) one checkpoint consists of.

    Accepts a single `.pth`, one shard `<base>.s<N>.pth` of a sharded checkpoint (all its
    siblings are found), a directory holding either layout, or an explicit list of files.
    Shards must be numbered 0..N-1 with none missing.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        path = Path(path_or_paths)
        if path.is_dir():
            return _files_in_dir(path)
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint file not found")
        m = _SHARD_RE.match(path.name)
        if m:
            return _shard_group(path.parent, m.group("base"))
        return [path]
    paths = [Path(p) for p in path_or_paths]
    if not paths:
        raise CheckpointError("no checkpoint files given")
    if len(set(paths)) != len(paths):
        raise CheckpointError(f"checkpoint file list repeats a file: {[str(p) for p in paths]}")
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file not found")
    indexed = [(_SHARD_RE.match(p.name), p) for p in paths]
    if len(paths) > 1 and all(m for m, _ in indexed):
        order = sorted(indexed, key=lambda mp: int(mp[0].group("index")))
        _check_contiguous([int(m.group("index")) for m, _ in order], paths[0].parent, order[0][0].group("base"))
        return [p for _, p in order]
    return paths


def _files_in_dir(directory: Path) -> list[Path]:
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    bases = sorted({m.group("base") for m in (_SHARD_RE.match(p.name) for p in directory.iterdir()) if m})
    if len(bases) == 1:
        return _shard_group(directory, bases[0])
    pth = sorted(p for p in directory.glob("*.pth") if p.is_file())
    if len(bases) > 1:
        raise CheckpointError(
            f"{directory}: several sharded checkpoints ({', '.join(bases)}); pass one shard's path"
        )
    if len(pth) == 1:
        return pth
    if not pth:
        raise CheckpointError(f"{directory}: no checkpoint found (expected {SINGLE_FILE} or its .s0..s9 shards)")
    raise CheckpointError(f"{directory}: several .pth files ({', '.join(p.name for p in pth)}); pass the file")


def _shard_group(directory: Path, base: str) -> list[Path]:
    found: dict[int, Path] = {}
    for p in directory.iterdir():
        m = _SHARD_RE.match(p.name)
        if m and m.group("base") == base and p.is_file():
            found[int(m.group("index"))] = p
    _check_contiguous(sorted(found), directory, base)
    return [found[i] for i in sorted(found)]


def _check_contiguous(indices: list[int], directory: Path, base: str) -> None:
    missing = sorted(set(range(max(indices) + 1)) - set(indices))
    if missing:
        names = ", ".join(f"{base}.s{i}.pth" for i in missing)
        raise CheckpointError(
            f"{directory}: sharded checkpoint is incomplete: missing {names} "
            f"(found shards {', '.join(map(str, indices))})"
        )
    if len(indices) != len(set(indices)):
        raise CheckpointError(f"{directory}: shard numbers of {base} repeat: {indices}")


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torch_file(path: Path, what: str = "checkpoint") -> Any:
    """`torch.load` a file memory-mapped and weights-only; every failure is one-line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {what} file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a {what} file, found a directory or special file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    expected = "a PyTorch checkpoint (torch.save zip file)"
    if size == 0:
        raise CheckpointError(f"{path}: expected {expected}, found an empty file")
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: expected {expected}, found a truncated or corrupt zip archive "
                f"({size} bytes, no central directory); download it again"
            )
        if _is_torchscript(path):
            raise CheckpointError(f"{path}: expected {expected}, found a TorchScript archive")
        return _guarded_load(path, expected, mmap=True)
    if head[:2] == b"\x80\x02":  # the pre-1.6 pickle format cannot be memory-mapped
        log.warning("%s: legacy (non-zip) torch.save format, loading it fully into RAM", path)
        return _guarded_load(path, expected, mmap=False)
    found = "a safetensors file" if head[:8] and _looks_like_safetensors(path) else f"bytes {head!r}"
    raise CheckpointError(f"{path}: expected {expected}, found {found}")


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        raw = fh.read(9)
    return len(raw) == 9 and raw[8:9] == b"{"


def _guarded_load(path: Path, expected: str, mmap: bool) -> Any:
    try:
        return torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/OSError/pickle errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: expected {expected}, could not read it (truncated or corrupt?): "
            f"{type(exc).__name__}: {first[:200]}"
        ) from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded object ({"model": sd} and {"state_dict": sd} too)."""
    for _ in range(2):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("model", "state_dict", "module") if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: expected a state dict of tensors, found no tensors (keys: {list(obj)[:5]})")
    return tensors


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name in out:
            raise CheckpointError(f"{path}: key {name!r} appears both with and without the {prefix!r} prefix")
        out[name] = value
    return out


def _open(path_or_paths) -> tuple[dict[str, torch.Tensor], list[Path]]:
    files = find_checkpoint_files(path_or_paths)
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        sd = _strip_prefix(_unwrap_state_dict(load_torch_file(f), f), PREFIX, f)
        clash = sorted(set(sd) & set(merged))
        if clash:
            raise CheckpointError(
                f"{f}: {len(clash)} keys also appear in {origin[clash[0]].name} (e.g. {clash[0]!r}); "
                "shards must hold disjoint keys"
            )
        merged.update(sd)
        origin.update(dict.fromkeys(sd, f))
    log.info("opened %s: %d tensors in %d file(s)", files[0] if len(files) == 1 else files[0].parent, len(merged), len(files))
    return merged, files


def open_checkpoint(path_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, memory-mapped, keys without the `llma.` prefix.

    `path_or_paths`: `consolidated.00-of-01.pth`, one shard of the ten-shard layout, a
    directory holding either, or a list of shard files.
    """
    return _open(path_or_paths)[0]


# --------------------------------------------------------------------------- CLIP file


def open_clip_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The CLIP visual tower of an OpenAI or open_clip ViT-L/14 file as `clip.visual.*` tensors.

    Accepts OpenAI's TorchScript `ViT-L-14.pt`, a plain state dict with `visual.*` keys
    (OpenAI or open_clip naming, optionally `module.`-prefixed or wrapped in
    {"state_dict": ...}), or one with `clip.visual.*` keys. Returns (tensors, source label).
    """
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path) and _is_torchscript(path):
        log.info("%s: OpenAI TorchScript archive, reading its state dict with torch.jit.load", path)
        try:
            with warnings.catch_warnings():  # torch.jit's deprecation notice is not the user's concern
                warnings.simplefilter("ignore", DeprecationWarning)
                sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as exc:
            raise CheckpointError(
                f"{path}: expected an OpenAI CLIP TorchScript archive, torch.jit.load failed: "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            ) from None
        style = "OpenAI TorchScript"
    else:
        sd = _unwrap_state_dict(load_torch_file(path, what="CLIP checkpoint"), path)
        style = "state dict"
        if any(k.startswith("module.") for k in sd):
            sd = _strip_prefix(sd, "module.", path)
            style = "open_clip state dict (module. prefix)"
    if any(k.startswith(CLIP_VISUAL) for k in sd):
        visual = {k: v for k, v in sd.items() if k.startswith(CLIP_VISUAL)}
        style += ", clip.visual.* keys"
    elif any(k.startswith("visual.") for k in sd):
        visual = {"clip." + k: v for k, v in sd.items() if k.startswith("visual.")}
        if style == "state dict":
            style = "OpenAI/open_clip state dict"
    else:
        hf = any(k.startswith(("vision_model.", "text_model.")) for k in sd)
        found = "Hugging Face transformers CLIP names (vision_model.*)" if hf else f"keys like {sorted(sd)[:3]}"
        raise CheckpointError(
            f"{path}: expected an OpenAI/open_clip CLIP ViT-L/14 state dict with visual.* keys, found {found}"
        )
    return visual, f"{style}: {path}"


# --------------------------------------------------------------------------- model


@dataclasses.dataclass
class LoadReport:
    """What `load_model` did."""

    files: tuple[str, ...]  # checkpoint file(s) read, shards in order
    clip_source: str  # "checkpoint" or "<format>: <CLIP file>"
    dtype: str  # parameter dtype of the model: fp32 / bf16 / fp16
    n_tensors: int  # tensors assigned to the model
    n_params: int  # elements in those tensors
    source_dtypes: dict[str, int]  # dtype in the file(s) -> tensor count
    cast_tensors: int  # tensors converted to `dtype` (each one a new RAM copy)
    cast_bytes: int  # bytes of RAM those copies take
    ignored_keys: tuple[str, ...]  # CLIP text-tower leftovers skipped
    skipped_keys: tuple[str, ...]  # weights of modalities the config leaves out
    seconds: float  # wall time of the load

    def summary(self) -> str:
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} shards in {Path(self.files[0]).parent}"
        src = ", ".join(f"{k} x{v}" for k, v in sorted(self.source_dtypes.items()))
        cast = (
            f"{self.cast_tensors} tensors cast ({self.cast_bytes / 2**20:.0f} MiB copied)"
            if self.cast_tensors else "no copies (memory-mapped)"
        )
        return (
            f"loaded {self.n_params / 1e6:.1f}M params ({self.n_tensors} tensors) from {files} as {self.dtype} "
            f"[file: {src}; {cast}]; CLIP visual from {self.clip_source}; "
            f"{len(self.ignored_keys)} text-tower keys ignored, {len(self.skipped_keys)} keys of unused modalities skipped; "
            f"{self.seconds:.2f}s"
        )


def build_meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The reference model with every tensor on the meta device (no memory)."""
    from .model import OneLLM

    with torch.device("meta"):
        return OneLLM(cfg)


def _compress(keys: Iterable[str], limit: int = 6) -> str:
    """Keys grouped by numeric components: `layers.{0-31}.attention.wq.weight (32)`."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for key in sorted(keys):
        parts = key.split(".")
        pattern = tuple("#" if p.isdigit() else p for p in parts)
        groups.setdefault(pattern, []).append(tuple(int(p) for p in parts if p.isdigit()))

    def ranges(values: set[int]) -> str:
        vals = sorted(values)
        out, start = [], vals[0]
        for a, b in zip(vals, vals[1:] + [None]):
            if b != a + 1:
                out.append(str(start) if start == a else f"{start}-{a}")
                start = b
        return ",".join(out)

    shown = []
    for pattern, idx in groups.items():
        slot, words = 0, []
        for p in pattern:
            if p == "#":
                values = {i[slot] for i in idx}
                words.append(str(idx[0][slot]) if len(values) == 1 else f"{{{ranges(values)}}}")
                slot += 1
            else:
                words.append(p)
        shown.append(".".join(words) + (f" ({len(idx)})" if len(idx) > 1 else ""))
    more = len(shown) - limit
    return ", ".join(shown[:limit]) + (f", ... and {more} more groups" if more > 0 else "")


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(map(str, t.shape)) + "]"


def load_model(
    cfg: ModelConfig,
    checkpoint: str | os.PathLike | Iterable[str | os.PathLike],
    clip_checkpoint: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "fp32",
) -> tuple[torch.nn.Module, LoadReport]:
    """Build `OneLLM(cfg)` from the release checkpoint without copying it into RAM.

    Every parameter the config needs must come from the checkpoint (CLIP's visual tower
    may come from `clip_checkpoint` instead); otherwise one `CheckpointError` lists the
    missing, unexpected and mis-shaped keys. CLIP text-tower keys and the weights of
    modalities outside `cfg.modalities` are skipped. Returns (model in eval mode with
    requires_grad off, LoadReport).
    """
    t0 = time.perf_counter()
    target = parse_dtype(dtype)
    sd, files = _open(checkpoint)
    where = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"

    model = build_meta_model(cfg)
    expected = model.state_dict()

    ignored = sorted(k for k in sd if k not in expected and is_ignored_key(k))
    skipped = sorted(
        k for k in sd
        if k not in expected and key_modality(k) is not None and key_modality(k) not in cfg.modalities
    )
    unexpected = sorted(set(sd) - set(expected) - set(ignored) - set(skipped))
    missing = [k for k in expected if k not in sd]

    clip_source = "checkpoint"
    missing_clip = [k for k in missing if k.startswith(CLIP_VISUAL)]
    if missing_clip:
        if clip_checkpoint is None:
            if len(missing_clip) == sum(k.startswith(CLIP_VISUAL) for k in expected):
                raise CheckpointError(
                    f"{where}: holds no CLIP visual weights (clip.visual.*); pass --clip-checkpoint with an "
                    "OpenAI (ViT-L-14.pt) or open_clip ViT-L/14 'openai' file"
                )
        else:
            clip_sd, clip_source = open_clip_checkpoint(clip_checkpoint)
            for k in missing_clip:
                if k in clip_sd:
                    sd[k] = clip_sd[k]
            still = [k for k in missing_clip if k not in sd]
            if still:
                raise CheckpointError(
                    f"{clip_checkpoint}: CLIP file lacks {len(still)} visual weights the model needs: {_compress(still)}"
                )
            missing = [k for k in missing if k not in sd]
            log.info("CLIP visual weights (%d tensors) from %s", len(missing_clip), clip_source)
    elif clip_checkpoint is not None:
        log.info("checkpoint holds the CLIP visual weights; --clip-checkpoint %s not used", clip_checkpoint)
    if clip_source == "checkpoint":
        log.info("CLIP visual weights from the checkpoint")

    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(_mismatch_message(where, cfg, missing, unexpected, wrong, sd, expected))

    source_dtypes: dict[str, int] = {}
    cast_tensors = cast_bytes = 0
    pages = _FilePages(files) if any(
        t.is_floating_point() and t.dtype != target for t in sd.values()
    ) else _FilePages([])
    state: dict[str, torch.Tensor] = {}
    for key in expected:  # one tensor at a time: at most one cast copy is in flight
        t = sd.pop(key)
        name = dtype_name(t.dtype)
        source_dtypes[name] = source_dtypes.get(name, 0) + 1
        if t.is_floating_point() and t.dtype != target:
            cast = t.to(target)
            pages.release(t)  # the file pages just read for the cast are not needed again
            t = cast
            cast_tensors += 1
            cast_bytes += t.numel() * t.element_size()
        state[key] = t
    del sd
    if cast_tensors:
        log.info("cast %d tensors to %s (%.0f MiB of new memory)", cast_tensors, dtype_name(target), cast_bytes / 2**20)

    model.load_state_dict(state, strict=True, assign=True)
    _materialize_leftovers(model)
    model.requires_grad_(False)
    model.eval()

    report = LoadReport(
        files=tuple(str(f) for f in files),
        clip_source=clip_source,
        dtype=dtype_name(target),
        n_tensors=len(state),
        n_params=sum(t.numel() for t in state.values()),
        source_dtypes=source_dtypes,
        cast_tensors=cast_tensors,
        cast_bytes=cast_bytes,
        ignored_keys=tuple(ignored),
        skipped_keys=tuple(skipped),
        seconds=time.perf_counter() - t0,
    )
    log.info(report.summary())
    return model, report


class _FilePages:
    """Drops the resident pages behind memory-mapped tensors once they have been cast.

    Casting reads every source page; without this, those clean file-backed pages stay
    counted in the process's RSS until the whole mapping goes away, so the peak would be
    the cast copies *plus* the file. Only whole pages inside a tensor's bytes that lie in
    a private/shared mapping of one of `files` are advised away (MADV_DONTNEED): such
    pages are re-read from the file if touched again, so nothing can be lost. Linux only;
    anywhere else (or on any failure) this does nothing.
    """

    MADV_DONTNEED = 4

    def __init__(self, files: list[Path]) -> None:
        self.spans: list[tuple[int, int]] = []
        self.madvise = None
        if not files or not sys.platform.startswith("linux"):
            return
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            self.madvise = libc.madvise
            self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.page = os.sysconf("SC_PAGE_SIZE")
            real = {os.path.realpath(f) for f in files}
            with open("/proc/self/maps") as fh:
                for line in fh:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[5].strip() in real:
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        self.spans.append((lo, hi))
        except (OSError, AttributeError, ValueError):
            self.spans = []

    def release(self, t: torch.Tensor) -> None:
        if not self.spans or self.madvise is None:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.spans):
            return
        lo = -(-start // self.page) * self.page
        hi = end // self.page * self.page
        if hi > lo:
            self.madvise(lo, hi - lo, self.MADV_DONTNEED)


def _materialize_leftovers(model: torch.nn.Module) -> None:
    """Give non-persistent buffers (never in a checkpoint) real memory after assignment.

    The model computes them itself: a module may define `init_buffers()` (called after
    the move); otherwise a leftover meta tensor is an internal error.
    """
    if not any(b.is_meta for b in model.buffers()):
        return
    hook = getattr(model, "init_buffers", None)
    if hook is None:
        leftovers = [n for n, b in model.named_buffers() if b.is_meta]
        raise AssertionError(f"buffers left on the meta device after loading: {leftovers[:5]}")
    hook()
    assert not any(b.is_meta for b in model.buffers()), "init_buffers() left meta buffers"


def _mismatch_message(where, cfg, missing, unexpected, wrong, sd, expected) -> str:
    parts = []
    if missing:
        missing_set = set(missing)
        mods = sorted({key_modality(k) for k in missing} - {None})
        whole = [m for m in mods if all(k in missing_set for k in expected if key_modality(k) == m)]
        rest = [k for k in missing if key_modality(k) not in whole]
        if whole:
            n_whole = len(missing) - len(rest)
            parts.append(
                f"no weights at all for modalities {', '.join(whole)} ({n_whole} keys; use a --config "
                "whose `modalities` leaves them out)"
            )
        if rest:
            parts.append(f"{len(rest)} missing: {_compress(rest)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_compress(unexpected)}")
    if wrong:
        shown = [f"{k} file {_shape(sd[k])} vs model {_shape(expected[k])}" for k in wrong[:4]]
        more = f", ... and {len(wrong) - 4} more" if len(wrong) > 4 else ""
        parts.append(f"{len(wrong)} with wrong shape: {', '.join(shown)}{more}")
    hint = ""
    if wrong or (missing and unexpected):
        hint = f"; is --preset/--config right (config {cfg.name!r})?"
    return f"{where} does not match model config {cfg.name!r}: " + "; ".join(parts) + hint
