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
requests. `cancel()` (or the `cancel` event passed to `ask`) may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import cache_dir, load_manifest
from .errors import ConfigError, InputError
from .modalities import ModalityInput, get_modality
from .prompt import Conversation

log = logging.getLogger(__name__)

DEMO_BUNDLE_NAME = "demo-tiny"


def default_bundle_dir() -> Path:
    """Where the demo bundle lives (`$ONELLM_CACHE_DIR` or the XDG cache, `demo-tiny/`)."""
    return cache_dir() / DEMO_BUNDLE_NAME


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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

    def to_json(self, tokenizer=None) -> dict[str, Any]:
        out = {
            "answer": self.text,
            "modality": self.modality,
            "token_ids": self.token_ids,
            "stop_reason": self.stop_reason,
            "timings": self.timings,
            "input": self.inputs,
        }
        if self.logprobs is not None:
            out["logprobs"] = [
                [{"id": t, "piece": tokenizer.id_to_piece(t) if tokenizer else None, "logprob": lp} for t, lp in step]
                for step in self.logprobs
            ]
        return out


def extra_bufts_for(quant: str) -> bool | None:
    """Whether to let llama.cpp repack weights into its extra CPU buffer types for this GGUF.

    Off by default (quantized GGUFs crash on their first decode with the AMX buffer type
    of this llama.cpp; see tests/test_llama_bufts.py). On for q4_k_m where the CPU offers
    no AMX buffer type: CPU_REPACK's Q4_K kernels measured 1.29x faster decoding there,
    while they made q8_0 1.41x slower (benchmarks/RESULTS.md). ONELLM_LLAMA_EXTRA_BUFTS
    (0/1) overrides: None is returned and the decoder reads it.
    """
    if os.environ.get("ONELLM_LLAMA_EXTRA_BUFTS", "") != "":
        return None
    if quant != "q4_k_m":
        return False
    from . import _llama

    try:
        return "AMX" not in _llama.cpu_extra_buffer_types()
    except (OSError, AttributeError) as exc:  # an older llama.cpp without the device API
        log.debug("cannot list llama.cpp's extra buffer types (%s); leaving them off", exc)
        return False


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

    def __init__(self, manifest: dict[str, Any], encoder, decoder, tokenizer, load_seconds: float) -> None:
        self.manifest = manifest
        self.encoder = encoder
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.load_seconds = load_seconds
        self.random_weights = bool(manifest.get("random_weights"))
        self.bundle_dir = Path(manifest["_dir"])
        self._lock = threading.RLock()
        self._cancel = threading.Event()
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
        from .encoder import Encoder, select_providers
        from .tokenizer import Tokenizer

        t0 = time.perf_counter()
        bundle = Path(path) if path is not None else default_bundle_dir()
        manifest = load_manifest(bundle, verify=verify)
        enc_all = manifest["encoder"]["precisions"]
        trt_options = None
        trt_entry = manifest.get("tensorrt")
        if device in ("auto", "tensorrt") and trt_entry:
            from .errors import BackendError
            from .trt import engine_cache_for, tensorrt_options

            try:
                trt_options = tensorrt_options(engine_cache_for(bundle, trt_entry, cache_dir()))
                device = "tensorrt"
                precision = precision or trt_entry.get("source_precision")
            except BackendError as exc:
                if device == "tensorrt":
                    raise
                log.info("not using the bundle's TensorRT engines: %s", exc)
        elif device == "tensorrt":
            from .trt import TRT_DIR, tensorrt_options

            trt_options = tensorrt_options(cache_dir() / TRT_DIR / bundle.resolve().name)
        _providers, device_type, _ = select_providers(device, trt_options)
        if precision is None:
            if device_type == "cuda" and "fp16" in enc_all:
                precision = "fp16"
            else:
                precision = manifest["encoder"]["default"]
                if precision == "fp16" and device_type != "cuda":
                    precision = "fp32" if "fp32" in enc_all else precision
        if precision not in enc_all:
            raise ConfigError(f"{bundle}: encoder precision {precision!r} was not exported (bundle has {', '.join(enc_all)})")
        quants = manifest["decoder"]["quants"]
        quant = quant or manifest["decoder"]["default"]
        if quant not in quants:
            raise ConfigError(f"{bundle}: decoder quantization {quant!r} was not exported (bundle has {', '.join(quants)})")
        tokenizer = Tokenizer(bundle / manifest["tokenizer"]["file"])
        encoder = Encoder(enc_all[precision], bundle, device=device, threads=threads, verify=False,
                          provider_options=trt_options)
        decoder = Decoder(bundle / quants[quant]["file"], n_ctx=n_ctx, n_threads=threads,
                          use_extra_bufts=extra_bufts_for(quant))
        _check_reader_constants(manifest)
        pipe = cls(manifest, encoder, decoder, tokenizer, time.perf_counter() - t0)
        pipe.precision, pipe.quant = precision, quant
        if pipe.random_weights:
            log.info("bundle %s has RANDOM weights: answers are meaningless text", bundle)
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
        return list(self.manifest["modalities"])

    # ------------------------------------------------------------------ stages
    def _pick_input(self, inputs: dict[str, Any]) -> tuple[str | None, Any, Any]:
        """(modality, source, image) from keyword inputs such as imu=..., depth=..., image=..."""
        from .inputs import select_input

        sel = select_input(inputs)
        if sel.modality is not None and sel.modality not in self.manifest["modalities"]:
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
        if modality not in self.encoder._plans:
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
            self.encoder._plan(modality)
        except BaseException as exc:  # re-raised on the caller's thread
            self._plan_error = exc

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        return self.tokenizer.encode(conversation.render(), bos=True, eos=False)

    # ------------------------------------------------------------------ asking
    def cancel(self) -> None:
        """Stop the answer being generated now (callable from any thread)."""
        self._cancel.set()

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
        stream=True returns an iterator of text chunks (its `.answer` is set when exhausted);
        otherwise the `Answer`.
        """
        conv = Conversation()
        conv.add_question(question)
        gen = _AnswerStream(self, conv, embeddings, modality, options, sampling, cancel, inputs, None, logprobs)
        if stream:
            return gen
        for _ in gen:
            pass
        return gen.answer

    def chat(self, *, embeddings: np.ndarray | None = None, modality: str | None = None,
             options: dict[str, Any] | None = None, **inputs: Any) -> ChatSession:
        """A multi-turn conversation about one input; follow-up turns reuse the KV cache."""
        return ChatSession(self, embeddings=embeddings, modality=modality, options=options, inputs=inputs)


class _AnswerStream:
    """Iterator of answer chunks holding the pipeline lock while it runs."""

    def __init__(self, pipe: Pipeline, conv, embeddings, modality, options, sampling, cancel, inputs, chat,
                 logprobs: int = 0) -> None:
        self.pipe = pipe
        self.answer: Answer | None = None
        self.logprobs = logprobs
        self._it = self._gen(conv, embeddings, modality, options, sampling, cancel, inputs, chat)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _gen(self, conv, embeddings, modality, options, sampling, cancel, inputs, chat) -> Iterator[str]:
        from .decoder import Sampling

        pipe = self.pipe
        timings: dict[str, float] = {"bundle_load_s": pipe.load_seconds}
        meta: dict[str, Any] = {}
        t_start = time.perf_counter()
        with pipe._lock:
            pipe._cancel.clear()
            stop_event = _AnyEvent(pipe._cancel, cancel)
            block = None
            if chat is not None and chat.block is not None:
                block, modality, meta = chat.block, chat.modality, chat.meta
                timings.update(preprocess_s=0.0, encode_s=0.0)
            elif embeddings is not None:
                from .inputs import select_input

                select_input(inputs, embeddings=True)  # refuses an input file alongside the block
                block, modality = _check_embeddings(embeddings, pipe.manifest, modality)
                meta = {"source": "embeddings"}
                timings.update(preprocess_s=0.0, encode_s=0.0)
            else:
                m, source, image = pipe._pick_input(inputs)
                if m is not None:
                    modality = m
                    block, meta = pipe.encode(m, source, image=image, options=options, timings=timings)
                else:
                    timings.update(preprocess_s=0.0, encode_s=0.0)
            if chat is not None and chat.block is None and block is not None:
                chat.block, chat.modality, chat.meta = np.array(block, copy=True), modality, meta
                block = chat.block
            ids = pipe.prompt_ids(conv)
            session = chat.session() if chat is not None else pipe.decoder.session()
            prefilled_before = session.tokens_prefilled + session.rows_injected
            t0 = time.perf_counter()
            session.prefill(ids, block, cancel=stop_event)
            t1 = time.perf_counter()
            timings["prefill_s"] = t1 - t0
            timings["prefill_positions"] = session.tokens_prefilled + session.rows_injected - prefilled_before
            sampling = sampling or Sampling()
            first = None
            n0 = session.tokens_generated
            for chunk in session.generate(sampling, cancel=stop_event, stop=tuple(pipe.manifest["prompt"]["stop"]),
                                          logprobs=self.logprobs):
                if first is None:
                    first = time.perf_counter()
                yield chunk
            t2 = time.perf_counter()
            gen = session.last
            n_new = session.tokens_generated - n0
            if first is None:
                first = t2
            timings["first_token_s"] = first - t_start
            timings["decode_s"] = t2 - t1
            timings["decode_tokens"] = n_new
            timings["decode_tokens_per_s"] = n_new / (t2 - t1) if t2 > t1 else 0.0
            timings["total_s"] = t2 - t_start
            timings["peak_rss_mib"] = peak_rss_mib()
            self.answer = Answer(text=gen.text, modality=modality, token_ids=list(gen.tokens),
                                 stop_reason=gen.stop_reason, timings=timings, inputs=meta,
                                 logprobs=gen.logprobs)
            if chat is not None:
                conv.set_answer(gen.text)


class ChatSession:
    """A conversation about one input that keeps its encoder block and KV cache."""

    def __init__(self, pipe: Pipeline, *, embeddings, modality, options, inputs) -> None:
        self.pipe = pipe
        self.conversation = Conversation()
        self.block: np.ndarray | None = None
        self.modality = modality
        self.meta: dict[str, Any] = {}
        self._embeddings, self._options, self._inputs = embeddings, options, inputs
        self._session = None
        self.turns = 0

    def prepare(self) -> dict[str, Any]:
        """Read and encode the conversation's input now (otherwise the first question does)."""
        if self.block is None and self.turns == 0:
            pipe = self.pipe
            with pipe._lock:
                if self._embeddings is not None:
                    block, self.modality = _check_embeddings(self._embeddings, pipe.manifest, self.modality)
                    self.block = block.copy()
                    self.meta = {"source": "embeddings"}
                else:
                    m, source, image = pipe._pick_input(self._inputs)
                    if m is not None:
                        block, self.meta = pipe.encode(m, source, image=image, options=self._options)
                        self.block, self.modality = np.array(block, copy=True), m
        return self.meta

    def session(self):
        dec = self.pipe.decoder
        if self._session is None or dec._owner is not self._session:
            if self._session is not None:
                log.info("chat: KV cache was used by another request; re-prefilling the conversation")
            self._session = dec.session()
        return self._session

    @property
    def decoder_session(self):
        return self._session

    def ask(self, question: str, *, stream: bool = False, sampling=None, cancel: threading.Event | None = None):
        """One turn; returns an iterator of chunks (stream=True) or the `Answer`."""
        self.conversation.add_question(question)
        first = self.turns == 0
        self.turns += 1
        gen = _AnswerStream(
            self.pipe, self.conversation,
            self._embeddings if first else None, self.modality, self._options, sampling, cancel,
            self._inputs if first else {}, self,
        )
        if stream:
            return gen
        for _ in gen:
            pass
        return gen.answer


def _check_reader_constants(manifest: dict[str, Any]) -> None:
    """Warn when this onellm's readers differ from those the bundle was exported for."""
    from .modalities.base import reader_constants

    for m, entry in manifest.get("preprocessing", {}).items():
        want = entry.get("constants") or {}
        have = reader_constants(m)
        diff = sorted(k for k in want if k in have and not np.allclose(np.asarray(want[k]), np.asarray(have[k])))
        if diff:
            log.warning("%s: the bundle was exported with different %s preprocessing constants (%s); "
                        "re-export it with this onellm version", manifest.get("_dir"), m, ", ".join(diff))


class _AnyEvent:
    """An event that is set when any of its parts is (cancellation from several sources)."""

    def __init__(self, *events: threading.Event | None) -> None:
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _check_embeddings(block: Any, manifest: dict[str, Any], modality: str | None = None) -> tuple[np.ndarray, str]:
    """(float32 block, its modality) from an array or an embeddings file path (runtime/embeddings.py)."""
    from .embeddings import check_embeddings, load_embeddings

    meta = None
    if isinstance(block, (str, os.PathLike)):
        block, meta = load_embeddings(block)
    return check_embeddings(block, manifest, modality=modality, meta=meta)
