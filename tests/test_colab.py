"""The Colab path (issue #30): the first cell installs iseg only on Colab and turns on ipympl's
widget manager; a wheel built from this checkout carries everything the notebooks read and runs
notebooks 00 and 07 from a clean virtual environment."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import sysconfig
import time
import types
from pathlib import Path

import pytest

import iseg
from iseg.course import colab

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_install_cell_pins_this_version():
    assert colab.install_spec() == f"iseg-attention @ git+{colab.REPOSITORY}@v{iseg.__version__}"
    cell = colab.first_cell()
    assert f'%pip install -q "{colab.install_spec()}"' in cell and "enable_custom_widget_manager()" in cell


def test_first_cell_does_nothing_off_colab_and_installs_on_colab(monkeypatch):
    from IPython.core.inputtransformer2 import TransformerManager

    code = TransformerManager().transform_cell(colab.first_cell())
    calls = []
    shell = types.SimpleNamespace(run_line_magic=lambda name, line: calls.append((name, line)))
    namespace = {"get_ipython": lambda: shell}
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(compile(code, "first-cell", "exec"), namespace)
    assert calls == []  # not on Colab: nothing installed
    assert colab.setup() is False and not colab.on_colab()

    enabled = []
    fake = types.ModuleType("google.colab")
    fake.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: enabled.append(True))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", fake)
    sys.modules["google"].colab = fake
    exec(compile(code, "first-cell", "exec"), namespace)
    assert calls == [("pip", f'install -q "{colab.install_spec()}"')] and enabled == [True]
    ran = []
    monkeypatch.setattr(colab.subprocess, "run", lambda cmd, check: ran.append(cmd))
    assert colab.setup(install=True) is True and enabled == [True, True]
    assert ran and ran[0][-1] == colab.install_spec()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_opens_with_the_colab_cell(notebook):
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    source = "".join(cells[0]["source"])
    assert source.startswith(colab.first_cell()), (
        f"{notebook.name}: the first code cell must start with iseg.course.colab.first_cell() (the Colab install lines)")


def test_data_files_are_found_and_refused_clearly():
    assert iseg.data_path("results", "colour_binding.json").is_file()
    assert (iseg.data_path("photos") / "classes.json").is_file()
    with pytest.raises(FileNotFoundError, match="nope.json is not among iseg's shipped data files"):
        iseg.data_path("results", "nope.json")


def test_wheel_installs_in_a_clean_venv_and_runs_notebooks_00_and_07(tmp_path):
    """The wheel built from this checkout, in a venv of its own; its dependencies (torch, diffusers,
    Jupyter) are this environment's, reached through a .pth file, so nothing is downloaded."""
    from notebook_runner import run

    t0 = time.perf_counter()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path, timeout=600)
    (wheel,) = wheels.glob("iseg_attention-*.whl")
    assert wheel.name.startswith(f"iseg_attention-{iseg.__version__}-")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies: this environment's site-packages as plain path entries (their .pth files,
    # such as an editable install of this checkout, are not run)
    ours = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]) if Path(p).is_dir()]
    (purelib / "_iseg_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, cwd=tmp_path, timeout=600)
    setup_s = time.perf_counter() - t0
    probe = ("import iseg, json; print(json.dumps([iseg.__file__, iseg.__version__, sorted(iseg.shipped_models()), "
             "str(iseg.data_path('results', 'colour_binding.json'))]))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONPATH", "ISEG_FAKE_CUDA")}
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    file, version, models, results = json.loads(out.stdout.splitlines()[-1])
    assert Path(file).is_relative_to(purelib) and version == iseg.__version__, file
    assert models == ["shapes", "shapes-mmdit"] and Path(results).is_relative_to(purelib)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("00_quickstart", "07_interactive"):
        report = run(ROOT / "notebooks" / f"{name}.ipynb", python=str(python), pythonpath="", workdir=work)
        print(f"{name} from the wheel: {report['seconds']} s")
        assert not report["errors"], report["errors"]
    print(f"wheel built and installed in {setup_s:.1f} s")
