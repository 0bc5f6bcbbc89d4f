"""The ``*-reference`` presets compute what the authors' code computes (iseg/reference.py).

The expected prompts, token positions and token ids below are written by hand from the authors'
tables (their word for each class, its token count and the tokens that stand for it; positions
start at 4 and advance by count + 1), not computed with the library. The ids are the real CLIP
vocabulary's (the tiny tokenizer of ``tests/tiny.py`` is CLIP's BPE).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import iseg
from iseg import reference as REF
from iseg.commands import main as cli
from iseg.presets import PRESETS, make_settings

VOC_BG = "ground, land, grass, tree, building, wall, sky, lake, water"
COCO_BG = "ground, land, grass, tree, building, wall, sky, lake, water, river, sea, railway, "
START, END = 49406, 49407

# preset -> [(classes as the dataset names them, prompt text, classes used, names given in that
# order, positions per class, CLIP ids at those positions)]
CASES = {
    "wsss-voc-reference": [
        (["dog", "aeroplane"], f"a photograph of plane and dog and other object and background, {VOC_BG}",
         ("plane", "dog"), ("aeroplane", "dog"), ((4,), (6,)), ((5363,), (1929,))),
        # table order; dining table selects both words, potted plant only "plant"
        (["potted plant", "dining table", "person"],
         f"a photograph of dining table and person and potted plant and other object and background, {VOC_BG}",
         ("dining table", "person", "potted plant"), ("dining table", "person", "potted plant"),
         ((4, 5), (7,), (10,)), ((8658, 2175), (2533,), (3912,))),
        (["tv monitor", "bicycle"], f"a photograph of bicycle and tv monitor and other object and background, {VOC_BG}",
         ("bicycle", "tv monitor"), ("bicycle", "tv monitor"), ((4,), (7,)), ((11652,), (10198,))),
        # a name outside the table passes through, after the table's classes
        (["unicorn", "cat"], f"a photograph of cat and unicorn and other object and background, {VOC_BG}",
         ("cat", "unicorn"), ("cat", "unicorn"), ((4,), (6,)), ((2368,), (15660,))),
    ],
    "wsss-coco-reference": [
        # fire hydrant counted 2 (really 3 tokens): it selects "hydr", and tv monitor, one short,
        # selects "tv" instead of "monitor"; the prompt ends in ", "
        (["fire hydrant", "person", "tv"],
         f"a photograph of people and fire hydrant and tv monitor and other object and background, {COCO_BG}",
         ("people", "fire hydrant", "tv monitor"), ("person", "fire hydrant", "tv"),
         ((4,), (7,), (10,)), ((1047,), (8031,), (1583,))),
        # after fire hydrant, the one-word zebra selects the "and" before it
        (["traffic light", "fire hydrant", "zebra"],
         f"a photograph of traffic light and fire hydrant and zebra and other object and background, {COCO_BG}",
         ("traffic light", "fire hydrant", "zebra"), ("traffic light", "fire hydrant", "zebra"),
         ((5,), (8,), (10,)), ((1395,), (8031,), (537,))),
        (["baseball bat", "motorcycle", "couch"],
         f"a photograph of motorbike and baseball bat and sofa and other object and background, {COCO_BG}",
         ("motorbike", "baseball bat", "sofa"), ("motorcycle", "baseball bat", "couch"),
         ((4,), (7,), (9,)), ((33341,), (6575,), (15723,))),
    ],
    "ovs-voc-reference": [
        (["aeroplane", "bus"], f"a photograph of plane and bus and other object and background{VOC_BG}",
         ("plane", "bus"), ("aeroplane", "bus"), ((4,), (6,)), ((5363,), (2840,))),
        (["tv monitor", "potted plant"],
         f"a photograph of potted plant and tv monitor and other object and background{VOC_BG}",
         ("potted plant", "tv monitor"), ("potted plant", "tv monitor"), ((5,), (8,)), ((3912,), (10198,))),
        # the words of their tagger stand for the table's classes, as in their open-vocabulary run
        (["people", "buses", "monitor"],
         f"a photograph of bus and person and tv monitor and other object and background{VOC_BG}",
         ("bus", "person", "tv monitor"), ("buses", "people", "monitor"), ((4,), (6,), (9,)),
         ((2840,), (2533,), (10198,))),
    ],
    "ovs-context-reference": [
        # VOC classes first: plane (0), monitor (19), bag (20); no background words
        (["bag", "aeroplane", "tv monitor"], "a photograph of plane and monitor and bag and other object and background",
         ("plane", "monitor", "bag"), ("aeroplane", "tv monitor", "bag"), ((4,), (6,), (8,)),
         ((5363,), (10198,), (3365,))),
        (["bedclothes", "computer", "person"],
         "a photograph of person and laptop and bedding and other object and background",
         ("person", "laptop", "bedding"), ("person", "computer", "bedclothes"), ((4,), (6,), (8,)),
         ((2533,), (10464,), (31761,))),
    ],
    "ovs-coco-reference": [
        (["fire hydrant", "bicycle"], f"a photograph of bicycle and fire hydrant and other object and background{COCO_BG}",
         ("bicycle", "fire hydrant"), ("bicycle", "fire hydrant"), ((4,), (7,)), ((11652,), (8031,))),
        (["person", "fire hydrant", "dog"],
         f"a photograph of people and fire hydrant and dog and other object and background{COCO_BG}",
         ("people", "fire hydrant", "dog"), ("person", "fire hydrant", "dog"), ((4,), (7,), (9,)),
         ((1047,), (8031,), (537,))),
    ],
}
ALL = [(preset, case) for preset, cases in CASES.items() for case in cases]


def _image(h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 0.2, np.float32)
    img[5:25, 6:30] = (0.9, 0.2, 0.1)
    img[20:38, 26:46] = (0.1, 0.3, 0.9)
    return (np.clip(img + 0.05 * rng.standard_normal(img.shape), 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("preset,case", ALL, ids=[f"{p}-{'+'.join(c[0])}" for p, c in ALL])
def test_reference_prompts_match_the_authors_tables(tiny_pipe, tokenizer, preset, case):
    classes, text, used, given, spans, ids = case
    seg = iseg.ISeg(tiny_pipe, preset=preset)
    prompt = seg.prompt_for(classes)
    assert prompt.text == text
    assert prompt.classes == used and prompt.given == given
    assert prompt.spans == spans
    assert tuple(tuple(prompt.input_ids[p] for p in span) for span in spans) == ids
    # byte for byte: the ids are the tokenizer's for exactly that text
    assert list(prompt.input_ids) == tokenizer(text, padding="max_length", max_length=77, truncation=True)["input_ids"]


@pytest.mark.parametrize("preset", sorted(CASES))
def test_every_dataset_reference_preset_segments_with_its_prompt(tiny_pipe, preset):
    classes, text, used, given, spans, _ = CASES[preset][0]
    seg = iseg.ISeg(tiny_pipe, preset=preset)
    image = _image()
    result = seg.segment(image, classes)
    assert (result.prompt, result.classes, result.given_classes, result.token_spans) == (text, used, given, spans)
    assert result.labels.shape == image.shape[:2] and result.labels.max() <= len(classes)
    assert np.isfinite(result.maps).all()
    # label k is given_classes[k-1]: mask() takes either name
    for k, (word, name) in enumerate(zip(used, given), start=1):
        assert np.array_equal(result.mask(word), result.labels == k)
        assert np.array_equal(result.mask(name), result.labels == k)
    # Cat-Cross scaled exactly the selected positions
    prompt = seg.prompt_for(classes)
    plain = seg.embedding(prompt, 1.0)
    scaled = seg.embedding(prompt, 1.6)
    chosen = sorted({p for s in spans for p in s})
    torch.testing.assert_close(scaled[0, chosen], 1.6 * plain[0, chosen])
    others = [p for p in range(77) if p not in chosen]
    assert torch.equal(scaled[0, others], plain[0, others])


def test_default_presets_are_unchanged(tiny_pipe):
    for name in ("wsss-voc", "wsss-coco", "ovs-voc", "ovs-context", "ovs-coco", "interactive"):
        assert "reference" not in PRESETS[name]
        assert make_settings(name).reference is None
        twin = make_settings(f"{name}-reference")
        base = make_settings(name)
        changed = {f for f in base.as_dict() if getattr(base, f) != getattr(twin, f)}
        assert changed == ({"reference", "threshold"} if name == "interactive" else {"reference"})
    prompt = iseg.ISeg(tiny_pipe, preset="wsss-coco").prompt_for(["fire hydrant", "person"])
    assert prompt.text.startswith("a photograph of fire hydrant and person and other object and background, ground")
    assert prompt.spans == ((4, 5, 6), (8,)) and prompt.names == ()


def test_reference_words_refuse_two_names_for_one_word():
    with pytest.raises(ValueError, match="both the authors' 'plane'"):
        REF.reference_words("wsss-voc", ["aeroplane", "plane"])
    with pytest.raises(ValueError, match="no reference dataset run"):
        REF.reference_words("interactive", ["cat"])
    with pytest.raises(iseg.presets.SettingsError, match="reference"):
        make_settings(reference="voc")


def test_reference_prompt_overflow_is_a_clear_error(tiny_pipe):
    seg = iseg.ISeg(tiny_pipe, preset="wsss-coco-reference")
    from iseg.evaluation.datasets import COCO_CLASSES

    with pytest.raises(iseg.prompts.PromptTooLongError, match="outside the window"):
        seg.prompt_for(list(COCO_CLASSES[:40]))


# -- float16 ---------------------------------------------------------------------------------------
def _authors_cluster(x: torch.Tensor, seeds: list[int], rounds: int = 20) -> torch.Tensor:
    """The authors' clustering on one (n, T) map, in float16, written from their description:
    zeros -> 1e-6, kl_dis in float16, member means, then the (n, n) same-cluster matrix times x
    divided by its row sums, both in float16."""
    x = x.half()
    x = torch.where(x == 0, torch.tensor(1e-6, dtype=torch.float16), x)
    prototype = x[seeds]
    cluster = None
    for _ in range(rounds):
        a = prototype.half()[:, None, :] + 1e-5
        b = x.half()[None, :, :] + 1e-5
        q = a.log() - b.log()
        dis = (a * q).sum(-1) * 0.5 + (-(b * q).sum(-1) * 0.5)
        cluster = dis.min(dim=0).indices
        prototype = torch.stack([x[cluster == k].mean(0) for k in cluster.unique()])
    same = (cluster[:, None] == cluster[None, :]).half()
    return (same.float() @ x.float()).half() / same.sum(-1, keepdim=True)


def _blocks(size: int, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    region = (torch.arange(size)[:, None] * 3 // size) * 3 + torch.arange(size)[None, :] * 3 // size
    profiles = torch.rand(9, tokens, generator=g) ** 3
    x = profiles[region.reshape(-1)] * (1 + 0.3 * torch.rand(size * size, tokens, generator=g))
    x[torch.rand(size * size, tokens, generator=g) < 0.05] = 0  # exact zeros, floored to 1e-6
    return (x / x.sum(0, keepdim=True) * 50).half()


def test_float16_clustering_matches_the_authors_float16_computation():
    x = _blocks(64, 8)
    seeds = [y * 64 + xx for y in range(0, 64, 11) for xx in range(0, 64, 11)]  # their 6x6 grid, step 11
    ours = REF.kl_cluster_half(x[None], rounds=20)[0]
    theirs = _authors_cluster(x[:, :], seeds)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=1e-6)
    # the float32 clustering of the default presets is another computation (it may agree on
    # labels, but its means are not float16 numbers)
    default = iseg.refine.kl_cluster(x.float()[None])[0]
    assert not torch.equal(default, default.half().float())


def test_kl_distance_half_rounds_like_float16():
    g = torch.Generator().manual_seed(1)
    a, x = torch.rand(3, 7, generator=g), torch.rand(5, 7, generator=g)
    d = REF.kl_distance_half(a, x)
    assert d.dtype == torch.float16 and d.shape == (3, 5)
    a64, x64 = a.half().double() + 1e-5, x.half().double() + 1e-5
    exact = 0.5 * ((a64[:, None] - x64[None]) * (a64[:, None].log() - x64[None].log())).sum(-1)
    torch.testing.assert_close(d.double(), exact, rtol=1e-2, atol=2e-3)
    assert not torch.equal(d.double(), exact)  # rounded, not exact


def test_reference_decode_is_the_float16_pipeline(tiny_pipe):
    seg = iseg.ISeg(tiny_pipe, preset="wsss-voc-reference")
    obs = seg.observe(_image(), ["dog", "aeroplane"])[0]
    result = seg.decode(obs)
    # mixing in float16, written here: normalise, upsample, weight, sum
    terms = []
    for r, w in obs.weights.items():
        a = obs.cross[r][None].half()
        a = (a / a.sum(-2, keepdim=True)).transpose(1, 2).reshape(1, -1, r, r)
        a = F.interpolate(a, size=(obs.grid, obs.grid), mode="bilinear", align_corners=False)
        terms.append((w * a).reshape(1, -1, obs.grid**2).transpose(1, 2))
    x = torch.stack(terms).sum(0)[0]
    step = obs.grid * 11 // 64
    seeds = [y * obs.grid + xx for y in range(0, 6 * step, step) for xx in range(0, 6 * step, step)]
    x = _authors_cluster(x, seeds)
    initial = torch.stack([x[:, list(span)].mean(-1) for span in obs.prompt.spans]).float()
    np.testing.assert_allclose(result.initial, initial.reshape(-1, obs.grid, obs.grid).numpy(), rtol=2e-3, atol=1e-6)
    # the float32 pipeline of the default gives other maps from the same observation
    default = iseg.decode.decode([obs], clustering=True)[0]
    assert default.initial.shape == result.initial.shape


# -- the interactive demo --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tiny_pipe):
    seg = iseg.ISeg(tiny_pipe, preset="interactive-reference")
    return seg, seg.prompt_session(_image())


def test_interactive_points_lines_boxes_scale_the_start_token(demo, tiny_pipe):
    seg, session = demo
    prompt = session._empty_for(session.settings)
    assert prompt.text == " " and prompt.spans == ((0,),)
    assert prompt.input_ids[:2] == (START, END)
    e1, e16 = seg.embedding(prompt, 1.0), seg.embedding(prompt, 1.6)
    torch.testing.assert_close(e16[0, 0], 1.6 * e1[0, 0])
    assert torch.equal(e16[0, 1:], e1[0, 1:])
    # the default interactive preset reads them with the empty prompt, nothing scaled
    default = iseg.ISeg(tiny_pipe, preset="interactive").prompt_session(_image(), observe=False)
    assert default._empty_for(default.settings).spans == ()
    assert session.settings.threshold == 0.4 and session.settings.iterations == 50 and session.settings.lam == 0.1


def test_interactive_box_cells_are_floor_to_floor_end_exclusive():
    geometry = iseg.images.Geometry(40, 48, "stretch")
    # rows [floor(5*16/40), floor(31*16/40)) = [2, 12); cols [floor(5*16/48), floor(31*16/48)) = [1, 10)
    cells = REF.box_cells((5, 5, 31, 31), geometry, 16).reshape(16, 16)
    expected = np.zeros((16, 16), np.float32)
    expected[2:12, 1:10] = 1
    assert np.array_equal(cells, expected)
    # iseg's default counts every cell the box touches: row 12 (y 30..32.5) and col 10 too
    default = iseg.interactive.box_cells((5, 5, 31, 31), geometry, 16).reshape(16, 16)
    assert default.sum() == 11 * 10 and cells.sum() == 10 * 9
    # corners in either order, as the demo sorts them; an empty box is refused
    assert np.array_equal(REF.box_cells((31, 31, 5, 5), geometry, 16).reshape(16, 16), expected)
    with pytest.raises(ValueError, match="covers no cell"):
        REF.box_cells((5, 5, 6, 6), geometry, 16)


def test_interactive_line_is_the_cells_of_its_points(demo):
    seg, session = demo
    line = [(1, 1), (40, 30)]  # far apart: the demo marks only these two cells
    result = session.segment(line=line)
    assert result.initial.sum() == pytest.approx(1.0)  # two one-hot columns averaged
    assert np.count_nonzero(result.initial) == 2
    default = iseg.ISeg(seg.model, preset="interactive").prompt_session(_image()).segment(line=line)
    assert np.count_nonzero(default.initial) > 2


def test_interactive_text_prompt_and_grid(demo):
    seg, session = demo
    prompt = iseg.interactive.text_prompt(seg, "cat; a red dog", session.settings)
    assert prompt.text == "a photography of cat and a red dog and other object and background"
    # description 2 starts 1 + its own 3 tokens after description 1: "dog", "and", "other"
    assert prompt.spans == ((4,), (8, 9, 10))
    assert [prompt.input_ids[p] for p in (4, 8, 9, 10)] == [2368, 1929, 537, 1010]
    # the half-resolution grid (32 at 512 px; 8 on this 16x16 latent), up_blocks.2 alone
    plan = seg.plan(16, session.settings)
    assert dict(plan.weights) == {8: 1.0}
    names = [layer.name for layer in plan.cross[8]]
    assert names and all(n.startswith("up_blocks.2.") for n in names)
    default_plan = seg.plan(16, make_settings("interactive"))
    assert sorted(default_plan.weights) == [4, 8]
    assert any(not layer.name.startswith("up_blocks.2.") for layer in default_plan.cross[8])
    result = session.segment(text="cat; a red dog")
    assert result.mask.shape == (40, 48)


def test_interactive_map_goes_straight_from_the_grid_to_the_image(demo):
    seg, session = demo
    result = session.segment(points=[(20, 12)])
    final = torch.from_numpy(result.maps[-1])[None, None]
    straight = F.interpolate(final, size=(40, 48), mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    np.testing.assert_allclose(result.score, straight.numpy(), atol=1e-6)
    assert np.array_equal(result.mask, result.score > 0.4)
    via = F.interpolate(F.interpolate(final, size=(32, 32), mode="bilinear", align_corners=False), size=(40, 48),
                        mode="bilinear", align_corners=False)[0, 0]
    assert not np.allclose(result.score, via.clamp(0, 1).numpy(), atol=1e-4)


# -- with everything else ----------------------------------------------------------------------------
def test_reordered_classes_map_back_to_the_dataset_labels(tiny_pipe):
    from iseg.evaluation.datasets import ContextDataset

    seg = iseg.ISeg(tiny_pipe, preset="ovs-context-reference")
    result = seg.segment(_image(), ["bag", "person"])  # the authors' order puts person (VOC) first
    assert result.classes == ("person", "bag") and result.given_classes == ("person", "bag")
    mapped = ContextDataset.to_dataset_labels(result.labels, result.given_classes)
    person, bag = ContextDataset.class_index("person"), ContextDataset.class_index("bag")
    assert np.array_equal(mapped == person, result.labels == 1)
    assert np.array_equal(mapped == bag, result.labels == 2)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    import tiny

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny.tiny_pipeline(seed=0, sd_layout=True).save_pretrained(folder)
    return folder


def test_segment_command_with_a_reference_preset(tmp_path, tiny_folder):
    import json

    from PIL import Image

    from iseg.commands.main import main

    path = tmp_path / "img.png"
    Image.fromarray(_image()).save(path)
    out = tmp_path / "out"
    assert main(["segment", str(path), "--classes", "fire hydrant,person,tv", "--model", str(tiny_folder),
                 "--device", "cpu", "--preset", "wsss-coco-reference", "--out", str(out), "--no-gif"]) == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    classes, text, used, given, spans, _ = CASES["wsss-coco-reference"][0]
    assert record["prompt"] == text and record["classes"] == list(used) and record["given_classes"] == list(given)
    assert record["token_spans"] == [list(s) for s in spans] and record["settings"]["reference"] == "wsss-coco"


def test_eval_command_runs_a_reference_preset(tmp_path, tiny_folder):
    import json

    from fake_datasets import make_context
    from PIL import Image

    from iseg.evaluation.datasets import open_dataset

    folder = tiny_folder
    make_context(tmp_path / "data", [2_000_000, 2_000_001])
    root = tmp_path / "data" / "VOCdevkit" / "VOC2010"
    out = tmp_path / "run"
    assert cli.main(["eval", "--dataset", "context", "--root", str(root), "--model", str(folder), "--device", "cpu",
                    "--preset", "ovs-context-reference", "--out", str(out), "--no-progress", "--iterations", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["preset"] == "ovs-context-reference" and m["settings"]["reference"] == "ovs-context"
    ds = open_dataset("context", root, "val")
    seg = iseg.ISeg(iseg.load_pipeline(str(folder), device="cpu", verbose=False), preset="ovs-context-reference",
                    iterations=2)
    for i in ds.ids:
        item = ds.load(i)
        res = seg.segment(item.image, list(item.classes))
        expected = ds.to_dataset_labels(res.labels, res.given_classes)
        assert np.array_equal(np.array(Image.open(out / "masks" / f"{i}.png")), expected)


def test_readme_gives_one_reference_command_per_table():
    from pathlib import Path

    from iseg.evaluation import run as ev

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    commands = [line for line in text.splitlines() if line.startswith("iseg eval") and "-reference" in line]
    presets = []
    for line in commands:
        args = ev.build_parser().parse_args(line.split()[2:])
        presets.append(args.preset)
        assert args.preset in PRESETS
    assert sorted(presets) == sorted(f"{name}-reference" for name in CASES_TABLES)
    for number in ("75.5", "45.5", "68.6", "30.9", "38.4"):
        assert f"paper {number}" in text


CASES_TABLES = ("wsss-voc", "wsss-coco", "ovs-voc", "ovs-context", "ovs-coco")


def test_attention_labels_follow_the_reordered_prompt(tiny_pipe):
    from iseg.labels.attention import attention_evidence, raw_class_maps

    seg = iseg.ISeg(tiny_pipe, preset="ovs-context-reference")
    vocabulary = ["bag", "sky", "aeroplane"]  # prompted as plane, sky, bag
    evidence = attention_evidence(seg, [_image()], vocabulary)[0]
    assert set(evidence) == set(vocabulary)
    obs = seg.observe(_image(), vocabulary)[0]
    assert obs.prompt.classes == ("plane", "bag", "sky") and obs.prompt.given == ("aeroplane", "bag", "sky")
    raw = raw_class_maps(obs)
    for c, name in enumerate(obs.prompt.given):
        assert evidence[name]["peak"] == pytest.approx(float(raw[c].max()))


def test_text_queries_of_a_dataset_reference_preset_use_the_default_template(tiny_pipe):
    seg = iseg.ISeg(tiny_pipe, preset="wsss-voc-reference")
    prompt = iseg.interactive.text_prompt(seg, "aeroplane; red dog")
    assert prompt.text == "a photograph of aeroplane and red dog" and prompt.spans == ((4, 5), (7, 8))


def test_bench_reproduce_builds_the_readme_commands_and_needs_a_gpu(tmp_path, monkeypatch):
    import argparse
    import importlib.util
    from pathlib import Path

    from iseg.evaluation import run as ev

    path = Path(__file__).resolve().parent.parent / "bench" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(model=None, device=None, limit=5, ovs_labels_voc=tmp_path / "tags.json",
                              ovs_labels_context=None, ovs_labels_coco=None)
    for table, (dataset, task, split, preset, _paper, _) in module.TABLES.items():
        cmd = module.command(table, tmp_path / "data", tmp_path / table, args)
        parsed = ev.build_parser().parse_args(cmd[4:])
        assert (parsed.dataset, parsed.task, parsed.split, parsed.preset, parsed.limit) == (dataset, task, split, preset, 5)
        assert preset == f"{table}-reference"
    assert module.TABLES["wsss-voc"][4] == 75.5 and module.TABLES["ovs-coco"][4] == 38.4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        module.main(["--voc", str(tmp_path), "--runs", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()
