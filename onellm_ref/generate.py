"""Text generation with the reference model: prompt, prefill, cached decoding, sampling.

The sequence of a turn is [emb(BOS), the n_inserted-row modality block, emb(prompt
tokens after BOS)] (spec sections 1 and 8), prefilled in one pass at position 0. Each
generated token then goes in at the next TRUE position: the block counts as the
n_inserted (32) positions it occupies. (The reference code continues at +30 after the
first token, which overwrites the cache of the last two prompt tokens; that bug is not
reproduced.) The context budget counts the block too: prompt positions + new tokens
<= the cache length.

Stops: the first `###` (the text is cut there and stripped), EOS, `max_new_tokens`,
or a full context. Sampling is LLaMA's: softmax(logits / temperature), nucleus top-p,
a draw from a seeded `torch.Generator`; `greedy=True` (or temperature <= 0) takes
the argmax.

`ChatSession` keeps the KV cache between turns: a follow-up question re-renders the
whole conversation, keeps every cached position whose token matches the new prompt
(BOS, the block, and the earlier turns' tokens as far as they tokenise the same) and
prefills only the rest. `generate(...)` is one question in a fresh session.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from onellm.runtime.errors import BundleError, InputError
from onellm.runtime.prompt import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    STOP_STRINGS,
    Conversation,
)
from onellm.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["ChatSession", "GenerationResult", "generate", "sample_next_token"]


@dataclasses.dataclass
class GenerationResult:
    """What one turn produced."""

    text: str  # the answer: cut at the first stop string, stripped; EOS never included
    token_ids: list[int]  # every generated id in order (stop-string pieces and a final EOS included)
    stop_reason: str  # "stop_string" | "eos" | "max_new_tokens" | "context_full"
    prompt_ids: list[int]  # the turn's prompt token ids (BOS first), the whole conversation so far
    start_pos: int  # first position prefilled this turn = positions kept from the cache (0 on a first turn)
    n_positions: int  # valid cache positions after the turn (the last generated token is not in it)
    step_logits: torch.Tensor | None = None  # [len(token_ids), vocab] fp32: the logits each token came from


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None, greedy: bool = False
) -> int:
    """One token id from fp32 logits [vocab]: argmax, or temperature + nucleus (top-p) sampling."""
    if greedy or temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, sorted_idx = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > top_p, 0.0)  # keep the top-p nucleus
    sorted_probs = sorted_probs / sorted_probs.sum()
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)
    return int(sorted_idx[choice])


def _cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if cuts:
        return text[: min(cuts)].strip(), True
    return text.strip(), False


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _resolve_block(model, inputs) -> torch.Tensor | None:
    """None (text only), a [1, n, dim] embedding block, or (modality, x) to encode."""
    if inputs is None:
        return None
    if isinstance(inputs, tuple):
        modality, x = inputs
        x = torch.as_tensor(x)
        if x.ndim == len(model.input_shape(modality)):
            x = x[None]
        if x.shape[0] != 1:
            raise InputError(f"{modality} input", "a single sample (batch 1)", f"a batch of {x.shape[0]}")
        with torch.inference_mode():
            return model.encode(modality, x)
    block = torch.as_tensor(inputs)
    if block.ndim == 2:
        block = block[None]
    dim = model.cfg.decoder.dim
    if block.ndim != 3 or block.shape[0] != 1 or block.shape[2] != dim:
        raise InputError("modality embeddings", f"a [1, n, {dim}] tensor", f"shape {list(block.shape)}")
    return block


class ChatSession:
    """A multi-turn conversation about one (optional) modality input, with a persistent KV cache."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer | str | os.PathLike,
        inputs=None,
        history: list[tuple[str, str]] | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = Tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        if self.tokenizer.bos_id < 0:
            raise BundleError(f"{getattr(self.tokenizer, 'source', 'tokenizer')}: the model needs a BOS token")
        self.block = _resolve_block(model, inputs)
        self.n_block = 0 if self.block is None else self.block.shape[1]
        self.conversation = Conversation()
        for question, answer in history or []:
            self.conversation.add_question(question)
            self.conversation.set_answer(answer)
        self.cache = model.new_cache(batch_size=1, max_seq_len=max_seq_len)
        self._cached_ids: list[int] | None = None  # prompt/answer ids cached after [BOS, block]

    @property
    def n_fixed(self) -> int:
        """Positions before the first prompt token after BOS: BOS and the block."""
        return 1 + self.n_block

    def ask(
        self,
        question: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        seed: int = 0,
        greedy: bool = False,
        return_logits: bool = False,
        stop_at_eos: bool = True,
        stop_strings: tuple[str, ...] = STOP_STRINGS,
        on_overflow: str = "truncate",
    ) -> GenerationResult:
        """Answer one question; the conversation and the cache keep it for the next turn.

        on_overflow: what happens when prompt positions + max_new_tokens exceed the
        context: "truncate" generates fewer tokens (stop_reason "context_full"),
        "error" raises InputError. A prompt with no room left for one token always raises.
        """
        if on_overflow not in ("truncate", "error"):
            raise ValueError(f"on_overflow must be 'truncate' or 'error', not {on_overflow!r}")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens", "at least 1", str(max_new_tokens))
        self.conversation.add_question(question)
        try:
            result = self._run_turn(
                max_new_tokens, temperature, top_p, seed, greedy, return_logits, stop_at_eos, stop_strings, on_overflow
            )
        except BaseException:
            del self.conversation.messages[-2:]  # forget the unanswered question
            raise
        self.conversation.set_answer(result.text)
        return result

    @torch.inference_mode()
    def _run_turn(
        self, max_new_tokens, temperature, top_p, seed, greedy, return_logits, stop_at_eos, stop_strings, on_overflow
    ) -> GenerationResult:
        model, tok = self.model, self.tokenizer
        ids = tok.encode(self.conversation.render(), bos=True, eos=False)
        tail = ids[1:]
        n_prompt = self.n_fixed + len(tail)
        limit = self.cache.max_seq_len
        if n_prompt >= limit:
            raise InputError(
                "prompt",
                f"fewer than {limit - self.n_fixed} tokens after BOS (context {limit} = "
                f"BOS + {self.n_block} modality rows + prompt + at least one new token)",
                f"{len(tail)} tokens",
            )
        budget = limit - n_prompt
        capped = False
        if max_new_tokens > budget:
            if on_overflow == "error":
                raise InputError(
                    "generation request",
                    f"prompt positions ({n_prompt}, the {self.n_block} modality rows included) + max_new_tokens "
                    f"<= context {limit}",
                    f"{n_prompt} + {max_new_tokens}",
                )
            log.warning("max_new_tokens %d exceeds the context left (%d); generating at most %d",
                        max_new_tokens, budget, budget)
            max_new_tokens, capped = budget, True

        # prefill: everything on a first turn, else the part of the prompt not already cached
        if self._cached_ids is None:
            reuse, start = 0, 0
            h = model.build_sequence(torch.tensor([ids]), self.block)
        else:
            reuse = min(_common_prefix(tail, self._cached_ids), len(tail) - 1)
            start = self.n_fixed + reuse
            h = model.embed_tokens(torch.tensor([tail[reuse:]]))
        logits = model.forward_decoder(h, start, self.cache, last_only=True)[0, -1]
        pos = start + h.shape[1]

        gen = torch.Generator().manual_seed(seed)
        generated: list[int] = []
        step_logits: list[torch.Tensor] = []
        stop_reason = "max_new_tokens"
        text = ""
        while True:
            if return_logits:
                step_logits.append(logits.clone())
            token = sample_next_token(logits, temperature, top_p, gen, greedy)
            generated.append(token)
            if stop_at_eos and token == tok.eos_id:
                stop_reason = "eos"
                text, _ = _cut_at_stop(tok.decode(generated[:-1]), stop_strings)
                break
            text, stopped = _cut_at_stop(tok.decode(generated), stop_strings)
            if stopped:
                stop_reason = "stop_string"
                break
            if len(generated) >= max_new_tokens:
                stop_reason = "context_full" if capped else "max_new_tokens"
                break
            logits = model.forward_decoder(model.embed_tokens(torch.tensor([[token]])), pos, self.cache)[0, -1]
            pos += 1

        self._cached_ids = tail + generated[:-1]  # the last token was never fed
        assert self.cache.length == self.n_fixed + len(self._cached_ids)
        return GenerationResult(
            text=text,
            token_ids=generated,
            stop_reason=stop_reason,
            prompt_ids=ids,
            start_pos=start,
            n_positions=self.cache.length,
            step_logits=torch.stack(step_logits) if return_logits else None,
        )


def generate(
    model,
    tokenizer: Tokenizer | str | os.PathLike,
    question: str,
    inputs=None,
    history: list[tuple[str, str]] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    seed: int = 0,
    greedy: bool = False,
    return_logits: bool = False,
    stop_at_eos: bool = True,
    stop_strings: tuple[str, ...] = STOP_STRINGS,
    on_overflow: str = "truncate",
) -> GenerationResult:
    """Answer `question` about `inputs` in a fresh session.

    inputs: None (text only), a [1, n_inserted, dim] embedding block (e.g. from an
    exported encoder), or (modality, x) with x of the modality's input shape, batch
    dimension optional. history: earlier (question, answer) pairs rendered before it.
    """
    session = ChatSession(model, tokenizer, inputs, history=history)
    return session.ask(
        question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        greedy=greedy, return_logits=return_logits, stop_at_eos=stop_at_eos, stop_strings=stop_strings,
        on_overflow=on_overflow,
    )
