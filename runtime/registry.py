"""One home for the backend choices: decoder quantizations, encoder precisions, execution providers.

Everything else derives from these tables: the export's accepted values and
tolerances, the runtime's choices per device, the CLI's `--quant`/`--precision`/
`--device` choices and help texts, the bench's rows. Adding a quantization or an
execution provider is one entry here (plus, for a provider, whatever native package
it needs).

No native library is imported at module import; availability checks import
onnxruntime / llama.cpp when called.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .env import EXTRA_BUFTS, env_flag
from .errors import BackendError, ConfigError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- decoder quantizations


def _no_extra_bufts() -> bool:
    return False


def _repack() -> bool:
    """llama.cpp's CPU_REPACK weights where the CPU offers them (see DecoderQuant)."""
    from . import _llama

    try:
        return _llama.REPACK_BUFT in _llama.cpu_extra_buffer_types()
    except (OSError, AttributeError) as exc:  # an older llama.cpp without the device API
        log.debug("cannot list llama.cpp's extra buffer types (%s); leaving them off", exc)
        return False


@dataclasses.dataclass(frozen=True)
class DecoderQuant:
    """A GGUF file type the export writes and the runtime runs.

    Buffer-type policy: llama.cpp's extra CPU buffer types (weight repacking) are off by
    default. Its AMX buffer type is never used: quantized GGUFs crash on their first decode
    with it (tests/test_llama_bufts.py); where a CPU offers AMX, `_llama.LlamaModel` sends
    the tensors CPU_REPACK takes to CPU_REPACK by buffer-type overrides instead. q4_k_m
    repacks where CPU_REPACK exists: its Q4_K kernels measured 1.29x faster decoding, while
    the extra types made q8_0 1.41x slower (benchmarks/RESULTS.md). q4_0 follows q4_k_m: in the
    interleaved prefill sweep (benchmarks/prefill_sweep.py, bench preset, AMD EPYC Zen 4,
    AVX512-VNNI/BF16) its repacked weights prefilled the first question 1.3-1.7x faster and
    decoded 1.05-1.55x faster in every paired cell. q8_0 takes the same switch since
    2026-12-02: this llama.cpp repacks no Q8_0 on x86, but with the extra types on it reads the
    weights into its own buffers instead of mapping the file, and on the 7B q8_0 GGUF (Zen 4)
    our mapped setting prefilled the first question at 0.923 and 0.899 of plain
    llama-cpp-python's speed in two ABBA runs (4 and 8 rounds) at equal decode (0.971, per-round
    median); the bench preset's sweep showed the opposite in decode (mapped 33.8 vs 30.1 tok/s,
    best of 5) at equal prefill, so the release size decides. On AMX CPUs the loader finds no
    Q8_0 tensor to route to CPU_REPACK and leaves the file mapped, as before.
    n_ubatch stays n_batch: no smaller micro-batch (32..256) beat one graph for the
    ~136 positions of a first question.

    KV cache: f16 for every type but f32 (llama.cpp's default), flash attention on for the
    quantized types. A Q8_0 cache (`Pipeline.load(context={"kv_type": "q8_0"})`, flash
    attention on) halves the cache's memory but costs speed: on an AMD EPYC Zen 4
    (AVX-512 VNNI/BF16) the bench preset's q4_0 decoded at 0.913 of plain llama-cpp-python with
    a Q8_0 cache, 1.009 with an f16 one and 0.971 with Q8_0 K + f16 V (12 paired rounds, n_ctx
    2048); on an AMD EPYC Zen 3 the first question's prefill was about 10 % slower with it (q4_0
    +9 and +12 %, q8_0 +9 and +7 %, best of 3 rounds in two runs) and 7B decode unchanged. The
    memory is held down instead by the context: `onellm ask` sizes it to the question
    (`pipeline.context_for_question`: prompt, input rows and --max-tokens, rounded up to 256,
    i.e. 512 positions for a first question with 256 answer tokens), where the f16 cache of
    LLaMA-2-7B takes 256 MiB; a chat or server keeps the model's 2048 (1 GiB in f16 at 7B,
    half that in Q8_0). A fresh process answering one image question at `ask`'s 512 positions
    with the f16 cache peaked 451 / 470 / 470 MiB over its GGUF + encoder files at 7B q8_0 /
    q4_k_m / q4_0 (Zen 4; issue 13's budget: 600); at 1024 positions (Zen 3, 7B q4_0) it was
    707 with an f16 cache, 588 with Q8_0 K and f16 V, 468 with both Q8_0. On
    random weights the Q8_0 cache moved the logits by min cosine 0.998 against an f16 cache,
    less than the weights' own rounding (q8_0 weights vs fp32: 0.996 at 7B).
    """

    name: str  # the CLI and manifest name
    gguf_ftype: str  # member name of gguf.LlamaFileType (the GGUF `general.file_type`)
    llama_ftype: int  # the same file type as llama.cpp's llama_ftype value (llama_model_quantize)
    written_directly: bool  # gguf-py writes it; otherwise llama.cpp quantizes an f16/f32 file
    tolerance: Mapping[str, float]  # export parity bounds: rel max|diff|/std, min cosine, top-1 agreement
    extra_bufts: Callable[[], bool]  # whether to let llama.cpp repack weights (buffer-type policy)
    flash_attn: bool | None  # llama.cpp flash attention (None: llama.cpp decides)
    help: str  # one line for --help
    kv_type: str = "f16"  # llama.cpp KV cache type
    # overrides of `tolerance` for random-weight models (the bench's synthesised checkpoints):
    # their top logits are separated by tiny margins, so quantization flips the argmax and
    # inflates max|diff|/std far beyond trained weights (bench preset, measured: q8_0 rel
    # 0.19 vs 0.15; q4_k_m rel 1.72, min cosine 0.927, top-1 0.44). The bench reports its
    # own agreement figures next to every speed, so a wrong row stays visible.
    random_weights_tolerance: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def context_settings(self) -> dict[str, Any]:
        """`Decoder` keyword arguments for this file type where they differ from llama.cpp's
        defaults (f16 KV cache, flash attention auto).

        An f32 GGUF is the parity setting: an f32 KV cache and exact attention (CPU flash
        attention rounds Q to f16 as well) keep its logits within float32 noise of the torch
        reference (tests/test_decoder_f32.py: 2.4e-6 of the logit std on the tiny model,
        against 5.5e-3 with the defaults). f16 keeps the defaults; the quantized types keep the
        f16 cache with flash attention on (see the class docstring for the Q8_0 cache).
        """
        out: dict[str, Any] = {}
        if self.kv_type != "f16":
            out["kv_type"] = self.kv_type
        if self.flash_attn is not None:
            out["flash_attn"] = self.flash_attn
        return out

    def use_extra_bufts(self) -> bool:
        """The buffer-type policy on this machine; ONELLM_LLAMA_EXTRA_BUFTS (0/1), when set, wins."""
        flag = env_flag(EXTRA_BUFTS)
        return self.extra_bufts() if flag is None else flag


DECODER_QUANTS: dict[str, DecoderQuant] = {q.name: q for q in (
    DecoderQuant("f32", "ALL_F32", 0, True, {"rel": 0.02, "cos": 0.9999, "top1": 0.97},
                 _no_extra_bufts, False, "32-bit floats (reference, largest)", kv_type="f32"),
    DecoderQuant("f16", "MOSTLY_F16", 1, True, {"rel": 0.05, "cos": 0.9995, "top1": 0.95},
                 _no_extra_bufts, None, "16-bit floats"),
    DecoderQuant("q8_0", "MOSTLY_Q8_0", 7, False, {"rel": 0.15, "cos": 0.995, "top1": 0.85},
                 _repack, True, "8-bit blocks (near-lossless, half of f16)",
                 random_weights_tolerance={"rel": 0.5}),
    DecoderQuant("q4_k_m", "MOSTLY_Q4_K_M", 15, False, {"rel": 0.8, "cos": 0.93, "top1": 0.5},
                 _repack, True, "4-bit k-quants (smallest, fastest on CPU)",
                 random_weights_tolerance={"rel": 2.5, "cos": 0.8, "top1": 0.3}),
    DecoderQuant("q4_0", "MOSTLY_Q4_0", 2, False, {"rel": 1.0, "cos": 0.9, "top1": 0.45},
                 _repack, True, "4-bit blocks, one scale per 32 weights (CPU_REPACK's fastest kernels)",
                 random_weights_tolerance={"rel": 3.0, "cos": 0.75, "top1": 0.25}),
)}


# KV cache element types a user may pick (`--kv-cache`, `context={"kv_type": ...}`) over the
# GGUF type's default; f32 stays the f32 GGUF's parity setting. Memory per position at
# LLaMA-2-7B: f16 0.5 MiB, q8_0 0.27 MiB (DecoderQuant's docstring has the speed figures).
KV_CACHE_TYPES = {
    "f16": "16-bit floats (llama.cpp's default; the fastest decode and prefill measured)",
    "q8_0": "8-bit blocks: half the memory, flash attention on; decode up to 9 % and prefill ~10 % slower",
}


def kv_cache_context(kv_type: str | None) -> dict[str, Any]:
    """llama.cpp context settings for a KV cache type a user picked (None: the GGUF type's)."""
    if kv_type is None:
        return {}
    if kv_type not in KV_CACHE_TYPES:
        raise ConfigError(f"unknown KV cache type {kv_type!r}; choose from {', '.join(KV_CACHE_TYPES)}")
    return {"kv_type": kv_type, "flash_attn": True} if kv_type == "q8_0" else {"kv_type": kv_type}


def decoder_quant(name: str) -> DecoderQuant:
    try:
        return DECODER_QUANTS[name]
    except KeyError:
        raise ConfigError(f"unknown decoder quantization {name!r}; choose from {', '.join(DECODER_QUANTS)}") from None


# ---------------------------------------------------------------------------- encoder precisions


@dataclasses.dataclass(frozen=True)
class EncoderPrecision:
    """A precision the export derives from the fp32 graphs."""

    name: str  # the CLI and manifest name
    min_cosine: float  # parity floor vs the torch fp32 reference, per graph and per chain
    help: str  # one line for --help
    runtime: str = "onnxruntime"  # what runs its graphs: onnxruntime (any device) or openvino (CPU only)

    def is_available(self) -> bool:
        """Whether the library that runs this precision's graphs is importable here."""
        if self.runtime == "openvino":
            return openvino_available()
        return True


def openvino_available() -> bool:
    """Whether OpenVINO's Python package (the `openvino` extra) is importable."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


OPENVINO_HINT = "install the `openvino` extra: pip install 'onellm[openvino]'"

ENCODER_PRECISIONS: dict[str, EncoderPrecision] = {p.name: p for p in (
    EncoderPrecision("fp32", 0.99999, "32-bit floats (reference)"),
    EncoderPrecision("fp16", 0.999, "16-bit floats, fp32 inputs/outputs (GPUs)"),
    EncoderPrecision("int8", 0.99, "dynamic int8 MatMul weights, onnxruntime (CPUs)"),
    # benchmarks/RESULTS.md: at 7B 1.27x (image) / 1.35x (IMU) onnxruntime int8's speed, but OpenVINO
    # holds ~1.1 GiB more (the int8 weights ~2.5x over): the CPU runs int8 when both are exported
    EncoderPrecision("ov-int8", 0.99, "static int8 weights and activations, calibrated at export, run by "
                     "OpenVINO (CPUs; the fastest CPU encoder, ~1.1 GiB more memory than int8; the openvino "
                     "extra; run it with --precision ov-int8)", runtime="openvino"),
)}


def encoder_precision(name: str) -> EncoderPrecision:
    try:
        return ENCODER_PRECISIONS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder precision {name!r}; choose from {', '.join(ENCODER_PRECISIONS)}") from None


# ---------------------------------------------------------------------------- execution providers


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@dataclasses.dataclass(frozen=True)
class ExecutionProvider:
    """Where the encoder runs: an onnxruntime execution provider and what it implies."""

    device: str  # the --device name
    ort_provider: str  # onnxruntime's provider name
    device_type: str  # OrtValue device of its buffers ("cpu" or "cuda")
    fallbacks: tuple[str, ...]  # devices whose providers follow it in the session (unsupported ops)
    options: Mapping[str, Any]  # provider options; device_id is added for GPU devices
    precisions: tuple[str, ...]  # encoder precisions it prefers, best first (else the bundle default)
    install_hint: str  # what to install when it is missing
    help: str  # one line for --help

    def is_available(self) -> bool:
        """Whether the installed onnxruntime offers this provider."""
        return self.ort_provider in _ort_providers()

    def require(self, asked: str) -> None:
        """BackendError naming the missing provider(s) unless this device can run here."""
        have = _ort_providers()
        for dev in reversed((self.device, *self.fallbacks)):  # the base provider's absence explains most
            ep = EXECUTION_PROVIDERS[dev]
            if ep.ort_provider not in have:
                raise BackendError(f"encoder device {asked!r} needs onnxruntime's {ep.ort_provider}; this "
                                   f"onnxruntime has {', '.join(have)} ({ep.install_hint})")

    def session_providers(self, device_id: int = 0, extra: Mapping[str, Any] | None = None) -> list[Any]:
        """The `providers` list for onnxruntime.InferenceSession: this provider, then its fallbacks."""
        out: list[Any] = []
        for dev in (self.device, *self.fallbacks):
            ep = EXECUTION_PROVIDERS[dev]
            opts = dict(ep.options)
            if ep.device_type != "cpu":
                opts["device_id"] = device_id
            if dev == self.device and extra:
                opts.update(extra)
            out.append((ep.ort_provider, opts) if opts else ep.ort_provider)
        return out

    def pick_precision(self, exported: Mapping[str, Any] | tuple[str, ...], default: str) -> str:
        """The precision to run: the first preferred one the bundle has and this machine can run,
        else its default."""
        return next((p for p in self.precisions if p in exported and ENCODER_PRECISIONS[p].is_available()), default)


EXECUTION_PROVIDERS: dict[str, ExecutionProvider] = {e.device: e for e in (
    ExecutionProvider("cpu", "CPUExecutionProvider", "cpu", (), {}, ("int8", "ov-int8", "fp32"),
                      "any onnxruntime has it", "onnxruntime on the CPU"),
    ExecutionProvider("cuda", "CUDAExecutionProvider", "cuda", ("cpu",), {}, ("fp16",),
                      "install the `gpu` extra: onnxruntime-gpu", "onnxruntime's CUDA provider"),
    ExecutionProvider("tensorrt", "TensorrtExecutionProvider", "cuda", ("cuda", "cpu"), {"trt_fp16_enable": True},
                      ("fp16",), "install the `gpu` and `trt` extras: onnxruntime-gpu, tensorrt",
                      "TensorRT engines through onnxruntime (the bundle's, or built once into the cache)"),
)}
AUTO_ORDER = ("cuda", "cpu")  # `--device auto` without TensorRT engines: the first available
DEVICES = (*EXECUTION_PROVIDERS, "auto")


def resolve_device(device: str) -> tuple[ExecutionProvider, int]:
    """(provider, device id) for `cpu`, `cuda:1`, `auto`, ...; BackendError when unknown or unavailable."""
    name, _, index = device.partition(":")
    device_id = int(index) if index.isdigit() else 0
    if name == "auto":
        name = next((d for d in AUTO_ORDER if EXECUTION_PROVIDERS[d].is_available()), "cpu")
    ep = EXECUTION_PROVIDERS.get(name)
    if ep is None:
        raise BackendError(f"unknown encoder device {device!r}; known: {', '.join(DEVICES)} (optionally ':<id>')")
    ep.require(device)
    return ep, device_id
