"""The runtime pipeline: bundle -> (input file or array) -> encoder -> llama.cpp -> text.

    pipe = Pipeline.load("bundle/")                       # or Pipeline.load() for the demo bundle
    for chunk in pipe.ask("What is the person doing?", imu="walk.csv", stream=True):
        print(chunk, end="", flush=True)
    chat = pipe.chat(imu="walk.csv")                      # keeps its KV cache between turns
    chat.ask("What is the person doing?"); chat.ask("Is it fast?")

Every request runs on an `Engine` (runtime/engine.py) that the pipeline loads with
`parallel` slots: its encoder worker reads and encodes the input (blocks are cached by
content), its scheduler prefills and decodes every running request in one llama.cpp
batch per step, and a request whose prompt starts like a slot's cached positions (the
same input block, the same conversation so far) prefills only what is new.

Thread safety: a `Pipeline` may be shared between threads. Up to `parallel` requests run
at once (the default, 1, keeps one KV cache as before; `Pipeline.load(parallel=N)` gives
N); more wait for a slot. A second request on the SAME thread while one of its streams is
open raises a BackendError (it would wait for a stream only that thread can drain).

Cancellation is per request: `stream.cancel()` (or the `cancel` event passed to `ask`)
stops that request, even before its first chunk; `Pipeline.cancel()` stops every open
request. Both may be called from any thread. Chat turns are transactional: a turn that is
interrupted (an exception, Ctrl-C, the stream closed early) is removed from the
conversation, and the next turn reuses the KV cache only up to where the conversations
agree; a chat that outgrows the context drops its oldest turns (see `Pipeline._fit_prompt`).
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
DEFAULT_PARALLEL = 1  # engine slots of Pipeline.load: one KV cache, the memory of a one-request pipeline
# A stream's text arrives at most this often (the first chunk at once): a small model's tokens
# come faster than a thread switch per token costs (demo bundle: ~0.13 ms of ~0.4 ms per token)
STREAM_FLUSH_S = 0.004


def default_bundle_dir() -> Path:
    """Where the demo bundle lives (`$ONELLM_CACHE_DIR` or the XDG cache, `demo-tiny/`)."""
    return cache_dir() / DEMO_BUNDLE_NAME


CONTEXT_STEP = 256  # llama.cpp allocates its KV cache in steps of 256 cells


def context_for_question(path: str | os.PathLike | None, question: str, *, max_new_tokens: int,
                         with_input: bool = True) -> int:
    """Positions one `ask` needs: BOS, the input's rows (`with_input`), the prompt around
    `question` and `max_new_tokens` of answer, rounded up to 256 cells (llama.cpp's cache
    step), at most the model's context length.

    The KV cache grows with the context (LLaMA-2-7B: 0.5 MiB per position in f16), so a
    one-question process sized to its question holds a quarter of the cache the model's 2048
    positions would take; a chat keeps the model's context (its history grows).
    """
    from .tokenizer import Tokenizer

    bundle = load_manifest(Path(path) if path is not None else default_bundle_dir(), verify=False)
    manifest = bundle.manifest
    conv = Conversation(manifest.prompt)
    conv.add_question(question)
    ids = Tokenizer(bundle.path(manifest.tokenizer.file)).encode(conv.render(), bos=True, eos=False)
    need = len(ids) + (manifest.n_inserted if with_input else 0) + max(0, max_new_tokens)
    n_train = max(v.n_ctx for v in manifest.decoder.quants.values())
    return min(n_train, -(-need // CONTEXT_STEP) * CONTEXT_STEP)


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
    usage: dict[str, int] = dataclasses.field(default_factory=dict)  # prompt_tokens, cached_tokens, completion_tokens
    slot: int = -1  # the engine slot that answered (-1: none)

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
    """A loaded bundle: tokenizer, encoder and llama.cpp, served by an `Engine` of `parallel` slots."""

    def __init__(self, bundle: Bundle, engine, load_seconds: float) -> None:
        self.bundle = bundle  # where the bundle is and what its manifest says
        self.manifest: Manifest = bundle.manifest
        self.engine = engine  # runs every request (runtime/engine.py)
        self.encoder = engine.encoder
        self.tokenizer = engine.tokenizer
        self.load_seconds = load_seconds
        self.random_weights = self.manifest.random_weights
        self.bundle_dir = bundle.dir
        self.precision, self.quant = engine.precision, engine.quant
        self._decoder = None  # the reference Decoder, loaded on first use of `.decoder`
        self._decoder_lock = threading.Lock()
        self._open: weakref.WeakSet[AnswerStream] = weakref.WeakSet()  # created, not finished
        self._running: dict[int, AnswerStream] = {}  # thread id -> its started, unfinished stream
        self._open_lock = threading.Lock()

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
        parallel: int = DEFAULT_PARALLEL,
        context: dict[str, Any] | None = None,
    ) -> Pipeline:
        """Load a bundle (default: the demo bundle in the cache, which must exist).

        device: cpu | cuda | tensorrt | auto (auto: the bundle's TensorRT engines when they were
        built and onnxruntime's TensorRT provider is here, else CUDA when onnxruntime has it,
        else CPU; llama.cpp offloads every layer when it was built with GPU support).
        precision: encoder precision to run (default: fp16 on CUDA when exported, else the
        bundle's CPU default). quant: which exported GGUF to run (default: the bundle's).
        n_ctx: positions per conversation (default: the model's context length; for one
        question, `context_for_question` sizes it as `onellm ask` does, a quarter of the cache
        at 7B). parallel: requests answered at once (engine slots); each slot holds an n_ctx
        KV cache, so memory grows with it. context: llama.cpp settings (kv_type, flash_attn)
        replacing the GGUF type's (`{"kv_type": "q8_0"}`: half the cache, slower).
        """
        from .engine import Engine, Limits
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
        # a library caller's inputs are its own: no server-style caps on size, length or tokens
        limits = Limits(max_queue=1 << 16, max_tokens=1 << 30, max_media_bytes=1 << 62, max_media_seconds=float("inf"),
                        max_image_pixels=_pillow_bomb_limit())
        engine = Engine.load(bundle, parallel=parallel, n_ctx_slot=n_ctx, threads=threads, device=device, quant=quant,
                             verify=False, limits=limits, precision=precision, provider_options=trt_options,
                             context=context, tokenizer=tokenizer)
        try:
            _check_reader_constants(bundle)
        except BaseException:
            engine.close()
            raise
        pipe = cls(bundle, engine, time.perf_counter() - t0)
        pipe._threads = threads
        if pipe.random_weights:
            log.info("bundle %s has RANDOM weights: answers are meaningless text", bundle.dir)
        return pipe

    def close(self) -> None:
        self.engine.close()
        with self._decoder_lock:
            if self._decoder is not None:
                self._decoder.close()
                self._decoder = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    @property
    def n_ctx(self) -> int:
        """Positions one conversation may use (BOS, the rows, prompt and answer)."""
        return self.engine.n_ctx_slot

    @property
    def kv_type(self) -> str:
        """The KV cache's element type ("f16" unless the GGUF type or `context` chose another)."""
        return self.engine.context.get("kv_type", "f16")

    @property
    def parallel(self) -> int:
        return self.engine.parallel

    @property
    def decoder(self):
        """A `Decoder` of its own on the same GGUF and context settings, for low-level use
        (`logits_for`, a `session()` driven by hand). Requests never use it; it is loaded on
        first use (the weights a second time) and closed with the pipeline."""
        from .decoder import Decoder

        with self._decoder_lock:
            if self._decoder is None:
                eng = self.engine
                self._decoder = Decoder(eng.gguf_path, n_ctx=eng.n_ctx_slot, n_threads=getattr(self, "_threads", None),
                                        use_extra_bufts=decoder_quant(self.quant).use_extra_bufts(), **eng.context)
            return self._decoder

    # ------------------------------------------------------------------ stages
    def pick_input(self, inputs: dict[str, Any]) -> tuple[str | None, Any, Any]:
        """(modality, source, image) from keyword inputs such as imu=..., depth=..., image=..."""
        from .inputs import select_input

        sel = select_input(inputs)
        if sel.modality is not None and sel.modality not in self.manifest.modalities:
            raise ConfigError(f"this bundle has no {sel.modality!r} encoder (it has {', '.join(self.modalities)})")
        return sel.modality, sel.source, sel.image

    def _media(self, modality: str, source: Any, image: Any, options: dict[str, Any] | None):
        """The engine's Media for one checked input."""
        from .engine import Media
        from .inputs import check_source

        source = check_source(source, get_modality(modality).cli_option, modality)
        image = check_source(image, "--image", "image") if image is not None else None
        return Media(modality, source, dict(options or {}), image)

    def encode(self, modality: str, source: Any = None, *, image: Any = None, options: dict[str, Any] | None = None,
               timings: dict[str, float] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Read + encode one input on the engine's encoder worker; returns (the [32, n_embd] block,
        reader metadata).

        The block is read-only and shared with the engine's block cache (a later ask about the
        same input reuses it): copy it to change it.
        """
        media = self._media(modality, source, image, options)
        res = self.engine.encode(media).wait()
        if res.block is None:  # the engine was closed under the request
            raise BackendError(f"{self.bundle_dir}: the pipeline was closed before the {modality} input was encoded")
        if timings is not None:
            timings["preprocess_s"] = res.preprocess_s
            timings["encode_s"] = res.encode_s
        return res.block, _with_stdin_facts(res.inputs, media.source)

    def default_sampling(self):
        """The bundle's sampling defaults (`Manifest.prompt.defaults`) as a `Sampling`."""
        from .decoder import Sampling

        d = self.manifest.prompt.defaults
        return Sampling(temperature=d.temperature, top_p=d.top_p, max_new_tokens=d.max_new_tokens)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        return self.tokenizer.encode(conversation.render(), bos=True, eos=False)

    # ------------------------------------------------------------------ asking
    def cancel(self) -> None:
        """Cancel every open request: running, waiting for a slot, or not yet started.

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
            if self._running.get(stream._thread) is stream:
                del self._running[stream._thread]

    def _check_reentry(self) -> None:
        """A BackendError when this thread already has a request open: its next request would wait
        for a stream that only this thread can drain (with one slot, forever)."""
        if threading.get_ident() in self._running:
            raise BackendError(
                "a streamed answer is still open on this thread; exhaust it, cancel it or close it "
                "(stream.close()) before the next request"
            )

    def _enter(self, stream: AnswerStream) -> None:
        """Mark `stream` as this thread's running request."""
        with self._open_lock:
            self._check_reentry()
            stream._thread = threading.get_ident()
            self._running[stream._thread] = stream

    def _fit_prompt(self, conv: Conversation, n_rows: int, sampling, chat: ChatSession | None) -> tuple[list[int], list[str]]:
        """The prompt ids of `conv`, dropping a chat's oldest turns when it outgrows the context.

        A chat keeps room for the answer (max_new_tokens, at most a quarter of n_ctx); when it
        must drop turns it drops down to half the context, so the kept turns are re-prefilled
        once every few turns rather than on every turn. A question that does not fit even
        alone is a one-line InputError.
        """
        n_ctx = self.n_ctx
        ids = self.prompt_ids(conv)
        reserve = min(sampling.max_new_tokens, n_ctx // 4)
        notices: list[str] = []
        if len(ids) + n_rows + reserve <= n_ctx:
            return ids, notices
        alone = ids if conv.n_turns == 1 else self.prompt_ids(Conversation(conv.spec, list(conv.messages[-2:])))
        if len(alone) + n_rows >= n_ctx:  # checked before any turn is dropped: a bad question costs no history
            raise InputError(
                "question", f"a question that fits the context: fewer than {n_ctx} positions (n_ctx) with the system "
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
    """One request: an iterator of answer chunks, submitted to the engine on the first `next()`.

    `.answer` is the `Answer` once the stream has ended (a cancelled answer included).
    `.cancel()` stops this request only, from any thread, at any time: before the first
    `next()` (the request then ends at once with stop_reason "cancelled", nothing encoded),
    while it waits for a slot, during the prefill or between tokens. The engine may have
    drawn tokens past the last chunk read when `cancel()` lands: the stream yields no
    chunk after it, the answer is "cancelled" (unless every chunk had been read) and its
    text is what was read (its token_ids are every token drawn). The `cancel` Event given
    to `ask` is polled by the engine instead: the request stops at the engine's next step
    and the stream yields what was drawn until then.
    Stop reading early with `.close()` (or use the stream in a `with` block): the request
    is cancelled, and a chat turn is removed from the conversation (the next turn re-uses
    the KV cache up to where the conversations agree). Until it is exhausted or closed, a
    second request on the same thread raises a BackendError.
    """

    def __init__(self, pipe: Pipeline, question: str, *, chat: ChatSession | None, embeddings, modality, options,
                 sampling, cancel: threading.Event | None, inputs, logprobs: int = 0) -> None:
        self.pipe = pipe
        self.answer: Answer | None = None
        self.logprobs = logprobs
        self.handle = None  # the engine's Handle once submitted
        self._thread: int | None = None
        self._stop = _CancelToken(cancel)
        pipe._register(self)
        self._it = self._gen(question, chat, embeddings, modality, options, sampling, inputs)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def cancel(self) -> None:
        """Stop this request (callable from any thread, even before iteration starts)."""
        self._stop.set()
        self.pipe.engine._wake()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop reading: an unfinished request is cancelled and its chat turn rolled back."""
        self._it.close()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _gen(self, question, chat, embeddings, modality, options, sampling, inputs) -> Iterator[str]:
        pipe = self.pipe
        try:
            pipe._enter(self)
            yield from self._run(question, chat, embeddings, modality, options, sampling, inputs)
        finally:
            pipe._unregister(self)

    def _run(self, question, chat, embeddings, modality, options, sampling, inputs) -> Iterator[str]:
        from .engine import Request

        pipe = self.pipe
        timings: dict[str, float] = {"bundle_load_s": pipe.load_seconds}
        t_start = time.perf_counter()
        conv = chat.conversation if chat is not None else Conversation(pipe.manifest.prompt)
        if chat is not None and conv.drop_open_turn():  # left open by an interrupted rollback
            log.info("chat: dropped an unanswered turn left by an interrupted request")
        conv.add_question(question)
        seen: list[str] = []
        cut = False
        try:
            if self._stop.is_set():  # cancelled before it started: encode nothing
                self.answer = _empty_answer(modality, timings, t_start)
                if chat is not None:
                    conv.drop_open_turn()
                return
            media = block = None
            if chat is not None:
                block, modality, meta = chat._ensure_block(timings)
            else:
                block, media, modality, meta = self._input(embeddings, modality, options, inputs)
            sampling = sampling or pipe.default_sampling()
            n_rows = pipe.manifest.n_inserted if (block is not None or media is not None) else 0
            ids, notices = pipe._fit_prompt(conv, n_rows, sampling, chat)
            t_submit = time.perf_counter()
            handle = self.handle = pipe.engine.submit(Request(
                messages=(), prompt_ids=ids, media=media, block=block, modality=modality, sampling=sampling,
                cancel=self._stop, logprobs=self.logprobs, flush_s=STREAM_FLUSH_S))
            try:
                for chunk in handle:
                    if cut or self._stop.own:  # cancel(): the reader stops here, wherever the engine is
                        cut = True
                        continue
                    seen.append(chunk)
                    yield chunk
                res = handle.wait()
            except BaseException:  # the consumer closed the stream or raised, or the request failed
                handle.cancel()
                handle._done.wait()  # the slot is settled before the turn is rolled back
                raise
        except BaseException:
            if chat is not None:  # the unanswered turn goes; the next turn trims the slot's cache
                conv.drop_open_turn()
            raise
        t_end = time.perf_counter()
        if media is not None:
            meta = _with_stdin_facts(res.inputs, media.source)
            timings.update(preprocess_s=res.preprocess_s, encode_s=res.encode_s)
        stop_reason = "cancelled" if cut else res.stop_reason
        text = "".join(seen) if cut else res.text
        n_new = len(res.tokens)
        timings["prefill_s"] = res.prefill_s
        timings["prefill_positions"] = res.prompt_tokens - res.cached_tokens
        timings["first_token_s"] = (t_submit - t_start) + res.ttft_s if n_new else t_end - t_start
        timings["decode_s"] = res.decode_s
        timings["decode_tokens"] = n_new
        timings["decode_tokens_per_s"] = res.decode_tokens_per_s
        timings["total_s"] = t_end - t_start
        timings["peak_rss_mib"] = peak_rss_mib()
        self.answer = Answer(text=text, modality=res.modality, token_ids=list(res.tokens), stop_reason=stop_reason,
                             timings=timings, inputs=meta, logprobs=res.logprobs, notices=notices,
                             usage={"prompt_tokens": res.prompt_tokens, "cached_tokens": res.cached_tokens,
                                    "completion_tokens": n_new},
                             slot=res.slot)
        if chat is not None:
            if stop_reason == "cancelled" and not text:
                conv.drop_open_turn()  # nothing was answered: the turn never happened
            else:
                conv.set_answer(text)  # a cancelled answer keeps what the user saw
                chat.turns += 1

    def _input(self, embeddings, modality, options, inputs) -> tuple[Any, Any, str | None, dict]:
        """(block, media, modality, metadata) of a one-off question."""
        pipe = self.pipe
        if embeddings is not None:
            from .inputs import select_input

            select_input(inputs, embeddings=True)  # refuses an input file alongside the block
            block, modality = _check_embeddings(embeddings, pipe.manifest, modality)
            return block, None, modality, {"source": "embeddings"}
        m, source, image = pipe.pick_input(inputs)
        if m is None:
            return None, None, modality, {}
        return None, pipe._media(m, source, image, options), m, {}


def _with_stdin_facts(meta: dict[str, Any], source: Any) -> dict[str, Any]:
    """The reader's metadata, naming standard input rather than its temporary file."""
    from .inputs import stdin_facts

    meta = dict(meta)
    piped = stdin_facts(source)
    if piped is not None:
        meta["source"], meta["stdin"] = piped["source"], piped
    return meta


def _pillow_bomb_limit() -> int:
    """The pixel count above which Pillow refuses an image by default (twice its warning limit)."""
    from PIL import Image

    return 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def _empty_answer(modality: str | None, timings: dict[str, float], t_start: float) -> Answer:
    """The answer of a request cancelled before it started."""
    total = time.perf_counter() - t_start
    timings.update(preprocess_s=0.0, encode_s=0.0, prefill_s=0.0, prefill_positions=0, first_token_s=total,
                   decode_s=0.0, decode_tokens=0, decode_tokens_per_s=0.0, total_s=total,
                   peak_rss_mib=peak_rss_mib())
    return Answer(text="", modality=modality, token_ids=[], stop_reason="cancelled", timings=timings, inputs={})


class ChatSession:
    """A conversation about one input: its block is encoded once, its turns reuse a slot's KV cache.

    `conversation` holds the turns the model sees: a turn that was interrupted or closed
    is removed, and when the conversation outgrows the context the oldest turns are
    dropped (the input block and the system prompt stay); `turns_dropped` counts them.
    Each turn is one engine request carrying the whole (trimmed) conversation; the engine
    reuses the slot that caches its longest prefix, so a follow-up prefills only the new
    turn, and several chats may run at once.
    """

    def __init__(self, pipe: Pipeline, *, embeddings, modality, options, inputs) -> None:
        self.pipe = pipe
        self.conversation = Conversation(pipe.manifest.prompt)
        self.block: np.ndarray | None = None
        self.modality = modality
        self.meta: dict[str, Any] = {}
        self._embeddings, self._options, self._inputs = embeddings, options, inputs
        self.turns = 0  # answered turns
        self.turns_dropped = 0  # oldest turns dropped to stay within the context
        self._warned_context = False

    def _ensure_block(self, timings: dict[str, float] | None = None) -> tuple[np.ndarray | None, str | None, dict]:
        """Read and encode the input once."""
        pipe = self.pipe
        if self.block is None:
            if self._embeddings is not None:
                block, self.modality = _check_embeddings(self._embeddings, pipe.manifest, self.modality)
                self.block = np.array(block, dtype=np.float32, copy=True)
                self.meta = {"source": "embeddings"}
            else:
                m, source, image = pipe.pick_input(self._inputs)
                if m is not None:
                    block, self.meta = pipe.encode(m, source, image=image, options=self._options, timings=timings)
                    self.block, self.modality = block, m  # read-only, shared with the engine's block cache
                    return self.block, self.modality, self.meta
        if timings is not None:
            timings.update(preprocess_s=0.0, encode_s=0.0)
        return self.block, self.modality, self.meta

    def prepare(self) -> dict[str, Any]:
        """Read and encode the conversation's input now (otherwise the first question does)."""
        self.pipe._check_reentry()
        self._ensure_block()
        return self.meta

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


class _CancelToken:
    """A request's cancel flag: set by `cancel()`, or by the caller's own Event (the engine polls is_set)."""

    def __init__(self, extra: threading.Event | None = None) -> None:
        self._own = threading.Event()
        self._extra = extra

    def set(self) -> None:
        self._own.set()

    @property
    def own(self) -> bool:
        """Set by `set()` (the stream's or the pipeline's cancel), not by the caller's Event."""
        return self._own.is_set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self._extra is not None and self._extra.is_set())


def _check_embeddings(block: Any, manifest: Manifest, modality: str | None = None) -> tuple[np.ndarray, str]:
    """(float32 block, its modality) from an array or an embeddings file path (runtime/embeddings.py)."""
    from .embeddings import check_embeddings, load_embeddings

    meta = None
    if isinstance(block, (str, os.PathLike)):
        block, meta = load_embeddings(block)
    return check_embeddings(block, manifest, modality=modality, meta=meta)
