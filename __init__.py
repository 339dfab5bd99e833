"""onellm: an edge/offline inference runtime for OneLLM.

Installed layout: `onellm.runtime` (torch-free bottom layer), `onellm.ref` (the PyTorch
reference), `onellm.export` (checkpoint -> bundle), `onellm.benchmarks`, `onellm.cli`.
This module holds only the version, the one source of it (pyproject reads it too), so
importing `onellm` imports nothing else.
"""

__version__ = "0.1.0"
