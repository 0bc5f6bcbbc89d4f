"""How far fp32 results on a CPU move between machines: the model card's evaluation under several
thread counts and vector instruction sets, compared image by image.

    python bench/cpu_spread.py --limit 500 --out runs/cpu-spread    # writes bench/cpu-spread.json

Floating-point sums are not associative: another thread count splits reductions differently, and
another instruction set (AVX-512, AVX2, or none) changes the order and width of every vectorised
sum, inside PyTorch (ATEN_CPU_CAPABILITY), MKL (MKL_ENABLE_INSTRUCTIONS) and oneDNN
(ONEDNN_MAX_CPU_ISA). A pixel whose two best scores are within rounding of each other can then
change label. This script runs the same evaluation under each setting in a fresh process, so that
every cross-machine tolerance in the tests can be set from a measurement instead of a guess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ISA = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "scalar": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def run_one(name: str, threads: int, isa: str, limit: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **ISA[isa])
    folder = out / name
    cmd = [sys.executable, "-m", "iseg", "eval", "--dataset", "shapes", "--limit", str(limit), "--device", "cpu",
           "--save-masks", "--no-progress", "--out", str(folder)]
    if folder.exists():
        cmd.append("--restart")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"threads": threads, "isa": isa, "miou": metrics["miou"], "seconds": time.perf_counter() - t0,
            "folder": str(folder)}


def compare_masks(a: Path, b: Path) -> dict:
    pixels = images = total = 0
    for path in sorted((a / "masks").glob("*.png")):
        x = np.asarray(Image.open(path))
        y = np.asarray(Image.open(b / "masks" / path.name))
        diff = int((x != y).sum())
        pixels += diff
        images += diff > 0
        total += x.size
    return {"pixels_changed": pixels, "pixels": total, "images_changed": images}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("runs/cpu-spread"))
    p.add_argument("--configs", nargs="*", default=["2:native", "1:native", "2:avx2", "1:avx2", "2:scalar"],
                   help="THREADS:ISA pairs; the first is the reference the others are compared with")
    p.add_argument("--json", type=Path, default=Path(__file__).with_name("cpu-spread.json"))
    args = p.parse_args(argv)
    runs = []
    for item in args.configs:
        threads, isa = item.split(":")
        name = f"t{threads}-{isa}"
        runs.append(run_one(name, int(threads), isa, args.limit, args.out))
        print(f"{name}: mIoU {runs[-1]['miou']:.4f} in {runs[-1]['seconds']:.0f} s", flush=True)
    ref = Path(runs[0]["folder"])
    for r in runs[1:]:
        r.update(compare_masks(ref, Path(r["folder"])))
    mious = [r["miou"] for r in runs]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_capability": _capability()},
        "limit": args.limit,
        "runs": [{k: v for k, v in r.items() if k != "folder"} for r in runs],
        "miou_spread": max(mious) - min(mious),
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


if __name__ == "__main__":
    sys.exit(main())
