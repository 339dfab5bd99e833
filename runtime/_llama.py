"""Thin owners of llama.cpp's native objects (through llama-cpp-python's ctypes layer).

One class per C resource, each with `close()`, a context manager and a finaliser, the
way llama-cpp-python's `_internals.py` shapes them: `LlamaModel` (llama_model*),
`LlamaContext` (llama_context*), `LlamaBatch` (the arrays a `llama_batch` points at) and
`LlamaSampler` (a llama_sampler chain). Every native return code is checked and turned
into a `BackendError` that names the call and the code. llama.cpp's own log lines are
routed to the `onellm.runtime.llama_cpp` logger (INFO lines at DEBUG level).

Embeddings go in by pointer: `LlamaBatch.embd_view(rows, pos0)` returns a `llama_batch`
struct whose `embd` field points at the caller's C-contiguous float32 array, so nothing
is copied on the Python side (llama.cpp copies the rows once into its own ubatch buffer
inside `llama_decode`, whatever the caller does).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .env import ADAPTIVE_THREADS, env_flag
from .errors import BackendError

log = logging.getLogger(__name__)
_native_log = logging.getLogger("onellm.runtime.llama_cpp")

# ---------------------------------------------------------------- threads on a shared CPU
# llama-cpp-python's CPU backend (libggml-cpu) is built with OpenMP (libgomp): every graph
# runs in an `omp parallel` region and ggml's barrier between ops is `omp barrier`, where
# libgomp spins ~300000 `pause`s (about 3 ms) before it sleeps. When another process holds
# one of the cores, the thread that reaches a barrier first spins for a partner that is
# waiting for a core, at hundreds of barriers per token: measured on 2 cores beside one
# `yes`, 30 % of our CPU samples were libgomp's spin loop, prefill ran 100x slower and
# decode fell to a few tokens/s (benchmarks/busy_cpu.py, benchmarks/RESULTS-busy-cpu.md).
# Spinning less does not cure it (GOMP_SPINCOUNT 10000 and 30000 collapse too) and never
# spinning (OMP_WAIT_POLICY=PASSIVE) costs 2x (a 58 MiB q8_0 decoder) to 13x (the demo's)
# decode speed on an idle machine, where every barrier becomes a futex sleep and wake-up.
# What works: never run more llama.cpp threads than there are free cores. `ThreadGovernor`
# looks at how many other threads are runnable (/proc/stat procs_running minus our own
# running threads) at most every 100 ms and sets the context's thread count before each
# llama_decode (llama_set_n_threads is a field write); with one thread there is no barrier
# at all. The spin policy stays libgomp's, so an idle machine runs exactly as before.
WAIT_POLICY_ENV = "ONELLM_WAIT_POLICY"
WAIT_POLICIES = ("native", "passive")  # native: libgomp's default spin-then-sleep
ADAPTIVE_ENV = ADAPTIVE_THREADS  # 0: a fixed thread count even on a busy CPU (the old behaviour)
_OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _libgomp_loaded() -> bool:
    """Whether the shared libgomp.so.1 is already mapped into this process (its policy is then fixed).

    torch ships its own renamed copy (libgomp-<hash>.so.1), a separate instance that does
    not matter here.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any(line.rstrip().endswith("/libgomp.so.1") or "/libgomp.so.1." in line for line in f)
    except OSError:  # pragma: no cover - non-Linux
        return False


def apply_wait_policy(environ=None) -> str:
    """Put the OpenMP wait policy chosen by ONELLM_WAIT_POLICY into `environ` (default os.environ).

    libgomp reads OMP_WAIT_POLICY once, when it is loaded, so this runs at this module's
    import, before llama_cpp. Returns what was done: "native" (nothing: libgomp's default),
    "passive" (OMP_WAIT_POLICY=PASSIVE: threads sleep at once when they wait; for machines
    that are always busy, at a cost on idle ones) or "user" (the user set OMP_WAIT_POLICY
    or GOMP_SPINCOUNT: theirs wins). An unknown value is logged and treated as native,
    since raising here would break `import onellm.runtime`.
    """
    env = os.environ if environ is None else environ
    policy = env.get(WAIT_POLICY_ENV, "").strip().lower() or "native"
    if policy not in WAIT_POLICIES:
        log.warning("%s=%r is not one of %s; using native", WAIT_POLICY_ENV, env[WAIT_POLICY_ENV],
                    ", ".join(WAIT_POLICIES))
        policy = "native"
    if any(env.get(v) for v in _OMP_VARS):
        return "user"
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return policy


_gomp_preloaded = _libgomp_loaded()
wait_policy = apply_wait_policy()  # what this process's llama.cpp threads do when they wait
if _gomp_preloaded and wait_policy == "passive":  # pragma: no cover - llama_cpp imported before onellm
    log.warning("libgomp was loaded before onellm could set OMP_WAIT_POLICY=PASSIVE (%s=passive); "
                "set OMP_WAIT_POLICY=PASSIVE before starting Python instead", WAIT_POLICY_ENV)


def _proc_stat_running(path: str = "/proc/stat") -> int | None:
    """procs_running from /proc/stat: threads runnable right now, machine-wide (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b"procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _own_running_threads(task_dir: str = "/proc/self/task") -> int:
    """How many of this process's threads are running or runnable (state R) right now."""
    n = 0
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return 1
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        if stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3] == b"R":
            n += 1
    return max(1, n)  # the caller itself is running


def other_running_threads() -> int | None:
    """Threads of other processes that are runnable now (None where /proc does not say).

    procs_running is read before and after counting our own threads and the smaller
    value taken, so a kernel worker that runs for a few microseconds is not counted.
    """
    first = _proc_stat_running()
    if first is None:
        return None
    own = _own_running_threads()
    second = _proc_stat_running()
    return max(0, min(first, second if second is not None else first) - own)


def adaptive_threads_enabled(environ=None) -> bool:
    """ONELLM_ADAPTIVE_THREADS: on unless set to 0/false/no/off."""
    return env_flag(ADAPTIVE_ENV, environ) is not False


def _cpu_busy_seconds(path: str = "/proc/stat") -> float | None:
    """CPU time spent busy on all cores since boot, seconds (the `cpu` line of /proc/stat:
    user, nice, system, irq, softirq, steal; None if unreadable)."""
    try:
        with open(path, "rb") as f:
            fields = f.readline().split()
        if fields[0] != b"cpu":
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherCpuLoad:
    """How many cores other processes kept busy since the previous call (None: unknown).

    The machine's busy CPU time (/proc/stat) minus this process's own (os.times) over the
    window since the last call, divided by its length, rounded to whole cores: a process
    that spins all the time counts as one core, while one that runs for an instant (a
    shell command, a kernel worker) is lost in the rounding. The first window starts when
    the object is made (a context is made at load, before the first decode).
    """

    def __init__(self, busy=_cpu_busy_seconds, own=None, clock=time.monotonic, min_window: float = 0.02) -> None:
        self._busy, self._clock, self.min_window = busy, clock, min_window
        self._own = own or (lambda: sum(os.times()[:2]))
        self._last = self._sample()

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._busy(), self._own()

    def __call__(self) -> int | None:
        now = self._sample()
        t0, busy0, own0 = self._last
        if now[1] is None or busy0 is None:
            self._last = now
            return None
        if now[0] - t0 < self.min_window:  # too short to tell a spinning process from noise
            return other_running_threads()
        self._last = now
        others = (now[1] - busy0 - (now[2] - own0)) / (now[0] - t0)
        return max(0, int(others + 0.5))


class ThreadGovernor:
    """How many threads llama.cpp may use for the next decode: at most the free cores.

    `n_max`: the thread count on an idle machine. `cores`: cores this process may run on.
    `others`: returns how many cores other processes keep busy (None: unknown, then n_max);
    default an `OtherCpuLoad` made with the governor. It is called at most once per
    `interval` seconds; in between the last answer stands. With k busy cores elsewhere
    the answer is max(1, min(n_max, cores - k)).
    """

    def __init__(self, n_max: int, *, cores: int | None = None, interval: float = 0.1,
                 others=None, clock=None) -> None:
        self.n_max = max(1, int(n_max))
        self.cores = cores if cores is not None else _affinity_cores()
        self.interval = interval
        self._others = others if others is not None else OtherCpuLoad()
        self._clock = clock or time.monotonic
        self._checked = float("-inf")
        self.n = self.n_max

    def threads(self) -> int:
        now = self._clock()
        if now - self._checked >= self.interval:
            self._checked = now
            k = self._others()
            self.n = self.n_max if k is None else max(1, min(self.n_max, self.cores - k))
        return self.n


try:  # llama-cpp-python is a core dependency, but keep the import error readable
    import llama_cpp as _C
except ImportError as _exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = _exc
else:
    _IMPORT_ERROR = None

# ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR) -> logging level; llama.cpp's INFO is
# chatty (every tensor at load), so it goes to DEBUG
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_CONT = 5  # GGML_LOG_LEVEL_CONT: continues the previous line

_init_lock = threading.Lock()
_initialised = False
_log_state = {"level": logging.DEBUG, "buf": ""}
_log_capture: list[list[str]] = []  # stacks of active `capture_native_log()` lists


def lib():
    """The llama_cpp ctypes module, or a BackendError saying it is missing."""
    if _C is None:
        raise BackendError(f"llama-cpp-python is not importable ({_IMPORT_ERROR}); install llama-cpp-python>=0.3.2")
    return _C


def _on_native_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    try:
        msg = text.decode("utf-8", errors="replace") if text else ""
        if level != _CONT:
            _log_state["level"] = _LEVELS.get(level, logging.DEBUG)
        buf = _log_state["buf"] + msg
        *lines, rest = buf.split("\n")
        _log_state["buf"] = rest
        for line in lines:
            for sink in _log_capture:
                sink.append(line)
            if line.strip():
                _native_log.log(_log_state["level"], "%s", line)
    except Exception:  # never let an exception cross back into C
        pass


_log_callback = None  # keeps the ctypes trampoline alive for the process lifetime


def ensure_backend() -> None:
    """Initialise llama.cpp once per process and route its log to Python logging."""
    global _initialised, _log_callback
    if _initialised:
        return
    C = lib()
    with _init_lock:
        if _initialised:
            return
        _log_callback = C.llama_log_callback(_on_native_log)
        C.llama_log_set(_log_callback, ctypes.c_void_p(0))
        C.llama_backend_init()
        _initialised = True


@contextlib.contextmanager
def capture_native_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (all levels) emitted inside the block."""
    ensure_backend()
    lines: list[str] = []
    _log_capture.append(lines)
    try:
        yield lines
    finally:
        _log_capture.remove(lines)


def _cpu_extra_bufts() -> dict[str, int]:
    """Name -> `ggml_backend_buffer_type_t` of the extra weight buffer types of llama.cpp's CPU device."""
    ensure_backend()
    from llama_cpp._ggml import libggml as g

    vp = ctypes.c_void_p
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_get.argtypes, g.ggml_backend_dev_get.restype = [ctypes.c_size_t], vp
    g.ggml_backend_dev_type.argtypes, g.ggml_backend_dev_type.restype = [vp], ctypes.c_int
    g.ggml_backend_dev_backend_reg.argtypes, g.ggml_backend_dev_backend_reg.restype = [vp], vp
    g.ggml_backend_reg_get_proc_address.argtypes, g.ggml_backend_reg_get_proc_address.restype = [vp, ctypes.c_char_p], vp
    g.ggml_backend_buft_name.argtypes, g.ggml_backend_buft_name.restype = [vp], ctypes.c_char_p
    found: dict[str, int] = {}
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(dev) != 0:  # GGML_BACKEND_DEVICE_TYPE_CPU
            continue
        fn = g.ggml_backend_reg_get_proc_address(g.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
        if not fn:
            continue
        arr = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(fn)(dev)
        j = 0
        while arr and arr[j]:
            found[g.ggml_backend_buft_name(arr[j]).decode()] = int(arr[j])
            j += 1
    return found


def cpu_extra_buffer_types() -> list[str]:
    """Names of the extra weight buffer types llama.cpp's CPU device offers (e.g. AMX, CPU_REPACK).

    These are what llama.cpp's own `use_extra_bufts` lets its loader pick, in this order.
    """
    return list(_cpu_extra_bufts())


# Extra buffer types we never let llama.cpp use: with AMX, quantized models segfault on their
# first decode (this llama.cpp build, seen on two AMX Intel machines; tests/test_llama_bufts.py).
CRASHING_EXTRA_BUFTS = ("AMX",)
REPACK_BUFT = "CPU_REPACK"
# ggml_type ids that CPU_REPACK repacks on x86 (llama.cpp's ggml-cpu repack): Q4_0, Q4_K, IQ4_NL,
# each for matrices with a multiple of 8 rows
_REPACK_TYPES = {2: "q4_0", 12: "q4_K", 20: "iq4_nl"}


class _TensorPrefix(ctypes.Structure):
    """The leading fields of ggml's `struct ggml_tensor` (type, buffer, ne[4])."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4)]


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class _BuftOverride(ctypes.Structure):
    """llama.cpp's `llama_model_tensor_buft_override` (a regex over tensor names -> buffer type)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


_GGML_BASE = None


def _ggml_base() -> ctypes.CDLL:
    """llama-cpp-python's libggml-base (ggml's GGUF reader and row converters), signatures set once."""
    global _GGML_BASE
    if _GGML_BASE is None:
        import llama_cpp
        import llama_cpp._ctypes_extensions as ext

        base = ext.load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        for name, args, res in (
            ("gguf_init_from_file", [ctypes.c_char_p, _GgufInitParams], vp),
            ("gguf_get_n_tensors", [vp], i64),
            ("gguf_get_tensor_name", [vp, i64], ctypes.c_char_p),
            ("gguf_find_tensor", [vp, ctypes.c_char_p], i64),
            ("gguf_get_data_offset", [vp], ctypes.c_size_t),
            ("gguf_get_tensor_offset", [vp, i64], ctypes.c_size_t),
            ("ggml_get_tensor", [vp, ctypes.c_char_p], vp),
            ("ggml_type_name", [ctypes.c_int], ctypes.c_char_p),
            ("ggml_row_size", [ctypes.c_int, i64], ctypes.c_size_t),
            ("gguf_free", [vp], None),
            ("ggml_free", [vp], None),
        ):
            fn = getattr(base, name)
            fn.argtypes, fn.restype = args, res
        _GGML_BASE = base
    return _GGML_BASE


class _GgufHeader:
    """A GGUF file's header read by ggml (no tensor data): `with _GgufHeader(path) as h:`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.base = _ggml_base()
        self.meta = ctypes.c_void_p()
        self.gctx = self.base.gguf_init_from_file(str(path).encode("utf-8"), _GgufInitParams(True, ctypes.pointer(self.meta)))
        if not self.gctx:
            raise BackendError(f"{path}: not a readable GGUF file (gguf_init_from_file failed)")

    def __enter__(self) -> _GgufHeader:
        return self

    def __exit__(self, *exc) -> None:
        self.base.gguf_free(self.gctx)
        if self.meta:
            self.base.ggml_free(self.meta)

    def tensor(self, name: str) -> tuple[int, tuple[int, ...]] | None:
        """(ggml type id, ne) of tensor `name`, or None if the file has none of that name."""
        t = self.base.ggml_get_tensor(self.meta, name.encode())
        if not t:
            return None
        head = _TensorPrefix.from_address(t)
        return int(head.type), tuple(int(x) for x in head.ne)


def gguf_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Tensor name -> (ggml type id, ne) of a GGUF file, from its header (ggml's own gguf reader)."""
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    with _GgufHeader(path) as h:
        for i in range(h.base.gguf_get_n_tensors(h.gctx)):
            name = h.base.gguf_get_tensor_name(h.gctx, i).decode()
            found = h.tensor(name)
            if found is not None:
                out[name] = found
    return out


class EmbeddingRows:
    """Rows of a GGUF's `token_embd.weight` as float32, read from the file on demand.

    Each row is converted by ggml's own converter for the tensor's type
    (`dequantize_row_q4_K` and the like), the function llama.cpp's row lookup runs, so a row
    fed as an embedding equals the token's. `EmbeddingRows.open(path)` is None where the file
    has no such tensor or ggml exports no converter for its type (callers then feed tokens).
    The header is parsed once; each call reads only the rows asked for (os.pread, thread-safe).
    """

    def __init__(self, path: Path, start: int, row_bytes: int, n_embd: int, n_vocab: int, convert) -> None:
        self.path, self.start, self.row_bytes = path, start, row_bytes
        self.n_embd, self.n_vocab, self._convert = n_embd, n_vocab, convert

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingRows | None:
        with _GgufHeader(path) as h:
            found = h.tensor("token_embd.weight")
            if found is None:
                return None
            ggml_type, ne = found
            tid = h.base.gguf_find_tensor(h.gctx, b"token_embd.weight")
            start = h.base.gguf_get_data_offset(h.gctx) + h.base.gguf_get_tensor_offset(h.gctx, tid)
            row_bytes = h.base.ggml_row_size(ggml_type, ne[0])
            type_name = h.base.ggml_type_name(ggml_type).decode()
        convert = None
        if type_name != "f32":
            fn = {"f16": "ggml_fp16_to_fp32_row", "bf16": "ggml_bf16_to_fp32_row"}.get(type_name, f"dequantize_row_{type_name}")
            convert = getattr(_ggml_base(), fn, None)
            if convert is None:
                return None
            convert.argtypes, convert.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        return cls(Path(path), int(start), int(row_bytes), int(ne[0]), int(ne[1]), convert)

    def rows(self, ids: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Rows `ids` as float32 [len(ids), n_embd], written into `out` when given."""
        ids = [int(t) for t in ids]
        if any(not 0 <= t < self.n_vocab for t in ids):
            raise ValueError(f"token ids must lie in [0, {self.n_vocab})")
        if out is None:
            out = np.empty((len(ids), self.n_embd), dtype=np.float32)
        elif out.shape != (len(ids), self.n_embd) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array [{len(ids)}, {self.n_embd}]")
        if not ids:
            return out
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, t in enumerate(ids):
                raw = os.pread(fd, self.row_bytes, self.start + t * self.row_bytes)
                if len(raw) != self.row_bytes:
                    raise BackendError(f"{self.path}: token_embd.weight is cut short (row {t})")
                if self._convert is None:
                    out[i] = np.frombuffer(raw, dtype="<f4")
                else:
                    self._convert(raw, out[i].ctypes.data, self.n_embd)
        finally:
            os.close(fd)
        return out


def repackable_tensors(path: str | os.PathLike) -> list[str]:
    """The weight matrices of a GGUF that CPU_REPACK takes (type and row count), in file order.

    Only matrices that feed matrix multiplications (`blk.*` and `output.weight`) qualify:
    `token_embd.weight` is read by row lookups, which a repacked layout cannot serve.
    """
    names = []
    for name, (ggml_type, ne) in gguf_tensor_shapes(path).items():
        if not (name.startswith("blk.") or name == "output.weight") or not name.endswith(".weight"):
            continue
        if ggml_type in _REPACK_TYPES and ne[2] == ne[3] == 1 and ne[1] % 8 == 0:
            names.append(name)
    return names


def set_extra_bufts(params: Any, path: str | os.PathLike) -> tuple[bool, ctypes.Array | None]:
    """Let llama.cpp repack `path`'s weights at load through `params` (`llama_model_params`),
    never onto a crashing extra buffer type.

    Where the CPU offers one (AMX), llama.cpp's own switch stays off and each tensor
    CPU_REPACK takes is sent to it by a buffer-type override: the same repacking, without
    AMX. Returns whether anything may be repacked, and the override list (None when not
    used), which the caller keeps alive as long as the model.
    """
    bufts = _cpu_extra_bufts()
    params.use_extra_bufts = False
    if not any(b in bufts for b in CRASHING_EXTRA_BUFTS):
        params.use_extra_bufts = True
        return True, None
    overrides = _repack_overrides(Path(path), bufts)
    if overrides is None:
        return False, None
    params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
    return True, overrides


def _repack_overrides(path: Path, bufts: dict[str, int]) -> ctypes.Array | None:
    """A NULL-terminated override list sending each repackable tensor to CPU_REPACK, or None."""
    names = repackable_tensors(path) if REPACK_BUFT in bufts else []
    if not names or len(names) >= int(lib().llama_max_tensor_buft_overrides()):
        return None
    arr = (_BuftOverride * (len(names) + 1))()
    for i, name in enumerate(names):
        arr[i].pattern = ("^" + name.replace(".", "\\.") + "$").encode()
        arr[i].buft = bufts[REPACK_BUFT]
    return arr


def _affinity_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads for generation on an idle machine: every core we may run on, halved above 4 (SMT siblings).

    With no --threads given, `ThreadGovernor` lowers this while other processes keep cores busy.
    """
    n = _affinity_cores()
    return max(1, n if n <= 4 else n // 2)


class _Owner:
    """close() once, from close(), `with`, or the finaliser."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class LlamaModel(_Owner):
    """A loaded GGUF model (`llama_model*`) and its vocabulary."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_gpu_layers: int | None = None,
        use_extra_bufts: bool = False,
        vocab_only: bool = False,
    ) -> None:
        ensure_backend()
        C = lib()
        self.ptr = None
        self.path = Path(path)
        params = C.llama_model_default_params()
        if n_gpu_layers is None:
            n_gpu_layers = -1 if C.llama_supports_gpu_offload() else 0
        params.n_gpu_layers = n_gpu_layers
        # Extra buffer types: weight repacking at load, never onto AMX (see set_extra_bufts)
        params.use_extra_bufts = False
        read_file, self._overrides = set_extra_bufts(params, self.path) if use_extra_bufts else (False, None)
        # tensors sent to CPU_REPACK by override (None: llama.cpp chose, or no repacking)
        self.repacked = len(self._overrides) - 1 if self._overrides is not None else None
        # Repacked weights are copies made at load: a mapping of the file would keep its pages
        # resident beside them (twice the GGUF in RSS, measured at 7B q4_0: 3.6 GB file + 4.0 GB
        # anonymous). Read the file instead when repacking; map it otherwise (shared, no copy).
        if read_file and hasattr(params, "load_mode"):
            params.load_mode = C.LLAMA_LOAD_MODE_NONE  # read the file into llama.cpp's buffers, no mapping
        params.vocab_only = bool(vocab_only)
        self.n_gpu_layers = n_gpu_layers
        self.use_extra_bufts = bool(use_extra_bufts)
        ptr = C.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not ptr:
            raise BackendError(f"{self.path}: llama.cpp could not load the model (llama_model_load_from_file returned NULL; see -vv log)")
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        if not self.vocab:
            self.close()
            raise BackendError(f"{self.path}: llama_model_get_vocab returned NULL")
        self.n_embd = int(C.llama_model_n_embd(ptr))
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(C.llama_model_n_ctx_train(ptr))
        self.bos = int(C.llama_vocab_bos(self.vocab))
        self.eos = int(C.llama_vocab_eos(self.vocab))
        self._pieces: list[bytes] | None = None
        self._eog: frozenset[int] | None = None
        self._rows: EmbeddingRows | None | bool = False  # False: not looked at yet

    def embedding_rows(self) -> EmbeddingRows | None:
        """The file's token-embedding rows (`EmbeddingRows`), or None where its type has no
        converter. A prompt with an input block goes to llama.cpp as one embedding batch, BOS
        and text rows around the block's: a `llama_batch` holds tokens or embeddings, and each
        extra graph is a pass over the weights (plus, with repacked 4-bit weights, one more
        per row left over from the kernels' groups of 4)."""
        if self._rows is False:
            try:
                self._rows = EmbeddingRows.open(self.path)
            except (OSError, BackendError) as exc:
                log.info("%s: token embedding rows unreadable (%s); prompts go as tokens", self.path, exc)
                self._rows = None
            if self._rows is not None and self._rows.n_embd != self.n_embd:
                self._rows = None
        return self._rows

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lib().llama_model_free(self.ptr)
            self.ptr = None
            self.vocab = None

    def _check_open(self) -> None:
        if not self.ptr:
            raise BackendError(f"{self.path}: model is closed")

    def meta(self, key: str) -> str | None:
        """A metadata value as text (llama_model_meta_val_str), None when absent."""
        self._check_open()
        buf = ctypes.create_string_buffer(1 << 16)
        n = lib().llama_model_meta_val_str(self.ptr, key.encode("utf-8"), buf, len(buf))
        if n < 0:
            return None
        return buf.value.decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, ...), from a table built once."""
        if self._eog is None:
            self._build_tables()
        return token in self._eog

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Text -> token ids with llama.cpp's tokenizer (special tokens not parsed)."""
        self._check_open()
        C = lib()
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        while True:
            out = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, raw, len(raw), out, cap, add_bos, False)
            if n >= 0:
                return list(out[:n])
            if -n <= cap:
                raise BackendError(f"llama_tokenize failed with code {n}")
            cap = -n

    def piece(self, token: int) -> bytes:
        """The bytes one token renders to (control tokens render to b'')."""
        if self._pieces is None:
            self._build_tables()
        return self._pieces[token]

    def _build_tables(self) -> None:
        """Every token's piece and the end-of-generation set (one pass, so decoding makes no calls)."""
        self._check_open()
        C = lib()
        self._eog = frozenset(t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self.vocab, t))
        self._pieces = self._all_pieces()

    def _all_pieces(self) -> list[bytes]:
        C = lib()
        buf = ctypes.create_string_buffer(256)
        pieces = []
        for tok in range(self.n_vocab):
            n = C.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.vocab, tok, big, len(big), 0, False)
                if n < 0:
                    raise BackendError(f"llama_token_to_piece({tok}) failed with code {n}")
                pieces.append(big.raw[:n])
            else:
                pieces.append(buf.raw[:n])
        return pieces


class LlamaBatch(_Owner):
    """The arrays of a `llama_batch` for up to `capacity` entries of sequence 0.

    Backed by numpy arrays we own (filled with vectorised writes, no per-token ctypes
    calls). `tokens(...)` and `embd_view(...)` return `llama_batch` structs that point
    into these arrays, and for embeddings into the caller's float32 buffer.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("batch capacity must be positive")
        C = lib()
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_store = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        i32p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq_store.ctypes.data
        self.seq_ptrs = (i32p * capacity)(*[ctypes.cast(base + 4 * i, i32p) for i in range(capacity)])
        self._p_token = self.token.ctypes.data_as(i32p)
        self._p_pos = self.pos.ctypes.data_as(i32p)
        self._p_nseq = self.n_seq_id.ctypes.data_as(i32p)
        self._p_seq = ctypes.cast(self.seq_ptrs, ctypes.POINTER(i32p))
        self._p_logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._struct_type = C.llama_batch
        self._closed = False

    def close(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self.token = self.pos = self.n_seq_id = self.seq_store = self.logits = None
            self.seq_ptrs = None

    def _fill(self, n: int, pos0: int, logits: str) -> None:
        if self._closed:
            raise BackendError("batch is closed")
        if not 0 < n <= self.capacity:
            raise ValueError(f"batch of {n} entries exceeds its capacity {self.capacity}")
        if n == 1:  # the decode loop's case: skip the numpy temporaries
            self.pos[0] = pos0
            self.logits[0] = 0 if logits == "none" else 1
            return
        self.pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self.logits[:n] = 1 if logits == "all" else 0
        if logits in ("all", "last"):
            self.logits[n - 1] = 1

    def tokens(self, ids: Sequence[int] | np.ndarray, pos0: int, logits: str = "last", seq_id: int = 0):
        """A token batch: ids at positions pos0.. of sequence seq_id, outputs 'all', 'last' or 'none'."""
        n = len(ids)
        self._fill(n, pos0, logits)
        self.token[:n] = ids
        self.seq_store[:n] = seq_id
        return self._struct_type(n, self._p_token, None, self._p_pos, self._p_nseq, self._p_seq, self._p_logits)

    def embd_view(self, rows: np.ndarray, pos0: int, logits: str = "last", seq_id: int = 0):
        """An embedding batch whose `embd` points at `rows` ([n, n_embd] float32, C-contiguous).

        The caller must keep `rows` alive until llama_decode returns.
        """
        if rows.dtype != np.float32 or rows.ndim != 2 or not rows.flags.c_contiguous:
            raise ValueError("embedding rows must be a C-contiguous float32 [n, n_embd] array")
        n = rows.shape[0]
        self._fill(n, pos0, logits)
        self.seq_store[:n] = seq_id
        p_embd = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        return self._struct_type(n, None, p_embd, self._p_pos, self._p_nseq, self._p_seq, self._p_logits)

    def mixed(self, ids: Sequence[int], pos: Sequence[int], seq_ids: Sequence[int], outputs: Sequence[bool]):
        """A token batch over several sequences: entry i is token ids[i] at pos[i] of sequence seq_ids[i].

        outputs[i] asks for the logits of entry i (read them with index i after decoding).
        This is what continuous batching feeds llama_decode: one entry per decoding
        sequence plus prefill chunks of others.
        """
        if self._closed:
            raise BackendError("batch is closed")
        n = len(ids)
        if not 0 < n <= self.capacity:
            raise ValueError(f"batch of {n} entries exceeds its capacity {self.capacity}")
        if not len(pos) == len(seq_ids) == len(outputs) == n:
            raise ValueError("ids, pos, seq_ids and outputs must have the same length")
        self.token[:n] = ids
        self.pos[:n] = pos
        self.seq_store[:n] = seq_ids
        self.logits[:n] = outputs
        return self._struct_type(n, self._p_token, None, self._p_pos, self._p_nseq, self._p_seq, self._p_logits)


_DECODE_CODES = {
    1: "no KV-cache slot for the batch (context full: increase n_ctx or shorten the prompt)",
    2: "aborted",
    -1: "invalid input batch",
}


_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type of the KV cache (llama.cpp's default: f16)


class LlamaContext(_Owner):
    """An inference context (`llama_context*`): KV cache, threads, logits."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        n_seq_max: int = 1,
        kv_unified: bool | None = None,
        n_ubatch: int | None = None,
    ) -> None:
        """`n_seq_max`: sequences (slots) sharing this context's KV cache of n_ctx cells.
        `n_ubatch`: positions per compute graph inside one llama_decode (default n_batch).
        `kv_unified`: one cache buffer for all sequences (copying a shared prefix with
        `seq_cp` is then free: cells carry several sequence ids); None keeps llama.cpp's default.
        """
        C = lib()
        self.ptr = None
        self.model = model  # keeps the model alive as long as the context
        model._check_open()
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch or n_batch, n_batch)
        params.n_seq_max = n_seq_max
        if kv_unified is not None:
            params.kv_unified = bool(kv_unified)
        self.n_threads = n_threads or default_threads()
        params.n_threads = self.n_threads
        params.n_threads_batch = n_threads_batch or self.n_threads
        # no explicit thread count: follow the free cores (see ThreadGovernor), unless turned off
        self.governor = (ThreadGovernor(self.n_threads) if not (n_threads or n_threads_batch)
                         and adaptive_threads_enabled() else None)
        self._threads_now = (params.n_threads, params.n_threads_batch)
        params.no_perf = True
        if flash_attn is not None:
            params.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        if kv_type not in _KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(_KV_TYPES)}, not {kv_type!r}")
        if kv_type == "q8_0" and flash_attn is False:  # llama.cpp quantizes the V cache only with it
            raise ValueError("a q8_0 KV cache needs flash attention (flash_attn True or None)")
        params.type_k = params.type_v = _KV_TYPES[kv_type]
        ptr = C.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise BackendError(f"{model.path}: llama_init_from_model returned NULL (n_ctx={n_ctx}, n_batch={n_batch})")
        self.ptr = ptr
        self.n_ctx = int(C.llama_n_ctx(ptr))
        self.n_batch = int(C.llama_n_batch(ptr))
        self.n_ubatch = int(C.llama_n_ubatch(ptr))
        self.n_vocab = model.n_vocab
        self.n_seq_max = int(C.llama_n_seq_max(ptr))
        self._mem = C.llama_get_memory(ptr)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lib().llama_free(self.ptr)
            self.ptr = None

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Threads for the next decodes (generation, and batches of more than one token)."""
        pair = (n_threads, n_threads_batch or n_threads)
        if pair != self._threads_now:
            lib().llama_set_n_threads(self.ptr, *pair)
            self._threads_now = pair

    def decode(self, batch) -> None:
        if not self.ptr:
            raise BackendError("llama context is closed")
        if self.governor is not None:
            self.set_threads(self.governor.threads())
        rc = lib().llama_decode(self.ptr, batch)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc}: {_DECODE_CODES.get(rc, 'fatal error')}")

    def logits_ith(self, i: int) -> np.ndarray:
        """A copy of the logits of output i of the last decode (negative: from the end)."""
        p = lib().llama_get_logits_ith(self.ptr, i)
        if not p:
            raise BackendError(f"llama_get_logits_ith({i}) returned NULL (that entry produced no output)")
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def logits_all(self, n_outputs: int) -> np.ndarray:
        """A copy of every output row of the last decode, [n_outputs, n_vocab]."""
        p = lib().llama_get_logits(self.ptr)
        if not p:
            raise BackendError("llama_get_logits returned NULL")
        return np.ctypeslib.as_array(p, shape=(n_outputs, self.n_vocab)).copy()

    def memory_truncate(self, n_keep: int) -> None:
        """Drop cached positions >= n_keep of sequence 0."""
        ok = lib().llama_memory_seq_rm(self._mem, 0, n_keep, -1)
        if not ok:
            raise BackendError(f"llama_memory_seq_rm(seq 0, from {n_keep}) failed")

    def memory_clear(self) -> None:
        lib().llama_memory_clear(self._mem, True)

    def memory_pos_max(self) -> int:
        """Largest cached position of sequence 0, -1 when empty."""
        return int(lib().llama_memory_seq_pos_max(self._mem, 0))

    # per-sequence memory ops (several sequences in one context; see LlamaBatch.mixed)
    def seq_rm(self, seq_id: int, p0: int = 0, p1: int = -1) -> None:
        """Drop positions [p0, p1) of one sequence (p1 -1: to the end)."""
        if not lib().llama_memory_seq_rm(self._mem, seq_id, p0, p1):
            raise BackendError(f"llama_memory_seq_rm(seq {seq_id}, [{p0}, {p1})) failed")

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: int = -1) -> None:
        """Make positions [p0, p1) of sequence src also belong to dst (shared cells in a unified cache)."""
        lib().llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_pos_max(self, seq_id: int) -> int:
        """Largest cached position of one sequence, -1 when empty."""
        return int(lib().llama_memory_seq_pos_max(self._mem, seq_id))


class LlamaSampler(_Owner):
    """A llama.cpp sampler chain: penalties -> top-k -> temperature -> top-p -> draw, or greedy."""

    def __init__(
        self,
        n_vocab: int,
        *,
        temperature: float,
        top_p: float,
        top_k: int,
        repeat_penalty: float,
        repeat_last_n: int,
        seed: int,
    ) -> None:
        C = lib()
        self.ptr = None
        params = C.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = C.llama_sampler_chain_init(params)
        if not chain:
            raise BackendError("llama_sampler_chain_init returned NULL")
        self.ptr = chain
        self.greedy = temperature <= 0.0
        if repeat_penalty != 1.0:
            self._add(C.llama_sampler_init_penalties(n_vocab, repeat_last_n, repeat_penalty, 0.0, 0.0), "penalties")
        if self.greedy:
            self._add(C.llama_sampler_init_greedy(), "greedy")
            return
        if top_k > 0:
            self._add(C.llama_sampler_init_top_k(top_k), "top_k")
        self._add(C.llama_sampler_init_temp(temperature), "temp")
        if top_p < 1.0:
            self._add(C.llama_sampler_init_top_p(top_p, 1), "top_p")
        self._add(C.llama_sampler_init_dist(seed & 0xFFFFFFFF), "dist")

    def _add(self, smpl, name: str) -> None:
        if not smpl:
            raise BackendError(f"llama_sampler_init_{name} returned NULL")
        lib().llama_sampler_chain_add(self.ptr, smpl)  # the chain owns it from here

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lib().llama_sampler_free(self.ptr)
            self.ptr = None

    def accept(self, token: int) -> None:
        lib().llama_sampler_accept(self.ptr, token)

    def sample(self, ctx: LlamaContext, idx: int = -1) -> int:
        """Draw a token from output idx of the last decode (also accepts it into the chain)."""
        return int(lib().llama_sampler_sample(self.ptr, ctx.ptr, idx))


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, quant: str, n_threads: int | None = None) -> None:
    """Rewrite an f16/f32 GGUF as `quant` (a registry name) with llama.cpp's own quantizer (llama_model_quantize)."""
    from .registry import decoder_quant

    spec = decoder_quant(quant)  # ConfigError names the known ones
    quantize_ftype(src, dst, spec.llama_ftype, n_threads, what=quant)


def quantize_ftype(src: str | os.PathLike, dst: str | os.PathLike, ftype: int, n_threads: int | None = None,
                   what: str = "") -> None:
    """`quantize_model` by llama.cpp's raw `llama_ftype` value (benchmarks try types the registry lacks)."""
    ensure_backend()
    C = lib()
    quant = what or f"ftype {ftype}"
    params = C.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or default_threads()
    rc = C.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"), ctypes.byref(params))
    if rc != 0:
        raise BackendError(f"{src}: llama_model_quantize to {quant} failed with code {rc}")
