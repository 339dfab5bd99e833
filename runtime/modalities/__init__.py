"""One module per modality, each declaring a `SPEC`; see `base.py`."""

from .base import (
    MODALITY_ORDER,
    TOKENIZER_KINDS,
    Example,
    ModalityInput,
    ModalitySpec,
    ReaderFlag,
    all_modalities,
    example_file,
    example_inputs,
    examples_dir,
    get_modality,
    input_names,
)

__all__ = [
    "MODALITY_ORDER",
    "TOKENIZER_KINDS",
    "Example",
    "ModalityInput",
    "ModalitySpec",
    "ReaderFlag",
    "all_modalities",
    "example_file",
    "example_inputs",
    "examples_dir",
    "get_modality",
    "input_names",
]
