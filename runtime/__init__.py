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

__version__ = "0.1.0"

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
