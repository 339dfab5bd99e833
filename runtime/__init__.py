"""onellm.runtime: the torch-free bottom layer (numpy, onnxruntime, llama.cpp, sentencepiece).

Nothing here imports torch, `onellm.export` or `onellm.ref`.
"""

from .errors import (
    BackendError,
    BundleError,
    CheckpointError,
    ConfigError,
    InputError,
    OneLLMError,
    ParityError,
)

from .. import __version__  # the one version source: onellm/__init__.py

__all__ = [
    "BackendError",
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "OneLLMError",
    "ParityError",
    "__version__",
]
