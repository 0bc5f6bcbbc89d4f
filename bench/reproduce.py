"""Reproduce the paper's tables with the ``*-reference`` presets and record what the run gave.

Needs a GPU, SD 2.1-base's weights (a hub cache or ``--model FOLDER``) and the dataset folders;
nothing is downloaded and nothing is faked: a table whose folder is not given is skipped, and
without CUDA the script stops before running anything (``--device cpu`` forces a CPU run, which
takes days for a full table).

    PYTHONPATH=. python bench/reproduce.py --voc VOCdevkit/VOC2012 --context VOCdevkit/VOC2010 \\
        --coco coco2014 --runs runs/reference [--ovs-labels-voc voc_val_labels.json ...] [--limit 100]

Each table runs ``python -m iseg eval`` (the same command the README lists) into
``RUNS/<table>``, which resumes when run again. The numbers, the paper's beside them, the
commands, the device and the package versions are written to
``bench/reproduce-<device>-<date>.json`` and appended as a table to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# table -> (dataset, task, split, preset, the paper's mIoU, dataset option)
TABLES = {
    "wsss-voc": ("voc", "wsss", "train", "wsss-voc-reference", 75.5, "voc"),
    "wsss-coco": ("coco-object", "wsss", "train", "wsss-coco-reference", 45.5, "coco"),
    "ovs-voc": ("voc", "ovs", "val", "ovs-voc-reference", 68.6, "voc"),
    "ovs-context": ("context", "ovs", "val", "ovs-context-reference", 30.9, "context"),
    "ovs-coco": ("coco-object", "ovs", "val", "ovs-coco-reference", 38.4, "coco"),
}


def command(table: str, root: Path, out: Path, args) -> list[str]:
    dataset, task, split, preset, _, _ = TABLES[table]
    cmd = [sys.executable, "-m", "iseg", "eval", "--task", task, "--dataset", dataset, "--root", str(root),
           "--split", split, "--preset", preset, "--out", str(out), "--no-progress"]
    labels = getattr(args, f"ovs_labels_{TABLES[table][5]}", None) if task == "ovs" else None
    if labels is not None:
        cmd += ["--labels", str(labels)]
    elif task == "ovs":
        cmd += ["--label-method", "clip"]
    for flag in ("model", "device", "limit"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag}", str(value)]
    return cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", type=Path, help="VOCdevkit/VOC2012 (SegmentationClassAug for wsss-voc)")
    p.add_argument("--context", type=Path, help="VOCdevkit/VOC2010 with SegmentationClassContext")
    p.add_argument("--coco", type=Path, help="COCO-Object 2014: train2014/, val2014/, SegmentationClass/")
    for name in ("voc", "context", "coco"):
        p.add_argument(f"--ovs-labels-{name}", type=Path, default=None,
                       help=f"image-level labels for ovs-{name} (JSON/CSV; default: --label-method clip)")
    p.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=sorted(TABLES))
    p.add_argument("--runs", type=Path, required=True, help="folder of the run folders (one per table)")
    p.add_argument("--model", default=None, help="SD 2.1-base hub id or folder (default: iseg's)")
    p.add_argument("--device", default=None, help="default cuda; cpu only on purpose")
    p.add_argument("--limit", type=int, default=None, help="first N images per table (a quick check, not the table)")
    args = p.parse_args(argv)

    import torch

    if args.device is None and not torch.cuda.is_available():
        raise SystemExit("reproduce: no CUDA device here; run this on a GPU machine (or give --device cpu on purpose)")
    device = args.device or torch.cuda.get_device_name(0)
    roots = {"voc": args.voc, "context": args.context, "coco": args.coco}
    rows, skipped = [], []
    for table in args.tables:
        root = roots[TABLES[table][5]]
        if root is None:
            skipped.append(table)
            continue
        out = args.runs / table
        cmd = command(table, root, out, args)
        print("$", " ".join(cmd), flush=True)
        done = subprocess.run(cmd)
        metrics_path = out / "metrics.json"
        if done.returncode != 0 or not metrics_path.is_file():
            rows.append({"table": table, "command": cmd, "exit_status": done.returncode, "miou": None,
                         "paper": TABLES[table][4]})
            continue
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        rows.append({"table": table, "command": cmd, "exit_status": 0, "paper": TABLES[table][4],
                     "miou": metrics["miou"], "miou_defined": metrics["miou_defined"],
                     "images": metrics.get("counts", {}), "seconds_per_image": metrics["timing"]["seconds_per_image"],
                     "labels": metrics.get("labels")})
    if not rows:
        raise SystemExit(f"reproduce: no dataset folder given for {skipped}; give --voc, --context or --coco")

    import iseg

    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {"date": stamp.isoformat(timespec="seconds"), "device": device, "torch": torch.__version__,
              "iseg": getattr(iseg, "__version__", "?"), "limit": args.limit, "skipped": skipped, "tables": rows}
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    path = BENCH / f"reproduce-{slug}-{stamp:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    lines = [f"\n## Paper tables with the `*-reference` presets: {device}, {stamp:%Y-%m-%d}"
             + (f" (first {args.limit} images per table: not the paper's protocol)" if args.limit else ""), "",
             f"`bench/reproduce.py`, record `{path.name}`.", "", "| table | preset | mIoU | paper | difference |",
             "|---|---|---|---|---|"]
    for row in rows:
        got = "failed" if row["miou"] is None else f"{row['miou']:.1f}"
        diff = "" if row["miou"] is None else f"{row['miou'] - row['paper']:+.1f}"
        lines.append(f"| {row['table']} | {TABLES[row['table']][3]} | {got} | {row['paper']} | {diff} |")
    with open(BENCH / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit_status"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
