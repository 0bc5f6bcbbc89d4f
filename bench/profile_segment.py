"""Where a batch's time goes outside the two passes: cProfile of ``segment`` on the SD 2.1-base
architecture (random weights).

    python bench/profile_segment.py --batch 8 --compile cuda-graph
"""

import argparse
import cProfile
import pstats

import numpy as np
import torch

from iseg import ISeg
from iseg.bench import sd21_base_architecture
from iseg.loading import resolve_device

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--compile", default="none", choices=["none", "cuda-graph", "torch"])
p.add_argument("--device", default=None)
p.add_argument("--top", type=int, default=25)
args = p.parse_args()
device = resolve_device(args.device)
dtype = torch.float16 if device.type == "cuda" else torch.float32
seg = ISeg(sd21_base_architecture(device, dtype), preset="wsss-voc", clustering=False)
if args.compile != "none":
    seg.compile(args.compile)
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(args.batch)]
for _ in range(2):
    seg.segment(images, ["circle", "star"], progress=False)
profile = cProfile.Profile()
profile.enable()
for _ in range(3):
    seg.segment(images, ["circle", "star"], progress=False)
if device.type == "cuda":
    torch.cuda.synchronize()
profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
