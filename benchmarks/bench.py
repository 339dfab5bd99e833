"""`onellm bench`: the whole chain, stage by stage, against the PyTorch reference and the machine's ceilings.

In: a preset (`tiny`, `bench`, `7b`) or a config, and optionally a checkpoint and a
bundle. Without a checkpoint a seeded RANDOM one is synthesised (random weights are
fine for timing; every report says so). The checkpoint, its tokenizer and the exported
bundle are cached under a work directory (default `$ONELLM_CACHE_DIR/bench/<preset>-<hash>/`),
so a rerun measures without exporting again.

Out: a `BenchResult` (typed rows, `benchmarks/result.py`; its `to_dict()` is the JSON of
schema `onellm-bench` v1), written as JSON, a Markdown table and a PNG chart by
`report.write_reports`.

One run, in this order once the checkpoint and bundle exist (each backend on its own,
so thread pools never alternate):
 1. the machine's ceilings: memory bandwidth (a large numpy copy) and peak matmul rate
    (a square GEMM through torch fp32/bf16, numpy and onnxruntime's MLAS);
 2. the torch reference, eager fp32 and then bf16 (the model cast in place; the point
    tokenizer stays fp32): encoder stages per modality, decoder prefill / first token /
    greedy decode on the fp32 encoder block;
 3. the runtime's encoder per exported precision (onnxruntime, IOBinding chain), its
    stages, output cosine vs torch fp32, and the same graphs run as plain
    `session.run` calls (our chain's overhead);
 4. the runtime's decoder per GGUF quantization (llama.cpp through our Session), greedy
    agreement with torch fp32, and llama-cpp-python's own `Llama.generate` on the same
    GGUF and prompt (our decode loop's overhead);
 5. a two-turn chat through `Pipeline` (the follow-up's time to first token);
 6. per runtime configuration, a fresh subprocess that loads the bundle and answers once
    (bundle load time and peak RSS, undisturbed by the rest of the run).
Every timing is the median of `repeats` runs after `warmup` runs, with min and max.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onellm.runtime.errors import ConfigError
from onellm.runtime.pipeline import peak_rss_mib

from .result import (
    Artifacts, Bandwidth, BenchResult, Ceilings, ChatRow, DecodeLoopRow, DecoderRow,
    EncoderChainRow, EncoderRow, FootprintRow, GemmCeilings, GemmRate, InputInfo, LoopRun, Overhead, Settings,
    Stat,
)

log = logging.getLogger(__name__)

LOAD_WARN = 0.5  # 1-min load average at start above which `bench` warns and records it
SEED = 1234  # of the synthesised checkpoint
RANDOM_NOTICE = ("Weights are RANDOM (seeded): timings are those of the real architecture and sizes, "
                 "but answers are meaningless text and agreement figures compare backends, not quality.")
PRESET_DEFAULTS = {  # per preset: modalities, repeats, warmup, new tokens, GEMM size, copy size (MiB)
    "tiny": {"modalities": ("image", "imu"), "repeats": 3, "warmup": 1, "new_tokens": 16, "gemm_n": 512, "copy_mib": 64},
    "bench": {"modalities": ("image", "imu"), "repeats": 3, "warmup": 1, "new_tokens": 32, "gemm_n": 2048,
              "copy_mib": 1024},
    "7b": {"modalities": ("image", "imu"), "repeats": 2, "warmup": 1, "new_tokens": 32, "gemm_n": 2048, "copy_mib": 1024,
           # the CPU-sized files only: an f16 7B GGUF (13.5 GB) is no CPU choice and takes disk and export time
           # q8_0 first: its parity (near-lossless) checks the layer-wise fp32 reference early
           "quants": ("q8_0", "q4_k_m", "q4_0"), "precisions": ("int8",)},
}
DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")  # the other presets' decoders (q4_0: --decoder-quants, or the 7b preset)
N_CTX = 1024  # decoder context of every measurement (or the model's, if shorter)
# At 7B (32 random layers of dim 4096) the 4-bit noise of random weights compounds further than
# the registry's random-weight bounds allow: q4_k_m measured max|diff|/std 3.05, min cosine 0.769,
# top-1 0.211 against the exact fp32 reference, q4_0 top-1 0.018 (chance: the margins of random
# logits decide it). These replace the registry's bounds at release size; q8_0 (same writer, same
# f16 source, same quantizer) keeps a tight bound that a wrong reference or a layout bug would fail.
RANDOM_GGUF_TOLERANCES_7B = {"q8_0": {"rel": 1.0, "cos": 0.97, "top1": 0.6},
                             "q4_k_m": {"rel": 6.0, "cos": 0.5, "top1": 0.05},
                             "q4_0": {"rel": 10.0, "cos": 0.3, "top1": 0.0}}
ENCODER_STAGES = ("preprocess", "tokenizer", "clip_trunk", "upm_projection")
QUESTION_2 = "Tell me more about it."


@dataclasses.dataclass
class BenchOptions:
    """What `onellm bench` was asked to do."""

    preset: str | None = "tiny"  # preset name (ignored with config_path)
    config_path: str | None = None  # a model config JSON instead of a preset
    modalities: Sequence[str] | None = None  # default: the preset's (image, imu)
    encoder_precisions: Sequence[str] | None = None  # default fp32, int8 (+ fp16 when a GPU is used)
    decoder_quants: Sequence[str] | None = None  # default f16, q8_0, q4_k_m
    repeats: int | None = None  # timed runs per measurement
    warmup: int | None = None  # untimed runs before them
    new_tokens: int | None = None  # greedy tokens generated per decode measurement
    bundle: str | None = None  # an exported bundle to reuse (must match the config)
    checkpoint: str | None = None  # a real checkpoint (else a random one is synthesised)
    tokenizer: str | None = None  # its tokenizer.model
    work_dir: str | None = None  # cache of the synthesised checkpoint and bundle
    torch_reference: bool = True  # run the torch rows (needs the checkpoint in RAM)
    synthesize: bool = False  # allow synthesising a random checkpoint for the 7b preset
    threads: int | None = None  # CPU threads for every backend (default: physical cores)
    footprint: bool = True  # the subprocess load/peak-RSS probes
    plain_baselines: bool = True  # llama-cpp-python and plain onnxruntime rows
    device: str = "auto"  # encoder device for GPU rows: cpu | cuda | auto


# ----------------------------------------------------------------------------- timing helpers


def summarize(samples: Sequence[float]) -> Stat:
    """Median, min, max and count of a list of seconds (or any figure)."""
    xs = [float(x) for x in samples]
    if not xs:
        return Stat(median=None, min=None, max=None, n=0)
    return Stat(median=statistics.median(xs), min=min(xs), max=max(xs), n=len(xs))


def repeat(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[list[Any], Any]:
    """Run fn warmup + repeats times; returns (the timed runs' results, the last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    results = []
    for _ in range(max(1, repeats)):
        out = fn()
        results.append(out)
    return results, out


def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _status_bytes(key: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux; else the peak)."""
    cur = _status_bytes("VmRSS")
    return cur / 2**20 if cur else peak_rss_mib()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def prefix_match(ref: Sequence[int], got: Sequence[int]) -> float:
    """Fraction of `ref` reproduced before the first differing token."""
    n = 0
    for a, b in zip(ref, got):
        if a != b:
            break
        n += 1
    return n / max(1, len(ref))


# ----------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and llama.cpp's system info."""
    from importlib import metadata

    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("Model name", platform.processor())
        info["cpu_vendor"] = fields.get("Vendor ID", "")
        info["cpus"] = int(fields.get("CPU(s)", os.cpu_count() or 0))
        info["threads_per_core"] = int(fields.get("Thread(s) per core", 1))
        flags = fields.get("Flags", "").split()
        info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma", "f16c"))
                                   or f in ("avx_vnni",))
    except (OSError, subprocess.SubprocessError, ValueError):
        info["cpu_model"] = platform.processor()
        info["cpus"] = os.cpu_count() or 0
    from onellm.runtime.encoder import physical_cores

    info["physical_cores"] = physical_cores()
    try:
        with open("/proc/meminfo") as fh:
            mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        info["memory_gib"] = round(mem["MemTotal"] / 2**30, 1)
        info["memory_available_gib"] = round(mem.get("MemAvailable", 0) / 2**30, 1)
    except (OSError, KeyError, ValueError):
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    versions = {}
    for dist in ("onnxruntime", "onnxruntime-gpu", "openvino", "llama-cpp-python", "torch", "numpy", "onnx", "gguf"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    try:
        import llama_cpp

        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception as exc:  # noqa: BLE001 - informational only
        info["llama_cpp_system_info"] = f"unavailable ({exc})"
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        pass
    return info


def load_warning(machine: dict[str, Any]) -> str | None:
    """Record the 1-min load average at start in `machine`; a warning when it is above LOAD_WARN."""
    load1 = (machine.get("load_average") or [None])[0]
    machine["load_average_start"] = load1
    if load1 is None or load1 <= LOAD_WARN:
        return None
    return f"1-min load average {load1:.2f} at start is above {LOAD_WARN}: timings are disturbed by other work"


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512_BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read(1 << 16)
    except OSError:
        return False
    return any(f in text.split() for f in ("avx512_bf16", "amx_bf16"))


# ----------------------------------------------------------------------------- ceilings


def measure_bandwidth(size_mib: int, repeats: int, threads: int) -> Bandwidth:
    """Memory bandwidth, GB/s, with `threads` threads (numpy releases the GIL in both kernels).

    `gb_s`: READ bandwidth (a max-reduction over a large float32 array), the ceiling of a
    decode step, which streams the weights and writes almost nothing. `copy_gb_s`: a large
    copy, bytes read + written / time. `single_thread_copy_gb_s`: the copy on one thread.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = size_mib * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    src_parts, dst_parts = np.array_split(src, threads), np.array_split(dst, threads)
    with ThreadPoolExecutor(threads) as pool:
        def run(kernel) -> float:
            t = time.perf_counter()
            list(pool.map(kernel, range(threads)))
            return time.perf_counter() - t

        read, _ = repeat(lambda: run(lambda i: src_parts[i].max()), repeats, 1)
        copy, _ = repeat(lambda: run(lambda i: np.copyto(dst_parts[i], src_parts[i])), repeats, 1)
    single, _ = repeat(lambda: _clock(lambda: np.copyto(dst, src))[0], repeats, 1)
    nbytes = src.nbytes
    del src, dst, src_parts, dst_parts
    return Bandwidth(method=f"{threads}-thread numpy max-reduction over {size_mib} MiB (read bandwidth)",
                     gb_s=summarize([nbytes / t / 1e9 for t in read]),
                     copy_gb_s=summarize([2 * nbytes / t / 1e9 for t in copy]),
                     single_thread_copy_gb_s=summarize([2 * nbytes / t / 1e9 for t in single]),
                     bytes=nbytes, threads=threads)


def measure_gemm(n: int, repeats: int, threads: int) -> GemmCeilings:
    """Peak matmul rate of an n x n x n GEMM through each math library the backends use, GFLOP/s."""
    flops = 2.0 * n ** 3
    out: dict[str, GemmRate] = {}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)

    def rate(fn) -> Stat:
        times, _ = repeat(lambda: _clock(fn)[0], repeats, 1)
        return summarize([flops / t / 1e9 for t in times])

    out["numpy_fp32"] = GemmRate(library=f"numpy {np.__version__} BLAS", gflop_s=rate(lambda: a @ b))
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.inference_mode():
            out["torch_fp32"] = GemmRate(library="torch (oneDNN/MKL)", gflop_s=rate(lambda: ta @ tb))
            if bf16_supported():
                ha, hb = ta.bfloat16(), tb.bfloat16()
                out["torch_bf16"] = GemmRate(library="torch (oneDNN)", gflop_s=rate(lambda: ha @ hb))
    except ImportError:
        pass
    try:
        out["onnxruntime_fp32"] = GemmRate(library="onnxruntime MatMul (MLAS)", gflop_s=rate(_ort_matmul(a, b, threads)))
    except Exception as exc:  # noqa: BLE001 - a missing ceiling must not stop the run
        log.warning("onnxruntime GEMM ceiling skipped: %s", exc)
    try:
        out["onnxruntime_int8"] = GemmRate(library="onnxruntime MatMulInteger u8 x s8 -> s32 (MLAS, VNNI where present)",
                                           unit="GOP/s (int multiply-adds x 2)",
                                           gflop_s=rate(_ort_matmul_int8(n, threads)))
    except Exception as exc:  # noqa: BLE001 - a missing ceiling must not stop the run
        log.warning("onnxruntime int8 GEMM ceiling skipped: %s", exc)
    return GemmCeilings(n=n, **out)


def _ort_matmul_int8(n: int, threads: int) -> Callable[[], Any]:
    """An n x n x n MatMulInteger (uint8 activations x constant int8 weights), the integer GEMM
    that the int8 encoder graphs' MatMulIntegerToFloat / DynamicQuantizeMatMul / QAttention run."""
    # 7-bit values: exact on every MLAS kernel (the rate does not depend on them). Without VNNI,
    # AVX2 sums pairs of u8*s8 products in saturating int16 (vpmaddubsw), which full-range
    # values overflow: on an AMD EPYC Zen 3, 43 % of a full-range 32^3 product came out wrong.
    rng = np.random.default_rng(1)
    a = rng.integers(0, 128, (n, n), dtype=np.uint8)
    b = rng.integers(-64, 64, (n, n), dtype=np.int8)
    return _ort_gemm("MatMulInteger", a, b, threads)


def _ort_matmul(a: np.ndarray, b: np.ndarray, threads: int) -> Callable[[], Any]:
    return _ort_gemm("MatMul", a, b, threads)


def _ort_gemm(op: str, a: np.ndarray, b: np.ndarray, threads: int) -> Callable[[], Any]:
    """One-node onnxruntime graph `op(a, b)` with b a constant; returns a call that runs it on a."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    out_type = onnx.TensorProto.INT32 if op == "MatMulInteger" else onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))],
        [helper.make_tensor_value_info("c", out_type, [a.shape[0], b.shape[1]])],
        initializer=[numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"a": a})


# ----------------------------------------------------------------------------- cost models


def encoder_flops(cfg, modality: str) -> dict[str, float]:
    """Multiply-add count x2 of each encoder stage of one input (attention scores included)."""
    from onellm.runtime.modalities import get_modality

    spec = get_modality(modality)
    c, u, t = cfg.clip, cfg.upm, cfg.tokenizers
    w, kind, frames = c.width, spec.tokenizer_kind, spec.n_frames
    n_patch = cfg.tokenizers.n_patch_tokens(kind, c)
    length = n_patch + 1
    tok = {
        "clip_patch": frames * n_patch * 3 * c.patch_size ** 2 * w,
        "conv2d": n_patch * t.audio_kernel ** 2 * w,
        "conv1d": n_patch * t.imu_channels * t.imu_kernel * w,
        "linear": t.fmri_voxels * w * t.fmri_tokens,
        "point_patch": t.point_groups * t.point_k * t.point_channels * w,
    }[kind]
    trunk = frames * c.layers * (4 * length * w * w + 2 * length * length * w + 2 * length * w * c.mlp_dim)
    rows = length + u.n_resample_tokens
    block = 4 * rows * w * w + 2 * rows * rows * w + 3 * rows * w * cfg.upm_ffn_hidden
    upm = length * w * w + u.n_experts * u.depth * block + u.n_resample_tokens * w * cfg.decoder.dim
    return {"tokenizer": 2.0 * tok, "clip_trunk": 2.0 * trunk, "upm_projection": 2.0 * upm,
            "total": 2.0 * (tok + trunk + upm)}


def gguf_bytes_per_token(path: str | os.PathLike) -> int:
    """Bytes of weights llama.cpp reads per decoded token: every tensor but the embedding table."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return int(sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight"))


def torch_bytes_per_token(model) -> int:
    return int(sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if n.split(".")[0] in ("layers", "norm", "output")))


# ----------------------------------------------------------------------------- inputs


def modality_sources(modalities: Sequence[str], work: Path) -> dict[str, dict[str, Any]]:
    """Per modality, input keyword arguments for a real file: its spec's example (examples/ of a
    source checkout, else a stand-in written under `work` where the modality has one)."""
    from onellm.runtime.modalities import example_inputs

    found = {m: example_inputs(m, stand_ins=work / "inputs") for m in modalities}
    return {m: src for m, src in found.items() if src is not None}


def read_source(modality: str, source: dict[str, Any]):
    """Run the runtime reader on a source dict (as Pipeline.ask keyword arguments)."""
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.pipeline import read_input

    src = dict(source)
    path = src.pop(get_modality(modality).input_name)
    return read_input(modality, path, image=src.pop("image", None))


# ----------------------------------------------------------------------------- artefacts


def bench_config(opts: BenchOptions):
    """The model config, restricted to the benchmarked modalities."""
    from onellm.ref.config import resolve_config

    cfg = resolve_config(None if opts.config_path else (opts.preset or "tiny"), opts.config_path)
    mods = tuple(opts.modalities or PRESET_DEFAULTS.get(cfg.name, PRESET_DEFAULTS["tiny"])["modalities"])
    bad = [m for m in mods if m not in cfg.modalities]
    if bad:
        raise ConfigError(f"modality {', '.join(bad)} not in config {cfg.name!r} (it has {', '.join(cfg.modalities)})")
    return dataclasses.replace(cfg, modalities=mods)


def _config_key(cfg) -> str:
    d = cfg.to_dict()
    d.pop("modalities")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def default_work_dir(cfg) -> Path:
    from onellm.runtime.bundle import cache_dir

    return cache_dir() / "bench" / f"{cfg.name}-{_config_key(cfg)}"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The checkpoint, tokenizer and bundle of a run (from the cache, or made now)."""

    work_dir: Path
    checkpoint: Path
    tokenizer: Path
    bundle: Path
    manifest: Any  # the bundle's runtime.manifest.Manifest
    exported_now: bool  # whether this run exported the bundle

    def record(self) -> Artifacts:
        """The result's `artifacts` entry."""
        return Artifacts(work_dir=str(self.work_dir), bundle=str(self.bundle), checkpoint=str(self.checkpoint),
                         exported_this_run=self.exported_now, bundle_export_s=self.manifest.export_seconds)


def prepare_artifacts(cfg, opts: BenchOptions, precisions: Sequence[str], quants: Sequence[str],
                      progress: Callable[[str], None]) -> Prepared:
    """Checkpoint, tokenizer and bundle paths; synthesises and exports what the cache lacks."""
    work = Path(opts.work_dir) if opts.work_dir else default_work_dir(cfg)
    work.mkdir(parents=True, exist_ok=True)
    random_weights = opts.checkpoint is None
    bundle = Path(opts.bundle) if opts.bundle else work / "bundle"
    reason = _bundle_mismatch(bundle, cfg, precisions, quants)
    if reason and opts.bundle:
        raise ConfigError(f"{bundle}: cannot reuse this bundle: {reason}")
    if opts.checkpoint:
        ckpt, tok = Path(opts.checkpoint), opts.tokenizer
        if not tok:
            raise ConfigError("--checkpoint needs --tokenizer (the LLaMA tokenizer.model)")
        tok = Path(tok)
    else:
        if cfg.name == "7b" and not opts.synthesize:
            raise ConfigError("the 7b preset needs --checkpoint and --tokenizer (the release), or --synthesize "
                              "to write a random 7B checkpoint (~15 GB fp16 on disk)")
        ckpt = work / "checkpoint" / "consolidated.00-of-01.pth"
        tok = work / "tokenizer" / "tokenizer.model"
        if not tok.is_file():
            from onellm.ref.testing import train_tiny_tokenizer

            train_tiny_tokenizer(tok.parent, vocab_size=min(512, cfg.decoder.vocab_size))
        if not ckpt.is_file():
            from onellm.ref.testing import save_random_checkpoint, stream_random_checkpoint

            progress(f"synthesising a random {cfg.name} checkpoint (seed {SEED}) in {ckpt.parent}")
            t0 = time.perf_counter()
            if release_size(cfg):  # fp16 like the release, one tensor at a time (27 GB fp32 would not fit)
                stream_random_checkpoint(cfg, ckpt, seed=SEED, dtype="fp16", modalities=tuple(cfg.modalities))
            else:
                save_random_checkpoint(cfg, ckpt, seed=SEED, modalities=tuple(cfg.modalities))
            progress(f"checkpoint written in {time.perf_counter() - t0:.0f}s")
    exported = False
    if reason:
        from onellm.export.bundle import build_bundle

        progress(f"exporting the bundle to {bundle} ({reason}): encoder {','.join(precisions)}, "
                 f"decoder {','.join(quants)}")
        t0 = time.perf_counter()
        last = [0.0]

        def step(what: str, done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 20:
                last[0] = time.perf_counter()
                progress(f"  export: {what} ({done}/{total})")

        native = logging.getLogger("onellm.runtime.llama_cpp")
        level = native.level
        native.setLevel(logging.ERROR)  # the quantizer's per-tensor fallback notices (tiny widths)
        try:
            build_bundle(bundle, cfg, ckpt, tok, encoder_precision=list(precisions), decoder_quant=list(quants),
                         force=True, random_weights=random_weights, progress=step,
                         gguf_tolerances=_random_weights_tolerances(release_size(cfg)) if random_weights else None,
                         low_memory=release_size(cfg))
        finally:
            native.setLevel(level)
        progress(f"bundle exported in {time.perf_counter() - t0:.0f}s")
        exported = True
    from onellm.runtime.bundle import load_manifest

    return Prepared(work_dir=work, checkpoint=ckpt, tokenizer=tok, bundle=bundle,
                    manifest=load_manifest(bundle, verify=True).manifest, exported_now=exported)


def _random_weights_tolerances(release: bool = False) -> dict[str, dict[str, float]]:
    """Export-time GGUF tolerances for a random checkpoint: each quantization's registry override,
    and at release size (7B) the measured bounds above."""
    from onellm.runtime.registry import DECODER_QUANTS

    tolerances = {q.name: dict(q.random_weights_tolerance) for q in DECODER_QUANTS.values()
                  if q.random_weights_tolerance}
    if release:
        tolerances.update({k: dict(v) for k, v in RANDOM_GGUF_TOLERANCES_7B.items()})
    return tolerances


def release_size(cfg) -> bool:
    """Whether the model in fp32 would take over half this machine's RAM (the 7b preset on
    24 GiB): then the checkpoint is synthesised streamed in fp16 and exported in low-memory mode."""
    from onellm.export.bundle import fp32_exceeds_half_ram

    return fp32_exceeds_half_ram(cfg)


def _bundle_mismatch(bundle: Path, cfg, precisions, quants) -> str | None:
    from onellm.runtime.bundle import load_manifest
    from onellm.runtime.errors import BundleError

    if not (bundle / "manifest.json").is_file():
        return "no bundle yet"
    try:
        manifest = load_manifest(bundle, verify=False).manifest
    except BundleError as exc:
        return f"unusable manifest ({exc})"
    have = manifest.config if isinstance(manifest.config, dict) else {}
    want = cfg.to_dict()
    for part in ("clip", "upm", "tokenizers", "decoder"):
        if have.get(part) != want[part]:
            return f"its {part} config differs from {cfg.name!r}"
    missing = [m for m in cfg.modalities if m not in manifest.modalities]
    missing += [p for p in precisions if p not in manifest.encoder.precisions]
    missing += [q for q in quants if q not in manifest.decoder.quants]
    if missing:
        return f"it lacks {', '.join(missing)}"
    return None


# ----------------------------------------------------------------------------- torch reference


@dataclasses.dataclass(frozen=True)
class TorchRows:
    """What the torch reference phase gives the rest of the run."""

    encoder: list[EncoderRow]
    decoder: list[DecoderRow]
    blocks: dict[str, np.ndarray]  # modality -> torch fp32 encoder block (every decoder row gets it)
    greedy: dict[str, list[int]]  # modality -> torch fp32 greedy tokens


def bench_torch(cfg, ckpt: Path, inputs: dict[str, np.ndarray], prompt: dict[str, list[int]], new_tokens: int,
                repeats: int, warmup: int, dtypes: Sequence[str]) -> TorchRows:
    """Torch eager rows (encoder stages, decoder prefill/decode) for each dtype, fp32 first."""
    import torch

    from onellm.ref.checkpoint import load_model

    t0 = time.perf_counter()
    rss0 = rss_mib()
    model, _ = load_model(cfg, ckpt, dtype="fp32")
    model.eval()
    load_s = time.perf_counter() - t0
    enc_rows, dec_rows = [], []
    blocks: dict[str, np.ndarray] = {}
    greedy: dict[str, list[int]] = {}
    for dtype in dtypes:
        if dtype == "bf16":
            t0 = time.perf_counter()
            model.to(torch.bfloat16)
            if "point" in model.conv1:
                model.conv1["point"].float()  # the point tokenizer runs in fp32 (spec section 4)
            load_s = time.perf_counter() - t0  # the cast
        bytes_per_token = torch_bytes_per_token(model)
        resident = rss_mib() - rss0
        with torch.inference_mode():
            for m, arr in inputs.items():
                x = torch.from_numpy(arr)[None]

                def encode(m=m, x=x):
                    t = [time.perf_counter()]
                    h = model.tokenize(m, x)
                    t.append(time.perf_counter())
                    h = model.mean_frames(model.clip_trunk(h), 1)
                    t.append(time.perf_counter())
                    out = model.project(m, model.upm(m, h))
                    t.append(time.perf_counter())
                    return [t[i + 1] - t[i] for i in range(3)], out

                runs, (_, block) = repeat(encode, repeats, warmup)
                runs = [r[0] for r in runs]
                block = block[0].float().numpy()
                if dtype == "fp32":
                    blocks[m] = block
                enc_rows.append(_encoder_row(
                    m, "torch", dtype, "cpu", cfg, runs, cosine(block, blocks[m]), load_s=load_s, resident_mib=resident))

                ids = prompt[m]
                ref_block = torch.from_numpy(blocks[m])[None]  # every decoder gets the same rows
                runs, (_, _, tokens) = repeat(lambda: _torch_generate(model, ids, ref_block, new_tokens),
                                              repeats, warmup)
                if dtype == "fp32":
                    greedy[m] = tokens
                n_prefill = len(ids) + cfg.n_inserted
                dec_rows.append(_decoder_row(
                    m, "torch", dtype, runs, n_prefill, len(tokens), greedy[m], tokens, None,
                    load_s=load_s, bytes_per_token=bytes_per_token, resident_mib=resident))
    del model
    return TorchRows(encoder=enc_rows, decoder=dec_rows, blocks=blocks, greedy=greedy)


def _torch_generate(model, ids: list[int], block, n_new: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, greedy tokens): no stop conditions, exactly n_new tokens."""
    import torch

    t0 = time.perf_counter()
    h = model.build_sequence(torch.tensor([ids]), block)
    cache = model.new_cache(1, h.shape[1] + n_new)
    logits = model.forward_decoder(h, 0, cache, last_only=True)[0, -1]
    tok = int(logits.argmax())
    t1 = time.perf_counter()
    tokens = [tok]
    pos = h.shape[1]
    for _ in range(n_new - 1):
        logits = model.forward_decoder(model.embed_tokens(torch.tensor([[tok]])), pos, cache)[0, -1]
        tok = int(logits.argmax())
        tokens.append(tok)
        pos += 1
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, tokens


def _encoder_row(modality, backend, precision, device, cfg, runs, cos, **extra) -> EncoderRow:
    """runs: per repetition [tokenizer_s, trunk_s, upm_s] (+ optional total_s)."""
    stages = {name: summarize([r[i] for r in runs]) for i, name in enumerate(ENCODER_STAGES[1:])}
    totals = [sum(r[:3]) if len(r) < 4 else r[3] for r in runs]
    flops = encoder_flops(cfg, modality)
    total = summarize(totals)
    return EncoderRow(
        modality=modality, backend=backend, precision=precision, device=device,
        stages_s=stages, encode_s=total, flops=flops["total"],
        gflop_s=flops["total"] / total.median / 1e9 if total.median > 0 else 0.0,
        cosine_vs_torch_fp32=cos, **extra,
    )


def _decoder_row(modality, backend, precision, runs, n_prefill, n_tokens, ref_tokens, tokens, top1,
                 **extra) -> DecoderRow:
    """runs: per repetition (prefill_s, decode_s, tokens[, llama_decode calls in decode_s])."""
    prefill = summarize([r[0] for r in runs])
    decode = summarize([r[1] for r in runs])
    # torch's decode_s covers the tokens after the first; our Session's also decodes the last
    # token into the cache before it returns (a follow-up turn starts from it), so it says how many
    steps = max(1, runs[0][3] if len(runs[0]) > 3 else n_tokens - 1)
    return DecoderRow(
        modality=modality, backend=backend, precision=precision, device="cpu",
        prefill_positions=n_prefill, new_tokens=n_tokens,
        prefill_s=prefill, prefill_tokens_per_s=n_prefill / prefill.median if prefill.median else 0.0,
        decode_s=decode, decode_tokens_per_s=steps / decode.median if decode.median else 0.0,
        greedy_prefix_match=prefix_match(ref_tokens, tokens), top1_agreement=top1, **extra,
    )


# ----------------------------------------------------------------------------- runtime encoder


def bench_runtime_encoder(manifest, bundle: Path, precision: str, device: str, cfg, inputs, blocks,
                          repeats: int, warmup: int, threads: int, plain: bool) -> list[EncoderRow]:
    """Rows of one exported precision on one execution provider, per modality."""
    from onellm.runtime.encoder import Encoder

    rows = []
    rss0 = rss_mib()
    t0 = time.perf_counter()
    enc = Encoder(manifest.encoder.precisions[precision], bundle, device=device, threads=threads, verify=False)
    enc.warmup(list(inputs))
    load_s = time.perf_counter() - t0
    resident = rss_mib() - rss0
    try:
        for m, arr in inputs.items():
            def run_staged(m=m, arr=arr):
                # [tokenizer (incl. the input checks, copy-in and any numpy grouping), trunk, the rest]
                per_graph: list[float] = []
                t0 = time.perf_counter()
                enc.encode(m, arr, stage_hook=lambda _m, _g, sec: per_graph.append(sec))
                total = time.perf_counter() - t0
                return [total - sum(per_graph[1:]), per_graph[1], sum(per_graph[2:])]

            staged, _ = repeat(run_staged, repeats, warmup)

            def whole_and_plain(m=m, arr=arr):  # interleaved, so load drift hits both alike
                w = _clock(lambda: enc.encode(m, arr))[0]
                return w, (_clock(lambda: _plain_chain(enc, m, arr))[0] if plain else None)

            pairs, _ = repeat(whole_and_plain, repeats, warmup)
            block = np.array(enc.encode(m, arr), copy=True)
            runs = [s + [w] for s, (w, _) in zip(staged, pairs)]
            cos = cosine(block, blocks[m]) if m in blocks else None
            rows.append(_encoder_row(
                m, enc.runtime, precision, device, cfg, runs, cos, load_s=load_s, resident_mib=resident,
                plain_sessions_encode_s=summarize([p for _, p in pairs]) if plain else None))
    finally:
        enc.close()
    return rows


def _plain_chain(enc, modality: str, arr: np.ndarray) -> np.ndarray:
    """The same graphs as one `session.run` per graph with numpy in and out (no IOBinding)."""
    from onellm.runtime.point_grouping import group_points

    chain = enc.modalities[modality]
    first = chain.stages[0].inputs[0]
    if chain.point_grouping is not None:
        g = chain.point_grouping
        x = group_points(arr, g.groups, g.k, g.tie_break)[None]
    else:
        x = np.ascontiguousarray(arr.reshape(enc.feed_shape(modality)), dtype=first.dtype)
    values: dict[str, np.ndarray] = {first.name: x}
    if chain.routing_weights:
        values["routing"] = np.asarray(chain.routing_weights, dtype=np.float32)
    out = None
    for stage in chain.stages:
        feeds = {i.name: values[i.name] for i in stage.inputs}
        names = [o.name for o in stage.outputs]
        if enc.runtime == "openvino":  # the compiled model for these shapes, called with numpy
            got = enc.ov_compiled(stage.graph, stage)(feeds)
            by_name = {port.get_any_name(): value for port, value in got.items()}
            results = [by_name[n] for n in names]
        else:
            results = enc.session(stage.graph).run(names, feeds)
        values.update(zip(names, results))
        out = results[0]
    return out


# ----------------------------------------------------------------------------- runtime decoder


@dataclasses.dataclass(frozen=True)
class RuntimeDecoderRows:
    rows: list[DecoderRow]  # one per modality
    overhead: list[DecodeLoopRow]  # the llama-cpp-python comparison (empty without plain baselines)


def bench_runtime_decoder(manifest, bundle: Path, quant: str, blocks, prompt, greedy, new_tokens: int,
                          repeats: int, warmup: int, threads: int, plain: bool) -> RuntimeDecoderRows:
    """Rows of one GGUF quantization (llama.cpp through our Session), per modality."""
    from onellm.runtime.decoder import Decoder, Sampling, capture_native_log, context_settings_for
    from onellm.runtime.registry import decoder_quant

    entry = manifest.decoder.quants[quant]
    path = bundle / entry.file
    n_ctx = min(entry.n_ctx, N_CTX)
    extra = decoder_quant(quant).use_extra_bufts()  # the runtime's buffer-type policy (or the env's choice)

    rss0 = rss_mib()
    t0 = time.perf_counter()
    with capture_native_log() as native:
        # as the runtime runs this type: its buffer-type policy and context settings (KV cache, flash attention)
        dec = Decoder(path, n_ctx=n_ctx, n_threads=threads, use_extra_bufts=extra, **context_settings_for(quant))
        dec.session().prefill([dec.bos_id])  # flash attention is resolved on the first graph
    flash = _flash_attn_from_log(native)
    load_s = time.perf_counter() - t0
    resident = rss_mib() - rss0
    bpt = gguf_bytes_per_token(path)
    rows, overhead = [], []
    sampling = Sampling.greedy(new_tokens)
    try:
        for m, block in blocks.items():
            ids = prompt[m]
            block = np.ascontiguousarray(block, dtype=np.float32)

            def run(ids=ids, block=block):
                return session_greedy_run(dec, ids, sampling, block)

            runs, (_, _, tokens, _) = repeat(run, repeats, warmup)
            top1 = None
            ref = greedy.get(m)
            if ref:
                logits = dec.logits_for(block, list(ids[1:]) + ref[:-1])
                top1 = float(np.mean(logits[-len(ref):].argmax(-1) == np.asarray(ref)))
            rows.append(_decoder_row(m, "llama.cpp", quant, runs, len(ids) + block.shape[0], len(tokens),
                                     ref or tokens, tokens, top1, load_s=load_s, bytes_per_token=bpt,
                                     resident_mib=resident, file_bytes=entry.bytes))
        if plain:
            first = next(iter(prompt.values()))
            overhead.append(_decode_overhead(dec, extra, path, first, new_tokens, repeats, warmup, threads, quant,
                                             n_ctx, flash))
    finally:
        dec.close()
    return RuntimeDecoderRows(rows=rows, overhead=overhead)


def _decode_overhead(dec, shipped_extra: bool, path: Path, ids: list[int], new_tokens: int, repeats: int, warmup: int, threads: int,
                     quant: str, n_ctx: int, ctx_flash: bool) -> DecodeLoopRow:
    """Our Session vs llama-cpp-python's `Llama.generate`: same GGUF, text-only prompt, greedy.

    `Llama` loads with llama.cpp's default weight buffers (extra CPU buffer types on) and
    KV cache (f16), so the loop-overhead comparison (`ours`, `ratio`) runs our Decoder with
    the same settings and flash attention, batch and threads as `Llama`. When our shipped
    settings differ (extra buffer types off, or a Q8_0 cache), `dec` as shipped is timed
    too (`ours_shipped`): what a user gets from us versus from a plain llama-cpp-python.
    """
    import llama_cpp

    from onellm.runtime.decoder import Decoder, Sampling

    sampling = Sampling.greedy(new_tokens)

    def ours_runner(decoder):
        def ours():
            prefill_s, decode_s, tokens, decodes = session_greedy_run(decoder, ids, sampling)
            return prefill_s, decode_s, len(tokens), decodes
        return ours

    def plain_runner(llm):
        return lambda: plain_greedy_run(llm, ids, new_tokens)

    def summary(runs, **extra) -> LoopRun:
        rate = runs[0][3] / statistics.median(r[1] for r in runs)
        return LoopRun(prefill_s=summarize([r[0] for r in runs]), decode_s=summarize([r[1] for r in runs]),
                       decode_tokens_per_s=rate, tokens=runs[0][2], **extra)

    as_plain = shipped_extra and dec.kv_type == "f16"
    matched = dec if as_plain else Decoder(path, n_ctx=n_ctx, n_threads=threads, use_extra_bufts=True,
                                           flash_attn=ctx_flash, kv_type="f16")
    runners = {"ours": ours_runner(matched)}
    if not as_plain:
        runners["ours_shipped"] = ours_runner(dec)
    with _plain_llama_params(path) as (plain_buffers, _keep_overrides):
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                              n_threads_batch=threads, flash_attn=ctx_flash, verbose=False, seed=0)
    runners["llama_cpp_python"] = plain_runner(llm)
    runs: dict[str, list] = {k: [] for k in runners}
    try:
        for i in range(warmup + max(1, repeats)):  # interleaved, so a drifting machine load hits all alike
            for key, fn in runners.items():
                r = fn()
                if i >= warmup:
                    runs[key].append(r)
    finally:
        if hasattr(llm, "close"):
            llm.close()
        del llm
        if matched is not dec:
            matched.close()
    # rates are llama_decode calls per second of decode time: ours' holds n samples and n decodes
    # (the last token goes into the cache before generate returns), plain's (from its first token)
    # n-1 of each
    ours, plain = summary(runs["ours"]), summary(runs["llama_cpp_python"], extra_bufts=True, buffers=plain_buffers)
    shipped = summary(runs["ours_shipped"]) if "ours_shipped" in runs else None
    paired = _paired_ratios(runs["ours"], runs["llama_cpp_python"])
    paired_shipped = _paired_ratios(runs["ours_shipped"], runs["llama_cpp_python"]) if shipped else None
    return DecodeLoopRow(
        quant=quant, prompt_tokens=len(ids), new_tokens=new_tokens, flash_attn=ctx_flash,
        ours_extra_bufts=shipped_extra, ours_kv_type=dec.kv_type, ours=ours, ours_shipped=shipped,
        llama_cpp_python=plain,
        ratio=ours.decode_tokens_per_s / plain.decode_tokens_per_s,
        ratio_shipped=shipped.decode_tokens_per_s / plain.decode_tokens_per_s if shipped else None,
        ratio_paired=paired, ratio_shipped_paired=paired_shipped)


def session_greedy_run(decoder, ids: list[int], sampling, block=None) -> tuple[float, float, list[int], int]:
    """Our `Session` from an empty cache, no stop strings: (prefill seconds, decode seconds,
    tokens, llama_decode calls in the decode span: one per token, the last one included)."""
    s = decoder.session()
    t0 = time.perf_counter()
    s.prefill(ids, block)
    t1 = time.perf_counter()
    n0 = s.decode_calls
    gen = s.generate_text(sampling, stop=())
    return t1 - t0, gen.seconds, list(gen.tokens), s.decode_calls - n0


def plain_greedy_run(llm, ids: list[int], new_tokens: int) -> tuple[float, float, int, int]:
    """llama-cpp-python's `Llama.generate`, greedy, from an empty cache: (seconds to its first
    token, seconds from it to the last, tokens, llama_decode calls in that span: tokens - 1)."""
    llm.reset()  # no prompt reuse from the previous repetition: a full prefill, like ours
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n >= new_tokens:
            break
    t2 = time.perf_counter()
    return t_first - t0, t2 - t_first, n, n - 1


def _paired_ratios(ours: Sequence[tuple[float, float, int, int]],
                   plain: Sequence[tuple[float, float, int, int]]) -> Stat:
    """Round-by-round decode-rate ratios ours / plain of (prefill s, decode s, tokens, decodes)
    runs: each round's runs were taken back to back, so a load change between rounds cancels."""
    def rate(r):
        return r[3] / r[1]
    return summarize([rate(a) / rate(b) for a, b in zip(ours, plain, strict=True)])


@contextlib.contextmanager
def _plain_llama_params(path: Path) -> Iterator[tuple[str | None, Any]]:
    """llama-cpp-python's `Llama` loads with llama.cpp's extra buffer types on. Where the CPU
    offers AMX that crashes on the first decode (tests/test_llama_bufts.py), so there its
    default model parameters are swapped, for the duration of the load, for the weight
    placement our loader uses (`_llama.set_extra_bufts`: CPU_REPACK by override, no AMX).
    Yields that placement's description (None: llama-cpp-python's own defaults) and the
    override lists made, which the caller keeps alive as long as the model.
    """
    import llama_cpp.llama_cpp as lc

    from onellm.runtime import _llama

    offered = _llama.cpu_extra_buffer_types()
    crashing = [b for b in _llama.CRASHING_EXTRA_BUFTS if b in offered]
    if not crashing:
        yield None, None
        return
    original = lc.llama_model_default_params
    kept: list = []

    def params():
        p = original()
        kept.append(_llama.set_extra_bufts(p, path)[1])
        return p

    lc.llama_model_default_params = params
    try:
        repacked = len(_llama.repackable_tensors(path)) if _llama.REPACK_BUFT in offered else 0
        yield (f"{repacked} tensors on CPU_REPACK by override; "
               f"its defaults ({', '.join(crashing)} extra buffer type) crash on this CPU"), kept
    finally:
        lc.llama_model_default_params = original


def _flash_attn_from_log(lines: Sequence[str]) -> bool:
    """Whether llama.cpp resolved flash attention to enabled (so the plain baseline can match it)."""
    for line in lines:
        if "Flash Attention" in line:
            return "enabled" in line
        if "flash_attn" in line and "=" in line:
            value = line.split("=", 1)[1].strip()
            if value in ("1", "enabled", "true"):
                return True
            if value in ("0", "disabled", "false"):
                return False
    return False


# ----------------------------------------------------------------------------- chat and footprint


def bench_chat(bundle: Path, precision: str, quant: str, modality: str, source: dict[str, Any], new_tokens: int,
               repeats: int, warmup: int, threads: int, n_ctx: int) -> ChatRow:
    """Two-turn chat through Pipeline: time to first token of turn 1 and of the follow-up."""
    from onellm.runtime.decoder import Sampling
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.pipeline import Pipeline

    sampling = Sampling.greedy(new_tokens)
    question = get_modality(modality).caption_prompt
    with Pipeline.load(bundle, device="cpu", precision=precision, quant=quant, threads=threads,
                       n_ctx=n_ctx, verify=False) as pipe:
        def turn_pair():
            # a first question from scratch: the engine would otherwise answer turn 1 from the
            # previous pair's cached block and prefix
            pipe.engine.clear_cache(blocks=True)
            chat = pipe.chat(**source)
            a1 = chat.ask(question, sampling=sampling)
            a2 = chat.ask(QUESTION_2, sampling=sampling)
            return a1.timings, a2.timings

        runs, _ = repeat(turn_pair, repeats, warmup)

    def ttft(t: dict) -> float:
        return t["preprocess_s"] + t["encode_s"] + t["prefill_s"]

    first = summarize([ttft(a) for a, _ in runs])
    follow = summarize([ttft(b) for _, b in runs])
    return ChatRow(
        modality=modality, precision=precision, quant=quant,
        definition="time to first token = preprocess + encode + prefill (the first sample is in decode)",
        turn1_ttft_s=first, turn2_ttft_s=follow,
        turn1_prefill_positions=runs[-1][0]["prefill_positions"],
        turn2_prefill_positions=runs[-1][1]["prefill_positions"],
        turn1_first_chunk_s=summarize([a["first_token_s"] for a, _ in runs]),
        turn2_first_chunk_s=summarize([b["first_token_s"] for _, b in runs]),
        ratio=follow.median / first.median if first.median else 0.0,
    )


# peak_rss_mib reads VmHWM, which belongs to the process image and starts afresh at exec
# (ru_maxrss survives fork+exec on Linux: the child would report the bench's own peak).
FOOTPRINT_PROBE = r"""
import json, sys, time
from onellm.runtime.decoder import Sampling
from onellm.runtime.pipeline import Pipeline, context_for_question, peak_rss_mib
from onellm.runtime.prompt import DEFAULT_MAX_NEW_TOKENS

bundle, precision, quant, modality, source, threads = sys.argv[1:7]
source = json.loads(source)
question = "What is this?"
base = peak_rss_mib()
t0 = time.perf_counter()
n_ctx = context_for_question(bundle, question, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)  # as `onellm ask` sizes it
pipe = Pipeline.load(bundle, device="cpu", precision=precision, quant=quant, threads=int(threads),
                     n_ctx=n_ctx, verify=False)
load_s = time.perf_counter() - t0
after_load = peak_rss_mib()
ans = pipe.ask(question, sampling=Sampling.greedy(4), **source)
print(json.dumps({"load_s": load_s, "baseline_rss_mib": base, "after_load_peak_rss_mib": after_load,
                  "peak_rss_mib": peak_rss_mib(), "first_chunk_s": ans.timings["first_token_s"],
                  "n_ctx": pipe.n_ctx, "kv_type": pipe.kv_type}))
"""


def measure_footprint(bundle: Path, precision: str, quant: str, modality: str, source: dict[str, Any],
                      threads: int) -> FootprintRow:
    """Bundle load time and peak RSS of a fresh process that loads the bundle and answers once,
    with the context `onellm ask` gives a question by default (`context_for_question`: the
    prompt, the input's rows and the default 256 answer tokens, rounded up to 256 cells)."""
    cmd = [sys.executable, "-c", FOOTPRINT_PROBE, str(bundle), precision, quant, modality, json.dumps(source),
           str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return FootprintRow(precision=precision, quant=quant, error=tuple(proc.stderr.strip().splitlines()[-1:]))
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    gguf_mib, encoder_mib = loaded_files_mib(bundle, precision, quant, modality)
    return FootprintRow(precision=precision, quant=quant, modality=modality, gguf_mib=gguf_mib,
                        encoder_mib=encoder_mib, **data)


def loaded_files_mib(bundle: Path, precision: str, quant: str, modality: str) -> tuple[float, float]:
    """MiB of the GGUF of `quant` and of the `precision` encoder graphs `modality`'s chain runs."""
    from onellm.runtime.bundle import load_manifest

    man = load_manifest(bundle, verify=False).manifest
    variant = man.encoder.precisions[precision]
    graphs = dict.fromkeys(variant.modalities[modality].chain)
    return man.decoder.quants[quant].bytes / 2**20, sum(variant.graphs[g].bytes for g in graphs) / 2**20


# ----------------------------------------------------------------------------- the run


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Everything in the module docstring, one phase after the other; returns the typed result."""
    say = progress or (lambda msg: log.info("%s", msg))
    started, created = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cfg = bench_config(opts)
    defaults = PRESET_DEFAULTS.get(cfg.name, PRESET_DEFAULTS["bench"])
    st = _settings(opts, cfg, defaults)
    machine = machine_info()
    say(f"machine: {machine.get('cpu_model')}, {machine.get('physical_cores')} cores, "
        f"load {machine.get('load_average', ['?'])[0]}")
    warning = load_warning(machine)
    if warning:
        log.warning("%s; prefer a quiet machine (the value is recorded in the result)", warning)

    art = prepare_artifacts(cfg, opts, st.encoder_precisions, st.decoder_quants, say)
    manifest, bundle = art.manifest, art.bundle
    say("ceilings: memory bandwidth and GEMM")
    ceilings = Ceilings(bandwidth=measure_bandwidth(defaults["copy_mib"], max(3, st.repeats), st.threads),
                        gemm=measure_gemm(defaults["gemm_n"], max(3, st.repeats), st.threads))
    sources, inputs, prompt = _inputs_and_prompts(cfg, manifest, bundle, art.work_dir)
    with _quiet_readers():
        # the readers are numpy code shared by every backend (the reference has none of its own): timed once
        preprocess = {m: summarize(repeat(lambda m=m: _clock(lambda: read_source(m, sources[m]))[0],
                                          st.repeats, st.warmup)[0]) for m in sources}
        ref = _reference_rows(opts, cfg, art, st, inputs, prompt, say)
        enc_rows = ref.encoder + _runtime_encoder_rows(opts, cfg, art, st, inputs, ref.blocks, say)
        dec = _runtime_decoder_rows(opts, art, st, ref.blocks, prompt, ref.greedy, say)
        enc_rows = _attach_peak_fractions([_with_preprocess(r, preprocess) for r in enc_rows], ceilings.gemm)
        dec_rows = _attach_bandwidth_fractions(ref.decoder + dec.rows, ceilings.bandwidth.gb_s.median * 1e9)
        dec_rows = _attach_ttft(enc_rows, dec_rows)
        overhead = Overhead(decode_loop=tuple(dec.overhead), encoder_chain=_encoder_chain_rows(enc_rows))
        best_p = _best_runtime_precision(enc_rows) or st.encoder_precisions[0]
        n_ctx = min(cfg.decoder.max_seq_len, N_CTX)
        chat, footprint = _chat_and_footprint(bundle, cfg, sources, best_p, st, n_ctx, opts.footprint, say)
    from .report import evaluate_targets

    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return BenchResult(
        created=created,
        preset=cfg.name, config=cfg.to_dict(), settings=st, machine=machine,
        warnings=(warning,) if warning else None, random_weights=manifest.random_weights,
        notice=RANDOM_NOTICE if manifest.random_weights else "", artifacts=art.record(), ceilings=ceilings,
        inputs={m: InputInfo(source=sources.get(m, "dummy_input"), prompt_tokens=len(prompt[m])) for m in inputs},
        encoder=tuple(enc_rows), decoder=tuple(dec_rows), overhead=overhead, chat=chat, footprint=tuple(footprint),
        targets=tuple(evaluate_targets(st.modalities, enc_rows, dec_rows, overhead.decode_loop, chat,
                                       overhead.encoder_chain, footprint)),
        wall_s=time.perf_counter() - started)


@contextlib.contextmanager
def _quiet_readers():
    """The readers' notices were shown once when the inputs were read: not again per repeat."""
    readers = logging.getLogger("onellm.runtime.modalities")
    level = readers.level
    readers.setLevel(logging.ERROR)
    try:
        yield
    finally:
        readers.setLevel(level)


def _reference_rows(opts: BenchOptions, cfg, art: Prepared, st: Settings, inputs, prompt, say) -> TorchRows:
    """The torch reference's rows, blocks and greedy tokens; without the reference, no rows and
    the runtime's fp32 (else first) encoder block for the decoders."""
    if opts.torch_reference:
        dtypes = ["fp32"] + (["bf16"] if bf16_supported() else [])
        say(f"torch reference ({', '.join(dtypes)}): encoder and decoder")
        return bench_torch(cfg, art.checkpoint, inputs, prompt, st.new_tokens, st.repeats, st.warmup, dtypes)
    from onellm.runtime.encoder import Encoder

    p0 = "fp32" if "fp32" in st.encoder_precisions else st.encoder_precisions[0]
    with Encoder(art.manifest.encoder.precisions[p0], art.bundle, threads=st.threads, verify=False) as enc:
        blocks = {m: np.array(enc.encode(m, a), copy=True) for m, a in inputs.items()}
    return TorchRows(encoder=[], decoder=[], blocks=blocks, greedy={})


def _runtime_encoder_rows(opts: BenchOptions, cfg, art: Prepared, st: Settings, inputs, blocks,
                          say) -> list[EncoderRow]:
    """Each execution provider's preferred precisions, and fp32 everywhere as the reference row."""
    from onellm.runtime.registry import EXECUTION_PROVIDERS

    rows: list[EncoderRow] = []
    for device in ("cpu", *([st.gpu_device] if st.gpu_device else [])):
        for p in st.encoder_precisions:
            if p in EXECUTION_PROVIDERS[device].precisions or p == "fp32":
                say(f"runtime encoder {p} on {device}")
                rows += bench_runtime_encoder(art.manifest, art.bundle, p, device, cfg, inputs, blocks, st.repeats,
                                              st.warmup, st.threads, opts.plain_baselines)
    return rows


def _runtime_decoder_rows(opts: BenchOptions, art: Prepared, st: Settings, blocks, prompt, greedy,
                          say) -> RuntimeDecoderRows:
    """Every quantization's rows, and their decode-loop comparisons."""
    rows: list[DecoderRow] = []
    overhead: list[DecodeLoopRow] = []
    for q in st.decoder_quants:
        say(f"runtime decoder {q} (llama.cpp)" + (" and llama-cpp-python's plain generate" if opts.plain_baselines else ""))
        dr = bench_runtime_decoder(art.manifest, art.bundle, q, blocks, prompt, greedy, st.new_tokens, st.repeats,
                                   st.warmup, st.threads, opts.plain_baselines)
        rows += dr.rows
        overhead += dr.overhead
    return RuntimeDecoderRows(rows=rows, overhead=overhead)


def _with_preprocess(row: EncoderRow, preprocess: dict[str, Stat]) -> EncoderRow:
    """The row with its modality's reader time as the first stage (when a real file was read)."""
    if row.modality not in preprocess:
        return row
    return dataclasses.replace(row, stages_s={"preprocess": preprocess[row.modality], **row.stages_s})


def _encoder_chain_rows(enc_rows: Sequence[EncoderRow]) -> tuple[EncoderChainRow, ...]:
    """Our chain vs plain session.run calls, for the rows that timed both."""
    return tuple(EncoderChainRow(modality=r.modality, precision=r.precision, device=r.device, ours_s=r.encode_s.median,
                                 plain_sessions_s=r.plain_sessions_encode_s.median,
                                 ratio=r.plain_sessions_encode_s.median / r.encode_s.median)
                 for r in enc_rows if r.plain_sessions_encode_s is not None)


def _settings(opts: BenchOptions, cfg, defaults: dict[str, Any]) -> Settings:
    """Repeats, warm-up, new tokens, threads, GPU device, encoder precisions and decoder quants of a run."""
    from onellm.export.bundle import split_choices
    from onellm.runtime.encoder import physical_cores
    from onellm.runtime.registry import DECODER_QUANTS, ENCODER_PRECISIONS

    repeats = opts.repeats if opts.repeats is not None else defaults["repeats"]
    warmup = opts.warmup if opts.warmup is not None else defaults["warmup"]
    new_tokens = opts.new_tokens or defaults["new_tokens"]
    if repeats < 1 or warmup < 0 or new_tokens < 2:
        raise ConfigError(f"need --repeats >= 1, --warmup >= 0, --new-tokens >= 2 (got {repeats}, {warmup}, {new_tokens})")
    gpu = _gpu_encoder_device(opts.device)
    precisions = split_choices(opts.encoder_precisions, tuple(ENCODER_PRECISIONS), "encoder precision") or (
        list(defaults.get("precisions", ("fp32", "int8"))) + (["fp16"] if gpu else []))
    quants = split_choices(opts.decoder_quants, tuple(DECODER_QUANTS), "decoder quantization") or list(
        defaults.get("quants", DEFAULT_QUANTS))
    return Settings(modalities=tuple(cfg.modalities), encoder_precisions=tuple(precisions),
                    decoder_quants=tuple(quants), repeats=repeats, warmup=warmup, new_tokens=new_tokens,
                    threads=opts.threads or physical_cores(), gpu_device=gpu,
                    statistic="median over repeats after warm-up; min and max beside it")


def _inputs_and_prompts(cfg, manifest, bundle: Path, work_dir: Path):
    """(sources, modality arrays, prompt ids) of a run: real files where there are some, else dummies."""
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.prompt import Conversation
    from onellm.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(bundle / manifest.tokenizer.file)
    sources = modality_sources(cfg.modalities, work_dir)
    inputs, prompt = {}, {}
    rng = np.random.default_rng(0)
    for m in cfg.modalities:
        spec = get_modality(m)
        arr = read_source(m, sources[m]).array if m in sources else spec.dummy_input(rng)
        inputs[m] = np.ascontiguousarray(arr, dtype=np.float32)
        conv = Conversation(manifest.prompt)
        conv.add_question(spec.caption_prompt)
        prompt[m] = tokenizer.encode(conv.render(), bos=True, eos=False)
    return sources, inputs, prompt


def _attach_bandwidth_fractions(dec_rows: Sequence[DecoderRow], bandwidth_bytes_s: float) -> list[DecoderRow]:
    """Each decoder row with its bandwidth ceiling (bandwidth / bytes read per token) and its fraction of it."""
    out = []
    for row in dec_rows:
        ceiling = bandwidth_bytes_s / row.bytes_per_token if row.bytes_per_token else 0.0
        out.append(dataclasses.replace(row, bandwidth_ceiling_tokens_per_s=ceiling,
                                       fraction_of_bandwidth_ceiling=row.decode_tokens_per_s / ceiling if ceiling else 0.0))
    return out


def _chat_and_footprint(bundle, cfg, sources, best_p: str, st: Settings, n_ctx: int, footprint: bool,
                        say) -> tuple[ChatRow | None, list[FootprintRow]]:
    """The two-turn chat row and the fresh-process footprint rows (None and [] without a real input)."""
    quants = st.decoder_quants
    chat_q = "q8_0" if "q8_0" in quants else quants[0]
    chat_m = next((m for m in cfg.modalities if m in sources), None)
    if chat_m is None:
        return None, []
    say(f"chat: two turns through Pipeline ({best_p} encoder, {chat_q} decoder, {chat_m})")
    chat = bench_chat(bundle, best_p, chat_q, chat_m, sources[chat_m], st.new_tokens, st.repeats, st.warmup,
                      st.threads, n_ctx)
    rows = []
    if footprint:
        combos = list(dict.fromkeys([(p, chat_q) for p in st.encoder_precisions if p != "fp16"]
                                    + [(best_p, q) for q in quants]))
        for p, q in combos:
            say(f"footprint: fresh process loading the bundle with {p} encoder, {q} decoder")
            rows.append(measure_footprint(bundle, p, q, chat_m, sources[chat_m], st.threads))
    return chat, rows


def _gpu_encoder_device(device: str) -> str | None:
    """The GPU execution provider for the GPU rows: the one asked for, or with `auto` the
    first available in the registry's auto order; None on CPU-only machines."""
    if device == "cpu":
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from onellm.runtime.registry import AUTO_ORDER, EXECUTION_PROVIDERS

    wanted = [device] if device != "auto" else [d for d in AUTO_ORDER if EXECUTION_PROVIDERS[d].device_type != "cpu"]
    for name in wanted:
        ep = EXECUTION_PROVIDERS.get(name)
        if ep is None:
            raise ConfigError(f"--device {name}: unknown; choose from auto, {', '.join(EXECUTION_PROVIDERS)}")
        if ep.is_available():
            return name
        if device != "auto":
            raise ConfigError(f"--device {name}: this onnxruntime has no {ep.ort_provider} "
                              f"({', '.join(ort.get_available_providers())})")
    return None


def _attach_peak_fractions(rows: Sequence[EncoderRow], gemm: GemmCeilings) -> list[EncoderRow]:
    """Each CPU encoder row with the GEMM ceiling of its backend and precision and its fraction of it."""
    peaks = {("torch", "fp32"): "torch_fp32", ("torch", "bf16"): "torch_bf16",
             ("onnxruntime", "fp32"): "onnxruntime_fp32", ("onnxruntime", "int8"): "onnxruntime_int8"}
    rates = gemm.rates()
    out = []
    for r in rows:
        key = peaks.get((r.backend, r.precision))
        if r.device != "cpu" or key not in rates:
            out.append(dataclasses.replace(r, peak_gemm=None, fraction_of_peak=None))
            continue
        peak = rates[key].gflop_s.median
        out.append(dataclasses.replace(r, peak_gemm=key, fraction_of_peak=r.gflop_s / peak if peak else None))
    return out


def _attach_ttft(enc_rows: Sequence[EncoderRow], dec_rows: Sequence[DecoderRow]) -> list[DecoderRow]:
    """Each decoder row with its time to first token with the matching encoder (sum of stage medians)."""
    enc = {(r.modality, r.backend, r.precision): r for r in enc_rows if r.device == "cpu"}
    runtime = [r for r in enc_rows if r.backend in ("onnxruntime", "openvino") and r.device == "cpu"]
    out = []
    for d in dec_rows:
        if d.backend == "torch":
            e = enc.get((d.modality, "torch", d.precision))
        else:
            cands = [r for r in runtime if r.modality == d.modality]
            e = min(cands, key=lambda r: r.encode_s.median) if cands else None
        pre = e.stages_s["preprocess"].median if e and "preprocess" in e.stages_s else 0.0
        enc_s = e.encode_s.median if e else 0.0
        out.append(dataclasses.replace(d, encoder_used=f"{e.backend} {e.precision}" if e else None,
                                       ttft_s=pre + enc_s + d.prefill_s.median))
    return out


def _best_runtime_precision(rows: Sequence[EncoderRow]) -> str | None:
    """The CPU encoder precision with the lowest median over modalities, cosine >= 0.99."""
    by_p: dict[str, list[float]] = {}
    for r in rows:
        if r.backend in ("onnxruntime", "openvino") and r.device == "cpu" and (r.cosine_vs_torch_fp32 or 1.0) >= 0.99:
            by_p.setdefault(r.precision, []).append(r.encode_s.median)
    return min(by_p, key=lambda p: sum(by_p[p])) if by_p else None
