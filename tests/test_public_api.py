"""``iseg.__all__``: what a learner and a user call, nothing only the tests use (issue #33)."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import iseg

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "iseg"

PUBLIC = [
    # loading
    "load_model", "LoadedModel", "register_model", "shipped_models", "DEFAULT_MODEL", "ModelNotAvailableError",
    # the method and its settings
    "ISeg", "Settings", "make_settings", "preset_names", "register_preset", "SettingsError",
    # the steps: Cat-Cross prompts, capture, class maps, Ent-Self, refinement, labels
    "build_prompt", "class_token_spans", "cat_cross", "capture_attention", "AttentionStore", "AttentionLayer",
    "aggregate_cross_attention", "kl_cluster", "class_maps", "entropy_reduce", "refine_maps", "minmax", "maps_to_labels",
    "predict_labels", "PromptSession", "SegmentationResult", "Observation", "Trace",
    "data_path", "NonFiniteError", "PromptTooLongError",
]
DEPRECATED = ["load_pipeline", "select_layers", "attention_layers", "CaptureProcessor", "PRESETS"]


def test_all_is_exactly_the_public_list_and_every_name_resolves_without_a_warning():
    assert len(iseg.__all__) == len(set(iseg.__all__))
    assert sorted(iseg.__all__) == sorted(PUBLIC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in iseg.__all__:
            obj = getattr(iseg, name)
            if callable(obj):  # the module's own object, not a copy
                assert obj.__module__.startswith("iseg.") and getattr(sys.modules[obj.__module__], name) is obj, name


def _python_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", markdown, flags=re.S))


def test_no_public_name_is_used_only_by_the_tests():
    """Each name is used by a notebook, by the README's or docs' code, or by a package module other
    than the one that defines it: none is exported for the tests' sake."""
    places = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("notebooks/*.ipynb"))}
    places["README.md (code)"] = _python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    places.update({str(p.relative_to(ROOT)): _python_blocks(p.read_text(encoding="utf-8"))
                   for p in sorted((ROOT / "docs").glob("*.md"))})
    modules = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}
    unused = []
    for name in iseg.__all__:
        obj = getattr(iseg, name)
        home = sys.modules[obj.__module__].__file__ if callable(obj) else None
        users = [where for where, text in places.items() if re.search(rf"\b{name}\b", text)]
        users += [where for where, text in modules.items()
                  if where != "iseg/__init__.py" and (home is None or not home.endswith(where))
                  and re.search(rf"\b{name}\b", text)]
        if not users:
            unused.append(name)
    assert not unused, f"exported but used only by the tests: {unused}"


def test_deprecated_names_warn_once_and_are_listed_for_removal():
    assert sorted(iseg.DEPRECATED) == sorted(DEPRECATED)
    assert not set(DEPRECATED) & set(iseg.__all__)
    # a fresh interpreter: every name warns on its first use only, and is the owning module's object
    code = (
        "import json, warnings, iseg\n"
        "from iseg import capture, loading, presets\n"
        "owners = dict(load_pipeline=loading, select_layers=capture, attention_layers=capture,\n"
        "              CaptureProcessor=capture, PRESETS=presets)\n"
        "out = {}\n"
        "for name, owner in owners.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        first, again = getattr(iseg, name), getattr(iseg, name)\n"
        "    out[name] = [first is getattr(owner, name) and again is first,\n"
        "                 [(w.category.__name__, str(w.message)) for w in caught]]\n"
        "try:\n"
        "    iseg.no_such_name\n"
        "except AttributeError as err:\n"
        "    out['missing'] = str(err)\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert out.pop("missing") == "module 'iseg' has no attribute 'no_such_name'"
    for name, (same, caught) in out.items():
        assert same, name
        assert len(caught) == 1 and caught[0][0] == "DeprecationWarning", (name, caught)
        assert f"iseg.{name} is deprecated" in caught[0][1] and "use " in caught[0][1]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    deprecated = readme.split("#### Deprecated", 1)[1].split("\n#", 1)[0]
    for name in DEPRECATED:
        assert f"`iseg.{name}`" in deprecated, name


def test_the_readme_walk_through_the_public_api_runs_and_gives_segments_maps(tmp_path):
    """The README's step-by-step block, run as written (in its own interpreter: it registers a
    preset and a model), then checked against ``seg.segment``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The public API", 1)[1].split("#### Deprecated", 1)[0]
    block = _python_blocks(section)
    assert "iseg.entropy_reduce" in block and "iseg.refine_maps(" in block
    checks = (
        "import numpy as np\n"
        "r = seg.segment(example.image, classes)\n"
        "assert np.allclose(maps.numpy(), r.maps, atol=1e-5), float(np.abs(maps.numpy() - r.maps).max())\n"
        "assert text == obs.prompt.text and tuple(spans) == obs.prompt.spans, (text, spans, obs.prompt)\n"
        "assert tuple(grid_labels.shape) == (obs.grid, obs.grid) and int(grid_labels.max()) <= len(classes)\n"
        "assert found and set(found) <= set(CLASSES)\n"
        "assert 'my-preset' in iseg.preset_names() and iseg.make_settings('my-preset').lam == 0.05\n"
        "print('README OK')\n"
    )
    script = tmp_path / "walk.py"
    script.write_text(block + "\n" + checks)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "README OK" in res.stdout
    assert "lam" in res.stdout  # the SettingsError the block prints names the setting
