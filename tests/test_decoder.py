"""The torch-free llama.cpp decoder: injected rows, KV cache across turns, greedy parity,
streaming (stop strings and UTF-8 split across tokens), cancellation, errors.

Greedy parity threshold: a step is compared where the reference's top-2 logit margin
exceeds 0.01, about 8x the largest logit difference measured between llama.cpp (f32 file,
default f16 KV cache) and torch on the tiny model (1.2e-3); below it, either token is a
legitimate argmax.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onellm.runtime.decoder import Decoder, Sampling, _TextStream
from onellm.runtime.errors import BackendError, BundleError, InputError
from onellm.runtime.prompt import cut_answer, render_prompt

MARGIN = 0.01


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from onellm.runtime.tokenizer import Tokenizer

    return Tokenizer(tiny_tokenizer)


@pytest.fixture(scope="module")
def block(tiny_model):
    """The tiny model's imu encoder output for a fixed input, [32, 128] float32."""
    import torch

    x = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 6, 400)).astype(np.float32))
    with torch.no_grad():
        return np.ascontiguousarray(tiny_model.encode("imu", x)[0].numpy())


@pytest.fixture(scope="module")
def dec(tiny_gguf):
    with Decoder(tiny_gguf("f32")) as d:
        yield d


def _ref_logits(model, cfg, ids, block):
    from onellm.export.gguf import reference_logits

    return reference_logits(model, cfg, ids[0], block, ids[1:])


def test_injected_block_equals_torch(dec, tiny_model, tiny_config, tok, block):
    ids = tok.encode(render_prompt("Describe the scene."))
    s = dec.session()
    got = s.prefill(ids, block, logits="all")
    ref = _ref_logits(tiny_model, tiny_config, ids, block)
    assert got.shape == ref.shape == (len(ids) + 32, tiny_config.decoder.vocab_size)
    assert np.abs(got - ref).max() / ref.std() < 0.02
    assert (s.tokens_prefilled, s.rows_injected, s.decode_calls) == (len(ids), 32, 1)  # BOS, rows, text: one batch
    # the rows matter: other rows give other logits after BOS
    other = dec.session().prefill(ids, np.ascontiguousarray(block[::-1]), logits="all")
    assert np.abs(other[1:] - got[1:]).max() > 100 * np.abs(got - ref).max()
    # a text-only prompt works too (no block)
    assert np.abs(dec.session().prefill(ids, None, logits="all")
                  - _ref_logits(tiny_model, tiny_config, ids, None)).max() / ref.std() < 0.02


@pytest.mark.parametrize("exact", [False, True], ids=["defaults", "f32-kv"])
def test_kv_cache_across_turns_equals_a_fresh_full_prefill(exact, tiny_gguf, tok, block):
    """Turn 2 prefills only its new tokens; its logits equal a fresh prefill of the whole text.

    With an f32 KV cache and no flash attention the two are bit-identical; with the
    defaults (f16 cache, flash attention) rounding depends on the batch split: measured
    max diff 1.2e-3 = 0.005 of the logit std, bound 0.02.
    """
    opts = {"kv_type": "f32", "flash_attn": False} if exact else {}
    with Decoder(tiny_gguf("f32"), n_ctx=256, **opts) as dec:
        s = dec.session()
        ids1 = tok.encode(render_prompt("What is this?"))
        s.prefill(ids1, block)
        g = s.generate_text(Sampling.greedy(12))
        answer = g.text or "a chair"
        ids2 = tok.encode(render_prompt("Describe the scene.", history=[("What is this?", answer)]))
        before = (s.tokens_prefilled, s.rows_injected)
        last = s.prefill(ids2, block)
        assert s.rows_injected == before[1] == 32  # the block is not injected again
        assert s.tokens_prefilled - before[0] <= len(ids2) - len(ids1) + 4
        assert s.tokens_reused >= len(ids1) + 32 - 1 and s.n_past == len(ids2) + 32
        fresh = dec.session()
        full = fresh.prefill(ids2, block)
        assert fresh.tokens_prefilled == len(ids2) and fresh.tokens_reused == 0
    if exact:
        np.testing.assert_array_equal(last, full)
    else:
        assert np.abs(last - full).max() <= 0.02 * full.std()
    assert int(last.argmax()) == int(full.argmax())


def test_greedy_tokens_match_torch(dec, tiny_model, tiny_config, tok, block):
    from onellm.ref.generate import ChatSession
    import torch

    ids = tok.encode(render_prompt("Describe the scene."))
    s = dec.session()
    s.prefill(ids, block)
    g = s.generate_text(Sampling.greedy(48), stop=())
    assert len(g.tokens) >= 40, g.stop_reason
    # teacher forcing: torch's argmax after each prefix llama.cpp produced
    ref = _ref_logits(tiny_model, tiny_config, ids + g.tokens[:-1], block)[len(ids) + 31:]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > MARGIN
    assert clear.sum() >= 32
    assert (ref.argmax(-1) == np.array(g.tokens))[clear].all()
    # free-running torch greedy gives the same tokens up to the first unclear step
    r = ChatSession(tiny_model, tok, inputs=torch.from_numpy(block)[None]).ask(
        "Describe the scene.", max_new_tokens=48, greedy=True, stop_strings=())
    first_unclear = int(np.argmin(clear)) if not clear.all() else len(clear)
    n = min(first_unclear, len(r.token_ids), len(g.tokens))
    assert n >= 32 and r.token_ids[:n] == g.tokens[:n]


def test_generation_decodes_its_last_token_into_the_cache(dec, tok, block):
    """n tokens cost n llama_decode calls, not n-1: the last sampled token is decoded before
    generate returns, so a follow-up turn starts from it (the bench counts decode rates so)."""
    s = dec.session()
    s.prefill(tok.encode(render_prompt("Describe the scene.")), block)
    n0, past = s.decode_calls, s.n_past
    g = s.generate_text(Sampling.greedy(12), stop=())
    assert g.stop_reason == "max_new_tokens" and len(g.tokens) == 12
    assert s.decode_calls - n0 == 12 and s.n_past == past + 12


def test_text_only_prefill_is_one_decode_with_the_same_logits(dec, tok):
    """BOS and the text go in one llama_decode (one pass over the weights, not two); the
    logits equal those of BOS first and the text after it (the reuse path)."""
    ids = tok.encode(render_prompt("What is in the picture?"))
    s = dec.session()
    got = s.prefill(ids)
    assert s.decode_calls == 1 and s.n_past == len(ids)
    two = dec.session()
    two.prefill(ids[:1])
    want = two.prefill(ids)  # BOS reused, the rest decoded on its own
    assert two.decode_calls == 2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize(("quant", "exact"), [("f32", True), ("f32", False), ("q8_0", False)])
def test_a_prompt_with_a_block_is_one_embedding_decode_with_the_same_logits(quant, exact, tiny_gguf, tok, block,
                                                                            monkeypatch):
    """With an input block the whole first prompt goes as embedding rows (BOS's and the text's
    read from the GGUF): one llama_decode where BOS, block and text took one each. Logits equal
    those of the token path: with an f32 cache and plain attention to float32 noise (atol 1e-5
    of the largest logit). With the shipped f16 cache and flash attention, whose rounding
    depends on how positions are batched, max |diff| / std of the logits measured 0.0034 (f32
    file) and 0.037 (q8_0 file, whose own parity bound against torch is 0.2); bounds 3x those,
    and the same argmax wherever the top two differ by more than twice the largest diff."""
    ids = tok.encode(render_prompt("Describe the scene."))
    kw = {"kv_type": "f32", "flash_attn": False} if exact else {}
    with Decoder(tiny_gguf(quant), n_ctx=256, **kw) as d:
        s = d.session()
        got = s.prefill(ids, block, logits="all")
        assert (s.decode_calls, s.tokens_prefilled, s.rows_injected, s.n_past) == (1, len(ids), 32, len(ids) + 32)
        follow = s.prefill(ids + [5, 6, 7], block)  # a longer turn reuses the cache and adds tokens
        assert s.decode_calls == 2 and s.tokens_reused == len(ids) + 32
        monkeypatch.setattr(d._model, "embedding_rows", lambda: None)  # the token path
        two = d.session()
        want = two.prefill(ids, block, logits="all")
        assert two.decode_calls == 3  # BOS, block, text
        want_follow = two.prefill(ids + [5, 6, 7], block)
    assert got.shape == want.shape == (len(ids) + 32, 512)
    if exact:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
        np.testing.assert_allclose(follow, want_follow, rtol=0, atol=1e-5 * float(np.abs(want_follow).max()))
        return
    tol = {"f32": 0.01, "q8_0": 0.1}[quant] * float(want.std())
    worst = float(np.abs(got - want).max())
    assert worst <= tol and np.abs(follow - want_follow).max() <= tol, worst / want.std()
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * worst
    assert clear.mean() > 0.5 and (got.argmax(1) == want.argmax(1))[clear].all()


def test_unreadable_prompt_rows_fall_back_to_tokens(dec, tok, block, monkeypatch, caplog):
    """A GGUF whose rows cannot be read (gone, cut short) costs the one batch, not the answer."""
    ids = tok.encode(render_prompt("Describe the scene."))
    want = dec.session().prefill(ids, block)
    reader = dec._model.embedding_rows()

    def broken(*a, **k):
        raise OSError("the file went away")

    monkeypatch.setattr(reader, "rows", broken)
    s = dec.session()
    with caplog.at_level("WARNING"):
        got = s.prefill(ids, block)
    assert s.decode_calls == 3 and "prompt rows unreadable" in caplog.text  # BOS, block, text as before
    np.testing.assert_allclose(got, want, rtol=0, atol=0.01 * float(want.std()))


def test_a_prompt_longer_than_n_batch_goes_in_n_batch_chunks(tiny_gguf, tok, block, monkeypatch):
    """Embedding rows are decoded n_batch at a time; the logits equal the token path's; a cancel
    between chunks leaves the cache at a chunk boundary."""
    ids = tok.encode(render_prompt("Describe the scene. " * 12))
    assert len(ids) + 32 > 64
    with Decoder(tiny_gguf("f32"), n_ctx=512, n_batch=64, kv_type="f32", flash_attn=False) as d:
        s = d.session()
        got = s.prefill(ids, block)
        n = len(ids) + 32
        assert s.decode_calls == -(-n // 64) and s.n_past == n
        import threading

        class CancelAfterFirst(threading.Event):
            calls = 0

            def is_set(self):
                self.calls += 1
                return self.calls > 1

        c = d.session()
        assert c.prefill(ids, block, cancel=CancelAfterFirst()) is None
        assert c.n_past == 64 and c.cached_positions() == 64
        monkeypatch.setattr(d._model, "embedding_rows", lambda: None)
        want = d.session().prefill(ids, block)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_bos_row_is_the_files_row_dequantized(tiny_gguf):
    """`EmbeddingRows` (ggml's converters over the file) equals gguf-py's dequantizer."""
    gguf = pytest.importorskip("gguf")
    from onellm.runtime._llama import EmbeddingRows

    for quant in ("f32", "f16", "q8_0", "q4_0"):
        path = tiny_gguf(quant)
        t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        ids = [1, 0, 7, ref.shape[0] - 1]
        got = EmbeddingRows.open(path).rows(ids)
        assert got.dtype == np.float32 and got.shape == (4, ref.shape[1])
        np.testing.assert_array_equal(got, ref[ids], err_msg=quant)
    with pytest.raises(ValueError, match="token ids"):
        EmbeddingRows.open(tiny_gguf("f32")).rows([100000])


def test_sampling_is_seeded_and_top_k_1_is_greedy(dec, tok, block):
    ids = tok.encode(render_prompt("What is this?"))

    def run(sampling):
        s = dec.session()
        s.prefill(ids, block)
        return s.generate_text(sampling, stop=()).tokens

    hot = Sampling(temperature=1.5, top_p=0.95, seed=7, max_new_tokens=24)
    assert run(hot) == run(hot)
    assert run(hot) != run(Sampling(temperature=1.5, top_p=0.95, seed=8, max_new_tokens=24))
    assert run(Sampling(temperature=0.8, top_k=1, seed=3, max_new_tokens=24)) == run(Sampling.greedy(24))
    assert len(run(Sampling(temperature=0.1, top_p=0.75, repeat_penalty=1.3, max_new_tokens=8))) == 8


def test_stop_string_split_across_tokens_end_to_end(dec, tok, block):
    ids = tok.encode(render_prompt("Describe the scene."))
    s = dec.session()
    s.prefill(ids, block)
    g = s.generate_text(Sampling.greedy(40), stop=())
    pieces = [dec._model.piece(t).decode("utf-8", "replace") for t in g.tokens]
    # a stop string made of the last char of one piece and the first of the next
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[k][-1] + pieces[k + 1][0]
    full = "".join(pieces)
    s = dec.session()
    s.prefill(ids, block)
    chunks = list(s.generate(Sampling.greedy(40), stop=(stop,)))
    assert s.last.stop_reason == "stop_string"
    expected = full[: full.find(stop)].strip()
    assert "".join(chunks) == s.last.text == expected
    assert len(s.last.tokens) <= k + 2


def test_text_stream_holds_split_stops_and_utf8():
    ts = _TextStream(("###",))
    out = [ts.feed(p) for p in (b" A", b" caf", b"\xc3", b"\xa9 ", b"#", b"#", b"#more")]
    assert "".join(out) == "A café" and ts.stopped
    assert out[2] == "" and out[3] == "é"  # the two bytes of é arrive in different tokens
    ts = _TextStream(("###",))
    out = [ts.feed(p) for p in (b"ab ", b"##", b"x")]  # "##" followed by x is not a stop
    assert "".join(out) + ts.finish() == "ab ##x" and not ts.stopped


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab #\n\u00e9\u65e5", max_size=40), st.lists(st.integers(1, 5), max_size=40))
def test_text_stream_chunks_equal_cut_answer(text, cuts):
    data = text.encode()
    pieces, i = [], 0
    for c in cuts:
        pieces.append(data[i:i + c])
        i += c
    pieces.append(data[i:])
    ts = _TextStream(("###",))
    streamed = "".join(ts.feed(p) for p in pieces) + ts.finish()
    assert streamed == cut_answer(text)[0] == ts.text
    assert ts.stopped == cut_answer(text)[1]


def test_cancellation_from_another_thread(dec, tok, block):
    ids = tok.encode(render_prompt("Describe the scene."))
    s = dec.session()
    s.prefill(ids, block)
    cancel = threading.Event()
    chunks: queue.Queue = queue.Queue()

    def worker():
        for c in s.generate(Sampling.greedy(400), cancel=cancel, stop=()):
            chunks.put(c)
        chunks.put(None)

    t = threading.Thread(target=worker)
    t.start()
    assert chunks.get(timeout=30) is not None  # generation is running
    cancel.set()
    t.join(timeout=30)
    assert not t.is_alive()
    assert s.last.stop_reason == "cancelled" and len(s.last.tokens) < 400
    # the session stays usable: the cache holds what was decoded
    assert s.n_past == len(ids) + 32 + len(s.last.tokens)
    s.prefill(ids, block)
    assert s.generate_text(Sampling.greedy(4), stop=()).stop_reason == "max_new_tokens"
    # a cancelled prefill stops between llama_decode calls and leaves nothing to sample from
    s = dec.session()
    assert s.prefill(ids, block, cancel=cancel) is None and s.n_past == 0
    assert list(s.generate(cancel=cancel)) == [] and s.last.stop_reason == "cancelled"
    with pytest.raises(BackendError, match="needs a prefill"):
        next(s.generate())


def test_an_open_stream_refuses_a_second_request_on_its_cache(dec, tok, block):
    """While generate() is open, a prefill/generate on its session or a new session raises;
    closing the stream frees the session with the cache equal to the bookkeeping."""
    ids = tok.encode(render_prompt("Describe the scene."))
    s = dec.session()
    s.prefill(ids, block)
    stream = s.generate(Sampling.greedy(40), stop=())
    next(stream)
    assert s.busy
    with pytest.raises(BackendError, match="still open"):
        s.prefill(ids, block)
    with pytest.raises(BackendError, match="still open"):
        next(s.generate())
    with pytest.raises(BackendError, match="open generate"):
        dec.session()
    stream.close()
    assert not s.busy and s.last.stop_reason == "closed"
    assert s.cached_positions() == s.n_past > len(ids) + 32
    s.prefill(ids, block)
    assert s.generate_text(Sampling.greedy(3), stop=()).stop_reason == "max_new_tokens"


def test_context_limits(tiny_gguf, tok, block):
    with Decoder(tiny_gguf("f32"), n_ctx=64) as d:
        ids = tok.encode(render_prompt("What is this?"))[:20]
        s = d.session()
        s.prefill(ids, block)
        g = s.generate_text(Sampling.greedy(100), stop=())
        assert g.stop_reason == "context_full" and s.n_past == 64
        with pytest.raises(InputError, match="at most 64 positions"):
            d.session().prefill(ids + ids + ids, block)


def test_bad_inputs_and_files_raise_one_line(tiny_gguf, tmp_path, dec, block):
    with pytest.raises(BundleError, match="GGUF decoder file not found") as e:
        Decoder(tmp_path / "missing.gguf")
    assert "\n" not in str(e.value)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(BundleError, match=r"expected a GGUF file \(magic b'GGUF'\), found bytes b'hell'"):
        Decoder(tmp_path / "text.gguf")
    good = tiny_gguf("f32").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) // 3])
    with pytest.raises(BackendError, match="could not load the model") as e:
        Decoder(tmp_path / "cut.gguf")
    assert "\n" not in str(e.value)
    s = dec.session()
    with pytest.raises(InputError, match="float32"):
        s.prefill([1, 5], block.astype(np.float64))
    with pytest.raises(InputError, match=r"\[rows, 128\]"):
        s.prefill([1, 5], block[:, :64].copy())
    with pytest.raises(InputError, match="token ids"):
        s.prefill([1, 99999], block)
    with pytest.raises(BackendError, match="needs a prefill"):
        next(dec.session().generate())
    old = dec.session()
    dec.session()
    with pytest.raises(BackendError, match="taken over"):
        old.prefill([1, 5])


def test_runtime_decoder_imports_without_torch(tiny_gguf, tok, block, tmp_path):
    np.save(tmp_path / "block.npy", block)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from onellm.runtime.decoder import Decoder, Sampling\n"
        f"d = Decoder({str(tiny_gguf('q8_0'))!r}, n_ctx=128)\n"
        "s = d.session()\n"
        f"s.prefill({tok.encode('What is this?')!r}, np.load({str(tmp_path / 'block.npy')!r}))\n"
        "print(len(s.generate_text(Sampling.greedy(5), stop=()).tokens))\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "5"
