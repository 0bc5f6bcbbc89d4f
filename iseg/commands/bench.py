"""Speed and memory of a segmentation against its hardware floor: ``iseg bench``.

    iseg bench --model shapes --batch-sizes 1 8 16
    iseg bench --model FAMILY-arch --batch-sizes 1 8   # a family's published architecture, random weights
    iseg bench --model FAMILY-arch --compile none cuda-graph --offload-text-encoder --dtype float16   # on CUDA

(``iseg bench --help`` lists the ``-arch`` names: each model family in ``iseg.backbones`` that
declares a published ``Architecture`` builds it with ``full_size_pipeline``.)

For every batch size it measures (median of ``--repeats`` after one warm-up, same process):
VAE encode (posterior mean), UNet forward with SDPA everywhere, the full ``segment`` per image,
the refinement alone, and peak memory (CUDA max allocated, or the process's peak RSS on a CPU).
The ratio ``segment / (VAE encode + UNet SDPA)`` says how close a segmentation comes to the two
passes it cannot avoid. Timing does not depend on the weights, so a full-size architecture is
built from its configuration with random weights when the real ones are absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .. import refine as R
from ..backbones import FAMILIES, Backbone
from ..loading import LoadedModel, load_model
from ..segmenter import ISeg
from ..shapes.model import make_tokenizer
from .files import write_text
from .options import (
    CommandError,
    add_set_option,
    device_option,
    output_file,
    overwrite_option,
    settings_overrides,
)

__all__ = ["ARCHITECTURES", "random_weight_model", "add_arguments", "run"]


def random_weight_model(backbone: type[Backbone], device, dtype) -> LoadedModel:
    """A model with ``backbone``'s published architecture and random weights (no download); the
    shapes word tokenizer with CLIP's 77-token window stands in for the family's tokenizers
    (timing does not depend on the vocabulary)."""
    tokenizer = make_tokenizer(max_length=77)
    torch.manual_seed(0)
    pipe = backbone.full_size_pipeline(tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe.to(device, dtype), backbone.architecture.name)


def _architectures() -> dict[str, type[Backbone]]:
    found: dict[str, type[Backbone]] = {}
    for backbone, _ in reversed(FAMILIES.values()):  # in the order they were registered: the built-in ones win
        if backbone.architecture is not None:
            found.setdefault(backbone.architecture.key, backbone)
    return found


# --model names of full-size architectures with random weights (timing needs no trained weights),
# each the backbone that builds it
ARCHITECTURES = _architectures()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return peak_kb / 1024


@torch.no_grad()
def _bench_batch(seg, b: int, repeats: int, classes: list[str]) -> dict:
    device = seg.backbone.device
    plan = seg.plan()
    size = plan.image_size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(b)]
    pixels = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompt = seg.prompt_for(classes)
    emb = seg.embedding(prompt, seg.settings.gamma).expand(b, -1, -1).contiguous()
    z0 = seg.forward.encode(pixels)
    z_t, t = seg.forward.noisy(z0, seg.settings.seed, seg.settings.timestep)
    vae_s = _timed(lambda: seg.forward.encode(pixels), device, repeats)
    # the denoiser with its own processors (SDPA), as the method's floor: no capture
    unet_s = _timed(lambda: seg.backbone.denoise(z_t, t, emb), device, repeats)
    segment_s = _timed(lambda: seg.segment(images, classes, progress=False), device, repeats)
    results = seg.segment(images, classes, progress=False)
    if not all(np.isfinite(r.maps).all() for r in results):  # fp16 must never produce NaNs
        raise RuntimeError(f"non-finite class maps at batch {b} in {seg.backbone.dtype}")
    n = plan.self_plan.self_resolution ** 2  # the grid refinement runs on (a second pass's, if any)
    attn = torch.rand(b, n, n, device=device).softmax(-1)
    maps = torch.rand(b, n, len(classes), device=device)
    refine_s = _timed(lambda: R.refine(maps, R.entropy_reduce(attn, seg.settings.lam), seg.settings.iterations),
                      device, repeats)
    # the same refinement in bfloat16: its time and its largest deviation from float32
    exact = R.refine(maps, R.entropy_reduce(attn, seg.settings.lam), seg.settings.iterations)
    attn16, maps16 = attn.bfloat16(), maps.bfloat16()
    refine16_s = _timed(lambda: R.refine(maps16, R.entropy_reduce(attn16, seg.settings.lam), seg.settings.iterations),
                        device, repeats)
    approx = R.refine(maps16, R.entropy_reduce(attn16, seg.settings.lam), seg.settings.iterations).float()
    rel_err = float(((approx - exact).abs().amax() / exact.abs().amax()).cpu())
    return {
        "batch": b, "vae_encode_ms": 1000 * vae_s / b, "unet_sdpa_ms": 1000 * unet_s / b,
        "segment_ms": 1000 * segment_s / b, "refine_ms": 1000 * refine_s / b,
        "refine_bf16_ms": 1000 * refine16_s / b, "refine_bf16_rel_err": rel_err,
        "ratio": segment_s / (vae_s + unet_s), "images_per_s": b / segment_s, "peak_memory_mb": _peak_memory_mb(device),
    }


def format_rows(rows: list[dict]) -> str:
    head = "| batch | VAE encode ms/img | UNet SDPA ms/img | segment ms/img | refine ms/img | segment / (VAE + UNet) | images/s | peak MB |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['vae_encode_ms']:.1f} | {r['unet_sdpa_ms']:.1f} | {r['segment_ms']:.1f} | "
                     f"{r['refine_ms']:.2f} | {r['ratio']:.2f} | {r['images_per_s']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``iseg bench``."""
    p.add_argument("--model", default="shapes",
                   help=f"shapes, {' / '.join(ARCHITECTURES)} (full-size architectures, random weights) or "
                        "anything load_model takes")
    presets = "".join(f"; {b.architecture.preset} for {key}" for key, b in ARCHITECTURES.items() if b.architecture.preset)
    p.add_argument("--preset", default=None, help=f"settings preset (default: the model's{presets})")
    add_set_option(p)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16], help="default: 1 8 16")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure, after one warm-up (default: 5)")
    p.add_argument("--compile", nargs="+", default=["none"], choices=["none", "cuda-graph", "torch"],
                   help="forward-pass variants to measure, one table each")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the 'torch' variant")
    p.add_argument("--offload-text-encoder", action="store_true", help="keep the text encoder on the CPU")
    p.add_argument("--compile-vae", action="store_true",
                   help="torch.compile the VAE encoder in every variant (ISeg.compile(..., vae=True))")
    p.add_argument("--channels-last", action="store_true",
                   help="UNet and VAE weights in channels-last memory format, cuDNN autotuning on")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    overwrite_option(p, "an existing --out file")


def run(args) -> int:
    """``iseg bench``: 0 when every figure was measured, 1 when a variant or batch size failed."""
    if args.repeats < 1 or min(args.batch_sizes) < 1:
        raise CommandError("--repeats and --batch-sizes must be at least 1")
    backbone = ARCHITECTURES.get(args.model)
    arch = backbone is not None
    preset = args.preset or (backbone.architecture.preset if arch else None)
    # the architectures are measured without clustering (and with their family's preset,
    # bench/RESULTS.md); --set may change it
    overrides = ({"clustering": False} if arch else {}) | settings_overrides(args.set, preset)
    device = device_option(args.device)
    out = output_file(args.out, args.overwrite)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    model = random_weight_model(backbone, device, dtype) if arch else load_model(args.model, device, dtype)
    seg = ISeg(model, preset=preset, **overrides)
    pipe = model.pipe
    if args.offload_text_encoder:
        seg.offload_text_encoder()
    if args.channels_last:
        # convolutions on tensor cores prefer NHWC; cuDNN picks its fastest kernel per shape
        seg.backbone.denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    report = {"model": model.name, "device": str(device), "dtype": str(dtype), "hardware": hardware,
              "torch": torch.__version__, "image_size": seg.plan().image_size, "repeats": args.repeats,
              "channels_last": args.channels_last, "rows": [],
              "errors": {}}
    print(f"{report['model']} on {hardware}, {dtype}, {seg.plan().image_size}x{seg.plan().image_size}, median of {args.repeats}")
    for variant in args.compile:
        # one variant or batch size failing (CUDA graphs on an unusual pipeline, memory) must not
        # cost the other figures of the run
        kwargs = {"mode": args.compile_mode} if variant == "torch" and args.compile_mode else {}
        rows = []
        try:
            seg.compile(None if variant == "none" else variant, vae=args.compile_vae, **kwargs)
            for b in args.batch_sizes:
                try:
                    rows.append({"variant": variant, "text_encoder": "cpu" if args.offload_text_encoder else "resident",
                                 "vae": "torch.compile" if args.compile_vae else "eager",
                                 **_bench_batch(seg, b, args.repeats, ["circle", "star"])})
                except Exception as exc:  # noqa: BLE001 - reported in the output and the JSON
                    report["errors"][f"{variant}, batch {b}"] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001
            report["errors"][variant] = f"{type(exc).__name__}: {exc}"
        finally:
            seg.compile(None)
        report["rows"].extend(rows)
        print(f"forward: {variant}, text encoder {'on the CPU' if args.offload_text_encoder else 'resident'}"
              f"{', channels last' if args.channels_last else ''}{', VAE encoder compiled' if args.compile_vae else ''}")
        print(format_rows(rows))
        for where, err in report["errors"].items():
            if where.startswith(variant):
                print(f"  failed ({where}): {err}")
        if out:
            write_text(out, json.dumps(report, indent=1))
    if report["errors"]:
        return 1
    return 0
