"""Run a course notebook headless, with any model as MODEL and optionally on a fake GPU.

    python tests/notebook_runner.py notebooks/01_pipeline_by_hand.ipynb --model /tmp/tiny-sd3 --fake-cuda

The notebook's ``MODEL = ...`` line (the knob of its first code cell) is rewritten to the given
model; the kernel is this Python (``ipykernel``) in a fresh temporary folder, so nothing in the
checkout is written. With ``--fake-cuda`` the kernel starts with ``tests/fake_cuda_site`` on its
PYTHONPATH and ISEG_FAKE_CUDA=1: every model it loads behaves as one on a GPU (``fake_cuda.py``).
With the environment variable ISEG_EXECUTED_NOTEBOOKS (or ``--save DIR``) the executed notebook is
written there, as ``NAME.ipynb`` (or ``NAME--TAG.ipynb`` with ``--tag``).

It prints one JSON line: the notebook, the model, the seconds taken, the error outputs (ename,
evalue and the cell) and the stderr outputs of the first code cell (a normal message there is
a red box in JupyterLab). Exit status 0 when there is no error output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAKE_CUDA_SITE = HERE / "fake_cuda_site"
MODEL_LINE = re.compile(r"^MODEL\s*=.*$", re.MULTILINE)


def set_model(nb, model: str) -> bool:
    """Rewrite the first ``MODEL = ...`` line of the notebook to ``model``; whether there was one."""
    for cell in nb.cells:
        if cell.cell_type == "code" and MODEL_LINE.search(cell.source):
            cell.source = MODEL_LINE.sub(lambda _: f"MODEL = {model!r}   # set by tests/notebook_runner.py",
                                         cell.source, count=1)
            return True
    return False


def kernel_env(fake_cuda: bool, pythonpath: str | os.PathLike | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    # pythonpath "" : nothing added (an installed iseg, not this checkout's)
    paths = [str(pythonpath if pythonpath is not None else ROOT)] if pythonpath != "" else []
    if fake_cuda:
        paths.insert(0, str(FAKE_CUDA_SITE))
        env["ISEG_FAKE_CUDA"] = "1"
    else:
        env.pop("ISEG_FAKE_CUDA", None)
    if pythonpath == "":
        env.pop("PYTHONPATH", None)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run(path: Path, model: str | None = None, fake_cuda: bool = False, timeout: int = 600, save: Path | None = None,
        tag: str | None = None, python: str | None = None, pythonpath=None, workdir: Path | None = None) -> dict:
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    has_knob = set_model(nb, model) if model is not None else None
    work = Path(tempfile.mkdtemp(prefix="iseg-nb-")) if workdir is None else workdir
    km = KernelManager(kernel_name="python3")
    km.kernel_cmd = [python or sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    client = NotebookClient(nb, timeout=timeout, km=km, allow_errors=True,
                            resources={"metadata": {"path": str(work)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=kernel_env(fake_cuda, pythonpath), cwd=str(work))
    finally:
        seconds = time.perf_counter() - t0
        if km.has_kernel:  # nbclient leaves a kernel it was given running: each would keep its model's memory
            km.shutdown_kernel(now=True)
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    errors, first_stderr = [], []
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                errors.append(dict(cell=i, ename=out.ename, evalue=out.evalue[:2000],
                                   traceback="\n".join(out.traceback)[-3000:]))
    if code_cells:
        first_stderr = [o.text for o in code_cells[0].get("outputs", [])
                        if o.output_type == "stream" and o.name == "stderr"]
    target = save or (Path(os.environ["ISEG_EXECUTED_NOTEBOOKS"]) if os.environ.get("ISEG_EXECUTED_NOTEBOOKS") else None)
    if target is not None:
        target.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target / (f"{path.stem}--{tag}.ipynb" if tag else f"{path.stem}.ipynb"))
    return dict(notebook=path.stem, model=model, tag=tag, fake_cuda=fake_cuda, seconds=round(seconds, 1),
                has_model_knob=has_knob, errors=errors, first_cell_stderr=first_stderr)


def _errors(nb) -> list[dict]:
    return [dict(cell=i, ename=out.ename, evalue=out.evalue[:2000], traceback="\n".join(out.traceback)[-3000:])
            for i, cell in enumerate(nb.cells) for out in cell.get("outputs", []) if out.output_type == "error"]


def _first_stderr(nb) -> list[str]:
    code = [c for c in nb.cells if c.cell_type == "code"]
    return [o.text for o in code[0].get("outputs", []) if o.output_type == "stream" and o.name == "stderr"] if code else []


def run_models(path: Path, models: dict[str, str], fake_cuda: bool = False, timeout: int = 600,
               save: Path | None = None) -> list[dict]:
    """The notebook once per model (``{tag: model}``), in ONE kernel: the namespace is reset
    (``%reset -f``) between runs, so each run starts from no variables, while imported modules
    stay loaded (importing torch and diffusers is most of a short notebook's time). One report
    per model, as ``run`` gives."""
    import copy

    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    original = nbformat.read(path, as_version=4)
    work = Path(tempfile.mkdtemp(prefix="iseg-nb-"))
    km = KernelManager(kernel_name="python3")
    km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    client = NotebookClient(copy.deepcopy(original), timeout=timeout, km=km, allow_errors=True,
                            resources={"metadata": {"path": str(work)}})
    reports = []
    target = save or (Path(os.environ["ISEG_EXECUTED_NOTEBOOKS"]) if os.environ.get("ISEG_EXECUTED_NOTEBOOKS") else None)
    try:
        with client.setup_kernel(env=kernel_env(fake_cuda), cwd=str(work)):
            for tag, model in models.items():
                nb = copy.deepcopy(original)
                knob = set_model(nb, model)
                client.nb = nb
                reset = nbformat.v4.new_code_cell("%reset -f\nimport matplotlib.pyplot as plt\nplt.close('all')")
                client.execute_cell(reset, 0)
                t0 = time.perf_counter()
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type == "code":
                        client.execute_cell(cell, index)
                seconds = time.perf_counter() - t0
                if target is not None:
                    target.mkdir(parents=True, exist_ok=True)
                    nbformat.write(nb, target / f"{path.stem}--{tag}.ipynb")
                reports.append(dict(notebook=path.stem, model=model, tag=tag, fake_cuda=fake_cuda,
                                    seconds=round(seconds, 1), has_model_knob=knob, errors=_errors(nb),
                                    first_cell_stderr=_first_stderr(nb)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--model", help="what MODEL is set to (a folder, a hub id, a shipped name); default: as written")
    parser.add_argument("--fake-cuda", action="store_true", help="the kernel's models behave as on a GPU")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--save", type=Path, help="write the executed notebook here (default: $ISEG_EXECUTED_NOTEBOOKS)")
    parser.add_argument("--tag", help="suffix of the saved notebook's name")
    parser.add_argument("--models", help="JSON {tag: model}: run the notebook once per model in one kernel "
                                         "(one JSON line each)")
    args = parser.parse_args(argv)
    if args.models:
        reports = run_models(args.notebook.resolve(), json.loads(args.models), args.fake_cuda, args.timeout, args.save)
    else:
        reports = [run(args.notebook.resolve(), args.model, args.fake_cuda, args.timeout, args.save, args.tag)]
    for report in reports:
        print(json.dumps(report))
    return 1 if any(r["errors"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
