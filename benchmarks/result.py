"""The `onellm bench` result as typed rows: what each phase of `bench.py` returns.

Every class is a frozen dataclass (keyword-only: a row built without one of its
fields is a TypeError where it is built). `BenchResult.to_dict()` is the JSON written
to `bench.json` (schema `onellm-bench` v1); `BenchResult.from_dict` (or `load_result`)
reads one back and rejects an unknown or missing key, a wrong type or a NaN with a
`ResultFileError` naming the key (`decoder[0].ttft_s`).

A few fields are absent from the JSON while they are None (declared `omitted()`):
rows that only some backends have (`plain_sessions_encode_s`, `file_bytes`), the
failure form of a footprint row, and the two shapes the decode-loop comparison had in
version-1 files (`ours_shipped` now; `llama_cpp_python_defaults` in older runs such as
`results/bench-preset.json`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from onellm.runtime.errors import ResultFileError
from onellm.runtime.strict import Rules, Strict, load, omitted

SCHEMA = "onellm-bench"
SCHEMA_VERSION = 1
_RULES = Rules(ResultFileError, "key", " (a damaged bench.json or another onellm version)", finite=True)
row = dataclasses.dataclass(frozen=True, kw_only=True)


class _Row(Strict):
    rules = _RULES


@row
class Stat(_Row):
    """A figure over the timed repeats (seconds unless the field says otherwise)."""

    median: float | None  # None when nothing was timed
    min: float | None
    max: float | None
    n: int  # timed runs


@row
class EncoderRow(_Row):
    """One encoder (backend, precision, device) on one modality."""

    modality: str
    backend: str  # torch | onnxruntime
    precision: str  # fp32, bf16 (torch), int8, fp16
    device: str  # execution provider name (cpu, cuda, ...)
    stages_s: dict[str, Stat]  # preprocess (once per modality), tokenizer, clip_trunk, upm_projection
    encode_s: Stat  # the whole encoder, preprocess excluded
    flops: float  # multiply-adds x2 of one input (encoder_flops)
    gflop_s: float  # flops / median encode time
    cosine_vs_torch_fp32: float | None  # output block vs the torch fp32 one (None without the reference)
    load_s: float  # model load (torch: checkpoint; bf16: the cast) or session creation
    resident_mib: float  # RSS growth of the load
    plain_sessions_encode_s: Stat | None = omitted()  # the same graphs as plain session.run calls
    peak_gemm: str | None = None  # the GEMM ceiling it is compared with (set by run_bench)
    fraction_of_peak: float | None = None  # gflop_s / that ceiling


@row
class DecoderRow(_Row):
    """One decoder (backend, precision) on one modality's prompt and encoder block."""

    modality: str
    backend: str  # torch | llama.cpp
    precision: str  # fp32, bf16 (torch) or a GGUF quantization
    device: str
    prefill_positions: int  # prompt tokens + inserted encoder rows
    new_tokens: int  # greedy tokens generated
    prefill_s: Stat
    prefill_tokens_per_s: float
    decode_s: Stat  # the tokens after the first
    decode_tokens_per_s: float
    greedy_prefix_match: float  # share of torch fp32's greedy tokens reproduced before a difference
    top1_agreement: float | None  # teacher-forced top-1 agreement with torch fp32 (runtime rows)
    load_s: float
    bytes_per_token: int  # weight bytes read per decoded token
    resident_mib: float
    file_bytes: int | None = omitted()  # the GGUF file (llama.cpp rows)
    bandwidth_ceiling_tokens_per_s: float | None = None  # bandwidth / bytes_per_token (set by run_bench)
    fraction_of_bandwidth_ceiling: float | None = None
    encoder_used: str | None = None  # the encoder its time to first token counts
    ttft_s: float | None = None  # preprocess + encode + prefill, from stage medians


@row
class LoopRun(_Row):
    """One side of the decode-loop comparison."""

    prefill_s: Stat
    decode_s: Stat
    decode_tokens_per_s: float
    tokens: int
    extra_bufts: bool | None = omitted()  # llama-cpp-python's weight buffer setting
    # how llama-cpp-python's weights were placed when its defaults could not run (AMX CPUs)
    buffers: str | None = omitted()


@row
class DecodeLoopRow(_Row):
    """Our decoder session vs llama-cpp-python's `Llama.generate` on the same GGUF and prompt."""

    quant: str
    prompt_tokens: int
    new_tokens: int
    flash_attn: bool  # as llama.cpp resolved it for our context; the plain run matches it
    ours_extra_bufts: bool  # our shipped buffer-type setting
    ours_kv_type: str | None = omitted()  # our shipped KV cache type (runs before it: f16 throughout)
    ours: LoopRun  # ours with llama-cpp-python's buffer setting
    ours_shipped: LoopRun | None = omitted()  # ours as shipped, when that setting differs
    llama_cpp_python: LoopRun
    llama_cpp_python_defaults: LoopRun | None = omitted()  # older version-1 runs: llama-cpp-python's defaults
    ratio: float  # ours / llama_cpp_python decode tokens/s
    ratio_shipped: float | None = omitted()  # ours_shipped / llama_cpp_python
    ratio_vs_defaults: float | None = omitted()  # older version-1 runs
    # the same ratios round by round (the runners take turns within a round, so machine-load
    # drift hits both sides of one ratio alike): median, min and max over the timed rounds
    ratio_paired: Stat | None = omitted()
    ratio_shipped_paired: Stat | None = omitted()


@row
class EncoderChainRow(_Row):
    """Our IOBinding chain vs the same graphs run as plain session.run calls."""

    modality: str
    precision: str
    device: str
    ours_s: float
    plain_sessions_s: float
    ratio: float  # plain / ours


@row
class Overhead(_Row):
    decode_loop: tuple[DecodeLoopRow, ...]
    encoder_chain: tuple[EncoderChainRow, ...]


@row
class ChatRow(_Row):
    """A two-turn chat through Pipeline: the follow-up's time to first token."""

    modality: str
    precision: str
    quant: str
    definition: str  # what ttft means here
    turn1_ttft_s: Stat
    turn2_ttft_s: Stat
    turn1_prefill_positions: int
    turn2_prefill_positions: int
    turn1_first_chunk_s: Stat
    turn2_first_chunk_s: Stat
    ratio: float  # turn 2 / turn 1 median ttft


@row
class FootprintRow(_Row):
    """A fresh process that loads the bundle and answers once (or the error it died with)."""

    precision: str
    quant: str
    modality: str | None = omitted()
    load_s: float | None = omitted()
    baseline_rss_mib: float | None = omitted()  # peak RSS before the load
    after_load_peak_rss_mib: float | None = omitted()
    peak_rss_mib: float | None = omitted()  # after one answer
    first_chunk_s: float | None = omitted()
    error: tuple[str, ...] | None = omitted()  # the last stderr line, when the probe failed
    gguf_mib: float | None = omitted()  # the GGUF file it loaded
    encoder_mib: float | None = omitted()  # the encoder graph files of the modality's chain
    n_ctx: int | None = omitted()  # the context it loaded (`ask`'s for its question; runs before: the bench's 1024)
    kv_type: str | None = omitted()  # its KV cache element type


@row
class Bandwidth(_Row):
    method: str
    gb_s: Stat  # read bandwidth, GB/s
    copy_gb_s: Stat  # copy, bytes read + written
    single_thread_copy_gb_s: Stat
    bytes: int
    threads: int


@row
class GemmRate(_Row):
    library: str
    unit: str | None = omitted()  # when not GFLOP/s
    gflop_s: Stat


@row
class GemmCeilings(_Row):
    """Peak rate of an n^3 GEMM through each library a backend uses (absent: not installed or failed)."""

    n: int
    numpy_fp32: GemmRate
    torch_fp32: GemmRate | None = omitted()
    torch_bf16: GemmRate | None = omitted()
    onnxruntime_fp32: GemmRate | None = omitted()
    onnxruntime_int8: GemmRate | None = omitted()

    def rates(self) -> dict[str, GemmRate]:
        """{library key: rate} of the ceilings measured."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "n" and getattr(self, f.name) is not None}


@row
class Ceilings(_Row):
    bandwidth: Bandwidth
    gemm: GemmCeilings


@row
class Settings(_Row):
    modalities: tuple[str, ...]
    encoder_precisions: tuple[str, ...]
    decoder_quants: tuple[str, ...]
    repeats: int
    warmup: int
    new_tokens: int
    threads: int
    gpu_device: str | None  # the GPU execution provider of the GPU rows
    statistic: str


@row
class Artifacts(_Row):
    work_dir: str
    bundle: str
    checkpoint: str
    exported_this_run: bool
    bundle_export_s: float | None


@row
class InputInfo(_Row):
    source: dict[str, str] | str  # reader keyword arguments, or "dummy_input"
    prompt_tokens: int


@row
class Target(_Row):
    name: str
    description: str
    measured: float | None  # None when a row it needs was not run
    threshold: float
    comparison: str  # ">=" or "<="
    met: bool | None


@row
class BenchResult(_Row):
    """Everything one `onellm bench` run measured."""

    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION
    created: str  # local time of the start
    preset: str
    config: Any  # the model config (ModelConfig.to_dict())
    settings: Settings
    machine: dict[str, Any]  # free-form: CPU, memory, versions, load averages (varies with what is installed)
    warnings: tuple[str, ...] | None = omitted()  # e.g. a busy machine at start
    random_weights: bool
    notice: str  # RANDOM_NOTICE for random weights, else ""
    artifacts: Artifacts
    ceilings: Ceilings
    inputs: dict[str, InputInfo]
    encoder: tuple[EncoderRow, ...]
    decoder: tuple[DecoderRow, ...]
    overhead: Overhead
    chat: ChatRow | None  # None without a real input file
    footprint: tuple[FootprintRow, ...]
    targets: tuple[Target, ...]
    wall_s: float

    @classmethod
    def from_dict(cls, data: Any, where: str = "bench.json", path: str = "") -> BenchResult:
        """Read a bench.json's data; ResultFileError naming the key if it is not schema onellm-bench v1."""
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ResultFileError(f"{where}: expected schema {SCHEMA!r}, found {found!r}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ResultFileError(f"{where}: expected schema version {SCHEMA_VERSION}, "
                                  f"found {data.get('schema_version')!r}")
        return load(cls, data, where, path, _RULES)


def load_result(path: str | Path) -> BenchResult:
    """Read a bench.json written by `onellm bench`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ResultFileError(f"{path}: cannot read a bench result ({exc})") from None
    return BenchResult.from_dict(data, where=str(path))
