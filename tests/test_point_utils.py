"""Furthest point sampling, kNN and the point patch embedding (onellm.ref.point_utils).

The CUDA kernel's semantics are checked against a literal Python transcription of its
thread/reduction structure on clouds full of exact ties (integer coordinates), and on a
hand-worked five-point cloud.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onellm.ref.point_utils import (  # noqa: E402
    PointPatchEmbed,
    cuda_block_size,
    furthest_point_sample,
    group_points,
    knn,
)
from onellm.runtime.errors import InputError  # noqa: E402


def kernel_fps(points: np.ndarray, m: int) -> list[int]:
    """The pointnet2 furthest_point_sampling_kernel, one block, written out thread by thread."""
    n = len(points)
    block = cuda_block_size(n)
    temp = np.full(n, 1e10, dtype=np.float32)
    pts = points.astype(np.float32)
    idxs = [0]
    old = 0
    for _ in range(1, m):
        x1, y1, z1 = pts[old]
        dists = np.empty(block, dtype=np.float32)
        dists_i = np.zeros(block, dtype=np.int64)
        for tid in range(block):
            best, besti = np.float32(-1), 0
            for k in range(tid, n, block):
                x2, y2, z2 = pts[k]
                d = (x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1)
                d2 = min(d, temp[k])
                temp[k] = d2
                if d2 > best:
                    best, besti = d2, k
            dists[tid], dists_i[tid] = best, besti
        stride = block // 2
        while stride >= 1:
            for tid in range(stride):
                v1, v2 = dists[tid], dists[tid + stride]
                if v2 > v1:
                    dists[tid], dists_i[tid] = v2, dists_i[tid + stride]
            stride //= 2
        old = int(dists_i[0])
        idxs.append(old)
    return idxs


def first_index_fps(points: np.ndarray, m: int) -> list[int]:
    """Textbook FPS: start at 0, argmax of the running minimum, ties to the lowest index."""
    temp = np.full(len(points), 1e10, dtype=np.float32)
    idxs = [0]
    for _ in range(1, m):
        d = ((points - points[idxs[-1]]) ** 2).sum(-1).astype(np.float32)
        temp = np.minimum(temp, d)
        idxs.append(int(np.argmax(temp)))
    return idxs


def test_block_size_matches_kernel_launch():
    assert cuda_block_size(8192) == 1024
    assert cuda_block_size(1025) == 1024
    assert cuda_block_size(1000) == 512
    assert cuda_block_size(5) == 4
    assert cuda_block_size(1) == 1


def test_fps_hand_checked_cloud():
    # On the x axis: 0, 1, 3, 10, 4.
    # step 1: squared distances to x=0 -> [0, 1, 9, 100, 16] -> index 3 (x=10)
    # step 2: min with distances to x=10 -> [0, 1, 9, 0, 16] -> index 4 (x=4)
    # step 3: min with distances to x=4 -> [0, 1, 1, 0, 0] -> a tie between indices 1 and 2.
    # The kernel (block of 4 threads) has thread 1 holding index 1 and thread 2 holding
    # index 2; its reduction compares slot 0 (winner of threads 0 and 2) with slot 1
    # (winner of threads 1 and 3) and keeps slot 0 on a tie: index 2 wins.
    p = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [10, 0, 0], [4, 0, 0]]])
    assert furthest_point_sample(p, 4).tolist() == [[0, 3, 4, 2]]
    assert furthest_point_sample(p, 4, tie_break="first").tolist() == [[0, 3, 4, 1]]
    assert kernel_fps(p[0].numpy(), 4) == [0, 3, 4, 2]


@pytest.mark.parametrize("n,m,levels", [(37, 20, 3), (70, 40, 2), (130, 64, 4), (300, 120, 3)])
def test_fps_matches_kernel_transcription_on_ties(n, m, levels):
    rng = np.random.default_rng(n)
    pts = rng.integers(0, levels, size=(2, n, 3)).astype(np.float32)  # exact ties everywhere
    got = furthest_point_sample(torch.from_numpy(pts), m)
    for b in range(2):
        assert got[b].tolist() == kernel_fps(pts[b], m)
        assert furthest_point_sample(torch.from_numpy(pts[b : b + 1]), m, tie_break="first")[0].tolist() == (
            first_index_fps(pts[b], m)
        )


def test_fps_without_ties_ignores_tie_rule():
    pts = torch.rand(1, 500, 3, generator=torch.Generator().manual_seed(0))
    a = furthest_point_sample(pts, 64)
    b = furthest_point_sample(pts, 64, tie_break="first")
    assert torch.equal(a, b)
    assert a[0, 0] == 0 and len(set(a[0].tolist())) == 64


def test_fps_rejects_too_few_points():
    with pytest.raises(InputError):
        furthest_point_sample(torch.zeros(1, 10, 3), 11)


def test_knn_hand_checked_ties():
    # 1-D cloud around the centre 0: distances [0, 1, 1, 2, 2, 1]
    p = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [2, 0, 0], [-2, 0, 0], [0, 1, 0]]])
    c = torch.zeros(1, 1, 3)
    assert knn(p, c, 2).tolist() == [[[0, 1]]]
    assert knn(p, c, 3).tolist() == [[[0, 1, 2]]]
    assert knn(p, c, 4).tolist() == [[[0, 1, 2, 5]]]
    assert knn(p, c, 5).tolist() == [[[0, 1, 2, 5, 3]]]


def test_knn_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    pts = rng.integers(0, 4, size=(2, 200, 3)).astype(np.float32)
    centres = pts[:, :17]
    got = knn(torch.from_numpy(pts), torch.from_numpy(centres), 9).numpy()
    for b in range(2):
        d = np.sqrt(((centres[b][:, None] - pts[b][None]) ** 2).sum(-1))
        want = np.argsort(d, axis=1, kind="stable")[:, :9]  # ties: lower index first
        np.testing.assert_array_equal(got[b], want)


def test_group_points_samples_on_last_three_channels_and_gathers_all_six():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 256, 6, generator=g)
    grouped = group_points(x, 16, 8)
    assert grouped.shape == (2, 6, 16, 8) and grouped.dtype == torch.float32
    for b in range(2):
        p = x[b : b + 1, :, 3:]
        centres = furthest_point_sample(p, 16)[0]
        nbr = knn(p, p[:, centres], 8)[0]  # [16, 8]
        torch.testing.assert_close(grouped[b], x[b][nbr].permute(2, 0, 1), rtol=0, atol=0)
    # the first three channels do not influence which points are grouped
    y = x.clone()
    y[..., :3] = torch.rand(2, 256, 3, generator=g) * 100
    same_geometry = group_points(y, 16, 8)
    torch.testing.assert_close(same_geometry[:, 3:], grouped[:, 3:], rtol=0, atol=0)


def test_point_patch_embed_is_conv_then_max_in_fp32():
    torch.manual_seed(0)
    embed = PointPatchEmbed(6, 12, n_groups=16, k=8)
    x = torch.rand(1, 128, 6)
    out = embed(x)
    assert out.shape == (1, 12, 16, 1) and out.dtype == torch.float32
    grouped = group_points(x, 16, 8)  # [1, 6, 16, 8]
    manual = torch.einsum("oc,bcmk->bomk", embed.conv1.weight[:, :, 0, 0], grouped) + embed.conv1.bias[:, None, None]
    torch.testing.assert_close(out, manual.amax(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    # a bf16 module still groups and convolves in fp32
    ref = embed(x)
    embed_bf16 = embed.to(torch.bfloat16)
    out_bf16 = embed_bf16(x)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, ref, rtol=2e-2, atol=2e-2)
