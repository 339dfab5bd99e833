"""The error types every layer of onellm raises.

One base class, `OneLLMError`; the CLI turns any of them into a one-line message and
a non-zero exit code. `assert` is kept for internal invariants only.
"""

from __future__ import annotations


class OneLLMError(Exception):
    """Base class of every error onellm raises on purpose."""

    exit_code = 1


class InputError(OneLLMError):
    """A user-supplied input (file or array) is not what the model can take.

    The message names the source, what was expected and what was found.
    """

    exit_code = 2

    def __init__(self, source: object, expected: str, found: str) -> None:
        self.source = str(source)
        self.expected = expected
        self.found = found
        super().__init__(f"{self.source}: expected {expected}, found {found}")


class ConfigError(OneLLMError):
    """A model configuration or preset is unknown or malformed."""

    exit_code = 2


class CheckpointError(OneLLMError):
    """A checkpoint is missing, unreadable or does not match the configuration."""


class BundleError(OneLLMError):
    """An exported bundle is missing files, has a bad checksum or an unknown schema."""


class BackendError(OneLLMError):
    """A native backend (onnxruntime, llama.cpp, TensorRT) failed or returned an error code."""


class ParityError(OneLLMError):
    """An exported artifact disagrees with the PyTorch reference beyond its tolerance."""
