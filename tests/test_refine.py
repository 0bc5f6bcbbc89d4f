"""The pure functions of method.md §4-§5 against hand-computed cases, in float64."""

import math

import numpy as np
import pytest
import torch
from oracle import reference_cluster, reference_distances, reference_seeds

from iseg import refine as R

LOG10 = math.log10


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_nrm_hand_case_and_constant_column():
    m = t([[5.0, 2.0], [1.0, 2.0], [3.0, 2.0]])
    out = R.nrm(m)
    assert torch.allclose(out[:, 0], t([4 / 6, 0.0, 2 / 6]), atol=1e-12)
    assert torch.equal(out[:, 1], t([0.0, 0.0, 0.0]))  # a constant map carries no evidence


def test_entropy_reduce_hand_case():
    A = t([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.2, 0.8]])
    lam = 0.1
    # column maxima 0.5, 0.5, 0.8 -> Ahat
    ahat = [[1.0, 1.0, 0.0], [0.5, 1.0, 0.3125], [0.0, 0.4, 1.0]]
    step = [[a + lam * LOG10(math.e * a) if a > 0 else 0.0 for a in row] for row in ahat]
    expected = [[v / sum(row) for v in row] for row in step]
    P = R.entropy_reduce(A, lam)
    assert torch.allclose(P, t(expected), atol=1e-12)
    assert P[0, 2] == 0 and P[2, 0] == 0  # zeros stay zero


def test_entropy_reduce_clamps_negative_and_max():
    A = t([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    lam = 1.0
    colmax = [0.9, 0.8, 0.6]
    ahat = [[A[q, k].item() / colmax[k] for k in range(3)] for q in range(3)]
    step = [[max(0.0, a + lam * LOG10(math.e * a)) for a in row] for row in ahat]
    assert min(min(r) for r in step) == 0.0  # the case really exercises the clamp at 0
    expected = [[v / sum(row) for v in row] for row in step]
    assert torch.allclose(R.entropy_reduce(A, lam), t(expected), atol=1e-12)
    capped = [[min(v, 1.0) for v in row] for row in step]
    expected_cap = [[v / sum(row) for v in row] for row in capped]
    assert torch.allclose(R.entropy_reduce(A, lam, clamp_max=1.0), t(expected_cap), atol=1e-12)


def test_entropy_reduce_rows_sum_to_one_batched():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64).softmax(-1)
    for lam in (0.0, 0.015, 0.1, 5.0):
        P = R.entropy_reduce(A, lam)
        assert P.shape == A.shape
        assert torch.allclose(P.sum(-1), torch.ones(2, 3, 16, dtype=torch.float64), atol=1e-12)
        assert (P >= 0).all()


def test_entropy_reduce_keeps_dtype_and_rejects_bad_input():
    A = torch.rand(4, 4).softmax(-1)
    assert R.entropy_reduce(A, 0.1).dtype == torch.float32
    with pytest.raises(ValueError, match="square"):
        R.entropy_reduce(torch.rand(3, 4), 0.1)
    with pytest.raises(ValueError, match="lam"):
        R.entropy_reduce(A, -1)


def test_refine_identity_keeps_maps():
    m = torch.rand(2, 9, 3, dtype=torch.float64)
    steps = R.refine(m, torch.eye(9, dtype=torch.float64).expand(2, 9, 9), 4)
    assert steps.shape == (2, 5, 9, 3)
    for i in range(5):
        assert torch.allclose(steps[:, i], R.nrm(m), atol=1e-12)


def test_refine_block_diagonal_keeps_mass_in_blocks():
    P = torch.zeros(6, 6, dtype=torch.float64)
    P[:3, :3] = 1 / 3
    P[3:, 3:] = 1 / 3
    m = t([[1.0], [0.0], [0.0], [0.0], [0.0], [0.5]])
    steps = R.refine(m, P, 3)
    # after one step every pixel of a block holds its block's mean; the min-shift leaves only block 1
    assert torch.allclose(steps[1, :3, 0], t([1 / 3] * 3), atol=1e-12)
    assert torch.allclose(steps[1, 3:, 0], t([0.0] * 3), atol=1e-12)
    assert torch.allclose(steps[3], steps[1], atol=1e-12)


def test_refine_orientation_rows_are_queries():
    # pixel 0 attends only to pixel 2: P @ C makes pixel 0 take pixel 2's evidence
    P = t([[0, 0, 1], [0, 1, 0], [0, 0, 1]])
    m = t([[5.0], [1.0], [3.0]])
    steps = R.refine(m, P, 1)
    assert torch.allclose(steps[0, :, 0], t([2 / 3, 0, 1 / 3]), atol=1e-12)
    assert torch.allclose(steps[1, :, 0], t([0.5, 0.0, 0.5]), atol=1e-12)  # P.T @ C would give [0, 0, 1]


def test_refine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iterations"):
        R.refine(torch.rand(4, 2), torch.eye(4), -1)
    with pytest.raises(ValueError, match="same n"):
        R.refine(torch.rand(4, 2), torch.eye(5), 1)


def test_aggregate_cross_attention_normalises_upsamples_and_mixes():
    # r=1 map: one pixel; r=2 map: token 0 only at the top-left pixel
    a1 = t([[[2.0, 4.0]]])  # (B=1, n=1, T=2)
    a2 = t([[[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])  # (1, 4, 2)
    x = R.aggregate_cross_attention({1: a1, 2: a2}, {1: 0.5, 2: 0.25}, size=2)
    assert x.shape == (1, 4, 2)
    # r=1 normalises to 1 and upsamples to a constant 1; r=2 normalises token 0 to [1,0,0,0], token 1 to 1/4
    assert torch.allclose(x[0, :, 0], t([0.75, 0.5, 0.5, 0.5]), atol=1e-12)
    assert torch.allclose(x[0, :, 1], t([0.5625] * 4), atol=1e-12)
    with pytest.raises(ValueError, match="resolution"):
        R.aggregate_cross_attention({2: a2}, {4: 1.0}, size=2)


def test_kl_cluster_outputs_are_means_of_their_clusters():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 256, 5, generator=g, dtype=torch.float64)
    out = R.kl_cluster(x)
    for b in range(2):
        groups = {}
        for i in range(256):
            groups.setdefault(tuple(out[b, i].tolist()), []).append(i)
        assert 1 < len(groups) <= 36  # at most one cluster per seed of the 6x6 grid
        for members in groups.values():
            assert torch.allclose(out[b, members[0]], x[b, members].mean(0), atol=1e-12)


def test_class_maps_average_token_columns():
    x = t([[[1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 4.0, 6.0]]])  # (1, n=2, T=4)
    m = R.class_maps(x, [(1,), (2, 3)])
    assert torch.allclose(m, t([[[2.0, 3.5], [2.0, 5.0]]]), atol=1e-12)
    with pytest.raises(ValueError):
        R.class_maps(x, [])


def test_kl_cluster_merges_a_pixel_into_the_nearest_seed():
    # 12x12: seeds sit on even coordinates; the left half is one vector except one odd pixel that
    # no seed holds, so that pixel can only join a left-half cluster and takes that cluster's mean
    side = 12
    x = torch.zeros(1, side * side, 2, dtype=torch.float64)
    for i in range(side * side):
        x[0, i] = t([0.9, 0.1]) if (i % side) < side // 2 else t([0.2, 0.8])
    x[0, side + 1] = t([0.85, 0.15])
    out = R.kl_cluster(x, rounds=1)
    odd = out[0, side + 1]
    assert odd[0] > 0.85 and odd[0] < 0.9  # a mean of the odd pixel and left pixels
    assert torch.allclose(out[0, side - 1], t([0.2, 0.8]), atol=1e-12)  # right half untouched


def test_kl_cluster_uses_the_vectors_as_they_are_not_rescaled():
    # 2x2 map, 2 tokens, seeds at pixels 0 and 1. Pixel 2 = (0.3, 0.3) points the same way as seed
    # 0 = (0.1, 0.1), so after scaling to sum 1 it is identical to it (divergence 0). As they are
    # (method.md §4), with 1e-5 inside the logs:
    #   symKL(P, A) = 0.5 * ((0.3 - 0.1) * (ln 0.30001 - ln 0.10001)) * 2 = 0.21971
    #   symKL(P, B) = 0.5 * ((0.3 - 0.4) * (ln 0.30001 - ln 0.40001) + (0.3 - 0.2) * (ln 0.30001 - ln 0.20001)) = 0.03466
    # so pixel 2 joins seed 1's cluster and takes the mean of (0.4, 0.2) and (0.3, 0.3).
    x = t([[[0.1, 0.1], [0.4, 0.2], [0.3, 0.3], [0.1, 0.1]]])
    sym = lambda p, q: 0.5 * sum((a - b) * (math.log(a + 1e-5) - math.log(b + 1e-5)) for a, b in zip(p, q))  # noqa: E731
    assert sym((0.3, 0.3), (0.1, 0.1)) == pytest.approx(0.21971, abs=1e-5)
    assert sym((0.3, 0.3), (0.4, 0.2)) == pytest.approx(0.03466, abs=1e-5)
    d = R.symmetric_kl(x[:, 2:3], x[:, :2])
    assert torch.allclose(d, t([[[0.2197091, 0.0346561]]]), atol=1e-6)
    for rounds in (1, 20):
        out = R.kl_cluster(x, rounds=rounds, seeds=[0, 1])
        expected = t([[[0.1, 0.1], [0.35, 0.25], [0.35, 0.25], [0.1, 0.1]]])
        assert torch.allclose(out, expected, atol=1e-12), rounds
    # scaled to sum 1 (what this project did before), pixel 2 would join seed 0 instead
    scaled = x / x.sum(-1, keepdim=True)
    assert R._kl_assign(scaled, torch.tensor([0, 1]), 1).tolist() == [[0, 1, 0, 0]]
    assert R._kl_assign(x, torch.tensor([0, 1]), 1).tolist() == [[0, 1, 1, 0]]


def test_kl_cluster_floors_zeros_and_drops_empty_clusters():
    # seeds 0 and 3 hold the same vector: every pixel ties, argmin gives seed 0, seed 3's cluster
    # is empty after round 1 and is dropped (its mean would be 0/0); zeros give no NaN.
    x = t([[[0.0, 1.0], [0.0, 0.9], [1.0, 0.0], [0.0, 1.0]]])
    out = R.kl_cluster(x, rounds=5, seeds=[0, 3])
    assert torch.isfinite(out).all()
    assert torch.allclose(out, x.mean(1, keepdim=True).expand_as(x), atol=1e-12)
    with pytest.raises(ValueError, match="seeds"):
        R.kl_cluster(x, seeds=[7])
    with pytest.raises(ValueError, match="square"):
        R.kl_cluster(torch.zeros(1, 5, 2))


def test_kl_cluster_seeds_the_reference_grid_on_64x64():
    assert R._grid_seeds(64).tolist() == [y * 64 + x for y in range(0, 56, 11) for x in range(0, 56, 11)]


def test_mass_inside_by_hand():
    # 3 pixels, groups [0, 0, 1]; pixel 0 sends 0.5 to itself, 0.25 to pixel 1 and 0.25 to pixel 2
    P = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    m = R.mass_inside(P, torch.tensor([0, 0, 1]), 2)
    assert m.shape == (2, 3)
    # step 1: 0.75 of pixel 0's row is in group 0; step 2: P^2 row 0 = [0.25, 0.375, 0.375] -> 0.625
    torch.testing.assert_close(m[:, 0], torch.tensor([0.75, 0.625], dtype=torch.float64))
    torch.testing.assert_close(m[:, 1:], torch.ones(2, 2, dtype=torch.float64))  # pixels 1 and 2 stay home
    with pytest.raises(ValueError, match="groups must be"):
        R.mass_inside(P, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="iterations"):
        R.mass_inside(P, torch.tensor([0, 0, 1]), 0)


def test_pool_labels_takes_the_majority_of_each_cell():
    import numpy as np

    from iseg.masks import pool_labels

    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0:2] = 2  # half of cell (0, 0): a tie with background goes to the smaller label, 0
    labels[2:4, 2:4] = 1
    labels[3, 3] = 0  # three of four pixels of cell (1, 1) are label 1
    assert pool_labels(labels, 2).tolist() == [[0, 0], [0, 1]]
    with pytest.raises(ValueError, match="does not tile"):
        pool_labels(np.zeros((5, 4), np.uint8), 2)


# -- clustering against an independent float64 reference (tests/oracle.py: numpy, no iseg code) --------


def _near_tie_map(size, tokens, seed, gap=1e-6):
    """A (size*size, tokens) float32 map like an aggregated cross-attention X whose every non-seed pixel lies between two seed vectors, ``gap`` closer to
    one of them (in float64 symmetric KL)."""
    rng = np.random.default_rng(seed)
    n = size * size
    seeds = reference_seeds(size)
    # seed k: a low random floor and a bump of 3 on two tokens of its own, so that a mixture of two
    # seeds is far from every third seed
    x = rng.uniform(0.02, 0.08, (n, tokens))
    for k, s in enumerate(seeds):
        x[s, [2 * k, 2 * k + 1]] += 3.0 * rng.uniform(0.5, 1.5, 2)
    a = rng.integers(0, len(seeds), n)
    b = (a + 1 + rng.integers(0, len(seeds) - 1, n)) % len(seeds)
    va, vb = x[seeds][a], x[seeds][b]
    target = gap * rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 1.5, n)
    lo, hi = np.zeros(n), np.ones(n)

    def f(t):  # d(v, A) - d(v, B) - target, increasing in t
        v = (1 - t)[:, None] * va + t[:, None] * vb
        da = 0.5 * ((v - va) * (np.log(v + 1e-5) - np.log(va + 1e-5))).sum(-1)
        db = 0.5 * ((v - vb) * (np.log(v + 1e-5) - np.log(vb + 1e-5))).sum(-1)
        return da - db - target

    for _ in range(60):
        mid = (lo + hi) / 2
        up = f(mid) > 0
        hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
    mixed = (1 - lo)[:, None] * va + lo[:, None] * vb
    keep = np.zeros(n, bool)
    keep[seeds] = True
    x = np.where(keep[:, None], x, mixed)
    return x.astype(np.float32), seeds


@pytest.mark.parametrize("size, tokens", [(64, 77), (16, 77), (32, 333)], ids=["unet-64", "unet-16", "mmdit-32"])
def test_kl_cluster_agrees_with_float64_reference_on_near_ties(size, tokens):
    # Every non-seed pixel sits about 1e-6 (symmetric KL) closer to one of two seeds, while each
    # distance is about 1 and the expanded sums about 7: float32 cancellation is larger than the gaps
    x32, seeds = _near_tie_map(size, tokens, seed=size + tokens)
    assert R._grid_seeds(size).tolist() == seeds
    p = np.maximum(x32.astype(np.float64), 1e-6)
    d = reference_distances(p, p[seeds])
    best2 = np.sort(d, 1)[:, :2]
    others = np.setdiff1d(np.arange(size * size), seeds)
    gaps = (best2[:, 1] - best2[:, 0])[others]
    assert np.median(gaps) < 3e-6 and np.median(best2[others, 0]) > 0.1  # the inputs are near ties
    # what the float32 expansion (this project's former distance) decides: it flips some of them
    p32 = torch.from_numpy(p).float()
    lp = (p32 + 1e-5).log()
    c32, lc = p32[seeds], lp[seeds]
    expanded = 0.5 * ((p32 * lp).sum(-1, keepdim=True) - p32 @ lc.T + (c32 * lc).sum(-1) - lp @ c32.T)
    assert (expanded.argmin(1).numpy() != d.argmin(1)).mean() > 0.01
    # iseg's distance and one round: the reference's nearest seed for every pixel
    ours = R.symmetric_kl(torch.from_numpy(p)[None], torch.from_numpy(p[seeds])[None])[0].numpy()
    assert np.abs(ours - d).max() < 1e-11
    x = torch.from_numpy(x32)[None]
    assign1, _, _ = reference_cluster(x32, seeds, 1)
    assert R._kl_assign(x.clamp_min(1e-6), torch.tensor(seeds), 1)[0].numpy().tolist() == assign1.tolist()
    # and the whole k-means, 3 rounds, in a batch of two with the image alone
    assign, expected, _ = reference_cluster(x32, seeds, 3)
    other = torch.from_numpy(_near_tie_map(size, tokens, seed=1)[0])[None]
    out = R.kl_cluster(torch.cat([other, x]), rounds=3)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[1].double().numpy(), expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(out[1:], R.kl_cluster(x, rounds=3))  # a batch computes what one image computes


def test_kl_cluster_seed_grid_below_64():
    assert R._grid_seeds(16).tolist() == [y * 16 + x for y in (0, 3, 6, 8, 11, 14) for x in (0, 3, 6, 8, 11, 14)]
    assert R._grid_seeds(8).tolist() == [y * 8 + x for y in (0, 1, 3, 4, 6, 7) for x in (0, 1, 3, 4, 6, 7)]
    assert R._grid_seeds(4).tolist() == list(range(16))  # repeated coordinates kept once
    x = torch.rand(1, 16, 3, dtype=torch.float64)
    assert torch.allclose(R.kl_cluster(x), x)  # every pixel its own seed: nothing moves


def test_symmetric_kl_in_float16_sums_the_direct_form():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(1, 40, 9, generator=g, dtype=torch.float64) + 0.1
    q = p[:, :5] * 1.5
    exact = R.symmetric_kl(p, q)
    half = R.symmetric_kl(p, q, dtype=torch.float16)
    assert half.dtype == torch.float16 and (half >= 0).all()
    torch.testing.assert_close(half.double(), exact, rtol=2e-2, atol=1e-3)
