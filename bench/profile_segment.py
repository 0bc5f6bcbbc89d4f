"""Where a batch's time goes outside the two passes: cProfile of ``segment`` on the SD 2.1-base
architecture (random weights).

    python bench/profile_segment.py --batch 8 --compile cuda-graph
    python bench/profile_segment.py --batch 16 --compile cuda-graph --kernels   # GPU kernel time per op

``--kernels`` uses ``torch.profiler`` instead of cProfile: it prints the GPU time of the largest
operations and how much of the wall time the GPU was busy (the rest is host work it waited for).
"""

import argparse
import cProfile
import pstats

import numpy as np
import torch

from iseg import ISeg
from iseg.commands.bench import ARCHITECTURES, random_weight_model
from iseg.loading import resolve_device

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--compile", default="none", choices=["none", "cuda-graph", "torch"])
p.add_argument("--device", default=None)
p.add_argument("--top", type=int, default=25)
p.add_argument("--kernels", action="store_true", help="torch.profiler: GPU time per operation")
p.add_argument("--compile-vae", action="store_true")
args = p.parse_args()
device = resolve_device(args.device)
dtype = torch.float16 if device.type == "cuda" else torch.float32
seg = ISeg(random_weight_model(ARCHITECTURES["sd21-arch"], device, dtype), preset="wsss-voc", clustering=False)
if args.compile != "none" or args.compile_vae:
    seg.compile(None if args.compile == "none" else args.compile, vae=args.compile_vae)
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(args.batch)]
for _ in range(2):
    seg.segment(images, ["circle", "star"], progress=False)
if args.kernels:
    import time

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            seg.segment(images, ["circle", "star"], progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.top))
    if device.type == "cuda":
        from torch.autograd import DeviceType

        # kernels only: an operator's own row repeats the time of the kernels it launched
        busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
        print(f"wall {1000 * wall / (3 * args.batch):.2f} ms/img, GPU kernels {1000 * busy / (3 * args.batch):.2f} ms/img,"
              f" GPU busy {100 * busy / wall:.0f}% of the wall time (which includes the profiler's overhead)")
else:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        seg.segment(images, ["circle", "star"], progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
