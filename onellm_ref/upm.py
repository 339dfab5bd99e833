"""Universal projection module pieces (spec section 5).

The modules themselves hang off `OneLLM` (`resample_layers`, `routers`, `resample_tokens`,
`clip_proj1`, `clip_proj2`, `start_tag`, `end_tag`) so the checkpoint keys load strictly;
this file holds their builders and the two computations:

* `routing_weights(router, tokens)`: sigmoid(router(resample_tokens)) normalised over
  the experts, one [n_experts] vector per resample row. Upstream evaluates the router on
  every row but reads only the first n_resample rows, which ARE the learned tokens, so
  the weights never depend on the input.
* `run_expert(blocks, x, n_out)`: LLaMA blocks without rotary embedding, mask or cache;
  only the first n_out rows of the last block are computed (they are all that is read).
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import LayerNorm
from .decoder import TransformerBlock


class Mlp(nn.Module):
    """Router: fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_projection(in_dim: int, out_dim: int, eps: float) -> nn.Sequential:
    """clip_proj1 / clip_proj2: Linear then LayerNorm (keys `.0.*`, `.1.*`)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), LayerNorm(out_dim, eps=eps))


def build_expert(width: int, heads: int, ffn_hidden: int, depth: int, eps: float) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(width, heads, ffn_hidden, eps) for _ in range(depth))


def routing_weights(router: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[n_resample, n_experts] weights from the resample tokens [n_resample, width]."""
    w = torch.sigmoid(router(tokens))
    return w / w.sum(dim=-1, keepdim=True)


def run_expert(blocks: nn.ModuleList, x: torch.Tensor, n_out: int, full_last_block: bool = False) -> torch.Tensor:
    """First n_out rows of an expert's output on x [B, L, width].

    `full_last_block=True` computes every row of the last block, as upstream does, then
    slices; the result is the same.
    """
    last = len(blocks) - 1
    for j, block in enumerate(blocks):
        x = block(x, n_query=None if (j < last or full_last_block) else n_out)
    return x[:, :n_out]
