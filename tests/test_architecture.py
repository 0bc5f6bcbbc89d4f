"""Where responsibilities live: a pure decode step, hashable settings, a typed plan, prompt
sessions, a registry without import side effects, and no function-level import inside the package
that works around a cycle."""

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import iseg
import iseg.decode
from iseg import registry
from iseg.backbones import Backbone, UNetBackbone, backbone_for
from iseg.forward import LayerPlan
from iseg.presets import FrozenMap
from iseg.shapes import CLASSES, sample

PACKAGE = Path(iseg.__file__).parent


def test_import_iseg_loads_no_model_family_plugin_and_registers_nothing():
    code = ("import sys, iseg; print(sorted(m for m in sys.modules if m.startswith('iseg.shapes'))); "
            "print(sorted(iseg.presets.PRESETS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "[]"  # the shapes world is not imported by `import iseg`
    assert "shapes" not in out[1]  # and has not registered a preset as a side effect
    # yet the shapes model's presets are found through the registry when asked for
    assert "shapes" in iseg.preset_names() and iseg.make_settings("shapes").lam == 100.0


def test_registry_is_a_plain_mapping_of_entries():
    entry = registry.MODELS["shapes"]
    assert dataclasses.is_dataclass(entry) and entry.preset == "shapes" and entry.plugin == "iseg.shapes.plugin"
    assert entry.card is not None and entry.card.name == "README.md"
    assert set(registry.model_presets()) >= {"shapes", "shapes-interactive"}


def test_loaded_model_carries_what_was_stamped_on_the_pipeline(shapes_pipe, tiny_pipe):
    assert isinstance(shapes_pipe, iseg.LoadedModel)
    assert (shapes_pipe.name, shapes_pipe.preset, shapes_pipe.family) == ("shapes", "shapes", "sd")
    assert "circle" in shapes_pipe.known_words and shapes_pipe.label_thresholds["min_peak"] == 0.175
    assert not any(k.startswith("iseg_") for k in vars(shapes_pipe.pipe))  # nothing stamped on diffusers' object
    # the pipeline of a loaded model still finds its model: ISeg(model.pipe) keeps the preset
    assert iseg.LoadedModel.of(shapes_pipe.pipe) is shapes_pipe and iseg.ISeg(shapes_pipe.pipe).preset == "shapes"
    bare = iseg.LoadedModel.of(tiny_pipe)  # a pipeline made elsewhere: its class name, no preset or vocabulary
    assert (bare.name, bare.preset, bare.known_words) == ("StableDiffusionPipeline", None, None)
    assert shapes_pipe.to("cpu") is shapes_pipe and "unet" in shapes_pipe.components


def test_settings_are_frozen_and_hashable():
    a = iseg.make_settings("shapes", cross_weights={"16": 0.3, "8": 0.7})
    b = iseg.make_settings("shapes")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert isinstance(a.cross_weights, FrozenMap) and a.cross_weights == {16: 0.3, 8: 0.7}
    with pytest.raises(TypeError):
        a.cross_weights[16] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.lam = 1.0
    c = iseg.Settings(cross_weights={8: 1.0}, extra_words=["x"])  # given directly, still hashable
    assert hash(c) and c.extra_words == ("x",)
    assert a.forward_key() == b.forward_key() != iseg.make_settings("shapes", timestep=300).forward_key()
    assert a.forward_key() == iseg.make_settings("shapes", lam=3.0).forward_key()  # lam acts after the pass


def test_layer_plan_is_typed_and_frozen(shapes_pipe):
    seg = iseg.ISeg(shapes_pipe)
    plan = seg.plan(32)
    assert isinstance(plan, LayerPlan) and hash(plan)
    assert dict(plan.weights) == {16: 0.3, 8: 0.7}
    assert set(plan.cross) == {16, 8} and all(layer.kind == "cross" for g in plan.cross.values() for layer in g)
    assert plan.self_resolution == 32 and all(layer.kind == "self" for layer in plan.self_layers)
    assert plan.layers() == [layer for g in plan.cross.values() for layer in g] + list(plan.self_layers)
    assert seg.plan(32) is plan  # cached on the hashable settings


def test_backbone_is_the_only_model_family_code(shapes_pipe, tiny_pipe):
    backbone = backbone_for(shapes_pipe.pipe)
    assert isinstance(backbone, UNetBackbone) and isinstance(backbone, Backbone)
    assert (backbone.latent_scale, backbone.native_size) == (2, 64)
    assert backbone_for(tiny_pipe).reference_layers("cross", 2)[0] == "down_blocks.2.attentions.0"

    class NoVae:
        unet, text_encoder, tokenizer, scheduler, vae = object(), object(), object(), object(), None

    with pytest.raises(TypeError, match="the pipeline has no vae"):
        iseg.ISeg(NoVae())
    with pytest.raises(TypeError, match=r"not its name: ISeg\(iseg.load_model\('shapes'\)\)"):
        iseg.ISeg("shapes")


def test_decode_needs_no_pipeline_and_equals_segment(shapes_pipe):
    seg = iseg.ISeg(shapes_pipe)
    images = [sample(2_000_000 + i).image for i in range(3)]
    observations = seg.observe(images, ["circle", "star"])
    direct = seg.segment(images, ["circle", "star"])
    for obs in observations:  # nothing in an observation refers to the model
        assert not any(isinstance(v, torch.nn.Module) for v in vars(obs).values())
    decoded = iseg.decode.decode(observations)
    for d, r in zip(decoded, direct):
        assert np.array_equal(d.labels, r.labels) and np.allclose(d.maps, r.maps)
    fewer = iseg.decode.decode(observations, iterations=1)  # post-forward settings change at decode
    assert fewer[0].maps.shape[0] == 2 and fewer[0].settings.iterations == 1


def test_prompt_session_runs_the_model_once_for_points_boxes_and_lines(shapes_pipe):
    seg = iseg.ISeg(shapes_pipe)
    s = sample(2_000_011)
    calls = []
    hook = shapes_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        session = seg.prompt_session(s.image)
        assert len(calls) == 1  # the pass runs when the session is made
        a = session.segment(points=[(20, 30)])
        b = session.segment(box=(5, 5, 40, 40))
        c = session.segment(line=[(5, 50), (60, 50)], lam=1.0)  # decode-time settings: no new pass
        assert len(calls) == 1
        t = session.segment(text=s.classes[0])
        assert len(calls) == 2  # a description reads its own words' cross-attention
        session.segment(text=s.classes[0])
        assert len(calls) == 2
    finally:
        hook.remove()
    assert np.array_equal(a.score, seg.segment_prompt(s.image, points=[(20, 30)]).score)
    assert np.array_equal(t.score, seg.segment_prompt(s.image, text=s.classes[0]).score)
    truth = s.mask == CLASSES.index(s.classes[0]) + 1
    assert (t.mask & truth).sum() / (t.mask | truth).sum() > 0.5
    assert b.mask.shape == c.mask.shape == (64, 64)


# Imports inside functions that are allowed: optional or heavy third-party packages that only
# some features need (widgets, plotting, CLIP, diffusers' model classes).
LAZY_OK = ("ipywidgets", "matplotlib", "IPython", "transformers", "diffusers", "huggingface_hub", "accelerate",
           "torch", "json", "PIL")


def test_no_function_level_import_of_the_package_itself():
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("iseg")):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} from {'.' * node.level}{node.module}")
                elif isinstance(node, ast.Import):
                    found += [f"{path.relative_to(PACKAGE)}:{node.lineno} import {a.name}" for a in node.names
                              if a.name.split(".")[0] not in LAZY_OK]
    assert found == [], "imports inside functions (move them to the top of the module): " + ", ".join(found)


def _module_imports(path: Path) -> set[str]:
    """The package modules one module imports at its top level (absolute dotted names)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    if parts[-1] == "__init__":
        package = parts[:-1]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ((node.module,) if node.module else ()))
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def test_command_modules_do_not_import_the_command_line_that_loads_them():
    # iseg.commands.main imports each command's module to build its parser; a command module importing
    # iseg.commands.main back would be a cycle hidden behind importlib
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        assert "iseg.commands.main" not in _module_imports(path), f"{path.relative_to(PACKAGE)} imports iseg.commands.main"


def test_decode_refuses_settings_that_act_before_decoding(shapes_pipe):
    seg = iseg.ISeg(shapes_pipe)
    observations = seg.observe([sample(2_000_001).image], ["circle", "star"])
    with pytest.raises(ValueError, match="timestep, seed act.* before decoding.*made with timestep=100, seed=1101.*observe"):
        iseg.decode.decode(observations, timestep=900, seed=7)
    same = iseg.decode.decode(observations, timestep=100, gamma=1.6)[0]  # repeating the pass's own values is fine
    assert np.array_equal(same.labels, iseg.decode.decode(observations)[0].labels)
    with pytest.raises(ValueError, match="kind must be 'cross', 'self' or None"):
        seg.trace(sample(2_000_001).image, ["circle"], kind="bogus")
    assert iseg.decode.decode(observations, lam=1.0)[0].settings.lam == 1.0


def test_settings_given_directly_are_frozen_at_any_depth():
    s = iseg.Settings(cross_heads={16: [1, 0]}, self_heads=(2, 1), extra_words=["x"])
    assert hash(s) and s.cross_heads[16] == (1, 0) and s.self_heads == (2, 1) and s.extra_words == ("x",)
    assert iseg.make_settings(extra_words=(w for w in ["a", "b"])).extra_words == ("a", "b")  # a generator, once
    # made directly, values are checked and normalised as make_settings does
    with pytest.raises(iseg.SettingsError, match="setting lam must be a finite number >= 0, got 'abc'"):
        iseg.Settings(lam="abc")
    assert iseg.Settings(cross_weights={"16": 1}) == iseg.make_settings(cross_weights={"16": 1})


# -- the layout of issue 33: the method at the top, the harness below it ---------------------------------
METHOD_PACKAGES = ("backbones", "labels")
HARNESS_PACKAGES = ("commands", "course", "evaluation", "shapes")


def _package_graph() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at any depth of the file."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = (".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
                          if node.level else node.module or "")
                for alias in node.names:
                    found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_method_is_at_most_18_modules_and_the_harness_lives_below_it():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 18, top
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert subpackages == sorted(METHOD_PACKAGES + HARNESS_PACKAGES)
    graph = _package_graph()
    harness = tuple(f"iseg.{h}" for h in HARNESS_PACKAGES)
    arrows_up = {m: sorted(t for t in targets if t.startswith(harness)) for m, targets in graph.items()
                 if not m.startswith(harness) and m != "iseg.__main__"}
    assert {m: t for m, t in arrows_up.items() if t} == {}, "the method imports the harness"


def test_no_import_cycle_between_modules():
    graph, state, cycles = _package_graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_functions_are_short_and_iseg_is_small():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} {node.end_lineno - node.lineno + 1}")
    assert long == []
    tree = ast.parse((PACKAGE / "segmenter.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ISeg")
    public = [n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    assert len(public) <= 15 and cls.end_lineno - cls.lineno + 1 < 220, (len(public), public)


FAMILY_WORDS = re.compile(r"sd3|sdxl|flux|up_blocks|down_blocks|mid_block|transformer_blocks", re.IGNORECASE)


def test_model_families_are_named_only_in_the_backbones():
    named = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("backbones", "shapes"):
            continue
        named += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if FAMILY_WORDS.search(line)]
    assert named == []


def test_the_readme_package_tree_matches_the_package():
    readme = (PACKAGE.parent / "README.md").read_text()
    tree = readme.split("### The package", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"\b([a-z_]+(?:\.py|/))", tree)) - {"iseg/"}
    actual = {p.name for p in PACKAGE.glob("*.py")} | {p.name + "/" for p in PACKAGE.iterdir()
                                                        if (p / "__init__.py").exists()}
    assert listed == actual
