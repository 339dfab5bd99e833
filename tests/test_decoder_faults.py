"""Transactional decoder state: an interruption at any step boundary leaves a usable session.

Faults are injected by monkeypatching llama.cpp's native `llama_decode` (and the sampler
call) to fail on its k-th call, for every k a clean turn makes:

- "interrupt": the native call finishes, then KeyboardInterrupt (Ctrl-C lands right
  after the C call returned, before our bookkeeping ran: the cache holds a batch the
  bookkeeping does not);
- "error": the native call writes the batch, then reports failure (a llama.cpp error
  that leaves part of a batch in the cache);
- "before": an exception before anything was decoded;
- "cancel": the request's cancel event is set during the call (chat only: the request
  ends with stop_reason "cancelled"; a turn with no answer text is dropped, a partial
  answer is kept as the user saw it).

After each fault the next turn must work, llama.cpp's cache must hold exactly the
positions the bookkeeping lists, the history text must be well formed (no open turn
left, never `###Assistant:Human:`), and the answer must equal a fresh prefill of the
kept history. The matrix of (interrupt point x outcome) is printed by the last test.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from onellm.runtime import _llama
from onellm.runtime.decoder import Decoder, Sampling
from onellm.runtime.errors import BackendError
from onellm.runtime.prompt import Conversation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
Q1, Q2 = "What is the person doing?", "Is it fast?"
N_NEW = 6  # greedy tokens per turn

MATRIX: dict[str, list[str]] = {}  # interrupt point -> outcomes, printed by test_print_fault_matrix


class Fault(Exception):
    """The injected exception of mode 'before'."""


class _Injector:
    """Wraps a native llama.cpp function: fails on its k-th call (counting from arming)."""

    def __init__(self, monkeypatch, name: str) -> None:
        self.name = name
        self.real = getattr(_llama.lib(), name)
        self.calls = 0
        self.fail_at: int | None = None
        self.mode = "interrupt"
        self.event = threading.Event()  # set by mode "cancel"
        monkeypatch.setattr(_llama.lib(), name, self)

    def arm(self, k: int | None, mode: str = "interrupt") -> None:
        self.calls, self.fail_at, self.mode = 0, k, mode
        self.event.clear()

    def __call__(self, *args):
        self.calls += 1
        if self.calls != self.fail_at:
            return self.real(*args)
        self.fail_at = None
        if self.mode == "before":
            raise Fault(f"injected before {self.name} call {self.calls}")
        out = self.real(*args)
        if self.mode == "cancel":  # e.g. a Stop button pressed while llama.cpp works
            self.event.set()
            return out
        if self.mode == "interrupt":
            raise KeyboardInterrupt
        return -3  # "error": llama.cpp reports a failure after writing the batch


def _phase(name: str, turn: int, k: int) -> str:
    """What the k-th native call of a clean turn does (turn 1: BOS, rows, text; turn 2: the new text)."""
    if name == "llama_sampler_sample":
        return f"draw of token {k}"
    prefill = ("BOS", "32 rows", "prompt text") if turn == 1 else ("new turn's text",)
    return f"prefill {prefill[k - 1]}" if k <= len(prefill) else f"decode of token {k - len(prefill)}"


def _greedy(n: int = N_NEW) -> Sampling:
    return Sampling.greedy(n)


@pytest.fixture(scope="module")
def block(tiny_pipeline):
    b, _ = tiny_pipeline.encode("imu", str(EXAMPLES / "imu" / "walk.csv"))
    return np.array(b, copy=True)


def _fresh_tokens(pipe, conv: Conversation, block, n: int = N_NEW) -> list[int]:
    """Greedy tokens of a brand-new session prefilled with the whole of `conv`."""
    s = pipe.decoder.session()
    s.prefill(pipe.prompt_ids(conv), block)
    return list(s.generate_text(_greedy(n)).tokens)


def _check_consistent(chat) -> None:
    for kept, held in chat.pipe.engine.cache_positions():  # llama.cpp holds what the engine lists
        assert kept == held, (kept, held)
    text = chat.conversation.render()
    assert not chat.conversation.has_open_turn
    assert "Assistant:Human" not in text and "Assistant:###" not in text
    assert len(chat.conversation.messages) == 2 * chat.turns


def _clean_calls(pipe, block, name: str) -> tuple[int, int]:
    """Native calls of `name` made by turn 1 and turn 2 of a clean chat."""
    counts = []
    real = getattr(_llama.lib(), name)
    n = {"calls": 0}

    def counting(*args):
        n["calls"] += 1
        return real(*args)

    mp = pytest.MonkeyPatch()
    mp.setattr(_llama.lib(), name, counting)
    try:
        pipe.engine.clear_cache()  # turn 1 prefills BOS, rows and text, not a cached prefix
        chat = pipe.chat(embeddings=block, modality="imu")
        for q in (Q1, Q2):
            n["calls"] = 0
            chat.ask(q, sampling=_greedy())
            counts.append(n["calls"])
    finally:
        mp.undo()
    return counts[0], counts[1]


@pytest.mark.parametrize("name,modes", [("llama_decode", ("interrupt", "error", "before", "cancel")),
                                        ("llama_sampler_sample", ("interrupt", "before", "cancel"))])
def test_chat_survives_a_fault_at_every_native_call(exact_pipe, block, monkeypatch, name, modes):
    pipe = exact_pipe
    clean = pipe.chat(embeddings=block, modality="imu")
    want1 = clean.ask(Q1, sampling=_greedy())
    want2 = clean.ask(Q2, sampling=_greedy())
    n1, n2 = _clean_calls(pipe, block, name)
    assert n1 >= (3 if name == "llama_decode" else 1) and n2 >= 1
    inj = _Injector(monkeypatch, name)
    expected = {"interrupt": KeyboardInterrupt, "error": BackendError, "before": Fault}
    for mode in modes:
        for turn, n_calls in ((1, n1), (2, n2)):
            for k in range(1, n_calls + 1):
                point = f"turn {turn}, {name} #{k} = {_phase(name, turn, k)} ({mode})"
                pipe.engine.clear_cache()
                chat = pipe.chat(embeddings=block, modality="imu")
                if turn == 2:
                    chat.ask(Q1, sampling=_greedy())
                inj.arm(k, mode)
                outcome = "turn rolled back"
                if mode == "cancel":
                    cancelled = chat.ask(Q1 if turn == 1 else Q2, sampling=_greedy(), cancel=inj.event)
                    if k == n_calls:  # during the last token's call: the answer was already complete
                        assert cancelled.stop_reason == "max_new_tokens", point
                        assert cancelled.token_ids == (want1 if turn == 1 else want2).token_ids, point
                    else:
                        assert cancelled.stop_reason == "cancelled", point
                    kept = bool(cancelled.text)
                    outcome = ("answer complete" if k == n_calls else
                               "partial answer kept" if kept else "unanswered turn dropped")
                    assert chat.turns == turn - (0 if kept else 1), point
                else:
                    with pytest.raises(expected[mode]):
                        chat.ask(Q1 if turn == 1 else Q2, sampling=_greedy())
                    assert chat.turns == turn - 1, point
                    kept = False
                inj.arm(None)
                _check_consistent(chat)
                # the next turn works and equals a fresh prefill of the kept history
                again = chat.ask(Q1 if turn == 1 else Q2, sampling=_greedy())
                _check_consistent(chat)
                conv = Conversation(chat.conversation.spec, list(chat.conversation.messages[:-1]) + [("Assistant", None)])
                assert again.token_ids == _fresh_tokens(pipe, conv, block), point
                if not kept:
                    assert again.token_ids == (want1 if turn == 1 else want2).token_ids, point
                MATRIX[point] = [cancelled.stop_reason if mode == "cancel" else f"raised {expected[mode].__name__}", outcome,
                                 "cache == bookkeeping", "next turn == fresh prefill"]


def test_decoder_session_survives_a_fault_at_every_decode_call(tiny_gguf, tok_ids, monkeypatch):
    """The Session alone (n_batch 32: a prefill of many chunks): every decode boundary of prefill and generate."""
    ids, rows = tok_ids
    # f32 KV cache, no flash attention: a re-prefill split differently is bit-identical
    with Decoder(tiny_gguf("f32"), n_ctx=256, n_batch=32, kv_type="f32", flash_attn=False) as dec:
        s = dec.session()
        s.prefill(ids, rows)
        want = s.generate_text(_greedy(8), stop=()).tokens
        inj = _Injector(monkeypatch, "llama_decode")
        inj.arm(None)
        s = dec.session()
        s.prefill(ids, rows)
        s.generate_text(_greedy(8), stop=())
        n_calls = inj.calls
        # one embedding batch per 32 positions (BOS, the 32 rows, the text), then 7 generated: a
        # fault between chunks leaves the cache mid-block or mid-text, and the retry resumes there
        assert n_calls >= 3 + 7, n_calls
        for mode, exc in (("interrupt", KeyboardInterrupt), ("error", BackendError), ("before", Fault)):
            for k in range(1, n_calls + 1):
                s = dec.session()
                inj.arm(k, mode)
                with pytest.raises(exc):
                    s.prefill(ids, rows)
                    s.generate_text(_greedy(8), stop=())
                inj.arm(None)
                assert s.cached_positions() == s.n_past, (mode, k)
                assert not s.busy
                s.prefill(ids, rows)  # keeps what survived, prefills the rest
                assert s.generate_text(_greedy(8), stop=()).tokens == want, (mode, k)
                MATRIX[f"Session llama_decode #{k} ({mode})"] = ["cache == bookkeeping", "retry == clean run"]


@pytest.fixture(scope="module")
def tok_ids(tiny_tokenizer):
    from onellm.runtime.prompt import render_prompt
    from onellm.runtime.tokenizer import Tokenizer

    ids = Tokenizer(tiny_tokenizer).encode(render_prompt("Describe the scene in a few words."))
    rows = np.ascontiguousarray(np.random.default_rng(3).standard_normal((32, 128)).astype(np.float32))
    return ids, rows


def test_stale_cache_positions_are_trimmed_before_the_next_prefill(tiny_gguf, tok_ids):
    """A second Ctrl-C inside the rollback itself: the next prefill still trims to the bookkeeping."""
    ids, rows = tok_ids
    with Decoder(tiny_gguf("f32"), n_ctx=256) as dec:
        s = dec.session()
        s.prefill(ids, rows)
        want = s.generate_text(_greedy(5), stop=()).tokens
        s = dec.session()
        s.prefill(ids, rows)
        del s._items[-7:]  # the cache now holds 7 positions the bookkeeping lost
        assert s.cached_positions() == s.n_past + 7
        s.prefill(ids, rows)
        assert s.cached_positions() == s.n_past == len(ids) + 32
        assert s.generate_text(_greedy(5), stop=()).tokens == want


@pytest.mark.parametrize("how", ["close", "consumer_error", "throw_interrupt", "cancel"])
@pytest.mark.parametrize("after", [0, 1, 3])
def test_chat_turn_stopped_by_its_consumer(exact_pipe, block, how, after, monkeypatch):
    """The consumer stops the stream after `after` chunks (0: before the first): close(), an
    exception in its loop (then the `with` closes it), KeyboardInterrupt thrown in at the
    yield, or cancel(). Every token's text is its own chunk here: with the pipeline's 4 ms
    flush how many chunks the tiny model's 60 tokens make depends on the machine's speed, and
    the stream sometimes ended (max_new_tokens) before the consumer's third."""
    from onellm.runtime import pipeline

    monkeypatch.setattr(pipeline, "STREAM_FLUSH_S", 0.0)
    pipe = exact_pipe
    chat = pipe.chat(embeddings=block, modality="imu")
    first = chat.ask(Q1, sampling=_greedy())
    stream = chat.ask(Q2, stream=True, sampling=Sampling(temperature=0.8, top_p=1.0, seed=3, max_new_tokens=60))
    got: list[str] = []
    outcome = "ok"

    def act():
        if how == "close":
            stream.close()
        elif how == "consumer_error":
            raise Fault("the consumer failed")
        elif how == "throw_interrupt":
            stream._it.throw(KeyboardInterrupt)
        else:
            stream.cancel()

    try:
        with stream:
            if after == 0:
                act()
            for chunk in stream:
                got.append(chunk)
                if len(got) >= after:
                    act()
    except (Fault, KeyboardInterrupt) as exc:
        outcome = f"raised {type(exc).__name__}"
    _check_consistent(chat)
    if how == "cancel":
        assert stream.answer.stop_reason == "cancelled"
        kept = stream.answer.text
        assert "".join(got) == kept
        # a cancelled answer keeps what the user saw; with nothing seen, the turn never happened
        assert chat.turns == (2 if kept else 1)
        if kept:
            assert chat.conversation.messages[-1] == ("Assistant", kept)
    else:
        assert stream.answer is None and chat.turns == 1
        assert chat.conversation.messages == [("Human", Q1), ("Assistant", first.text)]
    nxt = chat.ask("And now?", sampling=_greedy())
    conv = Conversation(chat.conversation.spec, list(chat.conversation.messages[:-1]) + [("Assistant", None)])
    assert nxt.token_ids == _fresh_tokens(pipe, conv, block)
    _check_consistent(chat)
    MATRIX[f"consumer {how} after {after} chunks"] = [outcome, f"turns kept {chat.turns - 1}",
                                                      "cache == bookkeeping", "next turn == fresh prefill"]


def test_print_fault_matrix():
    """Prints the fault-injection matrix collected above (run with -s to see it)."""
    if not MATRIX:
        pytest.skip("needs the fault tests in the same run")
    width = max(len(k) for k in MATRIX)
    lines = [f"{k:<{width}}  {' | '.join(v)}" for k, v in MATRIX.items()]
    print("\nfault-injection matrix (interrupt point x outcome):\n" + "\n".join(lines))
    assert len(MATRIX) >= 20
