#!/usr/bin/env bash
# The CUDA benchmark of bench/RESULTS.md, as run on a lent H100/H200 (no network there).
# Usage: bash bench/cuda.sh OUTDIR   (diffusers installed, or carried as a wheel: see the README)
set -u
out=${1:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
# SD 2.1-base architecture, fp16, 512x512: plain path and CUDA graphs in one process (same-run ratios)
timeout 200 python3 -m iseg.bench --model sd21-arch --batch-sizes 1 8 16 --repeats 10 --compile none cuda-graph \
    --out "$out/sd21-cuda.json"
# the same with the text encoder on the CPU (memory), batch 1 and 8
timeout 100 python3 -m iseg.bench --model sd21-arch --batch-sizes 1 8 --repeats 10 --offload-text-encoder \
    --out "$out/sd21-cuda-offload.json"
# the shapes model on the GPU
timeout 60 python3 -m iseg.bench --model shapes --batch-sizes 1 8 16 --repeats 10 --compile none cuda-graph \
    --out "$out/shapes-cuda.json"
