"""Model configuration: frozen dataclasses stored as JSON, with named presets.

Every size the upstream code hard-codes is a field here. Presets are JSON files in
`presets/` (`7b` is the release exactly; `tiny` keeps every input shape and token count
but has small widths and depths). `from_dict` rejects unknown keys so a typo in a custom
config is an error, not a silently ignored field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from onellm.runtime.errors import ConfigError

PRESET_DIR = Path(__file__).with_name("presets")


def _ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA's SwiGLU hidden size: 2/3 of 4*dim, optionally scaled, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _from_dict(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls.__name__, f.name))
        if sub is not None:
            value = _from_dict(sub, value, f"{where}.{f.name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """The CLIP ViT visual tower used as the universal encoder."""

    width: int = 1024  # transformer width (ViT-L/14: 1024)
    layers: int = 24  # residual attention blocks
    heads: int = 16  # attention heads
    patch_size: int = 14  # conv1 kernel and stride
    image_size: int = 224  # input side; (image_size/patch_size)^2 patch tokens
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio (QuickGELU)
    output_dim: int = 768  # `proj` columns; stored in the checkpoint, never used
    ln_eps: float = 1e-5  # LayerNorm epsilon

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class UPMConfig:
    """Universal projection module: routed mixture of LLaMA-block experts."""

    n_experts: int = 3  # experts shared by all modalities
    depth: int = 8  # LLaMA blocks per expert
    heads: int = 16  # attention heads per block (head_dim = clip width / heads)
    multiple_of: int = 256  # SwiGLU hidden rounding (1024 -> 2816)
    ffn_dim_multiplier: float | None = None  # optional SwiGLU hidden scale
    norm_eps: float = 1e-5  # RMSNorm epsilon
    n_resample_tokens: int = 30  # learned query rows per modality; the first rows kept
    router_hidden_ratio: float = 4.0  # router Mlp hidden = clip width * ratio
    proj_ln_eps: float = 1e-5  # LayerNorm epsilon in clip_proj1/clip_proj2


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Per-modality tokenizers in front of the CLIP trunk."""

    audio_kernel: int = 16  # Conv2d(1, width, k, s) over [128 mel, 1024 frames]
    audio_stride: int = 10
    audio_mel_bins: int = 128
    audio_frames: int = 1024
    point_points: int = 8192  # points per cloud
    point_channels: int = 6  # xyz + rgb
    point_groups: int = 1024  # furthest-point-sampled centres
    point_k: int = 32  # neighbours per centre
    imu_channels: int = 6  # accel xyz + gyro xyz
    imu_samples: int = 400  # 2 s at 200 Hz
    imu_kernel: int = 10  # Conv1d kernel, stride 1, no bias
    fmri_voxels: int = 15724  # NSD subject 1 nsdgeneral
    fmri_tokens: int = 8  # Linear(voxels, width*tokens) reshaped [width, tokens]
    video_frames: int = 15  # 5 clips x 3 crops
    rgbx_frames: int = 2  # [RGB, depth-or-normal map]

    def n_patch_tokens(self, kind: str, clip: ClipConfig) -> int:
        """Tokens a tokenizer kind produces, CLS excluded."""
        if kind == "clip_patch":
            return clip.grid * clip.grid
        if kind == "conv2d":
            h = (self.audio_mel_bins - self.audio_kernel) // self.audio_stride + 1
            w = (self.audio_frames - self.audio_kernel) // self.audio_stride + 1
            return h * w
        if kind == "conv1d":
            return self.imu_samples - self.imu_kernel + 1
        if kind == "linear":
            return self.fmri_tokens
        if kind == "point_patch":
            return self.point_groups
        raise ConfigError(f"unknown tokenizer kind {kind!r}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """LLaMA decoder (Meta layout)."""

    dim: int = 4096  # model width (n_embd)
    n_layers: int = 32
    n_heads: int = 32  # no grouped-query attention in LLaMA-2-7B
    vocab_size: int = 32000  # SentencePiece vocabulary
    multiple_of: int = 256  # SwiGLU hidden rounding (4096 -> 11008)
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base, interleaved pairs (llama.cpp normal mode)
    max_seq_len: int = 2048  # context length, the 32 inserted rows included

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return _ffn_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole OneLLM model."""

    name: str  # preset or user label, recorded in bundles
    clip: ClipConfig = ClipConfig()
    upm: UPMConfig = UPMConfig()
    tokenizers: TokenizerConfig = TokenizerConfig()
    decoder: DecoderConfig = DecoderConfig()
    modalities: tuple[str, ...] = ("image", "video", "audio", "point", "rgbd", "rgbn", "fmri", "imu")
    n_inserted: int = 32  # rows injected after BOS: start_tag + resample tokens + end_tag

    def __post_init__(self) -> None:
        if self.clip.width % self.clip.heads:
            raise ConfigError(f"{self.name}: clip.width {self.clip.width} is not divisible by clip.heads")
        if self.clip.width % self.upm.heads:
            raise ConfigError(f"{self.name}: clip.width {self.clip.width} is not divisible by upm.heads")
        if self.decoder.dim % self.decoder.n_heads:
            raise ConfigError(f"{self.name}: decoder.dim is not divisible by decoder.n_heads")
        if self.n_inserted != self.upm.n_resample_tokens + 2:
            raise ConfigError(f"{self.name}: n_inserted must be upm.n_resample_tokens + 2 (start and end tags)")

    @property
    def upm_ffn_hidden(self) -> int:
        return _ffn_hidden(self.clip.width, self.upm.multiple_of, self.upm.ffn_dim_multiplier)

    @property
    def router_hidden(self) -> int:
        return int(self.clip.width * self.upm.router_hidden_ratio)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> ModelConfig:
        return _from_dict(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: expected a JSON model config, could not parse it ({exc})") from None
        return cls.from_dict(data, where=str(path))


_NESTED = {
    ("ModelConfig", "clip"): ClipConfig,
    ("ModelConfig", "upm"): UPMConfig,
    ("ModelConfig", "tokenizers"): TokenizerConfig,
    ("ModelConfig", "decoder"): DecoderConfig,
}


def list_presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> ModelConfig:
    """A shipped preset by name; an unknown name lists the known ones."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return ModelConfig.from_json_file(path)


def resolve_config(preset: str | None = None, config: str | Path | None = None) -> ModelConfig:
    """What `--preset NAME` / `--config FILE.json` select (exactly one, default `7b`)."""
    if preset and config:
        raise ConfigError("pass either --preset or --config, not both")
    if config:
        return ModelConfig.from_json_file(config)
    return load_preset(preset or "7b")
