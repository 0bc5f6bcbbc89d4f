"""Write the course notebooks from the cell lists below (run from the repository root).

    python tools/make_notebooks.py [NAME ...] && python tools/strip_outputs.py --execute [NAME ...]

Keeping the source here makes review easy; the .ipynb files are what users open and CI runs.
Cells whose first line is ``# NBVAL_CHECK_OUTPUT`` print deterministic numbers that nbval compares.
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent.parent / "notebooks"

SETUP = '''MODEL = "auto"   # "auto": SD 2.1-base when its weights and a GPU are here, else the shapes model

import matplotlib.pyplot as plt
import numpy as np
import iseg
from iseg.examples import example

pipe = iseg.load_pipeline(MODEL)
seg = iseg.ISeg(pipe)
print("model:", pipe.iseg_model_name, "| preset:", seg.preset, "| device:", pipe.device)'''


def md(text):
    return nbf.v4.new_markdown_cell(text.strip())


def code(text):
    return nbf.v4.new_code_cell(text.strip())


NOTEBOOKS = {
    "00_quickstart": [
        md("""
# 00 · Quickstart: a mask from one noisy forward pass

**You will learn** how to segment an image into named classes with three lines of `iseg`, how
to look at the result, and how the mask changes over iSeg's refinement iterations.

**You need** nothing else: without Stable Diffusion weights the notebook uses the shapes model that
ships with `iseg` and runs on a CPU in seconds. Set `MODEL` to a hub id or a local folder to use
Stable Diffusion instead; every cell runs unchanged.
"""),
        code(SETUP),
        md("An example image and the names of the classes in it (for the shapes model: a test-split image)."),
        code("""
image, classes = example(pipe, 8)
print(classes)
plt.figure(figsize=(3, 3)); plt.imshow(image); plt.axis("off"); plt.show()
"""),
        md("""
`segment` runs the whole method: Cat-Cross prompt, one noisy UNet pass, cross-attention class maps,
Ent-Self, refinement, labels. `labels` is an integer map at the image's size: 0 is background,
`k` is the k-th class you gave.
"""),
        code("""
result = seg.segment(image, classes)
print(result.prompt)
print("labels:", {0: "background", **{i + 1: c for i, c in enumerate(result.classes)}})
fig = result.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
for k, name in enumerate(result.classes, start=1):
    print(f"{name:>8}: {(result.labels == k).mean():.2f} of the pixels")
"""),
        md("""
The result keeps every refinement step (`result.maps`, one map per class per iteration). Here is
the mask after each iteration as an animation, like the paper's figures; the GIF is written to
`outputs/` and shown inline.
"""),
        code("""
from pathlib import Path
from IPython.display import Image as ShowImage
from iseg.viz import iteration_frames, save_gif

Path("outputs").mkdir(exist_ok=True)
gif = save_gif(iteration_frames(result), "outputs/quickstart.gif", min_side=192)
ShowImage(filename=str(gif))
"""),
        md("""
**Play with it**: pick another example image and its classes. Change `index` or give your own
image path and class names.
"""),
        code("""
from iseg.explore import ExampleView
view = ExampleView(seg, index=1)
view.widget()
"""),
    ],
    "01_cross_attention": [
        md("""
# 01 · Cross-attention: where each word looks

**You will learn** what cross-attention maps are, how they differ between resolutions, layers and
heads, and how the diffusion timestep changes them.

**You need** the shapes model (default) or Stable Diffusion. `seg.trace` runs one noisy forward
pass and keeps every cross-attention layer, head by head, through diffusers' attention-processor
API (the UNet's own processors are restored afterwards).
"""),
        code(SETUP),
        code("""
image, classes = example(pipe, 2)
trace = seg.trace(image, classes, kind="cross")
print(trace.prompt.text)
for layer in trace.layers("cross"):
    print(f"{layer.name:55s} r={layer.resolution(trace.latent_side):3d} heads={layer.heads}")
"""),
        md("Each class word's map, averaged over heads, in every cross-attention layer:"),
        code("""
layers = trace.layers("cross")
fig, axes = plt.subplots(len(classes), len(layers) + 1, figsize=(1.6 * (len(layers) + 1), 1.7 * len(classes)), squeeze=False)
for row, cls in enumerate(classes):
    axes[row, 0].imshow(trace.image); axes[row, 0].set_ylabel(cls)
    for col, layer in enumerate(layers, start=1):
        axes[row, col].imshow(trace.class_map(layer.name, cls), cmap="jet")
        axes[row, col].set_title(f"r={layer.resolution(trace.latent_side)}", fontsize=7)
for ax in axes.ravel(): ax.set_xticks([]); ax.set_yticks([])
plt.tight_layout(); plt.show()
"""),
        md("""
Low resolutions are coarse but decide *which* object a word refers to; high resolutions are
sharper but noisier. iSeg mixes resolutions (`cross_weights`) before refining. Heads differ too:
"""),
        code("""
layer = max(layers, key=lambda l: (l.resolution(trace.latent_side), l.name))
cls = classes[0]
fig, axes = plt.subplots(1, layer.heads, figsize=(1.8 * layer.heads, 1.9))
for h, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(trace.class_map(layer.name, cls, head=h), cmap="jet"); ax.set_title(f"head {h}", fontsize=8); ax.axis("off")
plt.suptitle(f"'{cls}' in {layer.name.split('.transformer')[0]}", fontsize=9); plt.tight_layout(); plt.show()
"""),
        md("""
**The timestep.** iSeg adds noise for one timestep `t` (100 of 1000 by default) before the forward
pass. With little noise the image dominates; with a lot the maps blur.
"""),
        code("""
from iseg.explore import CrossAttentionView

view = CrossAttentionView(seg, image, classes)
token = trace.prompt.spans[0][0]
fig, axes = plt.subplots(1, 4, figsize=(8, 2.1))
for ax, t in zip(axes, [50, 100, 400, 800]):
    ax.imshow(view.map(token=token, resolution=view.resolutions[-1], timestep=t), cmap="jet"); ax.set_title(f"t={t}", fontsize=9); ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
# how concentrated the first class's map is (share of its mass on the top 10% of pixels), per timestep
for t in [50, 100, 400, 800]:
    m = view.map(token=token, resolution=view.resolutions[-1], timestep=t).ravel()
    top = np.sort(m)[::-1][: max(1, m.size // 10)].sum() / m.sum()
    print(f"t={t:4d}: {top:.1f}")
"""),
        md("**Play with it**: token, resolution, head (-1 = mean of heads) and timestep."),
        code("""
view.update(token=token)
display(view.fig.canvas if hasattr(view.fig.canvas, "toolbar_visible") else view.fig)
view.widget()
"""),
    ],
    "02_self_attention_and_entropy": [
        md("""
# 02 · Self-attention and Ent-Self

**You will learn** what a row of self-attention shows (the pixels a query pixel looks at), how
spread out those rows are (their entropy), and what iSeg's entropy-reduced self-attention
(Ent-Self, method.md §5) does to them.

**You need** the shapes model (default) or Stable Diffusion. Click a pixel of the image in the
interactive figure at the end (ipympl); in a static render, use the sliders.
"""),
        code(SETUP),
        code("""
image, classes = example(pipe, 3)
obs = seg.observe(image, classes)[0]       # one forward pass; everything below reuses it
A = obs.self_attention.double()
side = obs.grid
print("self-attention", tuple(A.shape), "on a", side, "x", side, "grid; rows sum to", float(A.sum(-1).mean()))
"""),
        md("One row is a map over the image: where the pixel at the centre of the grid looks."),
        code("""
from iseg.explore import row_entropy
y, x = side // 2, side // 2
fig, axes = plt.subplots(1, 2, figsize=(5, 2.5))
axes[0].imshow(obs.image); axes[0].plot([(x + .5) * obs.image.shape[1] / side], [(y + .5) * obs.image.shape[0] / side], "w+", ms=12, mew=2)
axes[1].imshow(A[y * side + x].reshape(side, side), cmap="jet"); axes[1].set_title(f"row of pixel ({y}, {x})")
for ax in axes: ax.axis("off")
plt.show()
"""),
        md("""
**Entropy of every row**, as a share of the maximum (a uniform row). Low entropy: the pixel looks at
a few pixels, usually its own object. iSeg relies on rows that group an object's pixels.
"""),
        code("""
H = row_entropy(A)
plt.figure(figsize=(3, 3)); plt.imshow(H.reshape(side, side), cmap="magma"); plt.colorbar(shrink=.8); plt.axis("off"); plt.title("row entropy / max"); plt.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
print(f"mean row entropy: {H.mean():.2f} of the maximum")
"""),
        md("""
**Ent-Self** (`iseg.refine.entropy_reduce`): divide every column by its maximum, move every entry
by `lam * log10(e * a)` (one gradient step that lowers entropy: weak affinities go negative),
clamp at 0 and normalise rows. The larger `lam`, the sparser the rows. For a large `lam` the log
term dominates: only affinities above about `1/e` of their column's maximum survive. The paper's
presets use 0.002 to 0.2 on Stable Diffusion; the shapes model's preset uses 100, chosen on its
validation images (its model card says why).
"""),
        code("""
from iseg.refine import entropy_reduce
q = y * side + x
lams = [0.0, 0.015, 0.1, 1.0, 100.0]
fig, axes = plt.subplots(1, len(lams), figsize=(2.2 * len(lams), 2.3))
for ax, lam in zip(axes, lams):
    P = entropy_reduce(A, lam)
    ax.imshow(P[q].reshape(side, side), cmap="jet"); ax.set_title(f"lam={lam}: H={row_entropy(P).mean():.2f}", fontsize=8); ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
for lam in lams:
    P = entropy_reduce(A, lam)
    print(f"lam={lam:<6}: mean row entropy {row_entropy(P).mean():.2f}, zero entries {(P == 0).double().mean():.2f}")
"""),
        md("""
Why it helps: refinement multiplies the class maps by `P` again and again. Rows that spread over
the whole image would smear every class over the background; sparse rows keep evidence inside
objects. **Play with it**: click a pixel (ipympl) or use the sliders.
"""),
        code("""
%matplotlib widget
from iseg.explore import SelfAttentionView
view = SelfAttentionView(seg, image, classes)
view.widget()
"""),
    ],
    "03_iterative_refinement": [
        md("""
# 03 · Iterative refinement

**You will learn** how iSeg propagates class maps through the entropy-reduced self-attention,
`C(i+1) = nrm(P @ C(i))`, what the masks look like after each iteration, and how the number of
iterations changes the mIoU on a batch of shapes images with ground truth.

**You need** the shapes model for the measured part (it has exact ground-truth masks).
"""),
        code(SETUP),
        code("""
image, classes = example(pipe, 4)
result = seg.segment(image, classes, iterations=10)
print(classes, "| maps:", result.maps.shape, "(iterations + 1, classes, h, w)")
"""),
        md("Every iteration's labels (top) and the first class's map (bottom):"),
        code("""
from iseg.viz import iteration_grid
fig = iteration_grid(result, steps=[0, 1, 2, 5, 10])
"""),
        md("The same as an animation (written to `outputs/`):"),
        code("""
from pathlib import Path
from IPython.display import Image as ShowImage
from iseg.viz import iteration_frames, save_gif
Path("outputs").mkdir(exist_ok=True)
ShowImage(filename=str(save_gif(iteration_frames(result), "outputs/refinement.gif", min_side=192)))
"""),
        md("""
**Measured**: mIoU (background included) against the number of iterations on 40 validation images
of the shapes world, with the model's preset and with a small `lam` for comparison.
`iterations=0` is the raw Cat-Cross cross-attention. With the small `lam` the class maps keep
leaking between objects and the background, and after enough steps a small object's map can
flood the image; the preset's large `lam` keeps them apart.
"""),
        code("""
from iseg.shapes.evaluate import evaluate
if pipe.iseg_model_name == "shapes":
    its = [0, 1, 2, 3, 4, 5, 10, 20]
    lams = [0.1, seg.settings.lam]
    report = evaluate(seg, "val", 40, timesteps=[seg.settings.timestep], lams=lams, iterations=its, progress=False)
    curves = report["timesteps"][str(seg.settings.timestep)]["miou"]
    plt.figure(figsize=(4, 2.6))
    for lam in lams:
        plt.plot(its, [curves[str(lam)][str(n)] for n in its], "o-", label=f"lam={lam:g}")
    plt.xlabel("iterations N"); plt.ylabel("mIoU (%)"); plt.legend(); plt.grid(alpha=.3); plt.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
if pipe.iseg_model_name == "shapes":
    for lam in lams:
        print(f"lam={lam:g}:", {n: round(curves[str(lam)][str(n)]) for n in its})
"""),
        md("**Play with it**: iterations, `lam` and the class whose map is shown. No slider re-runs the UNet."),
        code("""
from iseg.explore import RefinementView
view = RefinementView(seg, image, classes)
view.widget()
"""),
    ],
    "04_category_enhancement": [
        md("""
# 04 · Category enhancement (Cat-Cross)

**You will learn** what Cat-Cross does: after the text encoder, the embedding vectors of the class
tokens are multiplied by `gamma` (1.6 by default), so every cross-attention layer attends more to
the class words than to the rest of the prompt. You will see the maps with and without it and
measure mIoU against `gamma`.

**You need** the shapes model for the measured part.
"""),
        code(SETUP),
        code("""
image, classes = example(pipe, 5)
off = seg.segment(image, classes, gamma=1.0, iterations=0)
on = seg.segment(image, classes, gamma=1.6, iterations=0)
fig, axes = plt.subplots(2, len(classes) + 1, figsize=(2.1 * (len(classes) + 1), 4.3), squeeze=False)
for row, (r, name) in enumerate([(off, "gamma=1.0"), (on, "gamma=1.6")]):
    axes[row, 0].imshow(r.overlay()); axes[row, 0].set_title(name, fontsize=9)
    for col, s in enumerate(r.scores(0), start=1):
        axes[row, col].imshow(s, cmap="jet", vmin=0, vmax=1); axes[row, col].set_title(r.classes[col - 1], fontsize=9)
for ax in axes.ravel(): ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        md("""
The embeddings really change only at the class positions (`iseg.prompts.cat_cross`):
"""),
        code("""
# NBVAL_CHECK_OUTPUT
from iseg.prompts import cat_cross
prompt = seg.prompt_for(classes)
E = seg.embedding(prompt, 1.0)
scaled = cat_cross(E, prompt.spans, 1.6)
changed = (scaled != E).any(-1)[0].nonzero().ravel().tolist()
print("class token positions:", [list(s) for s in prompt.spans], "| changed rows:", changed)
"""),
        md("**Measured**: mIoU against `gamma` on 40 validation images, raw (N=0) and refined (the preset's N)."),
        code("""
from iseg.shapes.evaluate import evaluate
if pipe.iseg_model_name == "shapes":
    gammas = [1.0, 1.3, 1.6, 2.0, 2.5]
    n = seg.settings.iterations
    rows = []
    for g in gammas:
        rep = evaluate(seg, "val", 40, timesteps=[seg.settings.timestep], lams=[seg.settings.lam], iterations=[0, n], progress=False, gamma=g)
        rows.append(rep["timesteps"][str(seg.settings.timestep)]["miou"][str(seg.settings.lam)])
    plt.figure(figsize=(4, 2.6))
    plt.plot(gammas, [r["0"] for r in rows], "o-", label="raw (N=0)"); plt.plot(gammas, [r[str(n)] for r in rows], "o-", label=f"refined (N={n})")
    plt.xlabel("gamma"); plt.ylabel("mIoU (%)"); plt.legend(); plt.grid(alpha=.3); plt.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
if pipe.iseg_model_name == "shapes":
    print({g: (round(r["0"]), round(r[str(n)])) for g, r in zip(gammas, rows)})
"""),
        md("**Play with it**: each `gamma` runs one forward pass (fast with the shapes model)."),
        code("""
from iseg.explore import GammaView
view = GammaView(seg, image, classes)
view.widget()
"""),
    ],
    "05_generated_images": [
        md("""
# 05 · Masks for generated images

**You will learn** how to generate an image with the same pipeline and then segment the words of
its own prompt in it: training-free masks for synthetic data.

**You need** the shapes model (64x64 images, a second on a CPU) or Stable Diffusion on a GPU.
"""),
        code(SETUP),
        code("""
if pipe.iseg_model_name == "shapes":
    classes = ["star", "circle"]
    prompt = "a red star and a blue circle"
else:
    classes = ["dog", "ball"]
    prompt = "a photograph of a dog playing with a ball on the grass"
from iseg.explore import generate
image = generate(pipe, prompt, seed=0)   # a seeded pipeline call: 30 DDIM steps, guidance 4
plt.figure(figsize=(3, 3)); plt.imshow(image); plt.axis("off"); plt.title(prompt, fontsize=9); plt.show()
"""),
        md("Now segment the classes named in the prompt in the generated image:"),
        code("""
result = seg.segment(image, classes)
fig = result.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
print(image.size, sorted(set(np.unique(result.labels).tolist()) - {0}))
"""),
        md("""
**Play with it**: write a prompt and the classes to segment (comma-separated). Each click generates
with a fixed seed and segments.
"""),
        code("""
from iseg.explore import GenerationView
view = GenerationView(seg, prompt, classes, seed=1)
view.widget()
"""),
    ],
    "06_interactive": [
        md("""
# 06 · Interactive segmentation: points, lines, boxes and descriptions

**You will learn** how iSeg segments one object from a click, a stroke, a box or a description
(method.md §7): the prompt becomes an initial map on the attention grid (a one-hot cell, the
cells under a stroke, the cells inside a box, or the words' cross-attention), which is refined
through the entropy-reduced self-attention (lam 0.1, 50 iterations) and thresholded at 0.5.
The image's forward pass is cached, so every further click only costs the refinement.

**You need** the shapes model (default) or Stable Diffusion. The widget needs `%matplotlib widget`
(ipympl) for the mouse.
"""),
        code(SETUP),
        code("""
image, classes = example(pipe, 8)
print(classes)
w_, h_ = image.size
"""),
        md("One click in the middle of the image's left half, a box around its right half, and a description:"),
        code("""
from iseg.shapes import CLASSES
r_point = seg.segment_prompt(image, points=[(w_ * 0.3, h_ * 0.75)])
r_box = seg.segment_prompt(image, box=(w_ * 0.55, h_ * 0.5, w_, h_))
r_text = seg.segment_prompt(image, text=classes[-1])
fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.6))
for ax, r, title in zip(axes, [r_point, r_box, r_text], ["point", "box", f"text: {classes[-1]}"]):
    ax.imshow(r.overlay()); ax.set_title(title, fontsize=9); ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        md("How the combined map grows over the iterations for the click:"),
        code("""
steps = [0, 1, 5, 20, 50]
fig, axes = plt.subplots(1, len(steps), figsize=(2 * len(steps), 2.1))
for ax, n in zip(axes, steps):
    ax.imshow(r_point.maps[n], cmap="jet", vmin=0, vmax=1); ax.set_title(f"N={n}", fontsize=9); ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
print("non-empty masks:", [bool(r.mask.any()) for r in (r_point, r_box, r_text)])
"""),
        code("""
import time
t = time.perf_counter(); seg.segment_prompt(image, points=[(w_ * 0.5, h_ * 0.5)])
print(f"a new click on the same image: {1000 * (time.perf_counter() - t):.1f} ms (the UNet does not run again)")
"""),
        md("""
**Play with it**: choose a mode, then click (point), drag (line, box) or type and press Segment.
Upload your own image with the button; Clear removes the prompts.
"""),
        code("""
%matplotlib widget
from iseg.widgets import PromptWidget
PromptWidget(seg, image).show()
"""),
    ],

    "07_evaluation": [
        md("""
# 07 · Evaluation: pseudo-mask quality on a whole dataset

**You will learn** how the paper's numbers are measured (method.md §8): run iSeg over a labelled
dataset, accumulate one confusion matrix over every pixel, and read mIoU, per-class IoU and the
worst images from it. The weakly supervised setting (WSSS) gives iSeg the classes present in each
image and asks for their masks, the pseudo-masks a segmentation network would then be trained on.

**You need** nothing else: this notebook evaluates the shapes model on its test split (exact ground
truth, CPU, seconds). The last section shows the same command on PASCAL VOC, Context and COCO-Object.
"""),
        code("""
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown

import iseg
from iseg.datasets import ShapesDataset
from iseg.eval import evaluate_dataset, format_results, image_scores, load_records
from iseg.viz import plot_class_iou, show_predictions

pipe = iseg.load_pipeline("shapes")
seg = iseg.ISeg(pipe)          # the shapes model's own preset, chosen on the validation split
dataset = ShapesDataset(split="test", count=200)
print(dataset, "|", seg)
"""),
        md("""
A dataset item is an image, its label map (0 background, k = `class_names[k-1]`, 255 ignored) and
the names of the classes present, which is all WSSS gives the method.
"""),
        code("""
item = dataset[0]
print(item.id, item.classes, item.label.shape)
fig, axes = plt.subplots(1, 2, figsize=(4, 2))
axes[0].imshow(item.image); axes[1].imshow(iseg.viz.colorize(item.label))
for ax in axes: ax.axis("off")
plt.show()
"""),
        md("""
`evaluate_dataset` is what the `iseg-eval` command runs. It writes every image's confusion
matrix to `OUT/records/` as it goes (so a stopped run resumes), the pseudo-masks to `OUT/masks/`
as palette PNGs, and `metrics.json` plus `results.md` at the end.
"""),
        code("""
OUT = Path(tempfile.mkdtemp()) / "shapes-wsss"
metrics = evaluate_dataset(seg, dataset, task="wsss", out=OUT)
Markdown(format_results(metrics))
"""),
        code("""
# NBVAL_CHECK_OUTPUT
print(f"mIoU {metrics['miou']:.1f} over {metrics['counts']['images']} images")
"""),
        md("""
Two conventions exist (method.md §8): the reference averages IoU over the classes present in the
ground truth; mmsegmentation (used by CLIP-based peers) over the classes whose IoU is defined,
which also counts classes that were only predicted. With every shape in the test images they agree here.
How much does refinement add? The same run with `iterations=0` gives the raw Cat-Cross masks:
"""),
        code("""
raw = evaluate_dataset(iseg.ISeg(pipe, iterations=0), dataset, task="wsss", out=OUT.with_name("raw"), progress=False)
print(f"raw cross-attention: {raw['miou']:.1f}   refined (N={seg.settings.iterations}): {metrics['miou']:.1f}")
fig, axes = plt.subplots(1, 2, figsize=(9, 2.6), sharey=True)
plot_class_iou(raw, ax=axes[0], title="raw Cat-Cross (N=0)")
plot_class_iou(metrics, ax=axes[1], title=f"iSeg (N={seg.settings.iterations})")
plt.tight_layout(); plt.show()
"""),
        md("The worst images, by their own mIoU, show where the method fails:"),
        code("""
scores = image_scores(OUT)
worst = sorted(scores, key=scores.get)[:4]
show_predictions(dataset, OUT, worst, scores); plt.show()
"""),
        md("""
Running the same call again finds every image in `OUT/records/` and computes nothing: that is how
an interrupted run on 10,000 images resumes.
"""),
        code("""
import time
t = time.perf_counter()
again = evaluate_dataset(seg, dataset, task="wsss", out=OUT, progress=False)
print(f"resumed a finished run in {time.perf_counter() - t:.2f} s; same mIoU: {again['miou'] == metrics['miou']}")
print(len(load_records(OUT)), "records")
"""),
        md("""
## On the real datasets

Nothing is downloaded: point `--root` at your copy (layouts in `iseg/datasets.py`). The preset
defaults to method.md's for the dataset and task; every setting has a flag (`--lam 0.1`).

```bash
# weakly supervised pseudo-masks, VOC 2012 train (1,464 images), paper: 75.5 mIoU
iseg-eval --task wsss --dataset voc --root VOCdevkit/VOC2012 --split train --out runs/voc-wsss
# open-vocabulary, VOC 2012 val with image labels from a file (JSON {id: [names]} or CSV)
iseg-eval --task ovs --dataset voc --root VOCdevkit/VOC2012 --split val --labels voc_val_labels.json --out runs/voc-ovs
# PASCAL Context and COCO-Object (COCO 2014 per-image PNGs, or the COCO-Stuff-164k conversion)
iseg-eval --task ovs --dataset context --root VOCdevkit/VOC2010 --labels ctx.json --out runs/ctx
iseg-eval --task wsss --dataset coco-object --root coco2014 --split train --out runs/coco-wsss
# the same on 8 GPUs: images are shared out by batch, histograms summed; numbers equal one GPU's
accelerate launch --multi_gpu --num_processes 8 -m iseg.eval --task wsss --dataset voc --root VOCdevkit/VOC2012 --out runs/voc-wsss
```
Stop a run at any time; the same command continues it. `--restart` discards an earlier run.
"""),
    ],

    "08_open_vocabulary": [
        md("""
# 08 · Open vocabulary: which classes are in the image?

**You will learn** how open-vocabulary segmentation differs from the weakly supervised setting
of notebook 07: nobody tells iSeg which classes are present. They are first predicted from a
vocabulary (`iseg.labels.predict_labels`), then segmented. You will see the evidence the
training-free `attention` method uses, where it fails on the shapes model, and the two other
sources of labels (a CLIP tagger, a file).

**You need** nothing else for the shapes model. The CLIP section needs CLIP weights
(`openai/clip-vit-base-patch16`) in your Hugging Face cache.
"""),
        code("""
import matplotlib.pyplot as plt

import iseg
from iseg import labels as L
from iseg.shapes import CLASSES, SPLITS, sample
from iseg.viz import plot_label_evidence

pipe = iseg.load_pipeline("shapes")
seg = iseg.ISeg(pipe)
vocabulary = list(CLASSES)
records = [sample(s) for s in SPLITS["test"][:4]]
images = [r.image for r in records]
truth = [[c for c in CLASSES if c in r.classes] for r in records]
print("vocabulary:", vocabulary)
"""),
        md("""
**Step 1: prompts for the vocabulary.** The whole vocabulary goes into as few prompts as the
77-token window allows (`chunk_vocabulary`); six shape names fit in one. With Stable Diffusion
and the reference prompt, the eighty COCO names need several prompts, each class in exactly one.
"""),
        code("""
print(L.chunk_vocabulary(seg, vocabulary))
"""),
        md("""
**Step 2: evidence per class.** Each prompt is segmented as usual. A class present in the image
should win pixels (its *share*) and draw strong cross-attention somewhere (its *peak*, compared
with the strongest class of the image). Bold names are the true classes, starred ones are kept.
"""),
        code("""
evidence = L.attention_evidence(seg, images, vocabulary)
chosen = [L.select_by_evidence(ev, L.attention_thresholds(seg)) for ev in evidence]
fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
for ax, ev, t, c in zip(axes, evidence, truth, chosen):
    plot_label_evidence(ev, t, c, L.attention_thresholds(seg), ax=ax)
plt.tight_layout(); plt.show()
"""),
        code("""
# NBVAL_CHECK_OUTPUT
for t, c in zip(truth, chosen):
    print("true:", t, "| predicted:", c)
print({k: round(v, 3) for k, v in L.label_scores(chosen, truth).items()})
"""),
        md("""
On 500 shapes test images this gives label F1 0.96 (precision 0.965, recall 0.960; the model
card has the numbers). It took a change to the model: the first version of the shapes model put
a caption's words on their objects well (class discrimination 0.99), but a word that is *not* in
the image still landed on some object, and label F1 was 0.54. Version 2 was fine-tuned with a
"vocabulary" loss that teaches what Stable Diffusion learned from billions of captions: a word
without its object draws little attention. iSeg itself stays training-free. The paper's
open-vocabulary runs use a separate CLIP tagger instead (below).

**Step 3: segment with the predicted classes.** `segment(image, vocabulary=...)` does both steps.
Wrong labels cost mask quality: compare with the true classes.
"""),
        code("""
predicted = seg.segment(images, vocabulary=vocabulary)
oracle = seg.segment(images, truth)
fig, axes = plt.subplots(2, 4, figsize=(9, 4.6))
for k in range(4):
    axes[0, k].imshow(predicted[k].overlay()); axes[0, k].set_title(", ".join(predicted[k].classes), fontsize=8)
    axes[1, k].imshow(oracle[k].overlay()); axes[1, k].set_title("true: " + ", ".join(truth[k]), fontsize=8)
for ax in axes.ravel(): ax.axis("off")
plt.tight_layout(); plt.show()
"""),
        md("""
## Other label sources

```python
# a CLIP tagger (prompt ensemble, softmax over the vocabulary, relative threshold)
tagger = L.load_clip("openai/clip-vit-base-patch16")     # clear error if the weights are not here
labels = L.predict_labels(images, vocabulary, "clip", clip=tagger)
# labels made elsewhere, keyed by image id: JSON {"2007_000033": ["aeroplane"]} or CSV "id,a;b"
labels = L.predict_labels(paths, vocabulary, "file", labels_file="labels.json")
```
On a dataset, the command reports label precision and recall beside mIoU:
```bash
iseg-eval --task ovs --dataset voc --root VOCdevkit/VOC2012 --label-method clip --out runs/voc-ovs
iseg-eval --task ovs --dataset shapes --label-method attention --limit 500 --out runs/shapes-ovs
```
"""),
    ],
}


def cell_id(notebook: str, index: int) -> str:
    """A stable cell id (nbformat makes random ones), so regenerating a notebook changes only what changed."""
    return f"{notebook.split('_')[0]}-{index:02d}"


def main():
    import sys

    HERE.mkdir(exist_ok=True)
    wanted = sys.argv[1:] or list(NOTEBOOKS)
    for name, cells in NOTEBOOKS.items():
        if name not in wanted:
            continue
        nb = nbf.v4.new_notebook()
        nb.cells = cells
        for i, cell in enumerate(nb.cells):
            cell.id = cell_id(name, i)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbf.write(nb, HERE / f"{name}.ipynb")
        print("wrote", name)


if __name__ == "__main__":
    main()
