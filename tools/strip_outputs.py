"""Execute the notebooks and keep only the outputs nbval compares (cells marked NBVAL_CHECK_OUTPUT).

    python tools/strip_outputs.py --execute [NAME ...]    # run the notebooks, then strip (prints seconds)
    python tools/strip_outputs.py [NAME ...]              # strip only

Outputs policy: notebooks are committed without figures or widgets (small files, clean diffs);
the few cells that print deterministic numbers keep their text output so that CI (nbval) checks it.
"""

import argparse
import os
import time
from pathlib import Path

import nbformat as nbf

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MARK = "# NBVAL_CHECK_OUTPUT"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see conftest.py


def strip(nb):
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = None
        if cell.source.startswith(MARK):
            cell.outputs = [o for o in cell.outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"]
            for o in cell.outputs:
                o.pop("execution_count", None)
            cell.execution_count = count  # nbval only compares cells that were run
        else:
            cell.outputs = []
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--execute", action="store_true")
    p.add_argument("names", nargs="*")
    args = p.parse_args()
    paths = [NOTEBOOKS / f"{n}.ipynb" for n in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        nb = nbf.read(path, as_version=4)
        took = ""
        if args.execute:
            from nbclient import NotebookClient

            t0 = time.perf_counter()
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
            took = f" (ran in {time.perf_counter() - t0:.1f} s)"
        nbf.write(strip(nb), path)
        print("stripped", path.name + took)


if __name__ == "__main__":
    main()
