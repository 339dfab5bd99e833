"""Context management: a chat that outgrows n_ctx drops its oldest turns and goes on.

The tiny bundle's context is 512 positions (its max_seq_len), the `--ctx 512` of the
issue. BOS, the 32 inserted rows and the system prompt are always kept; the oldest
question/answer pairs go, the user is told once, and the answer after a trim equals a
fresh prefill of the kept history.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from onellm.runtime.decoder import Sampling
from onellm.runtime.errors import InputError
from onellm.runtime.prompt import SYSTEM, Conversation

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
N_TURNS = 50
MAX_NEW = 16


@pytest.fixture(scope="module")
def block(tiny_pipeline):
    b, _ = tiny_pipeline.encode("imu", str(EXAMPLES / "imu" / "walk.csv"))
    return np.array(b, copy=True)


def _open_copy(conv: Conversation) -> Conversation:
    """`conv` with its last answer reopened: the prompt that answer was generated from."""
    return Conversation(conv.spec, list(conv.messages[:-1]) + [("Assistant", None)])


def _fresh_tokens(pipe, conv: Conversation, block) -> list[int]:
    s = pipe.decoder.session()
    s.prefill(pipe.prompt_ids(conv), block)
    return list(s.generate_text(Sampling.greedy(MAX_NEW)).tokens)


def test_fifty_turn_chat_at_ctx_512_never_raises(exact_pipe, block, caplog):
    pipe = exact_pipe
    n_ctx = pipe.n_ctx
    assert n_ctx == 512 == pipe.decoder.n_ctx
    chat = pipe.chat(embeddings=block, modality="imu")
    notices: list[str] = []
    compared = trims = max_positions = prefilled = 0
    t0 = time.perf_counter()
    with caplog.at_level("WARNING"):
        for i in range(N_TURNS):
            before = chat.turns_dropped
            answer = chat.ask(f"Question {i}: what does the person do after step {i}?",
                              sampling=Sampling.greedy(MAX_NEW))
            notices += answer.notices
            prefilled += answer.timings["prefill_positions"]
            kept, held = pipe.engine.cache_positions()[answer.slot]
            assert kept == held <= n_ctx
            items = pipe.engine.slot_items(answer.slot)
            conv = chat.conversation
            assert conv.messages[-1] == ("Assistant", answer.text)
            positions = len(pipe.prompt_ids(_open_copy(conv))) + 32
            max_positions = max(max_positions, positions)
            assert positions + MAX_NEW <= n_ctx
            if chat.turns_dropped > before:
                trims += 1
                # the system prompt and the block stay; the oldest turns went
                assert conv.render().startswith(SYSTEM) and items[1:33] == [(items[1][0], r) for r in range(32)]
                assert conv.messages[0][1] != "Question 0: what does the person do after step 0?"
                assert answer.token_ids == _fresh_tokens(pipe, _open_copy(conv), block), f"turn {i}"
                compared += 1
    seconds = time.perf_counter() - t0
    assert chat.turns == N_TURNS
    assert trims >= 2 and compared == trims
    assert len(notices) == 1 and "outgrew the context" in notices[0]
    assert len([r for r in caplog.records if "outgrew the context" in r.getMessage()]) == 1
    print(f"\n50-turn chat at n_ctx {n_ctx}: {chat.turns} turns answered, {trims} trims dropped "
          f"{chat.turns_dropped} turns, {len(chat.conversation.messages) // 2} kept at the end, "
          f"largest prompt {max_positions} positions, {prefilled:.0f} positions prefilled in all "
          f"({prefilled / N_TURNS:.1f}/turn), {seconds:.2f} s")


def test_a_question_longer_than_the_context_is_a_one_line_error_and_the_chat_goes_on(exact_pipe, block):
    pipe = exact_pipe
    chat = pipe.chat(embeddings=block, modality="imu")
    first = chat.ask("What is the person doing?", sampling=Sampling.greedy(MAX_NEW))
    long_question = " ".join(f"word{i}" for i in range(400))
    with pytest.raises(InputError) as err:
        chat.ask(long_question, sampling=Sampling.greedy(MAX_NEW))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("question: expected") and "n_ctx" in msg
    # the history was not touched (no turn dropped for a question that could never fit)
    assert chat.conversation.messages == [("Human", "What is the person doing?"), ("Assistant", first.text)]
    assert chat.turns_dropped == 0
    nxt = chat.ask("Is it fast?", sampling=Sampling.greedy(MAX_NEW))
    assert nxt.token_ids == _fresh_tokens(pipe, _open_copy(chat.conversation), block)
    with pytest.raises(InputError, match="n_ctx"):
        pipe.ask(long_question, embeddings=block, modality="imu")
