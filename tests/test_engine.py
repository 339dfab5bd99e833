"""The request engine on the tiny bundle: answers equal the one-request Pipeline's, concurrent
requests equal the same requests run alone, prefix reuse, limits, cancellation, faults."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from onellm.runtime.decoder import Sampling
from onellm.runtime.engine import Engine, Limits, Media, QueueFull, Request
from onellm.runtime.errors import BackendError, InputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WALK = str(EXAMPLES / "imu" / "walk.csv")
QUESTIONS = ["What is this?", "Describe the motion.", "Is the person running?", "Why?",
             "Tell me more about the recording.", "What happens next?", "How many steps?", "Where is it?"]
NEAR_TIE = 1e-3  # a batched run may flip a token only where the alone run's top-2 logits are this close


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    eng = Engine.load(tiny_bundle, parallel=4, prefill_chunk=64)
    yield eng
    eng.close()


def _ask(engine, question, media=True, n=12, **kw):
    req = Request(messages=[("user", question)], media=Media("imu", WALK) if media else None,
                  sampling=Sampling.greedy(n), **kw)
    return engine.submit(req)


def _assert_same_or_near_tie(pipe, question, got: list[int], want: list[int], block) -> None:
    """Greedy tokens equal, or they part where the alone run's top-2 margin is a near-tie."""
    if got == want:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    from onellm.runtime.prompt import Conversation

    conv = Conversation()
    conv.add_question(question)
    ids = pipe.prompt_ids(conv)
    logits = pipe.decoder.logits_for(block, ids[1:] + want[:i])[-1]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] <= NEAR_TIE, f"{question!r}: tokens part at step {i}: {got} vs {want}"


def test_one_request_equals_the_pipeline(engine, tiny_pipeline):
    res = _ask(engine, QUESTIONS[0], n=20).wait(120)
    alone = tiny_pipeline.ask(QUESTIONS[0], imu=WALK, sampling=Sampling.greedy(20))
    assert res.tokens == alone.token_ids
    assert res.text == alone.text
    assert res.stop_reason == alone.stop_reason
    conv_ids = len(tiny_pipeline.tokenizer.encode(_render(QUESTIONS[0]), bos=True))
    assert res.prompt_tokens == conv_ids + engine.n_inserted  # the 32 inserted rows count
    assert res.modality == "imu" and res.inputs.get("source")


def _render(q):
    from onellm.runtime.prompt import render_prompt

    return render_prompt(q)


@pytest.mark.parametrize("chunk", [256, 8])
def test_a_new_prompt_goes_as_one_embedding_batch_and_changes_no_answer(tiny_bundle, monkeypatch, chunk):
    """A new conversation's BOS, block and text go to llama.cpp as one embedding batch (one
    graph where they took three); with more text than prefill_chunk the batch is cut to a
    multiple of 4 rows and the rest goes as tokens. The greedy answer equals the token path's."""
    sizes = []

    def run(tokens_only: bool):
        eng = Engine.load(tiny_bundle, parallel=1, prefill_chunk=chunk)
        try:
            if tokens_only:
                monkeypatch.setattr(eng.model, "embedding_rows", lambda: None)
            else:
                real = eng.batch.embd_view
                monkeypatch.setattr(eng.batch, "embd_view", lambda rows, *a, **k: sizes.append(rows.shape[0]) or real(rows, *a, **k))
            res = _ask(eng, QUESTIONS[1], n=16).wait(120)
            return res.tokens, dict(eng.counters), res.prompt_tokens
        finally:
            eng.close()

    rows_path, c1, n_prompt = run(False)
    tokens_path, c2, _ = run(True)
    assert rows_path == tokens_path and len(rows_path) == 16
    assert c1["tokens_prefilled"] == c2["tokens_prefilled"] and c1["rows_injected"] == c2["rows_injected"] == 32
    if chunk == 256:  # everything in one graph: BOS, block, text (3 graphs before)
        assert sizes == [n_prompt] and c2["decode_calls"] - c1["decode_calls"] == 2
    else:  # more text than the chunk: a multiple of 4 rows, then tokens
        assert n_prompt > 1 + chunk + 32 and sizes == [(1 + chunk + 32) // 4 * 4]


def test_concurrent_requests_equal_the_same_requests_alone(engine, tiny_pipeline):
    block = np.array(tiny_pipeline.encode("imu", WALK)[0], copy=True)
    alone = {q: tiny_pipeline.ask(q, imu=WALK, sampling=Sampling.greedy(24)).token_ids for q in QUESTIONS}
    steps0, calls0 = engine.counters["steps"], engine.counters["decode_calls"]
    handles = [(q, _ask(engine, q, n=24)) for q in QUESTIONS * 2]  # 16 at once over 4 slots
    results = [(q, h.wait(120)) for q, h in handles]
    assert len(results) == 16
    for q, res in results:
        assert res.stop_reason in ("max_new_tokens", "eos", "stop_string")
        _assert_same_or_near_tie(tiny_pipeline, q, res.tokens, alone[q], block)
    # continuous batching: far fewer decode calls than tokens (several slots per batch)
    tokens = sum(len(r.tokens) for _, r in results)
    assert engine.counters["decode_calls"] - calls0 < 0.6 * tokens
    assert engine.counters["steps"] > steps0
    assert engine.stats()["slots_busy"] == 0 and engine.stats()["queue_depth"] == 0


def test_second_question_about_the_same_media_reuses_block_and_prefix(engine):
    first = _ask(engine, "Unique first question about the walk?", n=4).wait(60)
    encodes = engine.counters["encodes"]
    second = _ask(engine, "And a different second one?", n=4).wait(60)
    assert engine.counters["encodes"] == encodes, "the same media was encoded again"
    # BOS + 32 rows + the system prompt (and the template's first tokens) come from the cache
    sys_tokens = len(engine.tokenizer.encode(_render("x"), bos=True)) - 8
    assert second.cached_tokens >= 1 + engine.n_inserted + sys_tokens
    assert first.prompt_tokens > 0


def test_follow_up_turn_reuses_the_whole_conversation(engine):
    q1 = "Follow-up test: what is it?"
    r1 = _ask(engine, q1, n=6).wait(60)
    req = Request(messages=[("user", q1), ("assistant", r1.text), ("user", "Why?")], media=Media("imu", WALK),
                  sampling=Sampling.greedy(4))
    r2 = engine.submit(req).wait(60)
    assert r2.cached_tokens >= r1.prompt_tokens  # the first turn's prompt is not prefilled again
    assert r2.prompt_tokens > r1.prompt_tokens


def test_precomputed_block_gives_the_same_answer(engine, tiny_pipeline):
    block = np.array(tiny_pipeline.encode("imu", WALK)[0], copy=True)
    via_block = engine.submit(Request(messages=[("user", "Block?")], block=block, modality="imu",
                                      sampling=Sampling.greedy(8))).wait(60)
    via_file = _ask(engine, "Block?", n=8).wait(60)
    assert via_block.tokens == via_file.tokens
    with pytest.raises(InputError, match="embeddings"):
        engine.submit(Request(messages=[("user", "x")], block=np.zeros((3, 5), np.float32), modality="imu"))


def test_text_only_request_and_stop_strings(engine, tiny_pipeline):
    res = _ask(engine, "Hello there", media=False, n=16).wait(60)
    alone = tiny_pipeline.ask("Hello there", sampling=Sampling.greedy(16))
    assert res.tokens == alone.token_ids
    text = res.text
    if len(text) >= 3:  # a stop string taken from the answer cuts it there
        cut = text[1:3]
        res2 = _ask(engine, "Hello there", media=False, n=16, stop=(cut,)).wait(60)
        assert res2.stop_reason == "stop_string" and res2.finish_reason == "stop"
        assert res2.text == text[: text.find(cut)].strip()


def test_bad_requests_are_one_line_input_errors(engine):
    with pytest.raises(InputError, match="messages"):
        engine.submit(Request(messages=[]))
    with pytest.raises(InputError, match="role 'assistant'"):
        engine.submit(Request(messages=[("assistant", "hi")]))
    with pytest.raises(InputError, match="one of this bundle's modalities"):
        engine.submit(Request(messages=[("user", "x")], media=Media("sonar", WALK)))
    h = engine.submit(Request(messages=[("user", "x")], media=Media("imu", str(EXAMPLES / "fmri" / "betas.npy"))))
    with pytest.raises(InputError):
        h.wait(60)
    assert engine.stats()["queue_depth"] == 0


def test_max_tokens_is_capped(tiny_bundle):
    with Engine.load(tiny_bundle, parallel=1, limits=Limits(max_tokens=3)) as eng:
        res = eng.submit(Request(messages=[("user", "Count")], sampling=Sampling.greedy(100))).wait(60)
        assert len(res.tokens) <= 3 and res.finish_reason in ("length", "stop")


def test_cancel_from_the_stream_frees_the_slot_in_the_same_step(engine):
    seen = []
    box = {}

    def listener(kind, value):
        seen.append(kind)
        if kind == "text":
            box["h"].cancel()  # runs on the engine thread, between two decode steps

    req = Request(messages=[("user", "Cancel me")], sampling=Sampling.greedy(200))
    done = threading.Event()
    box["h"] = h = engine.submit(req, on_event=lambda k, v: (listener(k, v), k in ("done", "error") and done.set()))
    assert done.wait(60)
    res = h.wait(0)
    assert res.stop_reason == "cancelled" and res.finish_reason == "cancelled"
    n_text = seen.count("text")
    assert len(res.tokens) <= n_text + 1 and n_text >= 1  # nothing decoded after the cancel
    assert engine.stats()["slots_busy"] == 0


def test_cancel_before_start_and_queue_full(tiny_bundle, monkeypatch):
    import onellm.runtime.pipeline as pipeline_mod

    gate = threading.Event()
    original = pipeline_mod.read_input

    def slow_reader(*a, **kw):
        gate.wait(30)
        return original(*a, **kw)

    monkeypatch.setattr(pipeline_mod, "read_input", slow_reader)
    with Engine.load(tiny_bundle, parallel=1, limits=Limits(max_queue=2)) as eng:
        h1 = eng.submit(Request(messages=[("user", "a")], media=Media("imu", WALK), sampling=Sampling.greedy(2)))
        h2 = eng.submit(Request(messages=[("user", "b")], media=Media("imu", WALK), sampling=Sampling.greedy(2)))
        with pytest.raises(QueueFull, match="queue is full"):
            eng.submit(Request(messages=[("user", "c")]))
        h2.cancel()
        gate.set()
        assert h1.wait(60).stop_reason in ("max_new_tokens", "eos", "stop_string")
        assert h2.wait(60).stop_reason == "cancelled" and h2.result.tokens == []
        assert eng.stats()["queue_depth"] == 0


def test_a_failed_decode_fails_its_request_and_the_engine_goes_on(tiny_bundle, monkeypatch):
    with Engine.load(tiny_bundle, parallel=2) as eng:
        real = eng.ctx.decode
        calls = {"n": 0}

        def flaky(batch):
            calls["n"] += 1
            if calls["n"] == 2:
                raise BackendError("llama_decode failed with code -3: injected")
            return real(batch)

        monkeypatch.setattr(eng.ctx, "decode", flaky)
        h = eng.submit(Request(messages=[("user", "first")], sampling=Sampling.greedy(5)))
        with pytest.raises(BackendError, match="injected"):
            h.wait(60)
        ok = eng.submit(Request(messages=[("user", "first")], sampling=Sampling.greedy(5))).wait(60)
        assert len(ok.tokens) >= 1
        assert eng.stats()["slots_busy"] == 0
        assert eng.slots[0].items == [] or eng.slots[1].items == []  # the failed slot's cache was dropped


def test_input_caps_and_the_decompression_bomb_guard(tiny_bundle, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    photo = str(EXAMPLES / "image" / "photo.jpg")
    with Engine.load(tiny_bundle, parallel=1, limits=Limits(max_image_pixels=64 * 64)) as eng:
        bomb = eng.submit(Request(messages=[("user", "x")], media=Media("image", photo), sampling=Sampling.greedy(2)))
        with pytest.raises(InputError, match="pixels"):
            bomb.wait(60)
    with Engine.load(tiny_bundle, parallel=1, limits=Limits(max_media_bytes=1000)) as eng:
        big = eng.submit(Request(messages=[("user", "x")], media=Media("imu", WALK), sampling=Sampling.greedy(2)))
        with pytest.raises(InputError, match="at most 1000 bytes"):
            big.wait(60)
        assert eng.stats()["queue_depth"] == 0


def test_one_buffer_per_sequence_mode_gives_the_same_answers(tiny_bundle, engine):
    """kv_unified=False: prefix copies are whole-buffer copies trimmed after; answers unchanged."""
    with Engine.load(tiny_bundle, parallel=3, kv_unified=False) as eng:
        first = [_ask(eng, q, n=10) for q in QUESTIONS[:3]]  # three at once
        again = [_ask(eng, q + " again", n=10) for q in QUESTIONS[:3]]  # reuse a prefix from another slot
        got = [h.wait(60) for h in first + again]
        want = [_ask(engine, q, n=10).wait(60) for q in QUESTIONS[:3]] + \
            [_ask(engine, q + " again", n=10).wait(60) for q in QUESTIONS[:3]]
        assert [g.tokens for g in got] == [w.tokens for w in want]
        assert max(g.cached_tokens for g in got[3:]) >= 1 + eng.n_inserted


def test_queued_inputs_of_one_modality_are_encoded_in_one_batch(tiny_bundle, tmp_path, monkeypatch):
    """Inputs waiting together go through the encoder as one batch; each request still gets its own block."""
    import onellm.runtime.pipeline as pipeline_mod

    lines = Path(WALK).read_text().splitlines()
    files = []
    for k in range(3):  # three different recordings: the walk shifted by (k+1)*50 rows
        f = tmp_path / f"walk{k}.csv"
        f.write_text("\n".join([lines[0]] + lines[1 + 50 * (k + 1):]) + "\n")
        files.append(str(f))
    gate, entered = threading.Event(), threading.Event()
    original = pipeline_mod.read_input

    def gated_reader(*a, **kw):
        entered.set()
        gate.wait(30)
        return original(*a, **kw)

    with Engine.load(tiny_bundle, parallel=4) as eng:
        alone = [eng.submit(Request(messages=[("user", "What is this?")], media=Media("imu", f),
                                    sampling=Sampling.greedy(8))).wait(60) for f in files]
        sizes = []
        real = eng.encoder.encode_many
        monkeypatch.setattr(eng.encoder, "encode_many", lambda m, xs, **kw: sizes.append(len(xs)) or real(m, xs, **kw))
        eng._blocks.clear()
        monkeypatch.setattr(pipeline_mod, "read_input", gated_reader)
        first = eng.submit(Request(messages=[("user", "Hold the worker")], media=Media("imu", WALK),
                                   sampling=Sampling.greedy(2)))
        assert entered.wait(30)  # the worker is inside the first read; the next three queue up
        handles = [eng.submit(Request(messages=[("user", "What is this?")], media=Media("imu", f),
                                      sampling=Sampling.greedy(8))) for f in files]
        gate.set()
        results = [h.wait(60) for h in handles]
        first.wait(60)
        assert sizes == [1, 3], sizes
        assert eng.counters["encode_batches"] >= 2
        for got, want in zip(results, alone):
            assert got.tokens == want.tokens or got.tokens[:2] == want.tokens[:2]
        # a batch's requests do not share one block
        assert len({eng._blocks[k][1] for k in eng._blocks}) == 4


def test_clear_cache_with_blocks_encodes_the_same_media_again(engine):
    """clear_cache() keeps encoded inputs; clear_cache(blocks=True) forgets them too (a cold first question)."""
    _ask(engine, "Warm the caches?", n=2).wait(60)
    encodes = engine.counters["encodes"]
    engine.clear_cache()
    r = _ask(engine, "Warm the caches?", n=2).wait(60)
    assert engine.counters["encodes"] == encodes and r.cached_tokens == 0
    engine.clear_cache(blocks=True)
    r = _ask(engine, "Warm the caches?", n=2).wait(60)
    assert engine.counters["encodes"] == encodes + 1 and r.cached_tokens == 0
