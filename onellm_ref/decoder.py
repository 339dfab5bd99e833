"""LLaMA building blocks (Meta layout) shared by the decoder and the UPM experts.

`TransformerBlock` is the LLaMA block: RMSNorm, attention with wq/wk/wv/wo, SwiGLU
w1/w2/w3. The decoder runs it with interleaved-pair rotary embeddings, a causal mask
and a `KVCache`; the UPM experts run the very same block without rotary embeddings,
without a mask and without a cache (spec sections 2 and 5).

Attention is plain `scaled_dot_product_attention`; rotary embeddings use real
arithmetic that equals Meta's complex formulation: pairs (0,1), (2,3), ... of each head
are rotated by position * theta^(-2i/head_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onellm.runtime.errors import InputError


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, n_positions: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, fp32, each [n_positions, head_dim // 2]."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    t = torch.arange(n_positions, device=device).float()
    angles = torch.outer(t, freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by cos/sin [S, D/2]; computed in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)


class KVCache:
    """Preallocated keys and values of every decoder layer, [layers, B, H, max_seq_len, D].

    `forward_decoder` writes positions start_pos .. start_pos+S-1 and attends over
    0 .. start_pos+S-1; `length` is the number of valid positions after the last write.
    Rewinding (a smaller start_pos) is allowed: later positions are simply overwritten.
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        head_dim: int,
        max_seq_len: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layers, batch_size, n_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.length = 0

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, S, D] at start_pos; return all keys/values up to the new end."""
        bsz, end = k.shape[0], start_pos + k.shape[2]
        self.k[layer, :bsz, :, start_pos:end] = k
        self.v[layer, :bsz, :, start_pos:end] = v
        return self.k[layer, :bsz, :, :end], self.v[layer, :bsz, :, :end]

    def check(self, batch_size: int, start_pos: int, n_new: int) -> None:
        if batch_size > self.batch_size:
            raise InputError("decoder input", f"a batch of at most {self.batch_size} (the cache's)", f"{batch_size}")
        if start_pos < 0 or start_pos > self.length:
            raise InputError(
                "decoder input", f"start_pos between 0 and {self.length} (positions already cached)", f"{start_pos}"
            )
        if start_pos + n_new > self.max_seq_len:
            raise InputError(
                "decoder input",
                f"at most {self.max_seq_len} positions in the cache",
                f"{start_pos} cached + {n_new} new",
            )


class Attention(nn.Module):
    """Multi-head attention with Meta's parameter names (no biases, no GQA)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
        n_query: int | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq_in = x if n_query is None else x[:, :n_query]
        n_q = xq_in.shape[1]
        q = self.wq(xq_in).view(bsz, n_q, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        if rope is not None:
            assert n_query is None, "rotary embeddings with a query subset are not used by OneLLM"
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)
        mask = None
        if causal and n_q > 1:
            # query i sits at key position (n_keys - n_q) + i and sees keys 0 .. that position
            n_keys = k.shape[2]
            qpos = torch.arange(n_q, device=x.device)[:, None] + (n_keys - n_q)
            mask = torch.arange(n_keys, device=x.device)[None, :] <= qpos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(bsz, n_q, self.n_heads * self.head_dim)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """The pre-norm LLaMA block.

    `n_query` computes only the first n_query output rows (keys and values still come
    from every row): what the UPM's last block needs, since only its first 30 rows are read.
    """

    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, norm_eps: float) -> None:
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, ffn_hidden)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
        n_query: int | None = None,
    ) -> torch.Tensor:
        residual = x if n_query is None else x[:, :n_query]
        h = residual + self.attention(
            self.attention_norm(x), rope=rope, causal=causal, cache=cache, layer=layer,
            start_pos=start_pos, n_query=n_query,
        )
        return h + self.feed_forward(self.ffn_norm(h))
