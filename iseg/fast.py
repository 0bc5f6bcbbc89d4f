"""Faster noisy forward passes for low batch-1 latency: CUDA graphs or ``torch.compile``.

At batch 1 a Stable Diffusion UNet on a large GPU is bound by kernel-launch overhead, not by
arithmetic. Both options here keep iSeg's capture exactly as it is (the same ``CaptureProcessor``
on the same layers) and only change how the forward pass is launched:

- ``GraphedForward``: records the UNet forward with capture once per input shape into a CUDA
  graph, then replays it. The graph owns its inputs, its activations and the captured maps;
  a replay rewrites them in place. The UNet's own processors are back as soon as recording ends.
- ``CompiledForward``: installs the capture processors and keeps them installed while
  ``torch.compile`` runs the UNet (any ``mode``/``backend`` of ``torch.compile``).

``ISeg.compile("cuda-graph")`` or ``ISeg.compile("torch", mode=...)`` switches one on;
``ISeg.compile(None)`` switches back to the plain path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .capture import AttentionLayer, AttentionStore, CaptureProcessor, capture_attention

__all__ = ["GraphedForward", "CompiledForward", "make_fast_forward", "require_cuda", "METHODS"]

METHODS = ("cuda-graph", "torch")


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise RuntimeError(
            f"CUDA graphs need the pipeline on a CUDA device, it is on {device}; "
            "use seg.compile('torch') or the plain path (seg.compile(None)) there"
        )


def _key(layers: Sequence[AttentionLayer], heads) -> tuple:
    heads = {k: tuple(v) for k, v in heads.items()} if isinstance(heads, Mapping) else heads
    return tuple(layer.name for layer in layers), repr(heads)


class GraphedForward:
    """One CUDA graph per (captured layers, heads, input shapes, dtype)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._graphs: dict[tuple, tuple] = {}

    def __call__(self, unet, layers, heads, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> AttentionStore:
        require_cuda(z_t.device)
        key = _key(layers, heads) + (tuple(z_t.shape), tuple(emb.shape), z_t.dtype, emb.dtype, z_t.device)
        if key not in self._graphs:
            self._graphs[key] = self._record(unet, layers, heads, z_t, t, emb)
        graph, (static_z, static_t, static_e), store = self._graphs[key]
        static_z.copy_(z_t)
        static_t.copy_(t)
        static_e.copy_(emb)
        graph.replay()
        return store

    def _record(self, unet, layers, heads, z_t, t, emb):
        inputs = (z_t.clone(), t.clone(), emb.clone())
        with capture_attention(unet, layers, heads=heads) as store:
            side = torch.cuda.Stream(device=z_t.device)
            side.wait_stream(torch.cuda.current_stream(z_t.device))
            with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
                for _ in range(self.warmup):
                    unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2], return_dict=False)
            torch.cuda.current_stream(z_t.device).wait_stream(side)
            store.clear()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2], return_dict=False)
        # the store now holds the graph's own output tensors, which every replay rewrites
        return graph, inputs, store

    def release(self, unet) -> None:
        self._graphs.clear()


class CompiledForward:
    """``torch.compile`` of the UNet with the capture processors installed for as long as it is used."""

    def __init__(self, **compile_kwargs):
        self.compile_kwargs = compile_kwargs
        self._key = None
        self._store: AttentionStore | None = None
        self._original = None
        self._fn = None

    def __call__(self, unet, layers, heads, z_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> AttentionStore:
        key = _key(layers, heads)
        if key != self._key:
            self.release(unet)
            self._install(unet, layers, heads)
            self._key = key
        self._store.clear()
        self._fn(z_t, t, encoder_hidden_states=emb, return_dict=False)
        return self._store

    def _install(self, unet, layers, heads) -> None:
        self._store = AttentionStore(layers)
        self._original = unet.attn_processors
        replaced = dict(self._original)
        for layer in layers:
            layer_heads = heads.get(layer.name) if isinstance(heads, Mapping) else heads
            replaced[layer.name + ".processor"] = CaptureProcessor(self._store, layer.name, heads=layer_heads)
        unet.set_attn_processor(replaced)
        self._fn = torch.compile(unet, **self.compile_kwargs)

    def release(self, unet) -> None:
        """Put the UNet's own processors back."""
        if self._original is not None:
            unet.set_attn_processor(self._original)
        self._key = self._store = self._original = self._fn = None


def make_fast_forward(method: str, **compile_kwargs):
    if method == "cuda-graph":
        if compile_kwargs:
            raise TypeError(f"'cuda-graph' takes no torch.compile arguments, got {sorted(compile_kwargs)}")
        return GraphedForward()
    if method == "torch":
        return CompiledForward(**compile_kwargs)
    raise ValueError(f"unknown compile method {method!r}; choose one of {METHODS} (or None for the plain path)")
