"""onellm.ref: the PyTorch reference implementation of OneLLM (CPU-capable).

Everything exported or run by onellm is checked against this package.
"""

from .config import ModelConfig, list_presets, load_preset, resolve_config

__all__ = ["ModelConfig", "list_presets", "load_preset", "resolve_config"]
