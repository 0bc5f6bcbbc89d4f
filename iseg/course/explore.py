"""Interactive views for the notebooks: a matplotlib figure plus ``update(**values)``.

Every view draws once when built and redraws in place when ``update`` is called, so a slider, a
dropdown or a mouse click only has to call ``update``; tests call it directly and check that the
figure's data changed. ``view.widget()`` returns the ipywidgets controls wired to ``update``.
The forward pass is cached: sliders that act after it (``lam``, ``iterations``, a clicked pixel)
never re-run the UNet.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from ..refine import entropy_reduce
from ..viz import MAP_CMAP, fit_figsize, overlay, panels_per_row
from .examples import example

__all__ = ["CrossAttentionView", "SelfAttentionView", "RefinementView", "GammaView", "ExampleView", "CompareView",
           "GenerationView",
           "generate", "row_entropy",
           "figure_widget", "figure_box", "redraw", "lam_slider"]


def row_entropy(attn) -> np.ndarray:
    """Entropy of every row of an ``(n, n)`` attention, as a share of the maximum ``log n``."""
    import torch

    a = torch.as_tensor(attn).detach().cpu().double()  # any device: the answer is for plotting
    h = -(a * a.clamp_min(1e-30).log()).sum(-1) / math.log(a.shape[-1])
    return h.numpy()


def _figure(panels: int, size: float = 2.6):
    import matplotlib.pyplot as plt

    # built without showing it: ``widget()`` places the figure under its controls
    # panels wrap onto more rows rather than making a figure wider than a notebook's output area
    per_row = panels_per_row(panels)
    rows = -(-panels // per_row)
    with plt.ioff():  # titles change with the controls: constrained layout keeps them inside the figure
        fig, grid = plt.subplots(rows, per_row, figsize=fit_figsize(size * per_row + 0.4, (size + 0.3) * rows),
                                 squeeze=False, layout="constrained")
    axes = list(grid.ravel())
    for ax in axes[panels:]:
        ax.axis("off")
    for ax in axes[:panels]:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes[:panels]


def _set_picture(artist, picture) -> None:
    """Show ``picture`` in an ``AxesImage`` whose size may change (the extent follows it)."""
    picture = np.asarray(picture)
    artist.set_data(picture)
    artist.set_extent((-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5))


def figure_widget(fig):
    """The widget that shows ``fig`` live.

    The course has one mechanism for every widget: ipympl (``%matplotlib widget``), whose figure
    canvas is itself a widget that redraws in place when the figure changes, in JupyterLab and in
    Voila. Under any other backend (``inline``, a static render) the figure is drawn as a picture into
    an ``ipywidgets.Output`` that ``redraw`` clears and fills again, so the picture still follows.
    """
    import ipywidgets as w

    if isinstance(fig.canvas, w.DOMWidget):
        return fig.canvas
    out = w.Output()
    fig._iseg_output = out
    redraw(fig)
    return out


def figure_box(children, fig):
    """``ipywidgets.VBox(children)`` that also carries a still PNG of ``fig`` as it is when displayed.

    A live front end (JupyterLab, Voila) renders the widget and ignores the picture; a static
    render of the executed notebook (nbconvert, the course's website, GitHub) has no widget manager
    and shows the picture instead: the widget's first state. ipympl's own canvas does the same
    when it is displayed alone.
    """
    import ipywidgets as w

    class FigureBox(w.VBox):
        def _repr_mimebundle_(self, **kwargs):
            data = super()._repr_mimebundle_(**kwargs)
            if data is None:  # no comm (a widget made outside a kernel): nothing to add a picture to
                return data
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi="figure")
            return {**data, "image/png": base64.b64encode(buf.getvalue()).decode("ascii")}

    return FigureBox(children)


def redraw(fig) -> None:
    """Draw ``fig`` again wherever ``figure_widget`` shows it."""
    fig.canvas.draw_idle()
    out = getattr(fig, "_iseg_output", None)
    if out is not None:
        from IPython.display import display

        with out:
            out.clear_output(wait=True)
            display(fig)


class _View:
    def widget(self):
        """The controls, wired to ``update``, above the live figure (see ``figure_widget``)."""
        import ipywidgets as w

        return figure_box([w.interactive(self.update, **self.controls()), figure_widget(self.fig)], self.fig)

    def _redraw(self):
        redraw(self.fig)


class CrossAttentionView(_View):
    """Cross-attention of one token, at one resolution, averaged over layers, for one head or all."""

    def __init__(self, seg, image, classes, timestep: int | None = None):
        self.seg, self.image, self.classes = seg, image, list(classes)
        self._traces = {}
        self.timestep = timestep if timestep is not None else seg.settings.timestep
        trace = self._trace(self.timestep)
        self.tokens = self._token_names(trace)
        self.resolutions = sorted({layer.resolution(trace.latent_side) for layer in trace.layers("cross")})
        self.fig, (self.ax_img, self.ax_map) = _figure(2)
        self.ax_img.imshow(trace.image)
        self.ax_img.set_title("image")
        self.state = dict(token=self.tokens[0][1], resolution=self.resolutions[-1], head=-1, timestep=self.timestep)
        self.im = self.ax_map.imshow(self.map(**self.state), cmap=MAP_CMAP)
        self.update()

    def _trace(self, timestep):
        if timestep not in self._traces:
            self._traces[timestep] = self.seg.trace(self.image, self.classes, kind="cross", timestep=timestep)
        return self._traces[timestep]

    def _token_names(self, trace):
        ids = trace.prompt.input_ids
        tok = self.seg.backbone.tokenizer
        end = ids.index(tok.eos_token_id) if tok.eos_token_id in ids else len(ids)
        names = tok.convert_ids_to_tokens(list(ids[: end + 1]))
        return [(f"{i}: {n.replace('</w>', '')}", i) for i, n in enumerate(names)]

    def map(self, token: int, resolution: int, head: int = -1, timestep: int | None = None) -> np.ndarray:
        """Mean over the layers at ``resolution`` of the token's map (``head=-1``: all heads)."""
        trace = self._trace(self.timestep if timestep is None else timestep)
        layers = [layer for layer in trace.layers("cross") if layer.resolution(trace.latent_side) == resolution]
        maps = [trace.token_map(layer.name, token, None if head < 0 else min(head, layer.heads - 1)) for layer in layers]
        return np.mean(maps, axis=0)

    def update(self, token: int | None = None, resolution: int | None = None, head: int | None = None,
               timestep: int | None = None):
        for key, value in dict(token=token, resolution=resolution, head=head, timestep=timestep).items():
            if value is not None:
                self.state[key] = value
        m = self.map(**self.state)
        self.im.set_data(m)
        self.im.set_clim(m.min(), m.max())
        name = dict((i, n) for n, i in self.tokens).get(self.state["token"], "?")
        head = "mean of heads" if self.state["head"] < 0 else f"head {self.state['head']}"
        self.ax_map.set_title(f"{name} | r={self.state['resolution']} | {head} | t={self.state['timestep']}", fontsize=8)
        self._redraw()
        return m

    def controls(self):
        import ipywidgets as w

        heads = max(layer.heads for layer in self._trace(self.timestep).layers("cross"))
        return dict(token=w.Dropdown(options=self.tokens, value=self.state["token"]),
                    resolution=w.Dropdown(options=self.resolutions, value=self.state["resolution"]),
                    head=w.IntSlider(min=-1, max=heads - 1, value=-1, description="head (-1 mean)",
                                     style={"description_width": "initial"}),  # the whole label, not "head (-1 ..."
                    timestep=w.IntSlider(min=0, max=950, step=50, value=self.timestep))


def lam_slider(value: float):
    """A log-scale slider for Ent-Self's ``lam``: the presets use values from 0.002 to 100."""
    import ipywidgets as w

    low, high = -3, 2  # powers of ten; the slider cannot reach 0, so 0 starts at its lowest value
    if value > 10.0**high:  # a larger value set by hand stays what it is (a slider clamps what it cannot show)
        high = math.ceil(math.log10(value))
    return w.FloatLogSlider(value=min(max(value, 10.0**low), 10.0**high), base=10, min=low, max=high, step=0.1,
                            readout_format=".3g")


class SelfAttentionView(_View):
    """Click a pixel: its self-attention row, the same row after Ent-Self, and the entropy map."""

    def __init__(self, seg, image, classes, lam: float | None = None):
        self.obs = seg.observe(image, classes)[0]
        self.attn = self.obs.self_attention.double().cpu()  # every click reads rows of it for plotting
        self.side = self.obs.grid
        self.lam = seg.settings.lam if lam is None else lam
        self.pixel = (self.side // 2, self.side // 2)
        self.fig, axes = _figure(4)
        self.ax_img, self.ax_row, self.ax_p, self.ax_ent = axes
        self.ax_img.imshow(self.obs.image)
        self.marker = self.ax_img.plot([], [], "w+", markersize=12, mew=2)[0]
        self.im_row = self.ax_row.imshow(np.zeros((self.side, self.side)), cmap=MAP_CMAP)
        self.im_p = self.ax_p.imshow(np.zeros((self.side, self.side)), cmap=MAP_CMAP)
        self.ax_ent.imshow(row_entropy(self.attn).reshape(self.side, self.side), cmap="magma")
        self.ax_ent.set_title("row entropy / max", fontsize=8)
        self.fig.canvas.mpl_connect("button_press_event", self.on_click)
        self.update()

    def rows(self, y: int, x: int, lam: float):
        q = y * self.side + x
        P = entropy_reduce(self.attn, lam)
        return (self.attn[q].reshape(self.side, self.side).numpy(), P[q].reshape(self.side, self.side).numpy())

    def update(self, y: int | None = None, x: int | None = None, lam: float | None = None):
        if y is not None or x is not None:
            self.pixel = (self.pixel[0] if y is None else y, self.pixel[1] if x is None else x)
        if lam is not None:
            self.lam = lam
        row, p = self.rows(*self.pixel, self.lam)
        for im, data in ((self.im_row, row), (self.im_p, p)):
            im.set_data(data)
            im.set_clim(data.min(), data.max())
        h, w = self.obs.image.shape[:2]
        y, x = self.pixel
        self.marker.set_data([(x + 0.5) * w / self.side], [(y + 0.5) * h / self.side])
        self.ax_row.set_title(f"attention of pixel {self.pixel}", fontsize=8)
        self.ax_p.set_title(f"after Ent-Self, lam={self.lam:g}", fontsize=8)
        self._redraw()
        return row, p

    def on_click(self, event):
        """Mouse handler (ipympl): a click on the image selects that pixel's row."""
        if event.inaxes is not self.ax_img or event.xdata is None:
            return
        h, w = self.obs.image.shape[:2]
        y = int(np.clip(event.ydata * self.side / h, 0, self.side - 1))
        x = int(np.clip(event.xdata * self.side / w, 0, self.side - 1))
        self.update(y=y, x=x)

    def controls(self):
        import ipywidgets as w

        return dict(y=w.IntSlider(min=0, max=self.side - 1, value=self.pixel[0]),
                    x=w.IntSlider(min=0, max=self.side - 1, value=self.pixel[1]),
                    lam=lam_slider(self.lam))


def _raw_power(seg) -> float | None:
    # raw maps are labelled at the model's own raw rule where it has one (a fair comparison)
    return seg.model.raw_bg_power


class RefinementView(_View):
    """The label overlay and one class's map after N refinement steps, for any lam."""

    def __init__(self, seg, image, classes, max_iterations: int = 20):
        self.seg = seg
        self.obs = seg.observe(image, classes)[0]
        self.max_iterations = max_iterations
        self.state = dict(iterations=seg.settings.iterations, lam=seg.settings.lam, cls=self.obs.prompt.classes[0])
        self._results = {}
        self.fig, (self.ax_over, self.ax_map) = _figure(2, 3.0)
        self.im_over = self.ax_over.imshow(self.obs.image)
        self.im_map = self.ax_map.imshow(np.zeros((8, 8)), cmap=MAP_CMAP, vmin=0, vmax=1)
        self.update()

    def result(self, lam: float):
        if lam not in self._results:
            self._results[lam] = self.seg.decode(self.obs, lam=lam, iterations=self.max_iterations)
        return self._results[lam]

    def update(self, iterations: int | None = None, lam: float | None = None, cls: str | None = None):
        for key, value in dict(iterations=iterations, lam=lam, cls=cls).items():
            if value is not None:
                self.state[key] = value
        r = self.result(self.state["lam"])
        n = min(self.state["iterations"], self.max_iterations)
        labels = r.labels_at(n, _raw_power(self.seg) if n == 0 else None)
        picture = np.asarray(overlay(r.image, labels))
        self.im_over.set_data(picture)
        score = r.scores(n)[r.classes.index(self.state["cls"])]
        self.im_map.set_data(score)
        rule = f" (bg_power {_raw_power(self.seg):g})" if n == 0 and _raw_power(self.seg) is not None else ""
        self.ax_over.set_title(f"labels after {n} iteration(s){rule}", fontsize=9)
        self.ax_map.set_title(f"{self.state['cls']}, lam={self.state['lam']:g}", fontsize=9)
        self._redraw()
        return labels

    def controls(self):
        import ipywidgets as w

        return dict(iterations=w.IntSlider(min=0, max=self.max_iterations, value=self.state["iterations"]),
                    lam=lam_slider(self.state["lam"]),
                    cls=w.Dropdown(options=list(self.obs.prompt.classes), value=self.state["cls"]))


class GammaView(_View):
    """Cat-Cross: the raw cross-attention class maps and labels for any gamma (one forward pass each)."""

    def __init__(self, seg, image, classes, gamma: float | None = None):
        self.seg, self.image, self.classes = seg, image, list(classes)
        self.gamma = seg.settings.gamma if gamma is None else gamma
        self.fig, axes = _figure(len(self.classes) + 1)
        self.ax_labels, self.ax_maps = axes[0], axes[1:]
        first = self.segment(self.gamma)
        self.im_labels = self.ax_labels.imshow(overlay(first.image, first.labels_at(0, _raw_power(seg))))
        self.im_maps = [ax.imshow(s, cmap=MAP_CMAP, vmin=0, vmax=1) for ax, s in zip(self.ax_maps, first.scores(0))]
        for ax, c in zip(self.ax_maps, self.classes):
            ax.set_title(c, fontsize=9)
        self.update()

    def segment(self, gamma: float):
        return self.seg.segment(self.image, self.classes, gamma=gamma, iterations=0)

    def update(self, gamma: float | None = None):
        if gamma is not None:
            self.gamma = gamma
        r = self.segment(self.gamma)
        self.im_labels.set_data(np.asarray(overlay(r.image, r.labels_at(0, _raw_power(self.seg)))))
        self.ax_labels.set_title(f"raw labels, gamma={self.gamma:g}", fontsize=9)
        for im, s in zip(self.im_maps, r.scores(0)):
            im.set_data(s)
        self._redraw()
        return r

    def controls(self):
        import ipywidgets as w

        return dict(gamma=w.FloatSlider(min=0.5, max=3.0, step=0.1, value=self.gamma))


class ExampleView(_View):
    """Segment the ``index``-th example image for the model at hand (``iseg.course.examples.example``)."""

    def __init__(self, seg, index: int = 0):
        self.seg, self.index = seg, index
        self.fig, (self.ax_img, self.ax_over) = _figure(2, 3.0)
        self.im_img = self.ax_img.imshow(np.zeros((8, 8, 3)))
        self.im_over = self.ax_over.imshow(np.zeros((8, 8, 3)))
        self.update()

    def update(self, index: int | None = None):
        if index is not None:
            self.index = index
        image, classes = example(self.seg, self.index)
        r = self.seg.segment(image, classes)
        _set_picture(self.im_img, r.image)
        _set_picture(self.im_over, r.overlay())
        self.ax_img.set_title(f"example {self.index}", fontsize=9)
        self.ax_over.set_title(", ".join(r.classes), fontsize=9)
        self._redraw()
        return r

    def controls(self):
        import ipywidgets as w

        return dict(index=w.IntSlider(min=0, max=30, value=self.index))


class CompareView(_View):
    """Several models on the same example image (the first model's ``example``; a model that does not
    know its class words gets its own): per model (``segs``: name -> ``ISeg``), the labels and the first
    class's map after N iterations. N = 0 is labelled at each model's raw rule.
    Moving N re-decodes only; a new image runs each model's forward pass once (cached)."""

    def __init__(self, segs, index: int = 0, max_iterations: int = 10):
        self.segs = dict(segs)
        if not self.segs:
            raise ValueError("CompareView needs at least one model")
        self.max_iterations = max_iterations
        first = next(iter(self.segs.values()))
        self.state = dict(index=index, iterations=first.settings.iterations)
        self._results: dict[tuple[str, int], object] = {}
        import matplotlib.pyplot as plt

        rows = len(self.segs)
        with plt.ioff():
            self.fig, axes = plt.subplots(rows, 2, figsize=(5.6, 2.8 * rows + 0.3), squeeze=False, layout="constrained")
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        self.axes = axes
        self.im_over = [axes[r, 0].imshow(np.zeros((8, 8, 3))) for r in range(rows)]
        self.im_map = [axes[r, 1].imshow(np.zeros((8, 8)), cmap=MAP_CMAP, vmin=0, vmax=1) for r in range(rows)]
        self.update()

    def result(self, name: str, index: int):
        key = (name, index)
        if key not in self._results:
            # one image for every row: the first model's example, as the docstring promises, unless its class
            # names are words this model never learned (a photo's "cup" for a shapes model): then its own
            seg = self.segs[name]
            image, classes = example(next(iter(self.segs.values())), index)
            known = seg.model.known_words
            if known is not None and not {c.lower() for c in classes} <= known:
                image, classes = example(seg, index)
            self._results[key] = seg.segment(image, classes, iterations=self.max_iterations)
        return self._results[key]

    def update(self, index: int | None = None, iterations: int | None = None):
        for key, value in dict(index=index, iterations=iterations).items():
            if value is not None:
                self.state[key] = value
        n = min(self.state["iterations"], self.max_iterations)
        out = {}
        for row, (name, seg) in enumerate(self.segs.items()):
            r = self.result(name, self.state["index"])
            labels = r.labels_at(n, _raw_power(seg) if n == 0 else None)
            _set_picture(self.im_over[row], overlay(r.image, labels))
            _set_picture(self.im_map[row], r.scores(n)[0])
            self.axes[row, 0].set_title(f"{name}: labels, N={n}", fontsize=9)
            self.axes[row, 1].set_title(f"{name}: {r.classes[0]} map", fontsize=9)
            out[name] = labels
        self._redraw()
        return out

    def controls(self):
        import ipywidgets as w

        return dict(index=w.IntSlider(min=0, max=30, value=self.state["index"]),
                    iterations=w.IntSlider(min=0, max=self.max_iterations, value=self.state["iterations"]))


def generate(pipe, prompt: str, seed: int = 0, steps: int = 30, guidance: float = 4.0):
    """One image from the pipeline, seeded on the CPU so it is the same on every device."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g).images[0]


class GenerationView(_View):
    """Generate an image from a prompt, then segment the given words in it."""

    def __init__(self, seg, prompt: str, classes, seed: int = 0, steps: int = 30):
        self.seg, self.steps = seg, steps
        self.state = dict(prompt=prompt, classes=", ".join(classes), seed=seed)
        self.fig, (self.ax_img, self.ax_over) = _figure(2, 3.0)
        self.im_img = self.ax_img.imshow(np.zeros((8, 8, 3)))
        self.im_over = self.ax_over.imshow(np.zeros((8, 8, 3)))
        self.update()

    def update(self, prompt: str | None = None, classes: str | None = None, seed: int | None = None):
        for key, value in dict(prompt=prompt, classes=classes, seed=seed).items():
            if value is not None:
                self.state[key] = value
        image = generate(self.seg.model.pipe, self.state["prompt"], self.state["seed"], self.steps)
        names = [c.strip() for c in self.state["classes"].split(",") if c.strip()]
        r = self.seg.segment(image, names)
        _set_picture(self.im_img, image)
        _set_picture(self.im_over, r.overlay())
        self.ax_img.set_title(self.state["prompt"], fontsize=8)
        self.ax_over.set_title(", ".join(r.classes), fontsize=8)
        self._redraw()
        return r

    def controls(self):
        import ipywidgets as w

        return dict(prompt=w.Text(value=self.state["prompt"]), classes=w.Text(value=self.state["classes"]),
                    seed=w.IntSlider(min=0, max=50, value=self.state["seed"]))

    def widget(self):
        """Generation is the one slow control (a full sampling run): it waits for the button, and the
        button says so while it works."""
        import ipywidgets as w

        controls = w.interactive(self._generate, {"manual": True, "manual_name": "Generate and segment"},
                                 **self.controls())
        self._button = controls.children[-2] if isinstance(controls.children[-2], w.Button) else None
        return figure_box([controls, figure_widget(self.fig)], self.fig)

    def _generate(self, **values):
        button = getattr(self, "_button", None)
        if button is not None:
            button.description, button.disabled = f"generating ({self.steps} steps)...", True
        try:
            return self.update(**values)
        finally:
            if button is not None:
                button.description, button.disabled = "Generate and segment", False
