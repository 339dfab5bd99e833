"""The GGUF decoder run by llama.cpp, with the encoder's rows injected after BOS (no torch).

In:  a GGUF written by `onellm.export.gguf`, token ids of a `v1` prompt (BOS first) and
     the encoder's [32, n_embd] float32 block.
Out: logits, or a stream of answer text.

Prefill order (spec section 1): BOS, then the 32 rows, then the prompt tokens after BOS,
at contiguous positions 0, 1, ... From an empty cache the whole prompt goes through
`llama_batch.embd` in one batch (per n_batch positions): BOS's and the text's rows are
read from the GGUF and converted by ggml's own dequantizer (`EmbeddingRows`), since a
batch holds ids or embeddings, not both, and three graphs (BOS, rows, text) cost a pass
over the weights each. Where the file's type has no converter, or part of the prompt is
already cached, BOS and text go as tokens and the rows by pointer (the batch's `embd`
field points at the caller's contiguous float32 array; llama.cpp copies them once into
its own ubatch buffer inside llama_decode).

A `Session` keeps the KV cache across turns. Each turn passes its whole sequence (the
conversation so far, re-rendered); the session keeps the longest prefix it has already
cached, drops the rest with `llama_memory_seq_rm`, and prefills only the new part.

Sampling runs in llama.cpp's sampler chain (penalties -> top-k -> temperature -> top-p
-> draw, or greedy when temperature is 0): it reads the logits in place inside the
context, so a decode step copies no vocabulary-sized array into Python. Generation stops
at EOS, at a stop string (`###`, possibly split across tokens), at max_new_tokens, at a
full context, or when a `threading.Event` is set (checked between tokens).

The session's bookkeeping (`_items`, one entry per cached position) is the truth about
the KV cache: whatever interrupts a prefill or a generation (KeyboardInterrupt, an
exception thrown into or raised by the consumer of the stream, a llama.cpp error, the
stream being closed), the cache is trimmed back to the bookkeeping (llama_memory_seq_rm)
before the exception leaves, and every prefill first checks that the cache holds no
position beyond the bookkeeping (a second Ctrl-C may land inside the rollback itself).
A session runs one request at a time: while a `generate()` stream is open, a second
`prefill`/`generate` on it, or a new `Decoder.session()` taking over its cache, raises.

Requests (`Pipeline`, `onellm serve`) run on `runtime/engine.py`, which takes `Sampling`,
the text stream and the GGUF check from here; `Decoder`/`Session` remain the one-sequence
low-level API (benchmarks, the export's validation, `Pipeline.decoder` for logits).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _llama
from .env import EXTRA_BUFTS, env_flag
from .errors import BackendError, BundleError, ConfigError, InputError
from .prompt import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, STOP_STRINGS

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# `with capture_native_log() as lines:` collects llama.cpp's log lines emitted inside the block
# (the bench reads how llama.cpp resolved flash attention from them)
capture_native_log = _llama.capture_native_log
# llama.cpp's quantizer (export writes the quantized GGUFs with it)
quantize_model = _llama.quantize_model
# the low-level wrappers, for measurements of llama.cpp alone (benchmarks/serve_bench.py)
LlamaModel, LlamaContext, LlamaBatch = _llama.LlamaModel, _llama.LlamaContext, _llama.LlamaBatch

def context_settings_for(quant: str) -> dict[str, Any]:
    """`Decoder` keyword arguments (kv_type, flash_attn) for a GGUF of this type, from the quant
    registry (`DecoderQuant.context_settings`); {} = llama.cpp's defaults, also for unknown types."""
    from .registry import DECODER_QUANTS

    q = DECODER_QUANTS.get(quant)
    return q.context_settings() if q is not None else {}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (defaults: the release demo's)."""

    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy (argmax)
    top_p: float = DEFAULT_TOP_P  # nucleus mass kept; 1 = off
    top_k: int = 0  # keep the k most likely first; 0 = off
    repeat_penalty: float = 1.0  # llama.cpp repeat penalty; 1 = off
    repeat_last_n: int = 64  # tokens the penalty looks back over
    seed: int = 0  # seed of the draw
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def greedy(cls, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Sampling:
        return cls(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


@dataclasses.dataclass
class Generation:
    """What one `Session.generate` produced."""

    text: str = ""  # the answer: cut at the first stop string, stripped
    tokens: list[int] = dataclasses.field(default_factory=list)  # sampled ids (the stop/EOS token included)
    # "stop_string" | "eos" | "max_new_tokens" | "context_full" | "cancelled", or, for a stream
    # that did not end normally, "closed" (closed by its consumer) | "interrupted" (an exception)
    stop_reason: str = ""
    seconds: float = 0.0
    # with generate(logprobs=K): per sampled token, the K most likely (id, log-probability)
    logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def check_gguf_file(path: str | os.PathLike) -> Path:
    """The path of a readable GGUF file, or a one-line BundleError."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: GGUF decoder file not found")
    if not path.is_file():
        raise BundleError(f"{path}: expected a GGUF decoder file, found a directory or special file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise BundleError(f"{path}: GGUF decoder file is unreadable ({exc.strerror})") from None
    if head != GGUF_MAGIC:
        found = "an empty file" if not head else f"bytes {head!r}"
        raise BundleError(f"{path}: expected a GGUF file (magic b'GGUF'), found {found}")
    return path


def prompt_rows(model: _llama.LlamaModel, ids: Sequence[int], block: np.ndarray, n_text: int | None = None) -> np.ndarray | None:
    """A new conversation's prompt as one float32 array of embedding rows: BOS's, the block's,
    then the first `n_text` text tokens' (default all), the tokens' rows read from the GGUF
    (`LlamaModel.embedding_rows`). None where the file gives no rows: the prompt then goes as tokens."""
    reader = model.embedding_rows()
    if reader is None:
        return None
    n_rows = block.shape[0]
    n_text = len(ids) - 1 if n_text is None else n_text
    rows = np.empty((1 + n_rows + n_text, block.shape[1]), dtype=np.float32)
    try:
        reader.rows(ids[:1], out=rows[:1])
        reader.rows(ids[1:1 + n_text], out=rows[1 + n_rows:])
    except (OSError, BackendError, ValueError) as exc:
        log.warning("%s: prompt rows unreadable (%s); the prompt goes as tokens", model.path, exc)
        return None
    rows[1:1 + n_rows] = block
    return rows


class _TextStream:
    """Bytes of sampled tokens -> answer text, released only when it cannot change.

    Multi-byte UTF-8 characters split across tokens are held by an incremental decoder;
    text that could be the start of a stop string is held until it is not; whitespace
    is held until followed by text, and leading whitespace is dropped, so the chunks
    concatenate to exactly `cut_answer(full text)[0]`.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.raw = ""  # everything decoded so far
        self.sent = 0  # characters of the stripped answer already released
        self.stopped = False
        self._scan_from = 0

    def _visible(self, upto: int) -> str:
        return self.raw[:upto].strip()

    def _release(self, upto: int) -> str:
        text = self._visible(upto)
        if len(text) <= self.sent:
            return ""
        chunk, self.sent = text[self.sent:], len(text)
        return chunk

    def feed(self, piece: bytes) -> str:
        if self.stopped:  # everything after a stop string is dropped
            return ""
        self.raw += self.utf8.decode(piece)
        return self._advance()

    def _advance(self) -> str:
        for stop in self.stops:
            idx = self.raw.find(stop, max(0, self._scan_from - len(stop) + 1))
            if idx >= 0:
                self.stopped = True
                self.raw = self.raw[:idx]
                return self._release(len(self.raw))
        self._scan_from = len(self.raw)
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.raw)), 0, -1):
                if self.raw.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return self._release(len(self.raw) - hold)

    def finish(self) -> str:
        """Flush at the end of generation (EOS, length, cancel): release everything left."""
        if not self.stopped:
            self.raw += self.utf8.decode(b"", final=True)
            out = self._advance()
            if self.stopped:
                return out
            return out + self._release(len(self.raw))
        return ""

    @property
    def text(self) -> str:
        return self.raw.strip()


class Session:
    """A conversation's KV cache in one llama.cpp context.

    Counters: `tokens_prefilled` (token ids fed by prefill), `rows_injected` (embedding
    rows fed), `decode_calls` (llama_decode calls), `tokens_generated`, `tokens_reused`
    (positions kept from an earlier turn).
    """

    def __init__(self, decoder: Decoder) -> None:
        self._dec = decoder
        self._items: list = []  # what each cached position holds: a token id or (block digest, row)
        self.tokens_prefilled = 0
        self.rows_injected = 0
        self.decode_calls = 0
        self.tokens_generated = 0
        self.tokens_reused = 0
        self.last: Generation | None = None
        self._have_logits = False
        self._busy = False  # a generate() stream is open

    @property
    def busy(self) -> bool:
        """True while a `generate()` stream of this session is open (started, not finished or closed)."""
        return self._busy

    def _check_idle(self, what: str) -> None:
        if self._busy:
            raise BackendError(
                f"{what}: this session's generate() stream is still open; exhaust it or close it "
                "(stream.close()) before the next request"
            )

    def cached_positions(self) -> int:
        """Positions llama.cpp holds for this session (largest cached position + 1)."""
        return self._ctx().memory_pos_max() + 1

    def _restore(self, ctx: _llama.LlamaContext) -> None:
        """Trim the KV cache back to the bookkeeping after an interruption (never raises BackendError)."""
        self._have_logits = False
        try:
            ctx.memory_truncate(self.n_past)
        except BackendError:  # cannot trim: start again from an empty cache
            log.warning("could not trim the KV cache to %d positions; clearing it", self.n_past)
            self._items.clear()
            ctx.memory_clear()

    def _heal(self, ctx: _llama.LlamaContext) -> None:
        """Make the cache agree with the bookkeeping before new positions go in."""
        held = ctx.memory_pos_max() + 1
        if held == self.n_past:
            return
        log.info("KV cache holds %d positions, bookkeeping %d: trimming to the bookkeeping", held, self.n_past)
        if held < self.n_past:  # positions were lost: keep only what both agree on
            del self._items[max(held, 0):]
        self._restore(ctx)

    @property
    def n_past(self) -> int:
        """Positions held in the KV cache."""
        return len(self._items)

    # -------------------------------------------------------------- prefill

    def _ctx(self) -> _llama.LlamaContext:
        return self._dec._context_for(self)

    def _decode_tokens(self, ids: Sequence[int], logits: str) -> np.ndarray | None:
        ctx, batch = self._ctx(), self._dec._batch
        out = []
        step = ctx.n_batch
        for s in range(0, len(ids), step):
            chunk = ids[s:s + step]
            last_chunk = s + step >= len(ids)
            want = logits if (logits == "all" or last_chunk) else "none"
            ctx.decode(batch.tokens(chunk, self.n_past, want))
            self._items.extend(int(t) for t in chunk)
            self.decode_calls += 1
            self.tokens_prefilled += len(chunk)
            if want == "all":
                out.append(ctx.logits_all(len(chunk)))
            elif want == "last":
                out.append(ctx.logits_ith(-1)[None])
        if logits == "all":
            return np.concatenate(out)
        return out[-1] if out else None

    def _decode_block(self, block: np.ndarray, digest: str, logits: str, r0: int = 0) -> np.ndarray | None:
        """Decode `block` (the input's rows r0.., as a C-contiguous slice) at the next positions."""
        ctx, batch = self._ctx(), self._dec._batch
        n_rows = block.shape[0]
        if n_rows > ctx.n_batch:
            raise InputError("embedding block", f"at most {ctx.n_batch} rows (n_batch)", f"{n_rows}")
        ctx.decode(batch.embd_view(block, self.n_past, logits))
        self._items.extend((digest, r0 + r) for r in range(n_rows))
        self.decode_calls += 1
        self.rows_injected += n_rows
        if logits == "all":
            return ctx.logits_all(n_rows)
        if logits == "last":
            return ctx.logits_ith(-1)[None]
        return None

    def _decode_as_rows(self, target: list, rows: np.ndarray, logits: str,
                        cancel: threading.Event | None) -> np.ndarray | None | bool:
        """Decode `target` (BOS, the block's rows, text) from an empty cache from `rows`, its
        embedding rows (`prompt_rows`): one graph per n_batch positions. False if cancelled."""
        ctx, batch = self._ctx(), self._dec._batch
        out = []
        step = ctx.n_batch
        for c0 in range(0, len(target), step):
            if c0 and cancel is not None and cancel.is_set():
                return False
            items = target[c0:c0 + step]
            last = c0 + step >= len(target)
            want = logits if (logits == "all" or last) else "none"
            ctx.decode(batch.embd_view(rows[c0:c0 + len(items)], self.n_past, want))
            self._items.extend(items)
            self.decode_calls += 1
            n_tok = sum(isinstance(x, int) for x in items)
            self.tokens_prefilled += n_tok
            self.rows_injected += len(items) - n_tok
            if want == "all":
                out.append(ctx.logits_all(len(items)))
            elif want == "last":
                out.append(ctx.logits_ith(-1)[None])
        if logits == "all":
            return np.concatenate(out)
        return out[-1] if out else None

    def _check_block(self, block: np.ndarray | None) -> np.ndarray | None:
        if block is None:
            return None
        n_embd = self._dec.n_embd
        if not isinstance(block, np.ndarray) or block.ndim != 2 or block.shape[1] != n_embd:
            found = f"shape {list(block.shape)}" if isinstance(block, np.ndarray) else type(block).__name__
            raise InputError("embedding block", f"a float32 array [rows, {n_embd}]", found)
        if block.dtype != np.float32 or not block.flags.c_contiguous:
            raise InputError(
                "embedding block", "a C-contiguous float32 array (passed by pointer, never copied)",
                f"{block.dtype}{'' if block.flags.c_contiguous else ', non-contiguous'}",
            )
        if not np.isfinite(block).all():
            raise InputError("embedding block", "finite values", "NaN or inf")
        return block

    def prefill(
        self,
        tokens: Sequence[int],
        block: np.ndarray | None = None,
        *,
        logits: str = "last",
        cancel: threading.Event | None = None,
    ) -> np.ndarray | None:
        """Bring the cache to `[tokens[0], block rows, tokens[1:]]`, prefilling only what is new.

        `tokens` is the whole sequence of this turn, BOS first (the conversation so far,
        re-rendered); `block` the encoder rows ([rows, n_embd] float32, C-contiguous),
        inserted right after BOS, or None for a text-only prompt. Positions already
        cached from an earlier turn with the same content are reused.
        `logits`: "last" returns [1, n_vocab] for the last position, "all" every
        position [len, n_vocab] (forces a full prefill), "none" returns None.
        `cancel`: checked between llama_decode calls; when set, returns None with the
        cache holding what was decoded so far (generate() then refuses to run).
        """
        self._check_idle("prefill()")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise InputError("prompt", "at least one token (BOS)", "no tokens")
        n_vocab = self._dec.n_vocab
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise InputError("prompt", f"token ids in [0, {n_vocab})", f"{bad[0]}")
        block = self._check_block(block)
        digest = hashlib.blake2b(block.tobytes(), digest_size=16).hexdigest() if block is not None else None
        n_rows = 0 if block is None else block.shape[0]
        target: list = [tokens[0]] + [(digest, r) for r in range(n_rows)] + tokens[1:]
        n_ctx = self._dec.n_ctx
        if len(target) > n_ctx:
            raise InputError("prompt", f"at most {n_ctx} positions (n_ctx)", f"{len(target)} (tokens plus {n_rows} rows)")

        keep = 0
        if logits != "all":
            limit = min(len(self._items), len(target))
            while keep < limit and self._items[keep] == target[keep]:
                keep += 1
            keep = min(keep, len(target) - 1)  # the last position is decoded again for its logits
        ctx = self._ctx()
        self._have_logits = False
        self._heal(ctx)
        keep = min(keep, self.n_past)
        if keep < len(self._items):
            del self._items[keep:]
            self._restore(ctx)
        self.tokens_reused += keep

        pieces = []
        # segments of target[keep:]: tokens before the block, the block, tokens after
        segments: list[tuple[str, object]] = []
        if not n_rows:  # text only: BOS goes with the rest (a graph of its own costs a full pass over the weights)
            segments.append(("tok", tokens[keep:]))
        else:
            rows = prompt_rows(self._dec._model, tokens, block) if keep == 0 else None
            if rows is not None:  # the whole prompt as embedding rows: BOS, block, text in one graph
                segments.append(("rows", rows))
            else:
                if keep == 0:
                    segments.append(("tok", [tokens[0]]))
                r0 = max(0, keep - 1)
                if r0 < n_rows:
                    segments.append(("blk", r0))
                t0 = max(1, keep - n_rows)
                if t0 < len(tokens):
                    segments.append(("tok", tokens[t0:]))
        try:
            for i, (kind, what) in enumerate(segments):
                if cancel is not None and cancel.is_set():
                    log.info("prefill cancelled after %d of %d positions", self.n_past, len(target))
                    return None
                want = logits if (logits == "all" or i == len(segments) - 1) else "none"
                if kind == "tok":
                    out = self._decode_tokens(what, want)
                elif kind == "rows":
                    out = self._decode_as_rows(target, what, want, cancel)
                    if out is False:
                        log.info("prefill cancelled after %d of %d positions", self.n_past, len(target))
                        return None
                else:
                    rows = block if what == 0 else block[what:]  # a row slice stays C-contiguous
                    out = self._decode_block(rows, digest, want, r0=what)
                if out is not None:
                    pieces.append(out)
        except BaseException:
            # KeyboardInterrupt after a decode returned but before its bookkeeping, or an
            # aborted/fatal decode that left part of a batch: drop what the bookkeeping lacks
            self._restore(ctx)
            raise
        self._have_logits = logits in ("last", "all")
        assert self._items == target
        if logits == "all":
            return np.concatenate(pieces)
        if logits == "last":
            return pieces[-1] if pieces else None
        return None

    def reset(self) -> None:
        """Forget the cached conversation."""
        self._check_idle("reset()")
        self._ctx().memory_clear()
        self._items.clear()
        self._have_logits = False

    # -------------------------------------------------------------- generation

    def generate(
        self,
        sampling: Sampling | None = None,
        *,
        cancel: threading.Event | None = None,
        stop: Sequence[str] = STOP_STRINGS,
        logprobs: int = 0,
    ) -> Iterator[str]:
        """Stream answer text after a `prefill`; `self.last` holds the `Generation` when done.

        Chunks concatenate to the stripped answer cut at the first stop string. Each
        sampled token except the final EOS/stop one is decoded into the cache.
        """
        sampling = sampling or Sampling()
        self._check_idle("generate()")
        if cancel is not None and cancel.is_set():  # e.g. the prefill was cancelled
            self.last = Generation(stop_reason="cancelled")
            return
        if not self._have_logits:
            raise BackendError("generate() needs a prefill() first (no logits to sample from)")
        dec = self._dec
        ctx, batch = self._ctx(), dec._batch
        self._busy = True
        try:
            yield from self._generate(ctx, batch, sampling, cancel, stop, logprobs)
        finally:
            self._busy = False

    def _generate(self, ctx, batch, sampling: Sampling, cancel, stop: Sequence[str], logprobs: int) -> Iterator[str]:
        dec = self._dec
        model = dec._model
        result = Generation()
        self.last = result
        stream = _TextStream(stop)
        t_start = time.perf_counter()
        with _llama.LlamaSampler(
            dec.n_vocab, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            repeat_penalty=sampling.repeat_penalty, repeat_last_n=sampling.repeat_last_n, seed=sampling.seed,
        ) as sampler:
            if sampling.repeat_penalty != 1.0:
                for item in self._items[-sampling.repeat_last_n:]:
                    if isinstance(item, int):
                        sampler.accept(item)
            self._have_logits = False
            reason = "max_new_tokens"
            try:
                for _ in range(sampling.max_new_tokens):
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
                    if logprobs > 0:
                        result.logprobs = result.logprobs if result.logprobs is not None else []
                        result.logprobs.append(_top_logprobs(ctx.logits_ith(-1), logprobs))
                    tok = sampler.sample(ctx, -1)
                    result.tokens.append(tok)
                    self.tokens_generated += 1
                    if model.is_eog(tok):
                        reason = "eos"
                        break
                    chunk = stream.feed(model.piece(tok))
                    if chunk:
                        yield chunk
                    if stream.stopped:
                        reason = "stop_string"
                        break
                    if self.n_past >= dec.n_ctx:
                        reason = "context_full"
                        break
                    ctx.decode(batch.tokens((tok,), self.n_past, "last"))
                    self._items.append(tok)
                    self.decode_calls += 1
                    self._have_logits = True
                tail = stream.finish()
                if tail:
                    yield tail
            except GeneratorExit:  # the consumer closed the stream: the cache is consistent
                reason = "closed"
                self._restore(ctx)
                raise
            except BaseException:
                reason = "interrupted"
                self._restore(ctx)
                raise
            finally:
                result.text = stream.text
                result.stop_reason = "stop_string" if stream.stopped and reason not in ("closed", "interrupted") else reason
                result.seconds = time.perf_counter() - t_start

    def generate_text(self, sampling: Sampling | None = None, **kw) -> Generation:
        """`generate` run to the end; returns the `Generation`."""
        for _ in self.generate(sampling, **kw):
            pass
        assert self.last is not None
        return self.last


def _top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely ids of a logit row with their log-probabilities (log-softmax)."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    k = min(k, x.size)
    idx = np.argpartition(-x, k - 1)[:k]
    idx = idx[np.argsort(-x[idx], kind="stable")]
    return [(int(i), float(x[i] - lse)) for i in idx]


class Decoder(_llama._Owner):
    """A GGUF decoder loaded in llama.cpp, with one context (KV cache) for its sessions.

    Not thread-safe: one thread drives it (another may only set a cancel Event).

    `n_ctx`: context length (default: the GGUF's context_length, i.e. max_seq_len).
    `n_gpu_layers`: default all layers when llama.cpp was built with GPU offload, else 0.
    `use_extra_bufts`: llama.cpp's extra CPU weight buffer types (repacking); off by
    default; the quant registry's policy or ONELLM_LLAMA_EXTRA_BUFTS=1 turns them on. The AMX
    type is never used (quantized models crash on their first decode with it,
    tests/test_llama_bufts.py): on AMX CPUs the weights CPU_REPACK takes go to it by override.
    `kv_type` ("f16", "f32" or "q8_0", which needs flash attention) and `flash_attn` (None:
    llama.cpp's auto): the KV cache and attention kernel; `context_settings_for(quant)`
    gives the ones a GGUF type runs with.
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int | None = None,
        use_extra_bufts: bool | None = None,
        n_batch: int = 512,
        flash_attn: bool | None = None,
        kv_type: str = "f16",
        n_ubatch: int | None = None,
    ) -> None:
        self.path = check_gguf_file(gguf_path)
        if use_extra_bufts is None:
            use_extra_bufts = bool(env_flag(EXTRA_BUFTS))
        self._model = None
        self._ctx = None
        self._batch = None
        self._owner: Session | None = None
        self.kv_type = kv_type  # KV cache element type ("f16", "f32" or "q8_0")
        self.flash_attn = flash_attn  # None: llama.cpp decides (auto)
        self._model = _llama.LlamaModel(self.path, n_gpu_layers=n_gpu_layers, use_extra_bufts=use_extra_bufts)
        try:
            arch = self._model.meta("general.architecture")
            if arch != "llama":
                raise BundleError(f"{self.path}: expected a GGUF of architecture 'llama', found {arch!r}")
            n_train = self._model.n_ctx_train
            n_ctx = n_ctx or n_train
            if n_ctx > n_train:
                raise ConfigError(f"{self.path}: n_ctx {n_ctx} exceeds the model's context length {n_train}")
            self._n_ctx = n_ctx  # llama.cpp pads its cache (to 256 cells); we hold to what was asked
            self._ctx = _llama.LlamaContext(
                self._model, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads, flash_attn=flash_attn,
                kv_type=kv_type, n_ubatch=n_ubatch,
            )
            self._batch = _llama.LlamaBatch(self._ctx.n_batch)
            self._model._build_tables()  # piece/EOG tables now, not inside the first generation
        except BaseException:
            self.close()
            raise
        log.info(
            "loaded %s: n_embd %d, vocab %d, n_ctx %d, %d threads, gpu layers %d, extra bufts %s, "
            "%s KV cache, flash attention %s",
            self.path, self.n_embd, self.n_vocab, self.n_ctx, self._ctx.n_threads,
            self._model.n_gpu_layers, use_extra_bufts, kv_type, "auto" if flash_attn is None else flash_attn,
        )

    # properties
    @property
    def n_embd(self) -> int:
        return self._model.n_embd

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    @property
    def n_ctx(self) -> int:
        """Positions a session may use (BOS, the rows, prompt and generated tokens)."""
        return self._n_ctx

    @property
    def bos_id(self) -> int:
        return self._model.bos

    @property
    def eos_id(self) -> int:
        return self._model.eos

    @property
    def n_threads(self) -> int:
        return self._ctx.n_threads

    def meta(self, key: str) -> str | None:
        return self._model.meta(key)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids with llama.cpp's SentencePiece-compatible tokenizer."""
        return self._model.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Ids -> text like SentencePiece's decode: control tokens dropped, the leading space removed."""
        text = b"".join(self._model.piece(int(t)) for t in ids).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    # sessions
    def session(self) -> Session:
        """A fresh session; it owns the context's KV cache until another session is made."""
        if self._ctx is None:
            raise BackendError(f"{self.path}: decoder is closed")
        if self._owner is not None and self._owner.busy:
            raise BackendError(
                f"{self.path}: the KV cache is in use by an open generate() stream; exhaust it or close it "
                "(stream.close()) before starting another request"
            )
        self._ctx.memory_clear()
        s = Session(self)
        self._owner = s
        return s

    def _context_for(self, session: Session) -> _llama.LlamaContext:
        if self._ctx is None:
            raise BackendError(f"{self.path}: decoder is closed")
        if session is not self._owner:
            raise BackendError("this session's KV cache was taken over by a newer Decoder.session()")
        return self._ctx

    def logits_for(self, block: np.ndarray | None, text_tokens: Sequence[int]) -> np.ndarray:
        """Logits at every position of [BOS, block rows, text tokens] from an empty cache."""
        s = self.session()
        return s.prefill([self.bos_id, *text_tokens], block, logits="all")

    def close(self) -> None:
        self._owner = None
        for name in ("_batch", "_ctx", "_model"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
                setattr(self, name, None)

