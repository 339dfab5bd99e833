"""What a modality declares, and the registry that finds the declarations.

Each module in this package defines one module-level `SPEC = ModalitySpec(...)`.
`get_modality(name)` and `all_modalities()` discover them; nothing else in the code
base branches on modality names.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

# Tokenizer kinds the PyTorch side knows how to build (onellm.ref maps kind -> module).
TOKENIZER_KINDS = ("clip_patch", "conv2d", "conv1d", "linear", "point_patch")


@dataclasses.dataclass
class ModalityInput:
    """A preprocessed input, ready for the encoder graph of its modality."""

    modality: str  # registry name, e.g. "imu"
    array: np.ndarray  # exactly SPEC.input_shape (no batch dimension), SPEC.input_dtype
    meta: dict[str, Any]  # JSON-serialisable facts: source file, sample rate, window, ...


@dataclasses.dataclass(frozen=True)
class ReaderFlag:
    """A command-line option that sets one keyword argument of a modality's reader."""

    option: str  # the flag, e.g. "--imu-rate"
    key: str  # the reader keyword it sets, e.g. "rate"
    kind: Any  # float, int or str; or a tuple of the allowed values
    help: str  # one line for --help

    @property
    def param(self) -> str:
        """The Python name of the option's value (click's: `--imu-rate` -> imu_rate)."""
        return self.option.lstrip("-").replace("-", "_")


@dataclasses.dataclass(frozen=True)
class Example:
    """A modality's example input: a file in `examples/` of a source checkout."""

    path: str  # relative to examples/, e.g. "imu/walk.csv"
    # writes a stand-in file of the same kind to the given path, for where there is no
    # examples/ folder (an installed package); None: the modality has no stand-in
    synthesize: Callable[[Path], None] | None = None


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """Everything the runtime and the reference need to know about one modality."""

    name: str  # checkpoint key suffix: image, video, audio, point, rgbd, rgbn, imu, fmri
    cli_option: str  # the `onellm ask` option that takes its file, e.g. "--imu"
    description: str  # one line for --help
    file_types: tuple[str, ...]  # accepted file extensions, lower case, with the dot
    input_shape: tuple[int, ...]  # tensor the encoder graph takes, without batch
    tokenizer_kind: str  # one of TOKENIZER_KINDS
    n_frames: int  # frames encoded by the CLIP trunk and averaged after it (1 = none)
    n_tokens: int  # tokens leaving the tokenizer, CLS included
    preprocess: Callable[..., ModalityInput]  # (source: path | array, **options) -> ModalityInput
    dummy_input: Callable[[np.random.Generator], np.ndarray]  # a valid random input for tests
    caption_prompt: str  # the evaluation question of spec section 8
    example: Example  # its example file (bench, preview pictures, docs and tests read it from here)
    input_dtype: str = "float32"  # numpy dtype name of the encoder input
    requires_image: bool = False  # rgbd/rgbn: the map must come with its RGB photo
    several_files: bool = False  # the reader takes a list of files (one-sensor IMU exports): a repeatable option
    accepts_folder: bool = False  # the reader takes a folder (an app's export folder)
    flags: tuple[ReaderFlag, ...] = ()  # dedicated CLI options for reader keywords (the rest: --reader-option)

    @property
    def input_name(self) -> str:
        """The word of its CLI option (`--depth` -> depth): the keyword its file goes by in the API."""
        return self.cli_option.lstrip("-").replace("-", "_")

    def __post_init__(self) -> None:
        if self.tokenizer_kind not in TOKENIZER_KINDS:
            raise ConfigError(
                f"modality {self.name!r}: unknown tokenizer kind {self.tokenizer_kind!r}; "
                f"known: {', '.join(TOKENIZER_KINDS)}"
            )


_REGISTRY: dict[str, ModalitySpec] | None = None


def _discover() -> dict[str, ModalitySpec]:
    global _REGISTRY
    if _REGISTRY is None:
        from . import __name__ as pkg_name, __path__ as pkg_path

        found: dict[str, ModalitySpec] = {}
        for info in sorted(pkgutil.iter_modules(pkg_path), key=lambda i: i.name):
            if info.name.startswith("_") or info.name == "base":
                continue
            module = importlib.import_module(f"{pkg_name}.{info.name}")
            spec = getattr(module, "SPEC", None)
            if isinstance(spec, ModalitySpec):
                if spec.name in found:
                    raise ConfigError(f"modality {spec.name!r} is declared twice")
                found[spec.name] = spec
        _REGISTRY = dict(sorted(found.items(), key=lambda kv: MODALITY_ORDER.index(kv[0])
                                if kv[0] in MODALITY_ORDER else len(MODALITY_ORDER)))
    return _REGISTRY


# The release's order (checkpoint and upstream lists); new modalities sort after it.
MODALITY_ORDER = ("image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu")


def all_modalities() -> dict[str, ModalitySpec]:
    """Every registered modality, by name, in the release's order."""
    return dict(_discover())


def input_names() -> dict[str, str]:
    """Every name an input may go by -> its modality: the registry name and the word of its CLI
    option (`--depth` -> rgbd, `--normal` -> rgbn), so the API, batch jobs and the CLI agree."""
    out: dict[str, str] = {}
    for spec in _discover().values():
        out[spec.name] = spec.name
        out.setdefault(spec.input_name, spec.name)
    return out


def examples_dir() -> Path | None:
    """`examples/` of the source checkout this package runs from (None when installed without it)."""
    here = Path(__file__).resolve().parents[2] / "examples"
    return here if here.is_dir() else None


def example_file(name: str) -> Path:
    """A modality's example file in examples/; ConfigError where there is none (an installed package)."""
    rel = get_modality(name).example.path
    found = examples_dir()
    if found is None or not (found / rel).is_file():
        raise ConfigError(f"modality {name!r}: no example file examples/{rel} here (it is in a source checkout)")
    return found / rel


def example_inputs(name: str, stand_ins: Path | None = None) -> dict[str, str] | None:
    """A modality's example as input keyword arguments ({"depth": ..., "image": ...}).

    The files of `examples/` where they are; else, given a `stand_ins` folder, stand-ins
    synthesised there once (for the modalities that have a synthesizer); else None.
    A modality that requires a photo gets the image modality's example as `image`.
    """
    spec = get_modality(name)
    wanted = {spec.input_name: spec.example}
    if spec.requires_image:
        wanted["image"] = get_modality("image").example
    found = examples_dir()
    out: dict[str, str] = {}
    for key, example in wanted.items():
        if found is not None and (found / example.path).is_file():
            out[key] = str(found / example.path)
        elif stand_ins is not None and example.synthesize is not None:
            path = stand_ins / example.path
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                example.synthesize(path)
            out[key] = str(path)
        else:
            return None
    return out


def get_modality(name: str) -> ModalitySpec:
    """The spec of one modality; an unknown name lists the known ones."""
    registry = _discover()
    try:
        return registry[name]
    except KeyError:
        raise ConfigError(
            f"unknown modality {name!r}; known modalities: {', '.join(registry)}"
        ) from None


def reader_constants(modality: str) -> dict[str, Any]:
    """The numeric module-level constants of a modality's reader (and CLIP's for image kinds).

    Recorded so a bundle says exactly which preprocessing it was exported for
    (normalisation statistics, sample rates, window lengths, point counts).
    """
    import importlib

    modules = [importlib.import_module(f"onellm.runtime.modalities.{modality}")]
    if get_modality(modality).tokenizer_kind == "clip_patch":
        modules.append(importlib.import_module("onellm.runtime.modalities._imaging"))
    out: dict[str, Any] = {}
    for mod in modules:
        for name, value in vars(mod).items():
            if not name.isupper() or name.startswith("_"):
                continue
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out[name] = value
            elif isinstance(value, np.ndarray) and value.size <= 16 and value.dtype.kind in "fiu":
                out[name] = value.tolist()
    return out
