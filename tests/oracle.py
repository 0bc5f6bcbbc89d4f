"""An independent float64 computation of the whole method (method.md §1-§6), for the oracle tests.

Nothing here calls iseg's capture, refinement or decoding: the attention probabilities are
recomputed from the inputs that the diffusers attention modules of a float64 copy of the pipeline
receive (forward pre-hooks; the modules run their own processors), and every later stage is
written out from method.md with numpy and plain torch. Which layers and heads are read comes from
``iseg.forward`` (that is the method's choice, not its arithmetic).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# -- §4 clustering ----------------------------------------------------------------------------------


def reference_seeds(size):
    """The reference's rows/columns 0, 11, .., 55 of 64, kept in proportion on other sides, once each."""
    coords = sorted({min(int(math.floor(i * 11 * size / 64 + 0.5)), size - 1) for i in range(6)})
    return [y * size + x for y in coords for x in coords]


def reference_distances(p, centers):
    """Symmetric KL, direct form, float64, ``(n, T) x (K, T) -> (n, K)``, in row chunks."""
    out = np.empty((len(p), len(centers)))
    lc = np.log(centers + 1e-5)
    for s in range(0, len(p), 512):
        pp = p[s : s + 512, None, :]
        out[s : s + 512] = 0.5 * ((pp - centers[None]) * (np.log(pp + 1e-5) - lc[None])).sum(-1)
    return out


def reference_cluster(x, seeds, rounds):
    """k-means of method.md §4 in float64: ``(assignments, clustered x, last distances)``."""
    x = np.asarray(x, dtype=np.float64)
    p = np.maximum(x, 1e-6)
    centers = p[seeds].copy()
    alive = np.ones(len(seeds), bool)
    for _ in range(rounds):
        d = reference_distances(p, centers)
        d[:, ~alive] = np.inf
        assign = d.argmin(1)
        counts = np.bincount(assign, minlength=len(seeds))
        alive = counts > 0
        for k in np.flatnonzero(alive):
            centers[k] = p[assign == k].mean(0)
    out = np.empty_like(x)
    for k in np.flatnonzero(alive):
        out[assign == k] = x[assign == k].mean(0)
    return assign, out, d


# -- §3 attention probabilities from a module's inputs --------------------------------------------------


class InputRecorder:
    """Keeps the positional and keyword arguments of the last call of every named module."""

    def __init__(self, root: torch.nn.Module, names):
        self.seen: dict[str, dict] = {}
        self.hooks = []
        for name in names:
            module = root.get_submodule(name)
            self.hooks.append(module.register_forward_pre_hook(self._keep(name), with_kwargs=True))

    def _keep(self, name):
        def hook(module, args, kwargs):
            self.seen[name] = dict(kwargs, _args=args)
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()


def _heads(attn, y):
    b, n, _ = y.shape
    return y.view(b, n, attn.heads, -1).transpose(1, 2)  # (B, H, n, d)


def _norm(layer, y):
    return y if layer is None else layer(y)


def unet_probs(attn, seen) -> torch.Tensor:
    """``(B, H, n_query, n_key)`` softmax(q k^T * scale) of a UNet attention module (attn1 or attn2)."""
    assert attn.group_norm is None and attn.spatial_norm is None and attn.norm_cross is None
    x = seen.get("hidden_states", seen["_args"][0] if seen["_args"] else None)
    c = seen.get("encoder_hidden_states")
    c = x if c is None else c
    q, k = _heads(attn, attn.to_q(x)), _heads(attn, attn.to_k(c))
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)


def sd3_probs(attn, seen):
    """Image queries of an SD3 joint attention module: (image-key part, text-key part), each
    renormalised over its keys. ``(B, H, n_img, n_img)``, ``(B, H, n_img, n_text)``."""
    x, c = seen["hidden_states"], seen["encoder_hidden_states"]
    q = _norm(attn.norm_q, _heads(attn, attn.to_q(x)))
    k = torch.cat([_norm(attn.norm_k, _heads(attn, attn.to_k(x))),
                   _norm(attn.norm_added_k, _heads(attn, attn.add_k_proj(c)))], dim=2)
    p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    n = x.shape[1]
    image, text = p[..., :n], p[..., n:]
    return image / image.sum(-1, keepdim=True), text / text.sum(-1, keepdim=True)


def flux_probs(attn, seen, n_img: int):
    """Image queries of a FLUX attention module (double stream: text from ``encoder_hidden_states``;
    single stream: the first tokens of ``hidden_states``), rotary embedding applied, over [text;
    image] keys, each part renormalised."""
    from diffusers.models.embeddings import apply_rotary_emb

    x, c, rope = seen["hidden_states"], seen.get("encoder_hidden_states"), seen["image_rotary_emb"]
    b, n, _ = x.shape

    def heads(y):
        return y.view(b, -1, attn.heads, y.shape[-1] // attn.heads)

    q, k = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(x)))
    if c is not None:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(c))), q], dim=1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(c))), k], dim=1)
    n_text = q.shape[1] - n_img
    q = apply_rotary_emb(q, rope, sequence_dim=1).transpose(1, 2)
    k = apply_rotary_emb(k, rope, sequence_dim=1).transpose(1, 2)
    p = (q[:, :, n_text:] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    text, image = p[..., :n_text], p[..., n_text:]
    return image / image.sum(-1, keepdim=True), text / text.sum(-1, keepdim=True)


# -- §4-§6 from attention to labels ------------------------------------------------------------------


def aggregate(cross: dict, weights: dict, size: int) -> torch.Tensor:
    """``X``: every token map scaled to sum 1 over space, bilinear to ``size``, mixed by ``weights``."""
    total = 0
    for r, w in weights.items():
        a = cross[r]  # (B, r*r, T)
        b, n, t = a.shape
        grid = (a / a.sum(1, keepdim=True)).transpose(1, 2).reshape(b, t, r, r)
        if r != size:
            grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        total = total + w * grid.reshape(b, t, size * size).transpose(1, 2)
    return total


def ent_self(attn: torch.Tensor, lam: float) -> torch.Tensor:
    ahat = attn / attn.amax(-2, keepdim=True)
    step = torch.where(ahat > 0, ahat + lam * torch.log10(math.e * ahat.clamp_min(1e-300)), torch.zeros_like(ahat))
    reduced = step.clamp_min(0)
    return reduced / reduced.sum(-1, keepdim=True)


def nrm(m: torch.Tensor) -> torch.Tensor:
    shifted = m - m.amin(-2, keepdim=True)
    return shifted / shifted.sum(-2, keepdim=True)


def labels_power(maps: torch.Tensor, height: int, width: int, size: int, power: float) -> np.ndarray:
    """§6 for a stretched image: bilinear to the model's square, then to the image, min-max per class,
    background ``(1 - max)**power``, argmax."""
    x = F.interpolate(maps[None], size=(size, size), mode="bilinear", align_corners=False)
    if (height, width) != (size, size):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    x = x[0]
    lo, hi = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    x = (x - lo) / (hi - lo)
    bg = (1 - x.amax(0, keepdim=True)) ** power
    return torch.cat([bg, x]).argmax(0).numpy()
