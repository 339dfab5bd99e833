"""Generation with the reference model: cache correctness, stops, sampling, context budget.

The central check, for every registered modality: logits produced while decoding with
the KV cache equal the logits of one uncached forward over the whole sequence
[BOS, 32-row block, prompt, generated tokens] (fp32, atol 1e-4). The same harness run
with the reference code's +30 position offset fails it.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onellm.ref.generate import ChatSession, generate, sample_next_token  # noqa: E402
from onellm.runtime.errors import InputError  # noqa: E402
from onellm.runtime.modalities import all_modalities, get_modality  # noqa: E402
from onellm.runtime.prompt import render_prompt  # noqa: E402
from onellm.runtime.tokenizer import Tokenizer  # noqa: E402

MODALITIES = list(all_modalities())
N_NEW = 10
ATOL = 1e-4  # fp32 logits of the tiny model are O(1); cached vs uncached differ by summation order only
NO_STOP = {"stop_at_eos": False, "stop_strings": ()}  # exactly max_new_tokens tokens


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return Tokenizer(tiny_tokenizer)


@pytest.fixture(scope="module")
def blocks(tiny_model):
    """One encoded dummy input per modality, [1, 32, dim]."""
    rng = np.random.default_rng(0)
    out = {}
    with torch.inference_mode():
        for name, spec in all_modalities().items():
            out[name] = tiny_model.encode(name, torch.from_numpy(spec.dummy_input(rng))[None])
    return out


def full_forward_logits(model, prompt_ids, token_ids, block):
    """Uncached logits at the positions that produced each generated token."""
    ids = torch.tensor([prompt_ids + token_ids[:-1]])
    n_block = 0 if block is None else block.shape[1]
    first = n_block + len(prompt_ids) - 1  # position of the last prompt token
    with torch.inference_mode():
        logits = model(ids, block)[0]
    return logits[first : first + len(token_ids)]


@pytest.mark.parametrize("name", MODALITIES)
def test_cached_decoding_equals_uncached_forward(tiny_model, tok, blocks, name):
    block = blocks[name]
    question = get_modality(name).caption_prompt
    r = generate(tiny_model, tok, question, block, max_new_tokens=N_NEW, greedy=True, return_logits=True, **NO_STOP)
    assert len(r.token_ids) == N_NEW and r.stop_reason == "max_new_tokens"
    assert r.prompt_ids == tok.encode(render_prompt(question))
    assert r.n_positions == 32 + len(r.prompt_ids) + N_NEW - 1
    full = full_forward_logits(tiny_model, r.prompt_ids, r.token_ids, block)
    torch.testing.assert_close(r.step_logits, full, rtol=0, atol=ATOL)
    assert r.token_ids == full.argmax(-1).tolist()


def test_modality_input_equals_precomputed_block(tiny_model, tok, blocks):
    x = torch.from_numpy(get_modality("imu").dummy_input(np.random.default_rng(0)))
    # blocks["imu"] came from the same rng stream only if imu were first; encode afresh instead
    with torch.inference_mode():
        block = tiny_model.encode("imu", x[None])
    a = generate(tiny_model, tok, "Describe the scene.", ("imu", x), max_new_tokens=6, greedy=True, return_logits=True)
    b = generate(tiny_model, tok, "Describe the scene.", block, max_new_tokens=6, greedy=True, return_logits=True)
    assert a.token_ids == b.token_ids
    torch.testing.assert_close(a.step_logits, b.step_logits, rtol=0, atol=0)


def test_text_only_cached_decoding_equals_uncached_forward(tiny_model, tiny_tokenizer):
    r = generate(tiny_model, str(tiny_tokenizer), "What is this?", None, max_new_tokens=8, greedy=True, return_logits=True, **NO_STOP)
    full = full_forward_logits(tiny_model, r.prompt_ids, r.token_ids, None)
    torch.testing.assert_close(r.step_logits, full, rtol=0, atol=ATOL)


def decode_with_offset(model, prompt_ids, block, n_steps, offset):
    """Greedy decoding where token i after the prompt goes in at len(prompt_ids) + offset + i.

    offset 32 is the true position; 30 is what the reference code does.
    """
    cache = model.new_cache()
    steps, tokens = [], []
    with torch.inference_mode():
        h = model.build_sequence(torch.tensor([prompt_ids]), block)
        logits = model.forward_decoder(h, 0, cache, last_only=True)[0, -1]
        for i in range(n_steps):
            steps.append(logits)
            tokens.append(int(logits.argmax()))
            if i + 1 < n_steps:
                emb = model.embed_tokens(torch.tensor([[tokens[-1]]]))
                logits = model.forward_decoder(emb, len(prompt_ids) + offset + i, cache)[0, -1]
    return torch.stack(steps), tokens


def test_upstream_plus_30_offset_fails_the_cache_check(tiny_model, tok, blocks):
    block = blocks["image"]
    prompt_ids = tok.encode(render_prompt(get_modality("image").caption_prompt))
    good, good_tokens = decode_with_offset(tiny_model, prompt_ids, block, N_NEW, offset=32)
    torch.testing.assert_close(good, full_forward_logits(tiny_model, prompt_ids, good_tokens, block), rtol=0, atol=ATOL)
    bad, bad_tokens = decode_with_offset(tiny_model, prompt_ids, block, N_NEW, offset=30)
    err = (bad - full_forward_logits(tiny_model, prompt_ids, bad_tokens, block)).abs().amax(-1)
    assert err[0] < ATOL  # the prefill itself is right
    assert err[1:].min() > 10 * ATOL, err  # every later step is wrong (by ~1e-2 on the tiny model)


def test_multi_turn_reuses_cache_and_equals_uncached_forward(tiny_model, tok, blocks):
    block = blocks["audio"]
    session = ChatSession(tiny_model, tok, block)
    r1 = session.ask("Provide a one-sentence caption for the provided audio.", max_new_tokens=8, greedy=True, **NO_STOP)
    r2 = session.ask("What can you hear?", max_new_tokens=N_NEW, greedy=True, return_logits=True, **NO_STOP)
    # turn 2 renders the whole conversation; the cached turn-1 prompt is not recomputed
    assert r2.prompt_ids[: len(r1.prompt_ids)] == r1.prompt_ids
    assert r2.start_pos >= 32 + len(r1.prompt_ids)
    assert r2.start_pos < 32 + len(r2.prompt_ids)
    full = full_forward_logits(tiny_model, r2.prompt_ids, r2.token_ids, block)
    torch.testing.assert_close(r2.step_logits, full, rtol=0, atol=ATOL)
    history = [("Provide a one-sentence caption for the provided audio.", r1.text)]
    assert r2.prompt_ids == tok.encode(render_prompt("What can you hear?", history))
    # a fresh session given the same history produces the same turn
    fresh = generate(tiny_model, tok, "What can you hear?", block, history=history, max_new_tokens=N_NEW,
                     greedy=True, return_logits=True, **NO_STOP)
    assert fresh.token_ids == r2.token_ids
    torch.testing.assert_close(fresh.step_logits, r2.step_logits, rtol=0, atol=ATOL)


class ScriptedModel:
    """The tiny model, but the logits of call i strongly favour script[i]."""

    def __init__(self, model, script):
        self._model = model
        self.script = list(script)
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward_decoder(self, h, start_pos=0, cache=None, last_only=False):
        logits = self._model.forward_decoder(h, start_pos, cache, last_only)
        if self.calls < len(self.script):
            logits[..., -1, self.script[self.calls]] += 1e4
        self.calls += 1
        return logits


def test_stops_at_the_separator_and_cuts_the_text(tiny_model, tok, blocks):
    script = tok.encode(" A dog runs.\n###Human: more text", bos=False)
    cut = next(j for j in range(1, len(script) + 1) if "###" in tok.decode(script[:j]))
    r = generate(ScriptedModel(tiny_model, script), tok, "What is this?", blocks["point"], max_new_tokens=40, greedy=True)
    assert r.stop_reason == "stop_string"
    assert r.text == "A dog runs."
    assert r.token_ids == script[:cut]


def test_stops_at_eos(tiny_model, tok, blocks):
    script = tok.encode(" A cat", bos=False) + [tok.eos_id]
    r = generate(ScriptedModel(tiny_model, script), tok, "What is this?", blocks["point"], max_new_tokens=40, greedy=True)
    assert r.stop_reason == "eos"
    assert r.text == "A cat"
    assert r.token_ids == script
    ignored = generate(ScriptedModel(tiny_model, script), tok, "What is this?", blocks["point"], max_new_tokens=6,
                       greedy=True, stop_at_eos=False, stop_strings=())
    assert len(ignored.token_ids) == 6 and ignored.token_ids[: len(script)] == script


def test_seeded_sampling_is_reproducible(tiny_model, tok, blocks):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, **NO_STOP)
    a = generate(tiny_model, tok, "Describe the scene.", blocks["imu"], seed=11, **kw)
    b = generate(tiny_model, tok, "Describe the scene.", blocks["imu"], seed=11, **kw)
    c = generate(tiny_model, tok, "Describe the scene.", blocks["imu"], seed=12, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    draws = [sample_next_token(logits, 1.0, 0.75, gen) for _ in range(2000)]
    counts = np.bincount(draws, minlength=4)
    assert counts[2] == counts[3] == 0  # outside the 0.75 nucleus {0, 1}
    assert abs(counts[0] / 2000 - 0.5 / 0.8) < 0.05  # renormalised within it
    assert sample_next_token(logits, 0.0, 0.75, gen) == 0  # temperature 0 = greedy
    assert sample_next_token(logits, 1.0, 0.75, gen, greedy=True) == 0


def test_context_budget_counts_the_inserted_block(tiny_model, tok, blocks):
    question = "Describe the scene."
    n_prompt = 32 + len(tok.encode(render_prompt(question)))  # BOS + 32 rows + prompt after BOS
    session = ChatSession(tiny_model, tok, blocks["imu"], max_seq_len=n_prompt + 5)
    with pytest.raises(InputError, match=r"max_new_tokens <= context"):
        session.ask(question, max_new_tokens=6, greedy=True, on_overflow="error", **NO_STOP)
    assert session.conversation.messages == []  # the failed question was taken back
    r = session.ask(question, max_new_tokens=50, greedy=True, **NO_STOP)
    assert r.stop_reason == "context_full" and len(r.token_ids) == 5
    assert r.n_positions == n_prompt + 4
    exact = ChatSession(tiny_model, tok, blocks["imu"], max_seq_len=n_prompt + 5)
    r = exact.ask(question, max_new_tokens=5, greedy=True, on_overflow="error", **NO_STOP)
    assert r.stop_reason == "max_new_tokens" and len(r.token_ids) == 5
    too_small = ChatSession(tiny_model, tok, blocks["imu"], max_seq_len=n_prompt)
    with pytest.raises(InputError, match="prompt"):
        too_small.ask(question, max_new_tokens=1)


def test_bad_embedding_block_is_rejected(tiny_model, tok):
    with pytest.raises(InputError, match="modality embeddings"):
        generate(tiny_model, tok, "hi", torch.zeros(1, 32, 7))
