"""Prompt rendering from a bundle's `PromptSpec`; the `v1` template the checkpoint was tuned on (spec section 8).

A bundle records its template in the manifest (`Manifest.prompt`); the runtime renders
with that spec. `V1_PROMPT` is the template export writes, and the default of a
`Conversation` made without a spec (the torch reference, tests).
"""

from __future__ import annotations

import dataclasses

from .manifest import PromptSpec, SamplingDefaults

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLES = ("Human", "Assistant")
SEP = "###"
STOP_STRINGS = (SEP,)

# Sampling defaults of the release demo.
DEFAULT_TEMPERATURE = 0.1
DEFAULT_TOP_P = 0.75
DEFAULT_MAX_NEW_TOKENS = 256

V1_PROMPT = PromptSpec(
    template="v1",
    system=SYSTEM,
    roles=ROLES,
    sep=SEP,
    header="{system}\n\n{sep}",
    turn="{role}: {message}\n{sep}",
    open_turn="{role}:",
    stop=STOP_STRINGS,
    defaults=SamplingDefaults(temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P,
                              max_new_tokens=DEFAULT_MAX_NEW_TOKENS),
)


@dataclasses.dataclass
class Conversation:
    """A multi-turn conversation in a bundle's template: (role, message) pairs, the last answer open."""

    spec: PromptSpec = V1_PROMPT  # the template (a bundle's `Manifest.prompt`)
    messages: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)

    def add_question(self, question: str) -> None:
        self.messages.append((self.spec.roles[0], question))
        self.messages.append((self.spec.roles[1], None))

    def set_answer(self, answer: str) -> None:
        role, msg = self.messages[-1]
        assert role == self.spec.roles[1] and msg is None, "no open answer to fill"
        self.messages[-1] = (role, answer)

    @property
    def has_open_turn(self) -> bool:
        """True when the last question has no answer yet."""
        return bool(self.messages) and self.messages[-1] == (self.spec.roles[1], None)

    @property
    def n_turns(self) -> int:
        """Questions in the conversation (answered or open)."""
        return len(self.messages) // 2

    def drop_open_turn(self) -> bool:
        """Remove the unanswered last turn (question and open answer); False when there is none."""
        if not self.has_open_turn:
            return False
        del self.messages[-2:]
        return True

    def drop_oldest_turn(self) -> bool:
        """Remove the first question and its answer; False when only the last turn is left."""
        if len(self.messages) <= 2:
            return False
        del self.messages[:2]
        return True

    def render(self) -> str:
        """The prompt text, encoded with BOS and no EOS.

        The spec's header, then each answered turn in its `turn` format and the open
        answer in its `open_turn` format (v1: `role + ": " + msg + "\\n###"`, `role + ":"`).
        """
        sp = self.spec
        out = sp.header.format(system=sp.system, sep=sp.sep)
        for role, msg in self.messages:
            if msg is None:
                out += sp.open_turn.format(role=role, sep=sp.sep)
            else:
                out += sp.turn.format(role=role, message=msg, sep=sp.sep)
        return out


def render_prompt(question: str, history: list[tuple[str, str]] | None = None) -> str:
    """One question (after optional earlier question/answer pairs) as prompt text."""
    conv = Conversation()
    for q, a in history or []:
        conv.add_question(q)
        conv.set_answer(a)
    conv.add_question(question)
    return conv.render()


def cut_answer(text: str) -> tuple[str, bool]:
    """Cut generated text at the first stop string; returns (answer, stopped)."""
    idx = text.find(SEP)
    if idx >= 0:
        return text[:idx].strip(), True
    return text.strip(), False
