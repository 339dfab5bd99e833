"""The runtime pipeline: bundle -> (input file or array) -> encoder -> llama.cpp -> text.

    pipe = Pipeline.load("bundle/")                       # or Pipeline.load() for the demo bundle
    for chunk in pipe.ask("What is the person doing?", imu="walk.csv", stream=True):
        print(chunk, end="", flush=True)
    chat = pipe.chat(imu="walk.csv")                      # keeps its KV cache between turns
    chat.ask("What is the person doing?"); chat.ask("Is it fast?")

Data path of one request: the reader returns the modality array; onnxruntime runs the
staged encoder graphs and writes the [32, n_embd] block into the encoder's ONE
preallocated float32 buffer; that buffer is handed to llama.cpp by pointer as the
embedding rows after BOS (nothing is copied on our side).

Thread safety: a `Pipeline` may be shared between threads. It owns one encoder output
buffer and one llama.cpp context, so requests are serialised by the pipeline's lock: a
second thread's `ask` waits until the first finishes (a streamed answer holds the lock
until its iterator is exhausted or closed). Use one `Pipeline` per thread for parallel
requests. A second request on the SAME thread while a stream is open raises a
BackendError (it would take over the KV cache under the open stream).

Cancellation is per request: `stream.cancel()` (or the `cancel` event passed to `ask`)
stops that request, even before its first chunk; `Pipeline.cancel()` stops every open
request. Both may be called from any thread. Chat turns are transactional: a turn that is
interrupted (an exception, Ctrl-C, the stream closed early) leaves the conversation and
the KV cache as they were before it; a chat that outgrows the context drops its oldest
turns (see `Pipeline._fit_prompt`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, cache_dir, load_manifest
from .errors import BackendError, BundleError, ConfigError, InputError
from .manifest import Manifest
from .modalities import ModalityInput, get_modality
from .prompt import Conversation
from .registry import decoder_quant, resolve_device

log = logging.getLogger(__name__)

DEMO_BUNDLE_NAME = "demo-tiny"


def default_bundle_dir() -> Path:
    """Where the demo bundle lives (`$ONELLM_CACHE_DIR` or the XDG cache, `demo-tiny/`)."""
    return cache_dir() / DEMO_BUNDLE_NAME


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB: VmHWM on Linux (it starts afresh at
    exec, unlike ru_maxrss, which a child inherits from its parent), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


@dataclasses.dataclass
class Answer:
    """One answered question, with what it took."""

    text: str
    modality: str | None
    token_ids: list[int]
    stop_reason: str
    timings: dict[str, float]  # seconds (decode_tokens_per_s in tokens/s)
    inputs: dict[str, Any]  # the readers' metadata
    logprobs: list[list[tuple[int, float]]] | None = None
    notices: list[str] = dataclasses.field(default_factory=list)  # e.g. "the oldest turns were dropped"

    def to_json(self, tokenizer=None) -> dict[str, Any]:
        out = {
            "answer": self.text,
            "modality": self.modality,
            "token_ids": self.token_ids,
            "stop_reason": self.stop_reason,
            "timings": self.timings,
            "input": self.inputs,
        }
        if self.notices:
            out["notices"] = list(self.notices)
        if self.logprobs is not None:
            out["logprobs"] = [
                [{"id": t, "piece": tokenizer.id_to_piece(t) if tokenizer else None, "logprob": lp} for t, lp in step]
                for step in self.logprobs
            ]
        return out


def read_input(modality: str, source: Any, options: dict[str, Any] | None = None, image: Any = None) -> ModalityInput:
    """Run the modality's reader on a path or an in-memory array (same validation either way)."""
    spec = get_modality(modality)
    opts = dict(options or {})
    if spec.requires_image:
        if image is None:
            raise InputError(spec.cli_option, f"the RGB photo as well ({spec.cli_option} F --image RGB)", "no --image")
        opts["image"] = image
    return spec.preprocess(source, **opts)


class Pipeline:
    """A loaded bundle: tokenizer, encoder sessions and the llama.cpp decoder."""

    def __init__(self, bundle: Bundle, encoder, decoder, tokenizer, load_seconds: float) -> None:
        self.bundle = bundle  # where the bundle is and what its manifest says
        self.manifest: Manifest = bundle.manifest
        self.encoder = encoder
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.load_seconds = load_seconds
        self.random_weights = self.manifest.random_weights
        self.bundle_dir = bundle.dir
        self._lock = threading.RLock()  # one request at a time (re-entered by encode() inside a request)
        self._active: AnswerStream | None = None  # the request holding the lock
        self._active_thread: int | None = None
        self._open: weakref.WeakSet[AnswerStream] = weakref.WeakSet()  # created, not finished
        self._open_lock = threading.Lock()
        self._plan_error: BaseException | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        *,
        device: str = "auto",
        precision: str | None = None,
        quant: str | None = None,
        threads: int | None = None,
        n_ctx: int | None = None,
        verify: bool = True,
    ) -> Pipeline:
        """Load a bundle (default: the demo bundle in the cache, which must exist).

        device: cpu | cuda | tensorrt | auto (auto: the bundle's TensorRT engines when they were
        built and onnxruntime's TensorRT provider is here, else CUDA when onnxruntime has it,
        else CPU; llama.cpp offloads every layer when it was built with GPU support).
        precision: encoder precision to run (default: fp16 on CUDA when exported, else the
        bundle's CPU default). quant: which exported GGUF to run (default: the bundle's).
        """
        from .decoder import Decoder
        from .encoder import Encoder
        from .tokenizer import Tokenizer

        t0 = time.perf_counter()
        bundle = load_manifest(Path(path) if path is not None else default_bundle_dir(), verify=verify)
        manifest = bundle.manifest
        enc_all = manifest.encoder.precisions
        trt_options = None
        trt_entry = manifest.tensorrt
        if device in ("auto", "tensorrt") and trt_entry:
            from .trt import engine_cache_for, tensorrt_options

            try:
                trt_options = tensorrt_options(engine_cache_for(bundle.dir, trt_entry, cache_dir()))
                device = "tensorrt"
                precision = precision or trt_entry.source_precision
            except BackendError as exc:
                if device == "tensorrt":
                    raise
                log.info("not using the bundle's TensorRT engines: %s", exc)
        elif device == "tensorrt":
            from .trt import TRT_DIR, tensorrt_options

            trt_options = tensorrt_options(cache_dir() / TRT_DIR / bundle.dir.name)
        provider, _device_id = resolve_device(device)
        if precision is None:
            precision = provider.pick_precision(enc_all, manifest.encoder.default)
        if precision not in enc_all:
            raise ConfigError(f"{bundle.dir}: encoder precision {precision!r} was not exported (bundle has {', '.join(enc_all)})")
        quants = manifest.decoder.quants
        quant = quant or manifest.decoder.default
        if quant not in quants:
            raise ConfigError(f"{bundle.dir}: decoder quantization {quant!r} was not exported (bundle has {', '.join(quants)})")
        tokenizer = Tokenizer(bundle.path(manifest.tokenizer.file))
        _check_token_ids(bundle, tokenizer)
        encoder = Encoder(enc_all[precision], bundle.dir, device=device, threads=threads, verify=False,
                          provider_options=trt_options)
        decoder = Decoder(bundle.path(quants[quant].file), n_ctx=n_ctx, n_threads=threads,
                          use_extra_bufts=decoder_quant(quant).use_extra_bufts(), **decoder_quant(quant).context_settings())
        _check_reader_constants(bundle)
        pipe = cls(bundle, encoder, decoder, tokenizer, time.perf_counter() - t0)
        pipe.precision, pipe.quant = precision, quant
        if pipe.random_weights:
            log.info("bundle %s has RANDOM weights: answers are meaningless text", bundle.dir)
        return pipe

    def close(self) -> None:
        with self._lock:
            self.encoder.close()
            self.decoder.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    # ------------------------------------------------------------------ stages
    def pick_input(self, inputs: dict[str, Any]) -> tuple[str | None, Any, Any]:
        """(modality, source, image) from keyword inputs such as imu=..., depth=..., image=..."""
        from .inputs import select_input

        sel = select_input(inputs)
        if sel.modality is not None and sel.modality not in self.manifest.modalities:
            raise ConfigError(f"this bundle has no {sel.modality!r} encoder (it has {', '.join(self.modalities)})")
        return sel.modality, sel.source, sel.image

    def encode(self, modality: str, source: Any = None, *, image: Any = None, options: dict[str, Any] | None = None,
               timings: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Read + encode one input; returns (the encoder's [32, n_embd] buffer view, reader metadata).

        The view is overwritten by the next encode: copy it to keep it.
        """
        from .inputs import check_source, stdin_facts

        t0 = time.perf_counter()
        source = check_source(source, get_modality(modality).cli_option, modality)
        image = check_source(image, "--image", "image") if image is not None else None
        # First use of a modality: build its onnxruntime sessions on another thread while the
        # reader parses the file (both take real time on a cold start: session creation for
        # large graphs, and the reader's first imports, e.g. scipy.signal ~0.8 s).
        builder = None
        if not self.encoder.is_prepared(modality):
            builder = threading.Thread(target=self._build_plan, args=(modality,), daemon=True)
            builder.start()
        try:
            item = read_input(modality, source, options, image=image)
        finally:
            if builder is not None:
                builder.join()
        if self._plan_error is not None:
            err, self._plan_error = self._plan_error, None
            raise err
        t1 = time.perf_counter()
        with self._lock:
            block = self.encoder.encode(modality, item.array)
        t2 = time.perf_counter()
        if timings is not None:
            timings["preprocess_s"] = t1 - t0
            timings["encode_s"] = t2 - t1
        meta = dict(item.meta)
        piped = stdin_facts(source)
        if piped is not None:  # name standard input, not its temporary file
            meta["source"], meta["stdin"] = piped["source"], piped
        return block, meta

    def _build_plan(self, modality: str) -> None:
        try:
            self.encoder.prepare(modality)
        except BaseException as exc:  # re-raised on the caller's thread
            self._plan_error = exc

    def default_sampling(self):
        """The bundle's sampling defaults (`Manifest.prompt.defaults`) as a `Sampling`."""
        from .decoder import Sampling

        d = self.manifest.prompt.defaults
        return Sampling(temperature=d.temperature, top_p=d.top_p, max_new_tokens=d.max_new_tokens)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        return self.tokenizer.encode(conversation.render(), bos=True, eos=False)

    # ------------------------------------------------------------------ asking
    def cancel(self) -> None:
        """Cancel every open request: running, waiting for the pipeline, or not yet started.

        Callable from any thread. Requests made after this call are not affected; to stop
        one request only, call its stream's `cancel()`.
        """
        with self._open_lock:
            streams = list(self._open)
        for s in streams:
            s.cancel()

    def _register(self, stream: AnswerStream) -> None:
        with self._open_lock:
            self._open.add(stream)

    def _unregister(self, stream: AnswerStream) -> None:
        with self._open_lock:
            self._open.discard(stream)

    def _check_reentry(self) -> None:
        """A BackendError when this thread already has a request open (it would take over the KV cache)."""
        if self._active is not None and self._active_thread == threading.get_ident():
            raise BackendError(
                "a streamed answer is still open on this thread; exhaust it, cancel it or close it "
                "(stream.close()) before the next request"
            )

    def _enter(self, stream: AnswerStream) -> None:
        """Mark `stream` as the running request (the lock is held: another holder is this thread)."""
        if self._active is not None:
            raise BackendError(
                "a streamed answer is still open on this thread; exhaust it, cancel it or close it "
                "(stream.close()) before the next request"
            )
        self._active, self._active_thread = stream, threading.get_ident()

    def _fit_prompt(self, conv: Conversation, n_rows: int, sampling, chat: ChatSession | None) -> tuple[list[int], list[str]]:
        """The prompt ids of `conv`, dropping a chat's oldest turns when it outgrows the context.

        A chat keeps room for the answer (max_new_tokens, at most a quarter of n_ctx); when it
        must drop turns it drops down to half the context, so the kept turns are re-prefilled
        once every few turns rather than on every turn. A question that does not fit even
        alone is a one-line InputError.
        """
        n_ctx = self.decoder.n_ctx
        ids = self.prompt_ids(conv)
        reserve = min(sampling.max_new_tokens, n_ctx // 4)
        notices: list[str] = []
        if len(ids) + n_rows + reserve <= n_ctx:
            return ids, notices
        alone = ids if conv.n_turns == 1 else self.prompt_ids(Conversation(conv.spec, list(conv.messages[-2:])))
        if len(alone) + n_rows > n_ctx:  # checked before any turn is dropped: a bad question costs no history
            raise InputError(
                "question", f"a question that fits the context: at most {n_ctx} positions (n_ctx) with the system "
                f"prompt{f' and the {n_rows} input rows' if n_rows else ''}", f"{len(alone) + n_rows}")
        if chat is None or conv.n_turns == 1:
            return ids, notices  # fits; the answer may stop early with stop_reason "context_full"
        dropped = 0
        while conv.n_turns > 1 and (len(ids) + n_rows + reserve > n_ctx or len(ids) + n_rows > n_ctx // 2):
            conv.drop_oldest_turn()
            dropped += 1
            ids = self.prompt_ids(conv)
        chat.turns_dropped += dropped
        log.debug("chat: dropped %d oldest turns; the prompt now takes %d of %d positions",
                  dropped, len(ids) + n_rows, n_ctx)
        if not chat._warned_context:
            chat._warned_context = True
            notice = (f"the conversation outgrew the context ({n_ctx} positions): the oldest turns are "
                      "dropped from now on (the input and the system prompt are kept)")
            log.warning("chat: %s", notice)
            notices.append(notice)
        return ids, notices

    def ask(
        self,
        question: str,
        *,
        stream: bool = False,
        embeddings: np.ndarray | None = None,
        modality: str | None = None,
        options: dict[str, Any] | None = None,
        sampling=None,
        cancel: threading.Event | None = None,
        logprobs: int = 0,
        **inputs: Any,
    ):
        """Answer one question about one input (imu=..., image=..., depth=... with image=..., ...).

        `embeddings`: a precomputed [32, n_embd] block (from `onellm encode`) instead of an input.
        stream=True returns an `AnswerStream` of text chunks (its `.answer` is set when exhausted,
        its `.cancel()` stops this request); otherwise the `Answer`. `cancel`: an extra Event
        that stops the request when set.
        """
        self._check_reentry()
        gen = AnswerStream(self, question, chat=None, embeddings=embeddings, modality=modality, options=options,
                           sampling=sampling, cancel=cancel, inputs=inputs, logprobs=logprobs)
        if stream:
            return gen
        for _ in gen:
            pass
        return gen.answer

    def chat(self, *, embeddings: np.ndarray | None = None, modality: str | None = None,
             options: dict[str, Any] | None = None, **inputs: Any) -> ChatSession:
        """A multi-turn conversation about one input; follow-up turns reuse the KV cache."""
        return ChatSession(self, embeddings=embeddings, modality=modality, options=options, inputs=inputs)


class AnswerStream:
    """One request: an iterator of answer chunks that holds the pipeline lock while it runs.

    `.answer` is the `Answer` once the stream has ended (a cancelled answer included).
    `.cancel()` stops this request only, from any thread, at any time: before the first
    `next()` (the request then ends at once with stop_reason "cancelled"), during the
    prefill (checked between llama_decode calls) or between tokens.
    Stop reading early with `.close()` (or use the stream in a `with` block): until it is
    exhausted or closed it keeps the pipeline, and a second request on the same thread
    raises a BackendError. An interrupted or closed chat turn is removed from the
    conversation and the KV cache is trimmed back, so the next turn works.
    """

    def __init__(self, pipe: Pipeline, question: str, *, chat: ChatSession | None, embeddings, modality, options,
                 sampling, cancel: threading.Event | None, inputs, logprobs: int = 0) -> None:
        self.pipe = pipe
        self.answer: Answer | None = None
        self.logprobs = logprobs
        self._event = threading.Event()
        self._stop = _AnyEvent(self._event, cancel)
        pipe._register(self)
        self._it = self._gen(question, chat, embeddings, modality, options, sampling, inputs)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def cancel(self) -> None:
        """Stop this request (callable from any thread, even before iteration starts)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop reading: an unfinished request is abandoned and its chat turn rolled back."""
        self._it.close()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _gen(self, question, chat, embeddings, modality, options, sampling, inputs) -> Iterator[str]:
        pipe = self.pipe
        try:
            with pipe._lock:
                pipe._enter(self)
                try:
                    yield from self._run(question, chat, embeddings, modality, options, sampling, inputs)
                finally:
                    pipe._active = pipe._active_thread = None
        finally:
            pipe._unregister(self)

    def _run(self, question, chat, embeddings, modality, options, sampling, inputs) -> Iterator[str]:
        pipe = self.pipe
        timings: dict[str, float] = {"bundle_load_s": pipe.load_seconds}
        t_start = time.perf_counter()
        conv = chat.conversation if chat is not None else Conversation(pipe.manifest.prompt)
        if chat is not None and conv.drop_open_turn():  # left open by an interrupted rollback
            log.info("chat: dropped an unanswered turn left by an interrupted request")
        conv.add_question(question)
        try:
            if self._stop.is_set():  # cancelled before it started: encode nothing
                self.answer = _empty_answer(modality, timings, t_start)
                if chat is not None:
                    conv.drop_open_turn()
                return
            if chat is not None:
                block, modality, meta = chat._ensure_block(timings)
            else:
                block, modality, meta = self._input_block(embeddings, modality, options, inputs, timings)
            sampling = sampling or pipe.default_sampling()
            n_rows = 0 if block is None else block.shape[0]
            ids, notices = pipe._fit_prompt(conv, n_rows, sampling, chat)
            session = chat.session() if chat is not None else pipe.decoder.session()
            prefilled_before = session.tokens_prefilled + session.rows_injected
            t0 = time.perf_counter()
            session.prefill(ids, block, cancel=self._stop)
            t1 = time.perf_counter()
            timings["prefill_s"] = t1 - t0
            timings["prefill_positions"] = session.tokens_prefilled + session.rows_injected - prefilled_before
            first = None
            n0 = session.tokens_generated
            for chunk in session.generate(sampling, cancel=self._stop, stop=pipe.manifest.prompt.stop,
                                          logprobs=self.logprobs):
                if first is None:
                    first = time.perf_counter()
                yield chunk
        except BaseException:
            if chat is not None:  # the unanswered turn goes; the session already trimmed its cache
                conv.drop_open_turn()
            raise
        t2 = time.perf_counter()
        gen = session.last
        n_new = session.tokens_generated - n0
        timings["first_token_s"] = (first if first is not None else t2) - t_start
        timings["decode_s"] = t2 - t1
        timings["decode_tokens"] = n_new
        timings["decode_tokens_per_s"] = n_new / (t2 - t1) if t2 > t1 else 0.0
        timings["total_s"] = t2 - t_start
        timings["peak_rss_mib"] = peak_rss_mib()
        self.answer = Answer(text=gen.text, modality=modality, token_ids=list(gen.tokens),
                             stop_reason=gen.stop_reason, timings=timings, inputs=meta,
                             logprobs=gen.logprobs, notices=notices)
        if chat is not None:
            if gen.stop_reason == "cancelled" and not gen.text:
                conv.drop_open_turn()  # nothing was answered: the turn never happened
            else:
                conv.set_answer(gen.text)  # a cancelled answer keeps what the user saw
                chat.turns += 1

    def _input_block(self, embeddings, modality, options, inputs, timings) -> tuple[Any, str | None, dict]:
        pipe = self.pipe
        if embeddings is not None:
            from .inputs import select_input

            select_input(inputs, embeddings=True)  # refuses an input file alongside the block
            block, modality = _check_embeddings(embeddings, pipe.manifest, modality)
            timings.update(preprocess_s=0.0, encode_s=0.0)
            return block, modality, {"source": "embeddings"}
        m, source, image = pipe.pick_input(inputs)
        if m is None:
            timings.update(preprocess_s=0.0, encode_s=0.0)
            return None, modality, {}
        block, meta = pipe.encode(m, source, image=image, options=options, timings=timings)
        return block, m, meta


def _empty_answer(modality: str | None, timings: dict[str, float], t_start: float) -> Answer:
    """The answer of a request cancelled before it started."""
    total = time.perf_counter() - t_start
    timings.update(preprocess_s=0.0, encode_s=0.0, prefill_s=0.0, prefill_positions=0, first_token_s=total,
                   decode_s=0.0, decode_tokens=0, decode_tokens_per_s=0.0, total_s=total,
                   peak_rss_mib=peak_rss_mib())
    return Answer(text="", modality=modality, token_ids=[], stop_reason="cancelled", timings=timings, inputs={})


class ChatSession:
    """A conversation about one input that keeps its encoder block and KV cache.

    `conversation` holds the turns the model sees: a turn that was interrupted or closed
    is removed, and when the conversation outgrows the context the oldest turns are
    dropped (the input block and the system prompt stay); `turns_dropped` counts them.
    """

    def __init__(self, pipe: Pipeline, *, embeddings, modality, options, inputs) -> None:
        self.pipe = pipe
        self.conversation = Conversation(pipe.manifest.prompt)
        self.block: np.ndarray | None = None
        self.modality = modality
        self.meta: dict[str, Any] = {}
        self._embeddings, self._options, self._inputs = embeddings, options, inputs
        self._session = None
        self.turns = 0  # answered turns
        self.turns_dropped = 0  # oldest turns dropped to stay within the context
        self._warned_context = False

    def _ensure_block(self, timings: dict[str, float] | None = None) -> tuple[np.ndarray | None, str | None, dict]:
        """Read and encode the input once (call with the pipeline lock held)."""
        pipe = self.pipe
        if self.block is None:
            if self._embeddings is not None:
                block, self.modality = _check_embeddings(self._embeddings, pipe.manifest, self.modality)
                self.block = block.copy()
                self.meta = {"source": "embeddings"}
            else:
                m, source, image = pipe.pick_input(self._inputs)
                if m is not None:
                    block, self.meta = pipe.encode(m, source, image=image, options=self._options, timings=timings)
                    self.block, self.modality = np.array(block, copy=True), m
                    return self.block, self.modality, self.meta
        if timings is not None:
            timings.update(preprocess_s=0.0, encode_s=0.0)
        return self.block, self.modality, self.meta

    def prepare(self) -> dict[str, Any]:
        """Read and encode the conversation's input now (otherwise the first question does)."""
        pipe = self.pipe
        pipe._check_reentry()
        with pipe._lock:
            self._ensure_block()
        return self.meta

    def session(self):
        dec = self.pipe.decoder
        if not dec.owns(self._session):
            if self._session is not None:
                log.info("chat: KV cache was used by another request; re-prefilling the conversation")
            self._session = dec.session()
        return self._session

    @property
    def decoder_session(self):
        return self._session

    def ask(self, question: str, *, stream: bool = False, sampling=None, cancel: threading.Event | None = None):
        """One turn; returns an `AnswerStream` (stream=True) or the `Answer`."""
        self.pipe._check_reentry()
        gen = AnswerStream(self.pipe, question, chat=self, embeddings=None, modality=self.modality,
                           options=self._options, sampling=sampling, cancel=cancel, inputs={})
        if stream:
            return gen
        for _ in gen:
            pass
        return gen.answer


def _check_reader_constants(bundle: Bundle) -> None:
    """Warn when this onellm's readers differ from those the bundle was exported for."""
    from .modalities.base import reader_constants

    for m, entry in bundle.manifest.preprocessing.items():
        want = entry.constants or {}
        have = reader_constants(m)
        diff = sorted(k for k in want if k in have and not np.allclose(np.asarray(want[k]), np.asarray(have[k])))
        if diff:
            log.warning("%s: the bundle was exported with different %s preprocessing constants (%s); "
                        "re-export it with this onellm version", bundle.dir, m, ", ".join(diff))


def _check_token_ids(bundle: Bundle, tokenizer) -> None:
    """The prompt is encoded with the bundle tokenizer's BOS; it must be the manifest's."""
    spec = bundle.manifest.tokenizer
    have = (tokenizer.bos_id, tokenizer.eos_id)
    if have != (spec.bos_id, spec.eos_id):
        raise BundleError(f"{bundle.path(spec.file)}: expected bos/eos ids {spec.bos_id}/{spec.eos_id} as the manifest "
                          f"records, found {have[0]}/{have[1]}")


class _AnyEvent:
    """An event that is set when any of its parts is (cancellation from several sources)."""

    def __init__(self, *events: threading.Event | None) -> None:
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _check_embeddings(block: Any, manifest: Manifest, modality: str | None = None) -> tuple[np.ndarray, str]:
    """(float32 block, its modality) from an array or an embeddings file path (runtime/embeddings.py)."""
    from .embeddings import check_embeddings, load_embeddings

    meta = None
    if isinstance(block, (str, os.PathLike)):
        block, meta = load_embeddings(block)
    return check_embeddings(block, manifest, modality=modality, meta=meta)
