"""Every notebook on a real GPU: both shapes models, then SD 2.1-base when its weights are cached.

    make gpu-check                       # = python bench/gpu_check.py --out bench/gpu-check.json

Each notebook runs headless (``tests/notebook_runner.py``) with MODEL set to each model in turn, on
this machine's CUDA device (``load_model`` picks it), and must end with no error output. The
result file lists, per model and notebook, the seconds taken and the error outputs, with the GPU's
name and the library versions. CI has no GPU: there, ``tests/test_notebook_families.py`` runs the
notebooks on a fake GPU (``tests/fake_cuda.py``) instead. Exit status 1 when any notebook failed;
2 when there is no CUDA device (``--allow-cpu`` runs it anyway, to try the script).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SD21 = "stabilityai/stable-diffusion-2-1-base"


def sd21_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(SD21, "model_index.json"), str)


def main(argv=None) -> int:
    import torch
    from notebook_runner import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu-check.json")
    parser.add_argument("--models", nargs="*", help="default: shapes, shapes-mmdit, and SD 2.1-base when cached")
    parser.add_argument("--notebooks", nargs="*", help="names (stems) of notebooks; default: all")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a CUDA device (to try the script)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu-check: no CUDA device here; run it on a machine with a GPU (or --allow-cpu to try it)")
        return 2
    models = args.models or ["shapes", "shapes-mmdit"] + ([SD21] if sd21_cached() else [])
    notebooks = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if not args.notebooks or p.stem in args.notebooks]
    import diffusers
    import transformers

    report = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{platform.machine()} CPU",
                  torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                  sd21_cached=sd21_cached(), started=time.strftime("%Y-%m-%d %H:%M:%S"), runs=[])
    failed = 0
    for model in models:
        for nb in notebooks:
            r = run(nb, model=model, timeout=args.timeout)
            report["runs"].append(r)
            failed += bool(r["errors"])
            first = r["errors"][0] if r["errors"] else None
            print(f"{model:>40} {nb.stem:<32} {r['seconds']:7.1f} s  "
                  + ("ok" if first is None else f"ERROR cell {first['cell']}: {first['ename']}: {first['evalue'][:120]}"),
                  flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))  # written after each notebook: a short lease keeps what ran
    print(f"gpu-check: {len(report['runs']) - failed} of {len(report['runs'])} notebook runs clean; {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
