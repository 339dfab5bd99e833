"""The request engine: one loaded bundle answering many requests at once (no HTTP here).

    engine = Engine.load("bundle/", parallel=4)
    handle = engine.submit(Request(messages=[("user", "What is the person doing?")],
                                   media=Media("imu", "walk.csv")))
    for chunk in handle:             # streamed text; handle.result when it ends
        print(chunk, end="")
    handle.cancel()                   # from any thread, at any time

`onellm serve` and `Pipeline` (ask, chat, encode) are its clients: a chat sends its own
rendered, trimmed prompt as `Request.prompt_ids`; `Engine.encode` runs only the reader and
encoder.

Shape (llama.cpp's server and vLLM's engine are the models; this is our own):

- Every request gets its own llama.cpp sequence ("slot") in ONE context whose unified
  KV cache holds `parallel x n_ctx_slot` cells. One scheduler thread owns the context.
- Continuous batching: each step puts the next token of every decoding slot AND chunks
  of new prompts (prefill, at most `prefill_chunk` tokens per step in all) into ONE
  `llama_decode` batch, so a new request's prefill is interleaved with running decodes
  instead of stalling them. The encoder's rows cannot share a token batch (a
  `llama_batch` carries ids or embeddings, not both), so a new conversation with an input
  goes as one embeddings call: BOS's row, the 32 rows and the text's rows (read from the
  GGUF, `LlamaModel.embedding_rows`; at most `prefill_chunk` text tokens, the rest as
  tokens), which at 7B prefilled 3-10 % faster than BOS, rows and text as three graphs.
  A follow-up that reuses BOS but not the rows sends the rows alone.
- The encoder runs in its own worker thread (reader + onnxruntime), so a slow file
  never blocks the decode loop. It takes every queued input (up to `encode_batch`) and
  encodes each modality's new ones in one batched run (`Encoder.encode_many`).
  Finished blocks are kept by content hash (LRU).
- Prefix reuse: a slot keeps its cached positions after a request ends. A request
  whose positions (BOS, block rows by digest, prompt tokens) start like a cached slot
  reuses that prefix: a follow-up turn reuses the whole conversation; a new question
  about the same media (or any request, for the system prompt) copies the shared
  prefix from whichever slot holds it with `seq_cp` (free in a unified cache: cells
  carry several sequence ids). Idle slots are reused least-recently-used first.
  The price of one unified buffer: each sequence's attention spans every occupied
  cell (masked), so the kept caches of idle slots cost decode time on small models;
  `kv_unified=False` gives each sequence its own buffer (a prefix copy is then a
  whole-buffer copy, trimmed after).
- Backpressure and limits: a bounded queue (`QueueFull` when full), `max_tokens`
  capped, input file size / duration caps, Pillow's decompression-bomb guard.
- Cancellation (`Handle.cancel()` or the request's event) ends the request in the
  next scheduler step (or before it starts) and frees its slot.
- Sampling per slot: a llama.cpp sampler chain per request (greedy is argmax, so a
  request's answer does not depend on what else is running, up to the floating-point
  differences of batched kernels).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _llama
from .bundle import Bundle, load_manifest
from .registry import decoder_quant, resolve_device
from .decoder import Sampling, _TextStream, _top_logprobs, check_gguf_file, prompt_rows
from .errors import BackendError, BundleError, ConfigError, InputError, OneLLMError
from .prompt import ROLES, Conversation

log = logging.getLogger(__name__)

FINISH_REASONS = {  # our stop reasons -> OpenAI's finish_reason
    "eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_full": "length",
    "cancelled": "cancelled",
}


class QueueFull(OneLLMError):
    """The engine's queue is full: try again later (HTTP 429 with Retry-After)."""


class EngineClosed(OneLLMError):
    """The engine is shutting down or closed (HTTP 503)."""


def default_parallel() -> int:
    """Concurrent slots by default: the cores we may use, between 2 and 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        n = os.cpu_count() or 2
    return max(2, min(8, n))


@dataclasses.dataclass
class Limits:
    """What one request may ask of the engine."""

    max_queue: int = 64  # requests waiting (encoding or for a slot) before QueueFull
    max_tokens: int = 1024  # cap on a request's max_new_tokens
    max_media_bytes: int = 64 << 20  # largest input file accepted
    max_media_seconds: float = 3600.0  # longest audio/video accepted (by container duration)
    max_image_pixels: int = 64_000_000  # Pillow refuses larger images (decompression-bomb guard)


@dataclasses.dataclass
class Media:
    """One non-text input: a file path (or array) for a modality's reader."""

    modality: str
    source: Any  # path or array, as the reader takes it
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # reader options (rate, start, ...)
    image: Any = None  # the RGB photo of a depth/normal map
    cleanup: Callable[[], None] | None = None  # called once the input was read (temp files)


@dataclasses.dataclass
class Request:
    """One chat completion: the conversation, at most one media input, sampling, a cancel token."""

    messages: Sequence[tuple[str, str]]  # (role "user"|"assistant", text); alternate, last one "user"
    media: Media | None = None
    prompt_ids: Sequence[int] | None = None  # or the rendered prompt's token ids, BOS first (messages unused)
    block: np.ndarray | None = None  # or a precomputed [32, n_embd] block (from `onellm encode`)
    modality: str | None = None  # what `block` encodes
    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    stop: tuple[str, ...] = ()  # stop strings besides the template's
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)  # anything with is_set()/set()
    logprobs: int = 0  # per sampled token, also its this-many most likely (id, log-probability)
    flush_s: float = 0.0  # deliver text at most this often (0: every chunk); the first and last go at once


@dataclasses.dataclass
class Result:
    """How a request ended."""

    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    stop_reason: str = ""  # eos | stop_string | max_new_tokens | context_full | cancelled
    prompt_tokens: int = 0  # positions of the prompt, the inserted rows included
    cached_tokens: int = 0  # of them, reused from the KV cache
    modality: str | None = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # the reader's metadata
    queue_s: float = 0.0  # submit -> slot
    ttft_s: float = 0.0  # submit -> first token
    decode_s: float = 0.0  # first token -> end
    slot: int = -1
    preprocess_s: float = 0.0  # the reader (0 for a block-cache hit or a precomputed block)
    encode_s: float = 0.0  # the encoder graphs (0 likewise)
    prefill_s: float = 0.0  # slot -> first token (the prompt's uncached positions and the first draw)
    logprobs: list[list[tuple[int, float]]] | None = None  # with Request.logprobs
    block: np.ndarray | None = None  # Engine.encode's answer: the [32, n_embd] block (read-only)

    @property
    def finish_reason(self) -> str:
        return FINISH_REASONS.get(self.stop_reason, "stop")

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Handle:
    """A submitted request: iterate for text chunks; `result` when done; `cancel()` any time.

    With `on_event`, events go to that callback (from the engine's threads) instead of
    the iterator: ("text", str), ("done", Result) or ("error", OneLLMError).
    """

    def __init__(self, engine: Engine, request: Request, on_event: Callable[[str, Any], None] | None) -> None:
        self._engine = engine
        self.request = request
        self.result: Result | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._on_event = on_event
        self._q: queue.SimpleQueue | None = None if on_event else queue.SimpleQueue()

    def _emit(self, kind: str, value: Any) -> None:
        if kind == "done":
            self.result = value
        elif kind == "error":
            self.error = value
        if self._on_event is not None:
            try:
                self._on_event(kind, value)
            except Exception:  # a listener's failure must not stop the engine
                log.exception("request event listener failed")
        else:
            self._q.put((kind, value))
        if kind in ("done", "error"):
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.request.cancel.set()
        self._engine._wake()

    def wait(self, timeout: float | None = None) -> Result:
        """Block until the request ends; its Result (or its error raised)."""
        if not self._done.wait(timeout):
            raise TimeoutError("request still running")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def __iter__(self) -> Iterator[str]:
        if self._q is None:
            raise RuntimeError("this handle delivers its events to on_event")
        while True:
            kind, value = self._q.get()
            if kind == "text":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def text(self) -> str:
        """Run to the end and return the answer."""
        for _ in self:
            pass
        return self.wait().text


@dataclasses.dataclass
class _Job:
    handle: Handle
    ids: list[int]  # prompt token ids, BOS first
    t_submit: float
    block: np.ndarray | None = None
    digest: str | None = None
    modality: str | None = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    encode_only: bool = False  # Engine.encode: answered with the block, never given a slot
    read_s: float = 0.0  # the reader's seconds (encoder worker)
    encode_s: float = 0.0  # the encoder's seconds

    @property
    def request(self) -> Request:
        return self.handle.request


class _Slot:
    """One llama.cpp sequence: what its cache holds and the request it serves."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.items: list = []  # per cached position: a token id or (block digest, row)
        self.job: _Job | None = None
        self.segments: list[tuple[str, Any]] = []  # prefill still to do: ("tok", ids) / ("blk", rows) / ("rows", BOS + block + text rows)
        self.next_tok: int | None = None  # sampled, to be decoded next step
        self.sampler: _llama.LlamaSampler | None = None
        self.stream: _TextStream | None = None
        self.result: Result | None = None
        self.t_first = 0.0
        self.t_start = 0.0  # when the slot took its request
        self.pending: list[str] = []  # text not yet delivered (Request.flush_s)
        self.t_emit = 0.0  # when text was last delivered
        self.last_used = 0.0

    @property
    def busy(self) -> bool:
        return self.job is not None


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _own_labels(job: _Job) -> dict[str, Any]:
    """The reader's metadata named after this request's own input: a block-cache hit carries the
    metadata of the first input with the same content, which may have had another path."""
    from .modalities._io import source_label

    media, inputs = job.request.media, dict(job.inputs)
    if media is not None:
        for key, src in (("source", media.source), ("image", media.image)):
            if key in inputs and isinstance(src, (str, os.PathLike)):
                inputs[key] = source_label(src)
    return inputs


def block_digest(block: np.ndarray) -> str:
    """The digest a block's rows are cached under (same as decoder.Session's)."""
    return hashlib.blake2b(block.tobytes(), digest_size=16).hexdigest()


class Engine:
    """A loaded bundle serving concurrent requests; see the module docstring.

    Thread-safe: `submit`, `Handle.cancel`, `stats` and `close` may be called from any thread.
    """

    def __init__(self, bundle: Bundle, encoder, model: _llama.LlamaModel, tokenizer, *,
                 parallel: int, n_ctx_slot: int, threads: int | None = None, n_batch: int = 512,
                 prefill_chunk: int = 256, block_cache: int = 16, encode_batch: int = 4, limits: Limits | None = None,
                 kv_unified: bool = True, context: dict[str, Any] | None = None) -> None:
        context = context or {}  # llama.cpp context settings of the GGUF type (kv_type, flash_attn)
        self.context = dict(context)
        manifest = bundle.manifest
        self.manifest = manifest
        self.encoder = encoder
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits or Limits()
        self.parallel = parallel
        self.n_ctx_slot = n_ctx_slot
        self.prefill_chunk = max(1, prefill_chunk)
        self.kv_unified = kv_unified
        self.random_weights = manifest.random_weights
        self.bundle_dir = bundle.dir
        self.n_inserted = manifest.n_inserted
        self.n_embd = manifest.n_embd
        self.stop_strings = tuple(manifest.prompt.stop)
        n_ctx = parallel * n_ctx_slot
        # llama.cpp warns "n_ctx_seq > n_ctx_train" for a unified cache (any sequence could use all
        # n_ctx cells); we hold each slot to n_ctx_slot <= n_ctx_train, so the warning does not apply
        native = logging.getLogger("onellm.runtime.llama_cpp")
        level = native.level
        native.setLevel(logging.ERROR)
        try:
            self.ctx = _llama.LlamaContext(model, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads,
                                           n_seq_max=parallel, kv_unified=kv_unified, **context)
        finally:
            native.setLevel(level)
        self.batch = _llama.LlamaBatch(self.ctx.n_batch)
        self.slots = [_Slot(i) for i in range(parallel)]
        self._blocks: collections.OrderedDict[str, tuple[np.ndarray, str, dict]] = collections.OrderedDict()
        self._block_cache = block_cache
        self.encode_batch = max(1, encode_batch)  # most queued inputs one encoder run takes
        self._cond = threading.Condition()
        self._encode_q: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: collections.deque[_Job] = collections.deque()
        self._waiting = 0  # jobs submitted and not yet in a slot
        self._clears: list[threading.Event] = []  # clear_cache() calls waiting for the scheduler
        self._closed = False
        self.counters = collections.Counter()  # steps, decode_calls, tokens_generated, tokens_reused, ...
        self._install_image_guard()
        self._sched = threading.Thread(target=self._run_scheduler, name="onellm-engine", daemon=True)
        self._enc = threading.Thread(target=self._run_encoder, name="onellm-encoder", daemon=True)
        self._sched.start()
        self._enc.start()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike | Bundle, *, parallel: int | None = None, n_ctx_slot: int | None = None,
             threads: int | None = None, device: str = "cpu", quant: str | None = None, verify: bool = True,
             limits: Limits | None = None, prefill_chunk: int = 256, kv_unified: bool = True,
             precision: str | None = None, provider_options: dict[str, Any] | None = None,
             context: dict[str, Any] | None = None, tokenizer=None) -> Engine:
        """Load a bundle for `parallel` concurrent requests of up to `n_ctx_slot` positions each
        (default: the model's context length).

        `path` may be a loaded `Bundle` (its manifest is not read again). `precision`: the encoder
        precision (default: the device's pick); `provider_options`: onnxruntime provider options
        (TensorRT's engine cache); `context`: llama.cpp context settings (kv_type, flash_attn) that
        replace the GGUF type's; `tokenizer`: one already loaded for this bundle.
        """
        from .encoder import Encoder
        from .tokenizer import Tokenizer

        bundle = path if isinstance(path, Bundle) else load_manifest(Path(path), verify=verify)
        manifest = bundle.manifest
        enc_all = manifest.encoder.precisions
        provider, _device_id = resolve_device(device)  # the same choice as Pipeline.load
        precision = precision or provider.pick_precision(enc_all, manifest.encoder.default)
        if precision not in enc_all:
            raise ConfigError(f"{bundle.dir}: encoder precision {precision!r} was not exported (bundle has {', '.join(enc_all)})")
        quants = manifest.decoder.quants
        quant = quant or manifest.decoder.default
        if quant not in quants:
            raise ConfigError(f"{bundle.dir}: decoder quantization {quant!r} was not exported (bundle has {', '.join(quants)})")
        parallel = parallel or default_parallel()
        if parallel < 1:
            raise ConfigError(f"--parallel: expected a positive number of slots, found {parallel}")
        tokenizer = tokenizer or Tokenizer(bundle.path(manifest.tokenizer.file))
        gguf = check_gguf_file(bundle.path(quants[quant].file))
        encoder = Encoder(enc_all[precision], bundle.dir, device=device, threads=threads, verify=False,
                          provider_options=provider_options)
        extra = decoder_quant(quant).use_extra_bufts()
        try:
            model = _llama.LlamaModel(gguf, use_extra_bufts=extra)
        except BaseException:
            encoder.close()
            raise
        try:
            arch = model.meta("general.architecture")
            if arch != "llama":
                raise BundleError(f"{gguf}: expected a GGUF of architecture 'llama', found {arch!r}")
            n_train = model.n_ctx_train
            n_ctx_slot = n_ctx_slot or n_train
            if n_ctx_slot > n_train:
                raise ConfigError(f"{gguf}: per-slot context {n_ctx_slot} exceeds the model's context length {n_train}")
            model._build_tables()
            engine = cls(bundle, encoder, model, tokenizer, parallel=parallel, n_ctx_slot=n_ctx_slot,
                         threads=threads, limits=limits, prefill_chunk=prefill_chunk, kv_unified=kv_unified,
                         context={**decoder_quant(quant).context_settings(), **(context or {})})
        except BaseException:
            model.close()
            encoder.close()
            raise
        engine.precision, engine.quant, engine.gguf_path = precision, quant, gguf
        log.info("engine: %s, %d slots x %d positions, encoder %s, decoder %s", bundle.dir, parallel, n_ctx_slot,
                 precision, quant)
        return engine

    def _install_image_guard(self) -> None:
        from PIL import Image

        # Pillow raises DecompressionBombError above twice this (the readers turn it into InputError)
        Image.MAX_IMAGE_PIXELS = max(1, self.limits.max_image_pixels // 2)

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    # ------------------------------------------------------------------ public API
    def submit(self, request: Request, on_event: Callable[[str, Any], None] | None = None) -> Handle:
        """Queue a request; returns its Handle. Bad requests raise InputError here, a full queue QueueFull."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        ids = self._prompt_ids(request.messages) if request.prompt_ids is None else self._check_ids(request.prompt_ids)
        s = request.sampling
        if s.max_new_tokens < 1:
            raise InputError("max_tokens", "a positive number of tokens", str(s.max_new_tokens))
        if s.max_new_tokens > self.limits.max_tokens:
            request.sampling = dataclasses.replace(s, max_new_tokens=self.limits.max_tokens)
        handle = Handle(self, request, on_event)
        job = _Job(handle, ids, time.perf_counter())
        if request.block is not None:
            job.block = self._check_block(request.block)
            job.digest = block_digest(job.block)
            job.modality = request.modality
            job.inputs = {"source": "embeddings"}
        elif request.media is not None:
            m = request.media.modality
            if m not in self.manifest.modalities:
                raise InputError("input", f"one of this bundle's modalities ({', '.join(self.modalities)})", repr(m))
        n_rows = self.n_inserted if (request.block is not None or request.media is not None) else 0
        if len(ids) + n_rows >= self.n_ctx_slot:
            raise InputError("messages", f"a prompt of fewer than {self.n_ctx_slot} positions (per-slot context)",
                             f"{len(ids) + n_rows}")
        with self._cond:
            if self._waiting >= self.limits.max_queue:
                raise QueueFull(f"the request queue is full ({self.limits.max_queue} waiting); retry later")
            self._waiting += 1
            self.counters["submitted"] += 1
            if request.media is not None and request.block is None:
                self._encode_q.put(job)
            else:
                self._ready.append(job)
                self._cond.notify_all()
        return handle

    def encode(self, media: Media, cancel: threading.Event | None = None) -> Handle:
        """Read and encode one input on the encoder worker (through the block cache), no decoding.

        The handle's Result carries `block` (read-only [32, n_embd] float32, shared with the
        cache: copy it to change it), `modality`, `inputs` and the reader/encoder seconds.
        """
        if self._closed:
            raise EngineClosed("the engine is closed")
        if media.modality not in self.manifest.modalities:
            raise InputError("input", f"one of this bundle's modalities ({', '.join(self.modalities)})",
                             repr(media.modality))
        handle = Handle(self, Request(messages=(), media=media, cancel=cancel or threading.Event()), None)
        job = _Job(handle, [], time.perf_counter(), encode_only=True)
        with self._cond:
            if self._waiting >= self.limits.max_queue:
                raise QueueFull(f"the request queue is full ({self.limits.max_queue} waiting); retry later")
            self._waiting += 1
            self.counters["encode_requests"] += 1
            self._encode_q.put(job)
        return handle

    def clear_cache(self, blocks: bool = False) -> None:
        """Forget what the idle slots cache (the next requests prefill from scratch); returns once
        the scheduler has done it. Busy slots keep their requests' positions. `blocks`: also forget
        the encoded inputs (the next request about any media reads and encodes it again)."""
        done = threading.Event()
        with self._cond:
            if self._closed:
                return
            if blocks:
                self._blocks.clear()
            self._clears.append(done)
            self._cond.notify_all()
        done.wait()

    def cache_positions(self) -> list[tuple[int, int]]:
        """Per slot: (positions our bookkeeping lists, positions llama.cpp holds). Equal unless a
        fault left the cache out of step; call it while the engine is idle."""
        return [(len(s.items), self.ctx.seq_pos_max(s.seq) + 1) for s in self.slots]

    def slot_items(self, seq: int) -> list:
        """What slot `seq` caches, one entry per position: a token id or (block digest, row)."""
        return list(self.slots[seq].items)

    def stats(self) -> dict[str, Any]:
        """Queue depth, busy slots and the counters (a snapshot)."""
        with self._cond:
            return {"queue_depth": self._waiting, "slots": self.parallel,
                    "slots_busy": sum(s.busy for s in self.slots), **dict(self.counters)}

    def close(self) -> None:
        """Cancel everything, stop the threads and free the native objects."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._encode_q.put(None)
        self._sched.join()
        self._enc.join()
        self.batch.close()
        self.ctx.close()
        self.model.close()
        self.encoder.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ request preparation
    def _prompt_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        conv = Conversation(self.manifest.prompt)
        expect = "user"
        if not messages:
            raise InputError("messages", "at least one user message", "none")
        for i, (role, text) in enumerate(messages):
            if role != expect:
                raise InputError(f"messages[{i}]", f"a {expect} message (user and assistant turns alternate, "
                                 "the last one from the user)", f"role {role!r}")
            if not isinstance(text, str):
                raise InputError(f"messages[{i}]", "text content", type(text).__name__)
            if role == "user":
                conv.add_question(text)
                expect = "assistant"
            else:
                conv.set_answer(text)
                expect = "user"
        if expect != "assistant":
            raise InputError("messages", "a last message from the user", "an assistant message last")
        assert conv.messages[-1][0] == ROLES[1]
        return self.tokenizer.encode(conv.render(), bos=True, eos=False)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in ids]
        n_vocab = self.model.n_vocab
        if not ids:
            raise InputError("prompt", "at least one token (BOS)", "no tokens")
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise InputError("prompt", f"token ids in [0, {n_vocab})", f"{bad[0]}")
        return ids

    def _check_block(self, block: Any) -> np.ndarray:
        arr = np.asarray(block)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        want = (self.n_inserted, self.n_embd)
        if arr.shape != want:
            raise InputError("embeddings", f"a float32 array {list(want)} for this bundle", f"shape {list(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise InputError("embeddings", "finite floating-point values", f"dtype {arr.dtype} or NaN/inf")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _media_key(self, media: Media) -> str:
        h = hashlib.sha256()
        h.update(media.modality.encode())
        h.update(json.dumps(media.options, sort_keys=True, default=str).encode())
        for src in (media.source, media.image):
            if src is None:
                h.update(b"\0none")
            elif isinstance(src, np.ndarray):
                h.update(str((src.dtype, src.shape)).encode())
                h.update(np.ascontiguousarray(src).tobytes())
            elif isinstance(src, (str, os.PathLike)):
                with open(src, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(repr(src).encode())
        return h.hexdigest()

    def _check_media_limits(self, media: Media) -> None:
        lim = self.limits
        for src in (media.source, media.image):
            if isinstance(src, (str, os.PathLike)) and os.path.isfile(src):
                size = os.path.getsize(src)
                if size > lim.max_media_bytes:
                    raise InputError(src, f"a file of at most {lim.max_media_bytes} bytes", f"{size} bytes")
        if media.modality in ("audio", "video") and isinstance(media.source, (str, os.PathLike)):
            try:
                import av

                with av.open(str(media.source)) as c:
                    seconds = (c.duration or 0) / 1e6
            except Exception:  # noqa: BLE001 - the reader reports unreadable files with its own message
                return
            if seconds > lim.max_media_seconds:
                raise InputError(media.source, f"{media.modality} of at most {lim.max_media_seconds:g} s",
                                 f"{seconds:.1f} s")

    # ------------------------------------------------------------------ encoder worker
    def _run_encoder(self) -> None:
        """Encoder worker: takes every queued media job, reads each input, encodes each modality's
        new inputs in one batch (`Encoder.encode_many`), and hands the jobs to the scheduler."""
        while True:
            jobs = [self._encode_q.get()]
            while len(jobs) < self.encode_batch:
                try:
                    jobs.append(self._encode_q.get_nowait())
                except queue.Empty:
                    break
            stop = None in jobs
            jobs = [j for j in jobs if j is not None]
            try:
                self._encode_jobs(jobs)
            finally:
                for job in jobs:
                    cleanup = job.request.media.cleanup
                    if cleanup is not None:
                        try:
                            cleanup()
                        except OSError as exc:
                            log.warning("cleaning up an input failed: %s", exc)
            if stop:
                return

    def _encode_jobs(self, jobs: list[_Job]) -> None:
        from .pipeline import read_input

        todo: dict[str, list[tuple[_Job, str, Any]]] = collections.defaultdict(list)  # modality -> (job, key, item)
        for job in jobs:
            media = job.request.media
            try:
                if job.request.cancel.is_set() or self._closed:
                    self._finish_unstarted(job, "cancelled")
                    continue
                key = self._media_key(media)
                with self._cond:
                    hit = self._blocks.get(key)
                    if hit is not None:
                        self._blocks.move_to_end(key)
                        self.counters["block_cache_hits"] += 1
                if hit is not None:
                    self._ready_job(job, hit)
                    continue
                self._check_media_limits(media)
                t0 = time.perf_counter()
                item = read_input(media.modality, media.source, media.options, image=media.image)
                job.read_s = time.perf_counter() - t0
                todo[media.modality].append((job, key, item))
            except OneLLMError as exc:
                self._fail_unstarted(job, exc)
            except Exception as exc:  # noqa: BLE001 - a reader bug must not kill the worker
                log.exception("reading a %s input failed", media.modality)
                self._fail_unstarted(job, BackendError(f"{media.modality} input: {type(exc).__name__}: {exc}"))
        for modality, group in todo.items():
            # the same input twice in one batch is encoded once
            unique: dict[str, Any] = {}
            for _job, key, item in group:
                unique.setdefault(key, item)
            t0 = time.perf_counter()
            try:
                blocks = self.encoder.encode_many(modality, [item.array for item in unique.values()])
                blocks.flags.writeable = False  # shared by every request on these inputs
            except Exception as exc:  # noqa: BLE001 - fail this batch's requests, keep the worker
                err = exc if isinstance(exc, OneLLMError) else BackendError(f"{modality} encoder: {exc}")
                if not isinstance(exc, OneLLMError):
                    log.exception("encoding a batch of %d %s inputs failed", len(unique), modality)
                for job, _key, _item in group:
                    self._fail_unstarted(job, err)
                continue
            made: dict[str, tuple[np.ndarray, str, dict]] = {}
            with self._cond:
                for (key, item), block in zip(unique.items(), blocks):
                    made[key] = (block, block_digest(block), dict(item.meta))
                    self._blocks[key] = made[key]
                    while len(self._blocks) > self._block_cache:
                        self._blocks.popitem(last=False)
                self.counters["encodes"] += len(unique)
                self.counters["encode_batches"] += 1
            encode_s = time.perf_counter() - t0  # each request of the batch waited for all of it
            for job, key, _item in group:
                job.encode_s = encode_s
                self._ready_job(job, made[key])

    def _ready_job(self, job: _Job, hit: tuple[np.ndarray, str, dict]) -> None:
        job.block, job.digest, job.inputs = hit[0], hit[1], dict(hit[2])
        job.modality = job.request.media.modality
        with self._cond:
            self._ready.append(job)
            self._cond.notify_all()

    def _finish_unstarted(self, job: _Job, reason: str) -> None:
        with self._cond:
            self._waiting -= 1
            self.counters[f"finished_{reason}"] += 1
        now = time.perf_counter()
        job.handle._emit("done", Result(stop_reason=reason, modality=job.modality, queue_s=now - job.t_submit,
                                        ttft_s=now - job.t_submit))

    def _fail_unstarted(self, job: _Job, exc: BaseException) -> None:
        with self._cond:
            self._waiting -= 1
            self.counters["failed"] += 1
        job.handle._emit("error", exc)

    # ------------------------------------------------------------------ scheduler
    def _run_scheduler(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._ready or self._clears or any(s.busy for s in self.slots)):
                        self._cond.wait()
                    if self._closed:
                        break
                    clears, self._clears = self._clears, []
                if clears:
                    self._clear_idle(clears)
                self._admit()
                self._reap_cancelled()
                if any(s.busy for s in self.slots):
                    self._step()
        except BaseException as exc:  # pragma: no cover - a bug: fail every request rather than hang them
            log.exception("engine scheduler stopped")
            err = exc if isinstance(exc, OneLLMError) else BackendError(f"engine failure: {exc}")
            for s in self.slots:
                if s.busy:
                    self._finish(s, None, error=err)
            with self._cond:
                self._closed = True
        with self._cond:
            ready = list(self._ready)
            self._ready.clear()
        for job in ready:
            self._finish_unstarted(job, "cancelled")
        for s in self.slots:
            if s.busy:
                self._finish(s, "cancelled")
        with self._cond:
            clears, self._clears = self._clears, []
        for ev in clears:
            ev.set()

    def _clear_idle(self, clears: list[threading.Event]) -> None:
        try:
            for s in self.slots:
                if not s.busy and s.items:
                    self.ctx.seq_rm(s.seq, 0, -1)
                    s.items.clear()
        finally:
            for ev in clears:
                ev.set()

    def _admit(self) -> None:
        """Give waiting requests a free slot (the one whose cache serves them best, else the LRU one)."""
        with self._cond:
            done = [j for j in self._ready if j.encode_only]
            for j in done:
                self._ready.remove(j)
        for j in done:
            self._finish_encode(j)
        while True:
            with self._cond:
                if not self._ready:
                    return
                free = [s for s in self.slots if not s.busy]
                if not free:
                    return
                job = self._ready.popleft()
            if job.encode_only:  # encoded since the sweep above
                self._finish_encode(job)
                continue
            if job.request.cancel.is_set():
                self._finish_unstarted(job, "cancelled")
                continue
            n_rows = 0 if job.block is None else job.block.shape[0]
            target = [job.ids[0]] + [(job.digest, r) for r in range(n_rows)] + job.ids[1:]
            own = {s.seq: _common_prefix(s.items, target) for s in self.slots}
            slot = max(free, key=lambda s: (own[s.seq], -s.last_used))
            keep = own[slot.seq]
            donor = max(self.slots, key=lambda s: own[s.seq])
            limit = len(target) - 1  # the last prompt position is always decoded (its logits)
            if own[donor.seq] > keep and min(own[donor.seq], limit) > keep:
                keep = min(own[donor.seq], limit)
                self.ctx.seq_rm(slot.seq, 0, -1)
                if self.kv_unified:  # shared cells: a metadata update
                    self.ctx.seq_cp(donor.seq, slot.seq, 0, keep)
                else:  # one buffer per sequence: llama.cpp copies the whole buffer (at the next decode)
                    self.ctx.seq_cp(donor.seq, slot.seq, -1, -1)
                    self.ctx.seq_rm(slot.seq, keep, -1)
                slot.items = donor.items[:keep]
                self.counters["prefix_copies"] += 1
            keep = min(keep, limit)
            if keep < len(slot.items):
                self.ctx.seq_rm(slot.seq, keep, -1)
                del slot.items[keep:]
            self._start(slot, job, target, keep)

    def _finish_encode(self, job: _Job) -> None:
        with self._cond:
            self._waiting -= 1
            self.counters["finished_encode"] += 1
        now = time.perf_counter()
        job.handle._emit("done", Result(stop_reason="encoded", modality=job.modality, inputs=_own_labels(job),
                                        queue_s=now - job.t_submit, preprocess_s=job.read_s,
                                        encode_s=job.encode_s, block=job.block))

    def _start(self, slot: _Slot, job: _Job, target: list, keep: int) -> None:
        req = job.request
        s = req.sampling
        ids, n_rows = job.ids, (0 if job.block is None else job.block.shape[0])
        segments: list[tuple[str, Any]] = []
        rows = self._prompt_rows(ids, job.block) if keep == 0 and n_rows else None
        if rows is not None:  # BOS, the block and the text (or its head) as one embedding batch
            segments.append(("rows", rows))
            t0 = rows.shape[0] - n_rows
        else:
            if keep == 0:
                segments.append(("tok", [ids[0]]))
            if n_rows and max(0, keep - 1) < n_rows:
                r0 = max(0, keep - 1)
                segments.append(("blk", job.block if r0 == 0 else job.block[r0:]))
            t0 = max(1, keep - n_rows)
        if t0 < len(ids):
            segments.append(("tok", list(ids[t0:])))
        if len(segments) == 2 and segments[0][0] == segments[1][0] == "tok":  # no block: one prefill run
            segments = [("tok", segments[0][1] + segments[1][1])]
        assert segments and segments[-1][0] in ("tok", "rows"), "a prompt ends with text"
        now = time.perf_counter()
        slot.job, slot.segments, slot.next_tok = job, segments, None
        slot.sampler = _llama.LlamaSampler(
            self.model.n_vocab, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            repeat_penalty=s.repeat_penalty, repeat_last_n=s.repeat_last_n, seed=s.seed)
        if s.repeat_penalty != 1.0:
            for item in [t for t in target if isinstance(t, int)][-s.repeat_last_n:]:
                slot.sampler.accept(item)
        slot.stream = _TextStream(self.stop_strings + tuple(x for x in req.stop if x))
        slot.result = Result(prompt_tokens=len(target), cached_tokens=keep, modality=job.modality,
                             inputs=_own_labels(job), queue_s=now - job.t_submit, slot=slot.seq,
                             preprocess_s=job.read_s, encode_s=job.encode_s)
        slot.t_first, slot.t_start, slot.t_emit = 0.0, now, 0.0
        slot.pending.clear()
        with self._cond:
            self._waiting -= 1
            self.counters["tokens_reused"] += keep
        log.debug("slot %d: %d prompt positions, %d reused", slot.seq, len(target), keep)

    def _prompt_rows(self, ids: list[int], block: np.ndarray) -> np.ndarray | None:
        """A new conversation's prompt as embedding rows, [BOS, block, text...], or None (tokens then).

        A llama_batch holds tokens or embeddings, so BOS, block and text went as three graphs, each
        a pass over the weights, and with repacked 4-bit weights every graph's rows beyond a
        multiple of 4 cost one more (ggml's repack kernels work in groups of 4). At most
        prefill_chunk text tokens ride along (the rest go in the shared token batches, as before),
        and then the batch is cut to a multiple of 4 rows.
        """
        n_rows = block.shape[0]
        if 1 + n_rows > self.batch.capacity:
            return None
        n_text = min(len(ids) - 1, min(self.batch.capacity, 1 + n_rows + self.prefill_chunk) - 1 - n_rows)
        if n_text < len(ids) - 1:
            n_text = max(0, (1 + n_rows + n_text) // 4 * 4 - 1 - n_rows)
        return prompt_rows(self.model, ids, block, n_text)

    def _reap_cancelled(self) -> None:
        for s in self.slots:
            if s.busy and s.job.request.cancel.is_set():
                self._finish(s, "cancelled")
        if self._closed:
            for s in self.slots:
                if s.busy:
                    self._finish(s, "cancelled")

    def _step(self) -> None:
        """One scheduler step: embeddings calls for slots at their block, then ONE token batch."""
        ctx = self.ctx
        for s in self.slots:
            if s.busy and s.segments and s.segments[0][0] in ("blk", "rows"):
                kind, rows = s.segments[0]
                last = len(s.segments) == 1  # the whole prompt: its last row's logits give the first token
                try:
                    ctx.decode(self.batch.embd_view(rows, len(s.items), "last" if last else "none", seq_id=s.seq))
                except BaseException as exc:  # noqa: BLE001 - the request's error (its caller re-raises it)
                    self._fail_slot(s, exc)
                    continue
                self.counters["decode_calls"] += 1
                if kind == "rows":  # BOS, the block's rows, then text tokens
                    n_text = rows.shape[0] - 1 - self.n_inserted
                    s.items.append(s.job.ids[0])
                    s.items.extend((s.job.digest, r) for r in range(self.n_inserted))
                    s.items.extend(s.job.ids[1:1 + n_text])
                    self.counters["tokens_prefilled"] += 1 + n_text
                    self.counters["rows_injected"] += self.n_inserted
                else:
                    self.counters["rows_injected"] += rows.shape[0]
                    s.items.extend((s.job.digest, r) for r in range(self.n_inserted - rows.shape[0], self.n_inserted))
                s.segments.pop(0)
                if last:
                    try:
                        self._sample(s, rows.shape[0] - 1)
                    except BaseException as exc:  # noqa: BLE001 - a failed draw ends this request only
                        self._fail_slot(s, exc)
        ids: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        outs: list[bool] = []
        plan: list[tuple[_Slot, list[int], bool]] = []  # slot, tokens it put in, whether it gets an output
        for s in self.slots:
            if s.busy and s.next_tok is not None:
                ids.append(s.next_tok)
                pos.append(len(s.items))
                seqs.append(s.seq)
                outs.append(True)
                plan.append((s, [s.next_tok], True))
        budget = min(self.batch.capacity - len(ids), self.prefill_chunk)
        for s in sorted((s for s in self.slots if s.busy and s.segments), key=lambda s: s.result.queue_s):
            if budget <= 0:
                break
            kind, toks = s.segments[0]
            if kind != "tok":
                continue
            take = toks[:budget]
            last = len(take) == len(toks) and len(s.segments) == 1
            n0 = len(s.items)
            ids.extend(take)
            pos.extend(range(n0, n0 + len(take)))
            seqs.extend([s.seq] * len(take))
            outs.extend([False] * (len(take) - 1) + [last])
            plan.append((s, take, last))
            budget -= len(take)
        if not ids:
            return
        try:
            ctx.decode(self.batch.mixed(ids, pos, seqs, outs))
        except BaseException as exc:  # noqa: BLE001 - every request in the batch gets the error
            for s, _, _ in plan:
                self._fail_slot(s, exc)
            return
        self.counters["decode_calls"] += 1
        self.counters["steps"] += 1
        idx = 0
        for s, toks, has_out in plan:
            s.items.extend(toks)
            idx += len(toks)
            if s.next_tok is not None and toks == [s.next_tok] and not s.segments:
                s.next_tok = None
            elif s.segments:
                self.counters["tokens_prefilled"] += len(toks)
                head = s.segments[0][1]
                if len(toks) == len(head):
                    s.segments.pop(0)
                else:
                    s.segments[0] = ("tok", head[len(toks):])
            if has_out:
                try:
                    self._sample(s, idx - 1)
                except BaseException as exc:  # noqa: BLE001 - a failed draw ends this request only
                    self._fail_slot(s, exc)

    def _sample(self, s: _Slot, out_index: int) -> None:
        job, res = s.job, s.result
        if job.request.logprobs > 0:
            res.logprobs = res.logprobs if res.logprobs is not None else []
            res.logprobs.append(_top_logprobs(self.ctx.logits_ith(out_index), job.request.logprobs))
        tok = s.sampler.sample(self.ctx, out_index)
        now = time.perf_counter()
        if not s.t_first:
            s.t_first = now
            res.ttft_s = now - job.t_submit
            res.prefill_s = now - s.t_start
        res.tokens.append(tok)
        self.counters["tokens_generated"] += 1
        if self.model.is_eog(tok):
            return self._finish(s, "eos")
        chunk = s.stream.feed(self.model.piece(tok))
        if chunk:
            s.pending.append(chunk)
            if now - s.t_emit >= job.request.flush_s:  # a fast model: one wake-up of the reader per flush_s
                job.handle._emit("text", "".join(s.pending))
                s.pending.clear()
                s.t_emit = now
        if s.stream.stopped:
            return self._finish(s, "stop_string")
        if len(res.tokens) >= job.request.sampling.max_new_tokens:
            return self._finish(s, "max_new_tokens")
        if len(s.items) >= self.n_ctx_slot:
            return self._finish(s, "context_full")
        if job.request.cancel.is_set():
            return self._finish(s, "cancelled")
        s.next_tok = tok

    def _fail_slot(self, s: _Slot, exc: BaseException) -> None:
        """A failed decode may leave part of a batch in the cache: forget this slot's cache."""
        try:
            self.ctx.seq_rm(s.seq, 0, -1)
        except BackendError:
            pass
        s.items.clear()
        if s.busy:
            self._finish(s, None, error=exc)

    def _finish(self, s: _Slot, reason: str | None, error: BaseException | None = None) -> None:
        job, res = s.job, s.result
        tail = "".join(s.pending) + s.stream.finish() if s.stream is not None and error is None else ""
        s.pending.clear()
        if tail:
            job.handle._emit("text", tail)
        now = time.perf_counter()
        if s.sampler is not None:
            s.sampler.close()
        s.job, s.sampler, s.segments, s.next_tok = None, None, [], None
        s.last_used = now
        if error is None:
            res.text = s.stream.text
            res.stop_reason = "stop_string" if s.stream.stopped else reason
            if not s.t_first:
                res.ttft_s = now - job.t_submit
            res.decode_s = now - s.t_first if s.t_first else 0.0
        s.stream, s.result = None, None
        with self._cond:
            self.counters["finished_" + (res.stop_reason if error is None else "error")] += 1
        if error is None:
            job.handle._emit("done", res)
        else:
            job.handle._emit("error", error)
