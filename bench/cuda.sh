#!/usr/bin/env bash
# The CUDA benchmark of bench/RESULTS.md, as run on a lent H100/H200 (no network there).
# Usage: bash bench/cuda.sh OUTDIR   (diffusers installed, or carried as a wheel: see the README)
# Stages run most important first, each under its own time limit, so that a short lease still
# returns the figures the targets need.
set -u
out=${1:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
stage() { echo "== $1 ($(date +%T))"; }
# SD 2.1-base architecture, fp16, 512x512: plain path and CUDA graphs in one process (same-run ratios)
stage "sd21: plain and CUDA graph"
timeout 200 python3 -m iseg bench --model sd21-arch --batch-sizes 1 8 16 --repeats 10 --compile none cuda-graph \
    --overwrite --out "$out/sd21-cuda.json"
stage "sd21: VAE encoder through torch.compile"
timeout 180 python3 -m iseg bench --model sd21-arch --batch-sizes 16 8 --repeats 10 --compile cuda-graph --compile-vae \
    --overwrite --out "$out/sd21-cuda-compiled-vae.json"
stage "sd21: where the GPU time goes at batch 16 (torch.profiler)"
timeout 60 python3 bench/profile_segment.py --batch 16 --compile cuda-graph --kernels --top 30 > "$out/profile-kernels.txt" 2>&1
tail -3 "$out/profile-kernels.txt"
stage "shapes model"
timeout 40 python3 -m iseg bench --model shapes --batch-sizes 1 8 16 --repeats 10 --compile none cuda-graph \
    --overwrite --out "$out/shapes-cuda.json"
stage "sd21: torch.compile (inductor), batch 1"
timeout 120 python3 -m iseg bench --model sd21-arch --batch-sizes 1 --repeats 10 --compile torch \
    --overwrite --out "$out/sd21-cuda-torch-compile.json"
stage "sd21: text encoder on the CPU"
timeout 60 python3 -m iseg bench --model sd21-arch --batch-sizes 1 8 --repeats 10 --offload-text-encoder \
    --overwrite --out "$out/sd21-cuda-offload.json"
# the newer families at 1024x1024 (issue: ratio to VAE encode + one denoiser pass, memory over weights)
stage "sdxl-base architecture, fp16"
timeout 240 python3 -m iseg bench --model sdxl-arch --batch-sizes 1 4 --repeats 5 --compile none cuda-graph \
    --overwrite --out "$out/sdxl-cuda.json"
stage "sd3-medium architecture, bf16"
timeout 240 python3 -m iseg bench --model sd3-arch --dtype bfloat16 --batch-sizes 1 4 --repeats 5 \
    --overwrite --out "$out/sd3-cuda.json"
stage "done"
