"""Point-cloud grouping in numpy: furthest point sampling and kNN, as the reference does it.

The point tokenizer (spec section 4) samples 1024 centres by furthest point sampling
(FPS) on the LAST three channels of the cloud, takes each centre's 32 nearest points
and gathers their six channels; a 1x1 convolution and a max over the neighbours (in
the exported tokenizer graph) turn that into tokens. This module does the data-
dependent part on the host, bit-for-bit like `onellm.ref.point_utils`:

* FPS: running squared distances start at 1e10; each step takes
  `dx*dx + dy*dy + dz*dz` (fp32, each operation rounded) to the last centre, keeps the
  running minimum and picks the maximum. Ties: `"cuda"` (the reference's default) picks
  what the pointnet2 CUDA kernel picks (the smallest bit-reversed `k mod T`, then the
  smallest k, T = the kernel's block size); `"first"` picks the lowest index.
* kNN: Euclidean distance computed as `torch.cdist` computes it on CPU
  (`sqrt(fma(dz, dz, fma(dy, dy, dx*dx)))` in fp32 — emulated exactly in fp64), the k
  smallest, equal distances to the lower index (the neighbour order is irrelevant: the
  tokenizer takes a max over neighbours).

Measured against doing both inside the ONNX graph (`python -m onellm.benchmarks.encoder
grouping`): numpy is faster and reproduces the reference's ties exactly.
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import InputError

FPS_INITIAL_DISTANCE = np.float32(1e10)  # the kernel's fill value for running distances
CUDA_MAX_THREADS = 1024  # the kernel's TOTAL_THREADS
TIE_BREAKS = ("cuda", "first")


def cuda_block_size(n_points: int) -> int:
    """Threads per block the pointnet2 FPS kernel launches for n_points."""
    pow2 = n_points.bit_length() - 1 if n_points > 0 else 0
    return max(min(1 << pow2, CUDA_MAX_THREADS), 1)


@functools.lru_cache(maxsize=8)
def preference_order(n_points: int) -> np.ndarray:
    """Point indices from most to least preferred on an exact tie, as the CUDA kernel decides.

    Thread t of a block of T scans points t, t+T, ... keeping the first strict maximum;
    the tree reduction keeps the left value on equality. So the winner among tied points
    has the smallest bit-reversed (k mod T), then the smallest k.
    """
    block = cuda_block_size(n_points)
    bits = max(block.bit_length() - 1, 0)
    k = np.arange(n_points, dtype=np.int64)
    tid = k % block
    rev = np.zeros_like(tid)
    for b in range(bits):
        rev |= ((tid >> b) & 1) << (bits - 1 - b)
    key = rev * (n_points // block + 1) + k // block
    order = np.argsort(key, kind="stable")
    order.setflags(write=False)
    return order


def furthest_point_sample(p: np.ndarray, n_samples: int, tie_break: str = "cuda") -> np.ndarray:
    """Indices [n_samples] (int64) of furthest-point-sampled points of p [N, 3], from index 0."""
    if p.ndim != 2 or p.shape[1] != 3:
        raise InputError("point coordinates", "an [N, 3] array", f"shape {list(p.shape)}")
    n_points = p.shape[0]
    if not 0 < n_samples <= n_points:
        raise InputError("point cloud", f"at least {n_samples} points to sample from", f"{n_points}")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, not {tie_break!r}")
    if tie_break == "cuda":
        order = preference_order(n_points)
        q = p[order]  # the first maximum in this order is the kernel's choice
        cur = int(np.flatnonzero(order == 0)[0])
    else:
        order = None
        q = p
        cur = 0
    px, py, pz = (np.ascontiguousarray(q[:, i], dtype=np.float32) for i in range(3))
    temp = np.full(n_points, FPS_INITIAL_DISTANCE, dtype=np.float32)
    d = np.empty(n_points, dtype=np.float32)
    t = np.empty(n_points, dtype=np.float32)
    picked = np.empty(n_samples, dtype=np.int64)
    for j in range(n_samples):
        picked[j] = cur
        if j == n_samples - 1:
            break
        np.subtract(px, px[cur], out=d)
        np.multiply(d, d, out=d)
        np.subtract(py, py[cur], out=t)
        np.multiply(t, t, out=t)
        np.add(d, t, out=d)
        np.subtract(pz, pz[cur], out=t)
        np.multiply(t, t, out=t)
        np.add(d, t, out=d)
        np.minimum(temp, d, out=temp)
        cur = int(temp.argmax())
    return order[picked] if order is not None else picked


KNN_CHUNK = 64  # centres per block: keeps the fp64 temporaries in cache


def cdist_like_torch(centres: np.ndarray, p: np.ndarray, chunk: int = KNN_CHUNK) -> np.ndarray:
    """[M, N] fp32 Euclidean distances exactly as torch.cdist (no matmul path) gives them on CPU.

    torch accumulates with fused multiply-adds: sqrt(fma(dz, dz, fma(dy, dy, dx*dx))).
    An fp32 product is exact in fp64, so each fma is an fp64 add rounded once to fp32.
    """
    out = np.empty((centres.shape[0], p.shape[0]), dtype=np.float32)
    for start, d in _cdist_blocks(centres, p, chunk):
        out[start : start + d.shape[0]] = d
    return out


def _cdist_blocks(centres: np.ndarray, p: np.ndarray, chunk: int):
    """Yield (first row, [rows, N] fp32 distances) blocks of cdist_like_torch; buffers are reused."""
    n_points = p.shape[0]
    cols = [np.ascontiguousarray(p[:, i], dtype=np.float32) for i in range(3)]
    cen = np.asarray(centres, dtype=np.float32)
    diff = np.empty((chunk, n_points), dtype=np.float32)
    acc = np.empty((chunk, n_points), dtype=np.float32)
    wide = np.empty((chunk, n_points), dtype=np.float64)
    for start in range(0, cen.shape[0], chunk):
        stop = min(start + chunk, cen.shape[0])
        n = stop - start
        dv, av, wv = diff[:n], acc[:n], wide[:n]
        for i in range(3):
            np.subtract(cen[start:stop, i, None], cols[i][None, :], out=dv)
            np.multiply(dv, dv, out=wv, dtype=np.float64)  # exact
            if i:
                np.add(wv, av, out=wv)
            av[...] = wv  # the fma's single rounding to fp32
        np.sqrt(av, out=av)
        yield start, av


def knn(p: np.ndarray, centres: np.ndarray, k: int, chunk: int = KNN_CHUNK) -> np.ndarray:
    """Indices [M, k] of the k points of p [N, 3] nearest to each centre [M, 3].

    The set is the reference's (ties to the lower index); within a row the order is
    arbitrary (the tokenizer takes a max over neighbours).
    """
    n_points = p.shape[0]
    if k > n_points:
        raise InputError("point cloud", f"at least {k} points for {k} neighbours", f"{n_points}")
    out = np.empty((centres.shape[0], k), dtype=np.int64)
    # Non-negative fp32 values order like their bit patterns; the index in the low bits
    # makes every key unique, so "k smallest keys" = k nearest with ties to the lower index.
    shift = max(int(n_points - 1).bit_length(), 1)
    index = np.arange(n_points, dtype=np.int64)[None, :]
    keys = np.empty((chunk, n_points), dtype=np.int64)
    for start, d in _cdist_blocks(centres, p, chunk):
        kv = keys[: d.shape[0]]
        np.left_shift(d.view(np.int32), shift, out=kv, dtype=np.int64)
        np.bitwise_or(kv, index, out=kv)
        out[start : start + d.shape[0]] = np.argpartition(kv, k - 1, axis=1)[:, :k]
    return out


def group_points(
    x: np.ndarray, n_groups: int, k: int, tie_break: str = "cuda", out: np.ndarray | None = None
) -> np.ndarray:
    """Neighbourhoods [n_groups, k, C] (fp32) of a cloud x [N, C], grouped on its last 3 channels.

    `out`, if given, receives the result (a preallocated [n_groups, k, C] fp32 buffer).
    """
    if x.ndim != 2 or x.shape[1] < 3:
        raise InputError("point cloud", "an [N, C>=3] array", f"shape {list(x.shape)}")
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError("point cloud", "finite values", "NaN or infinity")
    p = np.ascontiguousarray(x[:, -3:])
    centre_idx = furthest_point_sample(p, n_groups, tie_break)
    nbr = knn(p, p[centre_idx], k)  # [M, k]
    if out is None:
        return x[nbr]
    np.take(x, nbr, axis=0, out=out)
    return out
