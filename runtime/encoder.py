"""The encoder chain on onnxruntime, without torch: modality array -> [32, n_embd] block.

In: one encoder variant of a bundle manifest (`runtime.manifest.EncoderVariant`, or
its dict form as `onellm.export.onnx_encoder.export_encoders` returns it: graph entries
and, per modality, its chain of stages with their recorded shapes) and the bundle
directory. Out: `Encoder.encode(modality, array)`, a view of ONE
preallocated float32 [n_inserted, n_embd] host buffer that onnxruntime writes directly
(the output is bound to the buffer's pointer) and that every call reuses.

Per modality the chain is tokenizer -> trunk -> pre -> upm -> post; the point modality
first groups its cloud in numpy (`point_grouping`); the modality's folded routing
weights (from its entry) are a constant input of the shared upm graph. Between stages nothing is copied:
each stage's outputs are preallocated OrtValues (on the session's device), shaped as the
manifest's chain stages record, bound as the next stage's inputs through IOBinding, all
created once per modality on first use (`prepare`) or ahead of time.

Providers: `device="cpu"` (default), `"cuda"`, `"tensorrt"` or `"auto"` (CUDA when the
installed onnxruntime has it, else CPU), from `runtime.registry.EXECUTION_PROVIDERS`.
A GPU device that is not available raises BackendError; nothing GPU-specific is
imported or touched on CPU. CPU sessions use one
intra-op thread per physical core of the cores this process may run on.

Precisions whose registry entry says `runtime="openvino"` (ov-int8: static int8 QDQ graphs)
run on OpenVINO's CPU plugin instead: the same chain and buffers, each graph compiled for
the modality's recorded shapes (static shapes are ~10 % faster there than dynamic ones;
benchmarks/openvino_encoder.py), its infer request's tensors wrapping our numpy buffers.

The returned array is overwritten by the next `encode` call: copy it to keep it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendError, BundleError, InputError
from .manifest import Chain, EncoderVariant, Graph
from .point_grouping import group_points
from .registry import DEVICES, ENCODER_PRECISIONS, OPENVINO_HINT, openvino_available, resolve_device

log = logging.getLogger(__name__)

__all__ = ["DEVICES", "Encoder", "StageHook", "physical_cores", "select_providers"]
StageHook = Callable[[str, str, float], None]  # (modality, graph name, seconds) after each stage run
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((base.joinpath("physical_package_id").read_text().strip(),
                       base.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))
    return max(1, len(cores))


# onnxruntime graph optimizers CPU sessions run without. The int8 export splits
# SkipLayerNormalization into Add + LayerNormalization, because the fused CPU kernel is 3.7x
# slower (export/quantize.py: unfuse_skip_layer_norm); onnxruntime's SkipLayerNormFusion fuses
# such a pair again where the norm is the sum's only reader (tests/test_skip_layer_norm.py;
# in the exported trunk every sum also feeds the residual stream, and it fused none).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_kwargs(device_type: str) -> dict[str, Any]:
    """Extra InferenceSession keyword arguments for sessions on `device_type` ("cpu", "cuda")."""
    return {"disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)} if device_type == "cpu" else {}


def select_providers(device: str, trt_options: dict[str, Any] | None = None) -> tuple[list[Any], str, int]:
    """(providers for InferenceSession, OrtValue device type, device id) for a device name.

    trt_options: extra TensorRT provider options (engine/timing cache; see runtime/trt.py).
    """
    ep, device_id = resolve_device(device)
    return ep.session_providers(device_id, trt_options if ep.device == "tensorrt" else None), ep.device_type, device_id


class _Stage:
    """One graph run inside one modality's chain: its session and a persistent IOBinding."""

    def __init__(self, name: str, session, entry: Graph) -> None:
        self.name = name
        self.session = session
        self.entry = entry
        self.binding = session.io_binding()

    def run(self) -> None:
        self.binding.synchronize_inputs()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()


class _OvRunner:
    """`session.run(names, feeds)` over a graph compiled by OpenVINO with its dynamic axes
    (encode_many's batches), compiled on the first batch: `ask` never pays for it."""

    def __init__(self, compile_dynamic: Callable[[], Any]) -> None:
        self.compile_dynamic = compile_dynamic

    def run(self, names: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compile_dynamic().create_infer_request().infer(dict(feeds))
        by_name = {port.get_any_name(): value for port, value in result.items()}
        return [np.asarray(by_name[n]) for n in names]


class _OvStage:
    """One graph run inside one modality's chain on OpenVINO: an infer request over shared buffers."""

    def __init__(self, name: str, compiled, compile_dynamic: Callable[[], Any], entry: Graph) -> None:
        self.name = name
        self.entry = entry
        self.request = compiled.create_infer_request()
        self.session = _OvRunner(compile_dynamic)  # for encode_many's batches of any size
        self.tensors: list[Any] = []

    def bind(self, name: str, array: np.ndarray, output: bool = False) -> None:
        """Let the request read (or write) `array` in place: an ov.Tensor over its memory."""
        import openvino as ov

        tensor = ov.Tensor(array, shared_memory=True)
        self.tensors.append(tensor)
        if output:
            self.request.set_output_tensor(_ov_port_index(self.request.model_outputs, name), tensor)
        else:
            self.request.set_input_tensor(_ov_port_index(self.request.model_inputs, name), tensor)

    def run(self) -> None:
        self.request.infer()


# OpenVINO pins its threads to cores by default on Linux; onnxruntime's threads are not pinned.
# Off, like theirs: on the bench preset's trunk + UPM (2 threads) pinned and unpinned measured
# alike, quiet (1.10x vs 1.13x onnxruntime int8) and beside a process spinning on one of the
# two cores (1.14x vs 1.14x); benchmarks/results/openvino-pinning-*.json.
OV_CPU_PINNING = False


def _ov_port_index(ports, name: str) -> int:
    for i, port in enumerate(ports):
        if name in port.get_names():
            return i
    raise BundleError(f"encoder graph: no OpenVINO port named {name!r} (it has "
                      f"{', '.join(sorted(n for port in ports for n in port.get_names()))})")


# glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_LOAD_MMAP_THRESHOLD = 1 << 20  # while onnxruntime loads a graph: blocks of 1 MiB and more are mmap'd
_RUN_MMAP_THRESHOLD = 32 << 20  # afterwards: the value glibc's own dynamic threshold rises to


@contextlib.contextmanager
def _freed_blocks_go_back():
    """Let the memory onnxruntime frees while it creates a session go back to the system (glibc).

    onnxruntime reads every weight, packs it into a new buffer for its int8/fp32 GEMM
    kernels and frees the original. glibc serves such multi-MiB blocks from mmap only
    until the first of them is freed; then its dynamic threshold rises and the rest come
    from the heap, where the freed originals stay resident. Measured on the release-size
    int8 trunk and UPM graphs (586 MiB of files): loading both grew the process by 716 MiB
    by default and by 611 MiB with a fixed 1 MiB threshold during the load, peak included
    (each original is unmapped once it is packed); a whole `ask` on the bench preset peaked
    141 MiB lower. The setting is process-wide, so it is set back afterwards, to the value
    glibc's dynamic threshold would have risen to.
    Elsewhere (no glibc) this does nothing.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _RUN_MMAP_THRESHOLD)


@functools.lru_cache(maxsize=1)
def _glibc_mallopt():
    """glibc's mallopt, or None (another C library, or not Linux); looked up once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt is a stub)
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def _chain_of(enc: Encoder, modality: str) -> Chain:
    """A modality's manifest chain, checked to have at least two stages."""
    entry: Chain = enc.modalities[modality]
    if len(entry.stages) < 2:
        raise BundleError(f"encoder modality {modality!r}: chain {list(entry.chain)} is too short")
    return entry


def _produced(modality: str, stage: str, name: str, produced: Mapping[str, Any]) -> Any:
    """The buffer an earlier stage writes (or the routing constant) that `stage` reads as `name`."""
    if name not in produced:
        raise BundleError(f"encoder chain of {modality!r}: input {name!r} of graph {stage!r} is not an output "
                          f"of an earlier graph ({', '.join(produced) or 'none'})")
    return produced[name]


def _final_output(enc: Encoder, modality: str, entry: Chain) -> str:
    """The last stage's one output's name, checked to be the encoder buffer's float32 shape."""
    out_spec = entry.stages[-1].outputs
    out = enc.buffer
    if len(out_spec) != 1 or out_spec[0].dtype != "float32" or tuple(out_spec[0].shape) != out.shape:
        raise BundleError(f"encoder chain of {modality!r}: the last graph must have one float32 output of "
                          f"shape {list(out.shape)} (the manifest records {[s.to_dict() for s in out_spec]})")
    return out_spec[0].name


class _Plan:
    """A modality's chain with every buffer allocated once: stages, intermediate OrtValues, input staging."""

    def __init__(self, enc: Encoder, modality: str) -> None:
        import onnxruntime as ort

        entry = _chain_of(enc, modality)
        self.modality = modality
        self.input_shape = tuple(entry.input_shape)
        self.grouping = entry.point_grouping
        self.stages = [_Stage(st.graph, enc.session(st.graph), enc.graph(st.graph)) for st in entry.stages]
        self.values: list[Any] = []  # keeps the preallocated OrtValues alive

        # the first stage's input: a host staging buffer (CPU) or a device OrtValue
        first = self.stages[0]
        (inp,) = entry.stages[0].inputs
        self.feed_shape = tuple(int(d) for d in inp.shape)
        self.feed_name = inp.name
        self.staging = np.empty(self.feed_shape, dtype=_NP_DTYPES[inp.dtype])
        if enc.device_type == "cpu":
            first.binding.bind_input(self.feed_name, "cpu", 0, self.staging.dtype, list(self.feed_shape),
                                     self.staging.ctypes.data)
            self.device_feed = None
        else:
            self.device_feed = ort.OrtValue.ortvalue_from_numpy(self.staging, enc.device_type, enc.device_id)
            first.binding.bind_ortvalue_input(self.feed_name, self.device_feed)

        # every intermediate output: a preallocated OrtValue of its recorded shape, bound as the
        # next stage's input; the folded routing weights are a constant input (from the chain)
        produced: dict[str, Any] = {}
        if entry.routing_weights:
            self.routing = np.ascontiguousarray(entry.routing_weights, dtype=np.float32)
            produced["routing"] = ort.OrtValue.ortvalue_from_numpy(self.routing, enc.device_type, enc.device_id)
            self.values.append(produced["routing"])
        for k, (stage, recorded) in enumerate(zip(self.stages, entry.stages)):
            for spec in recorded.inputs:
                if k > 0:
                    stage.binding.bind_ortvalue_input(spec.name, _produced(modality, stage.name, spec.name, produced))
            if k == len(self.stages) - 1:
                continue
            for spec in recorded.outputs:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    [int(d) for d in spec.shape], _NP_DTYPES[spec.dtype], enc.device_type, enc.device_id
                )
                stage.binding.bind_ortvalue_output(spec.name, value)
                produced[spec.name] = value
                self.values.append(value)
        # the final block goes straight into the encoder's one host buffer
        out = enc.buffer
        self.stages[-1].binding.bind_output(_final_output(enc, modality, entry), "cpu", 0, np.float32, list(out.shape),
                                            out.ctypes.data)

    def feed(self, array: np.ndarray) -> None:
        if self.grouping is not None:
            g = self.grouping
            group_points(array, g.groups, g.k, g.tie_break, out=self.staging[0])
        else:
            np.copyto(self.staging, array.reshape(self.feed_shape), casting="same_kind")
        if self.device_feed is not None:
            self.device_feed.update_inplace(self.staging)

    def run(self, hook: StageHook | None = None) -> None:
        if hook is None:
            for stage in self.stages:
                stage.run()
            return
        for stage in self.stages:
            t0 = time.perf_counter()
            stage.run()
            hook(self.modality, stage.name, time.perf_counter() - t0)


class _OvPlan(_Plan):
    """A modality's chain on OpenVINO: the same buffers as numpy arrays shared with the requests."""

    def __init__(self, enc: Encoder, modality: str) -> None:  # noqa: D107 - the base class's, on OpenVINO
        entry = _chain_of(enc, modality)
        self.modality = modality
        self.input_shape = tuple(entry.input_shape)
        self.grouping = entry.point_grouping
        self.stages = [_OvStage(st.graph, enc.ov_compiled(st.graph, st), functools.partial(enc.ov_compiled, st.graph),
                                enc.graph(st.graph)) for st in entry.stages]
        self.values = []
        (inp,) = entry.stages[0].inputs
        self.feed_shape = tuple(int(d) for d in inp.shape)
        self.feed_name = inp.name
        self.staging = np.empty(self.feed_shape, dtype=_NP_DTYPES[inp.dtype])
        self.device_feed = None
        self.stages[0].bind(self.feed_name, self.staging)
        produced: dict[str, np.ndarray] = {}
        if entry.routing_weights:
            self.routing = np.ascontiguousarray(entry.routing_weights, dtype=np.float32)
            produced["routing"] = self.routing
        for k, (stage, recorded) in enumerate(zip(self.stages, entry.stages)):
            for spec in recorded.inputs:
                if k > 0:
                    stage.bind(spec.name, _produced(modality, stage.name, spec.name, produced))
            if k == len(self.stages) - 1:
                continue
            for spec in recorded.outputs:
                value = np.zeros([int(d) for d in spec.shape], _NP_DTYPES[spec.dtype])
                stage.bind(spec.name, value, output=True)
                produced[spec.name] = value
                self.values.append(value)
        self.stages[-1].bind(_final_output(enc, modality, entry), enc.buffer, output=True)


def _checked_input(plan: _Plan, array: Any, where: str) -> np.ndarray:
    """The reader's array as the chain takes it: the modality's input shape, floating point."""
    arr = np.asarray(array)
    if arr.shape != plan.input_shape:
        raise InputError(where, f"an array of shape {list(plan.input_shape)}", f"shape {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(where, "a floating-point array", f"dtype {arr.dtype}")
    return arr


class Encoder:
    """Runs exported encoder chains with onnxruntime (or OpenVINO for ov-int8); one reused output buffer.

    `entries`: the manifest's `EncoderVariant` (or its dict form, parsed strictly).
    `bundle_dir`: where the entries' relative file paths start.
    `device`: cpu | cuda | tensorrt | auto, optionally `:<id>`.
    `threads`: intra-op threads for CPU sessions (default: physical cores).
    `verify`: check each graph file's sha256 before loading it (the bundle loader may
    already have done so).
    `spin`: let onnxruntime's idle CPU threads spin-wait (faster hand-offs inside a run,
    but they keep cores busy after it, where the decoder runs next; off by default).
    """

    def __init__(
        self,
        entries: EncoderVariant | Mapping[str, Any],
        bundle_dir: str | os.PathLike,
        device: str = "cpu",
        threads: int | None = None,
        verify: bool = True,
        spin: bool = False,
        provider_options: dict[str, Any] | None = None,
    ) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise BackendError(f"onnxruntime is not importable ({exc})") from None
        if not isinstance(entries, EncoderVariant):
            entries = EncoderVariant.from_dict(entries, where="encoder entries")
        self.variant = entries
        self.graphs: Mapping[str, Graph] = entries.graphs
        self.modalities: Mapping[str, Chain] = entries.modalities
        self.n_embd = entries.n_embd
        self.n_inserted = entries.n_inserted
        self.width = entries.width
        self.precision = entries.precision
        self.bundle_dir = Path(bundle_dir)
        self.device = device
        self.runtime = ENCODER_PRECISIONS[self.precision].runtime if self.precision in ENCODER_PRECISIONS \
            else "onnxruntime"
        if self.runtime == "openvino":
            if not openvino_available():
                raise BackendError(f"encoder precision {self.precision!r} runs on OpenVINO, which is not "
                                   f"installed ({OPENVINO_HINT}); or pick another precision with --precision")
            if device.partition(":")[0] not in ("cpu", "auto"):
                raise BackendError(f"encoder precision {self.precision!r} runs on the CPU only (OpenVINO); "
                                   f"found --device {device}")
            device = "cpu"
        self.providers, self.device_type, self.device_id = select_providers(device, provider_options)
        self.threads = threads or physical_cores()
        self.verify = verify
        self.spin = spin
        # THE output buffer: onnxruntime writes every block here; encode returns a view of it.
        self.buffer = np.zeros((1, self.n_inserted, self.n_embd), dtype=np.float32)
        self._sessions: dict[str, Any] = {}
        self._ov: dict[tuple, Any] = {}
        self._ov_core = None  # one OpenVINO Core for every graph, created on the first compile
        self._verified: set[str] = set()  # (graph, input shapes or None) -> OpenVINO compiled model
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()
        self._closed = False

    # ---------------------------------------------------------------- lookups
    def graph(self, name: str) -> Graph:
        try:
            return self.graphs[name]
        except KeyError:
            raise BundleError(f"encoder: graph {name!r} is not in the bundle (it has {', '.join(self.graphs)})") from None

    def _graph_file(self, name: str) -> Path:
        """A graph's file, checked to exist (and its sha256 when `verify`)."""
        entry = self.graph(name)
        path = self.bundle_dir / entry.file
        if not path.is_file():
            raise BundleError(f"{path}: encoder graph {name!r} is missing from the bundle")
        if self.verify and entry.sha256 and name not in self._verified:
            from .bundle import sha256_file

            digest = sha256_file(path)
            if digest != entry.sha256:
                raise BundleError(f"{path}: expected sha256 {entry.sha256}, found {digest}")
            self._verified.add(name)
        return path

    def ov_compiled(self, name: str, stage=None):
        """A graph compiled by OpenVINO's CPU plugin: for the shapes of `stage` (a manifest
        `Stage`), or with the graph's dynamic axes when `stage` is None. Cached per shapes."""
        shapes = None if stage is None else tuple((t.name, tuple(int(d) for d in t.shape)) for t in stage.inputs)
        key = (name, shapes)
        if key in self._ov:
            return self._ov[key]
        import openvino as ov

        path = self._graph_file(name)
        try:
            if self._ov_core is None:
                self._ov_core = ov.Core()
            core = self._ov_core
            model = core.read_model(str(path))
            if shapes is not None:
                model.reshape({n: ov.PartialShape(list(shape)) for n, shape in shapes})
            compiled = core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                # like onnxruntime's threads, OpenVINO's may move off a core another process keeps busy
                "ENABLE_CPU_PINNING": OV_CPU_PINNING})
        except Exception as exc:  # OpenVINO raises its own exception types
            raise BackendError(f"{path}: OpenVINO could not load encoder graph {name!r} ({exc})") from None
        self._ov[key] = compiled
        return compiled

    def session(self, name: str):
        """The onnxruntime session of a graph, created on first use and shared by every chain."""
        if name in self._sessions:
            return self._sessions[name]
        import onnxruntime as ort

        path = self._graph_file(name)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # idle worker threads sleep instead of spinning (unless spin=True): the decoder
        # (llama.cpp) runs right after the encoder on the same cores and must not compete
        # with spinning threads, and neither must other processes on a shared CPU. Set both
        # ways so the session says which it got. (inter_op_num_threads=1 with sequential
        # execution creates no inter-op pool, so there is no inter-op spinning to turn off.)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        try:
            with _freed_blocks_go_back():
                sess = ort.InferenceSession(str(path), so, providers=self.providers, **session_kwargs(self.device_type))
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{path}: onnxruntime could not load encoder graph {name!r} ({exc})") from None
        self._sessions[name] = sess
        return sess

    @property
    def available(self) -> list[str]:
        return list(self.modalities)

    # ---------------------------------------------------------------- encode
    def prepare(self, modality: str) -> None:
        """Create the modality's sessions and preallocated buffers now (else its first encode does).

        Safe to call from another thread while the caller reads the input file.
        """
        self._plan(modality)

    def is_prepared(self, modality: str) -> bool:
        """Whether `prepare` (or an encode) already built this modality's chain."""
        return modality in self._plans

    def feed_shape(self, modality: str) -> tuple[int, ...]:
        """The first graph's input shape (the reader's array after any numpy grouping), batch 1."""
        return self._plan(modality).feed_shape

    def _plan(self, modality: str) -> _Plan:
        plan = self._plans.get(modality)
        if plan is None:
            if modality not in self.modalities:
                raise InputError(
                    "encoder", f"one of the bundle's modalities ({', '.join(self.modalities)})", repr(modality)
                )
            plan = self._plans[modality] = (_OvPlan if self.runtime == "openvino" else _Plan)(self, modality)
        return plan

    def encode(self, modality: str, array: np.ndarray, stage_hook: StageHook | None = None) -> np.ndarray:
        """Preprocessed input (the modality's input_shape) -> [n_inserted, n_embd] float32 view of `buffer`.

        `stage_hook(modality, graph, seconds)` is called after each stage (per-stage timing).
        """
        if self._closed:
            raise BackendError("encoder: used after close()")
        plan = self._plan(modality)
        arr = _checked_input(plan, array, f"{modality} input")
        with self._lock:
            plan.feed(arr)
            try:
                plan.run(stage_hook)
            except Exception as exc:  # onnxruntime's (or OpenVINO's) own error types
                raise BackendError(f"encoder ({modality}): {self.runtime} failed ({exc})") from None
        return self.buffer[0]

    def encode_many(self, modality: str, arrays: list[np.ndarray], stage_hook: StageHook | None = None) -> np.ndarray:
        """Several inputs of one modality in one run of each graph -> a new [k, n_inserted, n_embd] array.

        Every graph's leading axis is dynamic (frames x batch), so k inputs stack along it and
        each stage runs once with k times the rows: the weights are read once per stage for
        the whole batch. The batch's intermediates are allocated per call (k varies); a single
        input takes the preallocated path of `encode`. Row i of the result is input i's block.
        """
        if self._closed:
            raise BackendError("encoder: used after close()")
        if not arrays:
            return np.zeros((0, self.n_inserted, self.n_embd), np.float32)
        if len(arrays) == 1:
            return self.encode(modality, arrays[0], stage_hook)[None].copy()
        plan = self._plan(modality)
        n0 = plan.feed_shape[0]
        staging = np.empty((len(arrays) * n0, *plan.feed_shape[1:]), dtype=plan.staging.dtype)
        for i, array in enumerate(arrays):
            arr = _checked_input(plan, array, f"{modality} input {i}")
            view = staging[i * n0:(i + 1) * n0]
            if plan.grouping is not None:
                g = plan.grouping
                group_points(arr, g.groups, g.k, g.tie_break, out=view[0])
            else:
                np.copyto(view, arr.reshape(plan.feed_shape), casting="same_kind")
        chain = self.modalities[modality]
        values: dict[str, np.ndarray] = {plan.feed_name: staging}
        if chain.routing_weights:
            values["routing"] = plan.routing
        with self._lock:
            try:
                for stage, recorded in zip(plan.stages, chain.stages):
                    t0 = time.perf_counter()
                    names = [spec.name for spec in recorded.outputs]
                    feeds = {spec.name: values[spec.name] for spec in recorded.inputs}
                    values.update(zip(names, stage.session.run(names, feeds)))
                    if stage_hook is not None:
                        stage_hook(modality, stage.name, time.perf_counter() - t0)
            except Exception as exc:  # onnxruntime's (or OpenVINO's) own error types
                raise BackendError(f"encoder ({modality}): {self.runtime} failed on a batch of {len(arrays)} "
                                   f"({exc})") from None
        out = values[chain.stages[-1].outputs[0].name]
        want = (len(arrays), self.n_inserted, self.n_embd)
        if out.shape != want:
            raise BundleError(f"encoder chain of {modality!r}: a batch of {len(arrays)} gave shape {list(out.shape)}, "
                              f"expected {list(want)}")
        return np.ascontiguousarray(out, dtype=np.float32)

    def warmup(self, modalities: list[str] | None = None) -> None:
        """Build sessions and plans (and run each chain once on zeros) ahead of the first request."""
        for m in modalities or list(self.modalities):
            plan = self._plan(m)
            with self._lock:
                plan.staging[...] = 0
                if plan.device_feed is not None:
                    plan.device_feed.update_inplace(plan.staging)
                plan.run()

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release sessions, bindings and buffers' OrtValues."""
        self._plans.clear()
        self._sessions.clear()
        self._ov.clear()
        self._closed = True

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
