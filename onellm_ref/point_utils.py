"""Point-cloud grouping in plain torch: furthest point sampling, kNN, patch embedding.

The released model's point tokenizer used a pointnet2 CUDA extension. This module
reproduces its semantics on any device (spec section 4):

* `furthest_point_sample(p, n)`: the first centre is index 0; every point starts with a
  running distance of 1e10; each step takes squared Euclidean distances to the last
  centre, keeps the running minimum and picks the point with the largest one. Ties are
  broken the way the CUDA kernel breaks them (`tie_break="cuda"`, the default): the
  kernel runs a block of T = min(2^floor(log2 N), 1024) threads, thread t scans points
  t, t+T, t+2T, ... keeping the first strict maximum, and a tree reduction (strides
  T/2, T/4, ..., 1) keeps the left value on equality. So among tied points the winner
  has the smallest bit-reversed (k mod T), then the smallest k. `tie_break="first"`
  picks the lowest index instead (numpy/torch argmax). The two only differ on exact
  ties, which quantised RGB colours make common.
* `knn(p, centres, k)`: the k nearest points of each centre by Euclidean distance,
  nearest first, ties to the lower index. (Upstream used torch.cdist + topk; the
  neighbour order never matters because the tokenizer takes a max over neighbours.)
* `PointPatchEmbed`: sample 1024 centres and group 32 neighbours on the LAST three
  channels (colours in the training data), gather all six channels, Conv2d 1x1, max over
  neighbours. Always computed in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from onellm.runtime.errors import InputError

FPS_INITIAL_DISTANCE = 1e10  # the kernel's fill value for the running distances
CUDA_MAX_THREADS = 1024  # the kernel's TOTAL_THREADS


def cuda_block_size(n_points: int) -> int:
    """Threads per block the kernel launches for n_points (its opt_n_threads)."""
    pow2 = int(math.log(n_points) / math.log(2.0)) if n_points > 0 else 0
    return max(min(1 << pow2, CUDA_MAX_THREADS), 1)


@functools.lru_cache(maxsize=8)
def _cuda_preference_order(n_points: int) -> torch.Tensor:
    """Point indices sorted from most to least preferred on a tie, as the kernel decides."""
    block = cuda_block_size(n_points)
    bits = max(block.bit_length() - 1, 0)
    k = torch.arange(n_points)
    tid = k % block
    rev = torch.zeros_like(tid)
    for b in range(bits):
        rev |= ((tid >> b) & 1) << (bits - 1 - b)
    key = rev * (n_points // block + 1) + k // block
    return torch.argsort(key)


def furthest_point_sample(p: torch.Tensor, n_samples: int, tie_break: str = "cuda") -> torch.Tensor:
    """Indices [B, n_samples] (int64) of furthest-point-sampled points of p [B, N, 3].

    Computed in fp32. See the module docstring for the exact semantics.
    """
    if p.ndim != 3 or p.shape[-1] != 3:
        raise InputError("point coordinates", "a [B, N, 3] tensor", f"shape {list(p.shape)}")
    bsz, n_points, _ = p.shape
    if not 0 < n_samples <= n_points:
        raise InputError("point cloud", f"at least {n_samples} points to sample from", f"{n_points}")
    if tie_break not in ("cuda", "first"):
        raise ValueError(f"tie_break must be 'cuda' or 'first', not {tie_break!r}")
    p = p.float()
    if tie_break == "cuda":
        order = _cuda_preference_order(n_points).to(p.device)
        p = p[:, order]  # argmax (first maximum) over this order = the kernel's choice
    else:
        order = None
    px, py, pz = (p[..., i].contiguous() for i in range(3))
    batch = torch.arange(bsz, device=p.device)
    temp = torch.full((bsz, n_points), FPS_INITIAL_DISTANCE, dtype=torch.float32, device=p.device)
    picked = torch.empty(bsz, n_samples, dtype=torch.long, device=p.device)
    # position (in the permuted order) of original index 0, the first centre
    cur = torch.zeros(bsz, dtype=torch.long, device=p.device)
    if order is not None:
        cur[:] = int(torch.nonzero(order == 0)[0, 0])
    d = torch.empty_like(temp)
    t = torch.empty_like(temp)
    with torch.no_grad():
        for j in range(n_samples):
            picked[:, j] = cur
            if j == n_samples - 1:
                break
            c = p[batch, cur]  # [B, 3], the last centre
            # (dx*dx + dy*dy) + dz*dz in fp32, in place (the loop runs n_samples times)
            torch.sub(px, c[:, 0:1], out=d).mul_(d)
            torch.sub(py, c[:, 1:2], out=t).mul_(t)
            d.add_(t)
            torch.sub(pz, c[:, 2:3], out=t).mul_(t)
            d.add_(t)
            torch.minimum(temp, d, out=temp)
            cur = temp.argmax(dim=1)  # first maximum in the (permuted) order
    if order is not None:
        picked = order[picked]
    return picked


def knn(p: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, M, k] (int64) of the k points of p [B, N, 3] nearest to each centre [B, M, 3].

    Nearest first; equal distances go to the lower index (also at the k-th place).
    """
    bsz, n_points, _ = p.shape
    if k > n_points:
        raise InputError("point cloud", f"at least {k} points for {k} neighbours", f"{n_points}")
    out = []
    with torch.no_grad():
        for b in range(bsz):  # one cloud at a time bounds the [M, N] temporaries
            d = torch.cdist(centres[b].float(), p[b].float(), compute_mode="donot_use_mm_for_euclid_dist")
            # the k smallest distances are unambiguous whatever topk does with ties
            vals = d.topk(min(k + 1, n_points), dim=-1, largest=False, sorted=True).values
            kth = vals[:, k - 1 : k]
            take = d <= kth
            if k < n_points:  # rows where the (k+1)-th distance ties the k-th: too many candidates
                over = (vals[:, k] == vals[:, k - 1]).nonzero()[:, 0]
            else:
                over = torch.zeros(0, dtype=torch.long)
            if over.numel():
                sub = d[over]
                below = sub < kth[over]
                tied = sub == kth[over]
                room = k - below.sum(-1, keepdim=True)
                take[over] = below | (tied & (tied.cumsum(-1) <= room))  # lowest indices first
            idx = take.nonzero()[:, 1].view(-1, k)  # ascending index within each row
            order = d.gather(-1, idx).argsort(dim=-1, stable=True)
            out.append(idx.gather(-1, order))
    return torch.stack(out)


def group_points(x: torch.Tensor, n_groups: int, k: int, tie_break: str = "cuda") -> torch.Tensor:
    """Neighbourhoods [B, C, n_groups, k] (fp32) of x [B, N, C], grouped on its last 3 channels."""
    x = x.float()
    p = x[:, :, -3:].contiguous()
    centre_idx = furthest_point_sample(p, n_groups, tie_break=tie_break)
    centres = torch.gather(p, 1, centre_idx[..., None].expand(-1, -1, 3))
    nbr = knn(p, centres, k)  # [B, M, k]
    bsz, n_points, chans = x.shape
    grouped = torch.gather(x, 1, nbr.reshape(bsz, -1, 1).expand(-1, -1, chans))
    return grouped.view(bsz, n_groups, k, chans).permute(0, 3, 1, 2)


class PointPatchEmbed(nn.Module):
    """[B, N, C] cloud -> [B, width, n_groups, 1]; the parameters live in `conv1` (1x1)."""

    def __init__(self, in_channels: int, width: int, n_groups: int, k: int, tie_break: str = "cuda") -> None:
        super().__init__()
        self.n_groups = n_groups
        self.k = k
        self.tie_break = tie_break
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1)

    def embed_groups(self, grouped: torch.Tensor) -> torch.Tensor:
        """Grouped neighbourhoods [B, C, M, k] -> [B, width, M, 1], in fp32."""
        w = self.conv1.weight.float()
        b = None if self.conv1.bias is None else self.conv1.bias.float()
        return F.conv2d(grouped.float(), w, b).amax(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_groups(group_points(x, self.n_groups, self.k, self.tie_break))
