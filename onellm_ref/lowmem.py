"""An exact fp32 decoder reference for models loaded in their file's fp16/bf16, one layer at a time.

The export validates each GGUF against the reference's logits. Loading a 7B release
as fp32 for that would take 27 GB of RAM; loading it as stored (fp16, memory-mapped,
no copies) takes none. `decoder_logits_fp32` then runs the decoder with each layer's
weights cast to fp32 only while that layer runs (about 0.8 GB at 7B, or the 0.5 GB
output matrix), and gives the file pages it read back to the kernel afterwards
(`FilePages`), so the peak stays near one layer. fp16 -> fp32 is exact, and the layer
maths is the reference's own modules in fp32, so the logits equal those of the model
loaded as fp32 (tests/test_stream_checkpoint.py: within float32 rounding).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from .checkpoint import _FilePages

Release = Callable[[torch.Tensor], None]


def page_releaser(files: Sequence[str | os.PathLike]) -> Release:
    """A function dropping the resident file pages behind a memory-mapped tensor of `files`
    (no-op for anything else; Linux only)."""
    from pathlib import Path

    return _FilePages([Path(f) for f in files]).release


@contextlib.contextmanager
def fp32_params(module: torch.nn.Module, release: Release | None = None) -> Iterator[torch.nn.Module]:
    """`module` with its non-fp32 parameters cast to fp32 inside the block, restored after it."""
    saved = [(p, p.data) for p in module.parameters() if p.dtype != torch.float32]
    try:
        for p, data in saved:
            p.data = data.float()
            if release is not None:
                release(data)  # the cast read every page; the file keeps them
        yield module
    finally:
        for p, data in saved:
            p.data = data


def decoder_is_fp32(model) -> bool:
    return all(p.dtype == torch.float32 for p in model.layers.parameters())


def decoder_logits_fp32(model, ids: torch.Tensor, block: torch.Tensor | None,
                        release: Release | None = None) -> torch.Tensor:
    """fp32 logits [B, S, vocab] of [emb(ids[:, :1]), block, emb(ids[:, 1:])], like
    `model.forward_decoder(model.build_sequence(ids, block), 0, cache)` on an fp32 model."""
    with torch.no_grad():
        h = model.tok_embeddings.weight[ids].float()  # the rows alone: exact, no whole-matrix cast
        if block is not None:
            h = torch.cat([h[:, :1], block.float(), h[:, 1:]], dim=1)
        cos, sin = model._rope_tables(h.device)
        rope = (cos[: h.shape[1]], sin[: h.shape[1]])
        for i, layer in enumerate(model.layers):
            with fp32_params(layer, release):
                h = layer(h, rope=rope, causal=True, cache=None, layer=i, start_pos=0)
        with fp32_params(model.norm), fp32_params(model.output, release):
            return model.output(model.norm(h)).float()
