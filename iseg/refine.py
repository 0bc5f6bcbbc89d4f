"""Step 4 and 5 of the method: class maps from cross-attention, Ent-Self and iterative refinement.

Every function here is pure and batched: leading dimensions are carried through, nothing is
moved between devices and the input dtype is kept (pass float64 to check the formulas exactly).
Section numbers refer to ``method.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "nrm",
    "entropy_reduce",
    "refine",
    "refine_maps",
    "spatial_normalize",
    "aggregate_cross_attention",
    "kl_cluster",
    "symmetric_kl",
    "class_maps",
    "mass_inside",
]

_LOG10_E = 1.0 / math.log(10.0)


def nrm(maps: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Shift every map to a minimum of 0, then scale it to sum 1 along ``dim`` (method.md §5).

    ``maps`` is ``(..., n, C)`` by default (pixels along ``dim=-2``). A constant map carries no
    evidence: it becomes all zeros instead of 0/0.
    """
    shifted = maps - maps.amin(dim=dim, keepdim=True)
    total = shifted.sum(dim=dim, keepdim=True)
    return torch.where(total > 0, shifted / torch.where(total > 0, total, 1), 0)


def entropy_reduce(attn: torch.Tensor, lam: float, clamp_max: float | None = None) -> torch.Tensor:
    """Ent-Self: the row-stochastic propagation matrix ``P`` of method.md §5, steps 1-4.

    ``attn`` is ``(..., n, n)`` self-attention whose rows are query pixels. Each key column is
    divided by its maximum over queries, then every positive entry moves by
    ``lam * log10(e * a)`` (one descent step on the entropy), negatives are clamped to 0
    (and values above ``clamp_max`` to ``clamp_max``, as the interactive demo does), and rows are
    normalised to sum 1.

    A row whose entries all fall to 0 (only possible with a large ``lam``) would carry no
    distribution; it falls back to its ``lam = 0`` row so that ``P`` stays row-stochastic.
    """
    if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"entropy_reduce needs square (..., n, n) attention, got shape {tuple(attn.shape)}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    colmax = attn.amax(dim=-2, keepdim=True)
    ahat = torch.where(colmax > 0, attn / torch.where(colmax > 0, colmax, 1), 0)
    positive = ahat > 0
    # log10(e * a) = log10(e) + log10(a); evaluated only where a > 0, zeros stay zero.
    step = lam * (_LOG10_E + torch.log10(torch.where(positive, ahat, 1)))
    reduced = torch.where(positive, ahat + step, 0).clamp(min=0)
    if clamp_max is not None:
        reduced = reduced.clamp(max=clamp_max)
    rows = reduced.sum(dim=-1, keepdim=True)
    fallback = ahat / ahat.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(ahat.dtype).tiny)
    return torch.where(rows > 0, reduced / torch.where(rows > 0, rows, 1), fallback)


def refine(maps: torch.Tensor, P: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative refinement (method.md §5): ``C0 = nrm(maps)``, ``C(i+1) = nrm(P @ C(i))``.

    ``maps`` is ``(..., n, C)``; ``P`` is ``(..., n, n)`` with rows = query pixels, so every pixel
    gathers class evidence from the pixels it attends to. Returns ``(..., iterations + 1, n, C)``:
    index 0 is ``nrm(maps)``, index i the maps after i propagation steps.
    """
    if iterations < 0 or int(iterations) != iterations:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    if P.shape[-1] != P.shape[-2] or P.shape[-1] != maps.shape[-2]:
        raise ValueError(
            f"refine needs maps (..., n, C) and P (..., n, n) with the same n; "
            f"got maps {tuple(maps.shape)} and P {tuple(P.shape)}"
        )
    current = nrm(maps)
    steps = [current]
    for _ in range(int(iterations)):
        current = nrm(P @ current)
        steps.append(current)
    return torch.stack(steps, dim=-3)


# ``iseg`` exports the refinement by this name: ``iseg.refine`` is this module
refine_maps = refine


def spatial_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Scale every token map of ``(..., n, T)`` to sum 1 over its ``n`` pixels (method.md §4)."""
    total = maps.sum(dim=-2, keepdim=True)
    return maps / total.clamp_min(torch.finfo(maps.dtype).tiny)


def aggregate_cross_attention(
    cross: Mapping[int, torch.Tensor],
    weights: Mapping[int, float],
    size: int,
) -> torch.Tensor:
    """Combine head-averaged cross-attention of several resolutions into ``X`` (method.md §4).

    ``cross[r]`` is ``(B, r*r, T)`` (query pixels by tokens). Each token map is normalised to sum
    1 over space, upsampled bilinearly to ``size x size`` (``align_corners=False``) and the
    resolutions are mixed with ``weights[r]``. Returns ``(B, size*size, T)``.
    """
    missing = sorted(set(weights) - set(cross))
    if missing:
        raise ValueError(f"no cross-attention was captured at resolution(s) {missing}; captured: {sorted(cross)}")
    total = None
    for r, w in weights.items():
        a = cross[r]
        batch, n, tokens = a.shape
        if n != r * r:
            raise ValueError(f"cross-attention at r={r} must have {r * r} query pixels, got {n}")
        grid = spatial_normalize(a).transpose(1, 2).reshape(batch, tokens, r, r)
        if r != size:
            grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        term = w * grid.reshape(batch, tokens, size * size).transpose(1, 2)
        total = term if total is None else total + term
    return total


def _grid_seeds(size: int, count: int = 6) -> torch.Tensor:
    """Pixel indices of the ``count x count`` seed grid on a ``size x size`` map (method.md §4).

    The reference seeds rows and columns 0, 11, .., 55 of a 64x64 map. On other sizes the
    coordinates keep their place relative to the side, ``round(i * 11 * size / 64)``: 0, 3, 6, 8,
    11, 14 on 16x16 and 0, 1, 3, 4, 6, 7 on 8x8. Below 6x6 coordinates coincide and repeated seeds
    are kept once (a 4x4 map has 16 seeds, one per pixel).
    """
    coords = sorted({min((2 * 11 * i * size + 64) // 128, size - 1) for i in range(count)})
    return torch.tensor([y * size + x for y in coords for x in coords])


# method.md §4: zeros are floored at 1e-6 before the divergence and 1e-5 is added inside the logs
CLUSTER_FLOOR = 1e-6
CLUSTER_LOG_EPS = 1e-5
# bytes of the (rows, K, T) block that symmetric_kl builds at a time
CLUSTER_CHUNK_BYTES = 32 * 2**20


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, log_eps: float = CLUSTER_LOG_EPS,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``0.5 * (KL(p||q) + KL(q||p))`` with ``log_eps`` inside every log: ``(B, n, T)`` x ``(B, K, T)`` -> ``(B, n, K)``.

    Every term of ``0.5 * sum_t (p - q) * (log(p + eps) - log(q + eps))`` is >= 0 (log is
    increasing), while the distances that decide a pixel's cluster differ by 1e-6 to 1e-3. In
    ``float64`` (the default) the sum is expanded into ``sum p log p - sum p log q - sum q log p +
    sum q log q``, two matrix products: the four sums are about 7, so the expansion's rounding is
    about 1e-13, far below those gaps (in float32 it is about 1e-6, and assignments flipped). In
    any other ``dtype`` (e.g. ``torch.float16``, to see what that arithmetic decides) the direct
    form is summed, where nothing cancels, with rows of ``p`` taken in chunks so that the
    ``(rows, K, T)`` block stays within ``CLUSTER_CHUNK_BYTES``. Each image is computed on its own,
    so a batch gives what single calls give. Returns ``(B, n, K)`` in ``dtype``.
    """
    if p.ndim != 3 or q.ndim != 3 or p.shape[0] != q.shape[0] or p.shape[-1] != q.shape[-1]:
        raise ValueError(f"symmetric_kl needs (B, n, T) and (B, K, T), got {tuple(p.shape)} and {tuple(q.shape)}")
    p, q = p.to(dtype), q.to(dtype)
    logp, logq = (p + log_eps).log(), (q + log_eps).log()
    batch, n, tokens = p.shape
    k = q.shape[1]
    out = torch.empty(batch, n, k, dtype=dtype, device=p.device)
    if dtype == torch.float64:
        self_p = (p * logp).sum(-1, keepdim=True)  # (B, n, 1)
        self_q = (q * logq).sum(-1)  # (B, K)
        for b in range(batch):
            out[b] = self_p[b] + self_q[b] - p[b] @ logq[b].T - logp[b] @ q[b].T
        return 0.5 * out
    rows = max(1, CLUSTER_CHUNK_BYTES // max(1, k * tokens * p.element_size()))
    for b in range(batch):
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            dp = p[b, start:stop, None, :] - q[b, None]  # (rows, K, T)
            dlog = logp[b, start:stop, None, :] - logq[b, None]
            out[b, start:stop] = (dp * dlog).sum(-1)
    return 0.5 * out


def kl_cluster(x: torch.Tensor, rounds: int = 20, seeds: Sequence[int] | torch.Tensor | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The optional clustering step of method.md §4, as the reference does it.

    k-means on the pixel vectors of ``x`` (``(B, n, T)``, ``n`` a square) **as they are** (values
    floored at 1e-6, not rescaled to sum 1), with the symmetric KL divergence
    ``0.5 * (KL(p||q) + KL(q||p))`` (1e-5 added inside the logs), seeded on a regular 6x6 grid of
    pixels (``_grid_seeds``: step 11 on a 64x64 map, in proportion on other sizes) or on
    ``seeds``, for ``rounds`` rounds. Prototypes are the means of their members; a cluster that
    loses all its members is dropped for good. Distances and prototypes are computed in ``dtype``
    (float64 by default, see ``symmetric_kl``), every image on its own. Returns ``x`` with every
    pixel's vector replaced by the mean vector of its cluster, in ``x``'s dtype.
    """
    if x.ndim != 3:
        raise ValueError(f"kl_cluster needs (B, n, T) vectors, got shape {tuple(x.shape)}")
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    n = x.shape[1]
    size = math.isqrt(n)
    if size * size != n:
        raise ValueError(f"kl_cluster needs a square map, got {n} pixels")
    seed_idx = _grid_seeds(size) if seeds is None else torch.as_tensor(seeds, dtype=torch.long)
    if seed_idx.numel() == 0 or seed_idx.min() < 0 or seed_idx.max() >= n:
        raise ValueError(f"cluster seeds must be pixel indices in [0, {n}), got {seed_idx.tolist()}")
    # Apple's MPS has no float64: cluster there on the CPU (X is small: n x T per image)
    work = torch.device("cpu") if x.device.type == "mps" and dtype == torch.float64 else x.device
    wide = x.to(work, dtype)
    assign = _kl_assign(wide.clamp_min(CLUSTER_FLOOR), seed_idx.to(work), int(rounds), dtype)
    onehot = F.one_hot(assign, seed_idx.numel()).to(dtype)
    counts = onehot.sum(1).clamp_min(1).unsqueeze(-1)
    cluster_means = (onehot.transpose(1, 2) @ wide) / counts
    return (onehot @ cluster_means).to(x.device, x.dtype)


def _kl_assign(dist: torch.Tensor, seed_idx: torch.Tensor, rounds: int,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Cluster index of every vector of ``dist`` (``(B, n, T)``, positive) after ``rounds`` rounds."""
    dist = dist.to(dtype)
    batch, n, _ = dist.shape
    k = seed_idx.numel()
    centers = dist[:, seed_idx, :]
    alive = torch.ones(batch, k, dtype=torch.bool, device=dist.device)
    assign = torch.zeros(batch, n, dtype=torch.long, device=dist.device)
    for _ in range(rounds):
        d = symmetric_kl(dist, centers, dtype=dtype).masked_fill(~alive.unsqueeze(1), math.inf)
        assign = d.argmin(-1)  # ties go to the lower seed index
        onehot = F.one_hot(assign, k).to(dtype)  # (B, n, K)
        counts = onehot.sum(1)  # (B, K)
        alive = counts > 0  # an empty cluster is dropped for good: its distance stays inf
        # a matrix product, not scatter_add: CUDA's atomics would sum in a different order each run
        centers = (onehot.transpose(1, 2) @ dist) / counts.clamp_min(1).unsqueeze(-1)
    return assign


def class_maps(x: torch.Tensor, spans: Sequence[Sequence[int]]) -> torch.Tensor:
    """``M[:, c]`` = mean of ``x[:, tokens of c]``: ``(B, n, T)`` -> ``(B, n, C)`` (method.md §4)."""
    if len(spans) == 0:
        raise ValueError("class_maps needs at least one class span")
    columns = []
    for span in spans:
        if len(span) == 0:
            raise ValueError("every class needs at least one token position")
        span = list(span)
        if span == list(range(span[0], span[0] + len(span))):  # a slice: no index tensor to copy to the GPU
            columns.append(x[..., span[0] : span[0] + len(span)].mean(-1))
        else:
            columns.append(x[..., span].mean(-1))
    return torch.stack(columns, dim=-1)


def mass_inside(P: torch.Tensor, groups: torch.Tensor, iterations: int) -> torch.Tensor:
    """How much of every pixel's propagation stays in its own group, after 1 .. ``iterations`` steps.

    ``P`` is ``(..., n, n)`` row-stochastic (rows = query pixels), ``groups`` ``(..., n)`` integer
    labels (an object, or the background, per pixel). Entry ``[..., i - 1, q]`` is the share of row
    ``q`` of ``P^i`` that falls on pixels of ``q``'s own group: 1 means refinement never mixes that
    pixel's class evidence with another group's, and what leaks compounds with every step. Returns
    ``(..., iterations, n)``.
    """
    if iterations < 1 or int(iterations) != iterations:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    groups = torch.as_tensor(groups)
    if groups.shape != P.shape[:-1]:
        raise ValueError(f"groups must be (..., n) = {tuple(P.shape[:-1])}, got {tuple(groups.shape)}")
    groups = groups.to(P.device).long()  # exact masks come from the CPU; P may be on the GPU
    onehot = F.one_hot(groups, int(groups.max()) + 1).to(P.dtype)  # (..., n, G)
    mass, shares = onehot, []
    for _ in range(int(iterations)):
        mass = P @ mass  # row q: P^i's mass in every group
        shares.append(mass.gather(-1, groups.unsqueeze(-1)).squeeze(-1))
    return torch.stack(shares, dim=-2)
