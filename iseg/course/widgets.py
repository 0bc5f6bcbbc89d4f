"""A JupyterLab widget for interactive segmentation: click, stroke, box or describe an object.

    from iseg.course.widgets import PromptWidget
    PromptWidget(seg, image).show()         # needs `%matplotlib widget` (ipympl) for the mouse

Modes: ``point`` (click; several clicks combine), ``line`` (drag a stroke), ``box`` (drag a box),
``text`` (type descriptions separated by ';' and press Segment). Sliders set lam, iterations and
the threshold; an upload button loads your own image; Clear removes the prompts. The mouse
handlers are plain methods (``on_press``, ``on_move``, ``on_release``) so tests can drive them.
"""

from __future__ import annotations

import io

import numpy as np

from ..images import read_pixels, to_uint8
from ..interactive import interactive_defaults
from .examples import example
from .explore import _set_picture, figure_box, figure_widget, lam_slider, redraw

__all__ = ["PromptWidget"]

MODES = ("point", "line", "box", "text")
MASK_RGBA = (1.0, 0.15, 0.1, 0.55)


class PromptWidget:
    def __init__(self, seg, image=None, mode: str = "point"):
        import ipywidgets as w
        import matplotlib.pyplot as plt

        if image is None:
            image = example(seg, 0)[0]
        self.seg = seg
        self.points: list[tuple[float, float]] = []
        self.stroke: list[tuple[float, float]] = []
        self.box_start: tuple[float, float] | None = None
        self.result = None
        preset = interactive_defaults(seg)
        self.mode = w.ToggleButtons(options=list(MODES), value=mode, description="mode")
        # words of the model's world: the shapes models know only theirs, and a photo model's example names others
        self.text = w.Text(placeholder="; ".join(f"a {c}" for c in example(seg, 0)[1][:2]), description="text")
        self.segment_button = w.Button(description="Segment")
        self.clear_button = w.Button(description="Clear")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Your image")
        self.lam = lam_slider(preset["lam"])
        self.lam.description = "lam"
        # a range that holds the starting value: a slider clamps a value outside it, and would then
        # send the clamped one with every redraw
        self.iterations = w.IntSlider(min=0, max=max(100, preset["iterations"]), value=preset["iterations"],
                                      description="iterations")
        self.threshold = w.FloatSlider(min=min(0.05, preset["threshold"]), max=max(0.95, preset["threshold"]), step=0.05,
                                       value=preset["threshold"], description="threshold")
        self.status = w.Label()
        self.segment_button.on_click(lambda _: self.run())
        self.clear_button.on_click(lambda _: self.clear())
        self.upload.observe(self._on_upload, names="value")
        for slider in (self.lam, self.iterations, self.threshold):
            slider.observe(lambda _: self.run(), names="value")

        with plt.ioff():
            self.fig, self.ax = plt.subplots(figsize=(4, 4))
        self.fig.subplots_adjust(0, 0, 1, 1)  # the image fills the canvas: canvas pixels map linearly to image pixels
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        self.image_artist = self.ax.imshow(np.zeros((8, 8, 3)))
        self.mask_artist = self.ax.imshow(np.zeros((8, 8, 4)))
        self.marks = self.ax.plot([], [], "c.", ms=10)[0]
        self.set_image(image)
        self.fig.canvas.mpl_connect("button_press_event", self.on_press)
        self.fig.canvas.mpl_connect("motion_notify_event", self.on_move)
        self.fig.canvas.mpl_connect("button_release_event", self.on_release)

    # -- state ---------------------------------------------------------------------------------
    def set_image(self, image):
        self.array = to_uint8(read_pixels(image))
        h, w = self.array.shape[:2]
        _set_picture(self.image_artist, self.array)
        _set_picture(self.mask_artist, np.zeros((h, w, 4)))
        self.ax.set_xlim(-0.5, w - 0.5)
        self.ax.set_ylim(h - 0.5, -0.5)
        self.clear("click the image, or type and press Segment")

    def clear(self, status: str = "prompts cleared"):
        self.points, self.stroke, self.box_start, self.result = [], [], None, None
        h, w = self.array.shape[:2]
        self.mask_artist.set_data(np.zeros((h, w, 4)))
        self.marks.set_data([], [])
        self.status.value = status
        redraw(self.fig)

    def _on_upload(self, change):
        from PIL import Image

        files = change["new"]
        if not files:
            return
        item = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
        self.set_image(Image.open(io.BytesIO(bytes(item["content"]))))

    # -- mouse ---------------------------------------------------------------------------------
    def _xy(self, event):
        if event.inaxes is not self.ax or event.xdata is None:
            return None
        h, w = self.array.shape[:2]
        return float(np.clip(event.xdata, 0, w - 1e-3)), float(np.clip(event.ydata, 0, h - 1e-3))

    def on_press(self, event):
        xy = self._xy(event)
        if xy is None:
            return
        if self.mode.value == "point":
            self.points.append(xy)
            self.run()
        elif self.mode.value == "line":
            self.stroke = [xy]
        elif self.mode.value == "box":
            self.box_start = xy

    def on_move(self, event):
        xy = self._xy(event)
        if xy is not None and self.mode.value == "line" and self.stroke:
            self.stroke.append(xy)
            self.marks.set_data([p[0] for p in self.stroke], [p[1] for p in self.stroke])
            redraw(self.fig)

    def on_release(self, event):
        xy = self._xy(event)
        if self.mode.value == "line" and self.stroke:
            if xy is not None:
                self.stroke.append(xy)
            self.run()
        elif self.mode.value == "box" and self.box_start is not None and xy is not None:
            self.run(box_end=xy)

    # -- segmentation --------------------------------------------------------------------------
    def prompt(self, box_end=None) -> dict | None:
        """The keyword arguments for ``segment_prompt`` from the current mode and input."""
        mode = self.mode.value
        if mode == "point" and self.points:
            return {"points": list(self.points)}
        if mode == "line" and self.stroke:
            return {"line": list(self.stroke)}
        if mode == "box" and self.box_start is not None and box_end is not None:
            (x0, y0), (x1, y1) = self.box_start, box_end
            return {"box": (min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1)}
        if mode == "text" and self.text.value.strip():
            return {"text": self.text.value}
        return None

    def run(self, box_end=None):
        kwargs = self.prompt(box_end)
        if kwargs is None:
            return None
        try:
            self.result = self.seg.segment_prompt(self.array, lam=self.lam.value, iterations=self.iterations.value,
                                                  threshold=self.threshold.value, **kwargs)
        except ValueError as err:
            self.status.value = f"error: {err}"
            return None
        rgba = np.zeros((*self.result.mask.shape, 4))
        rgba[self.result.mask] = MASK_RGBA
        self.mask_artist.set_data(rgba)
        if "points" in kwargs:
            self.marks.set_data([p[0] for p in self.points], [p[1] for p in self.points])
        self.status.value = f"{next(iter(kwargs))}: {int(self.result.mask.sum())} pixels"
        redraw(self.fig)
        return self.result

    def show(self):
        """The whole widget: controls above the figure (an ipympl canvas when `%matplotlib widget`)."""
        import ipywidgets as w

        canvas = figure_widget(self.fig)
        return figure_box([
            w.HBox([self.mode, self.clear_button]),
            w.HBox([self.text, self.segment_button, self.upload]),
            w.HBox([self.lam, self.iterations, self.threshold]),
            canvas,
            self.status,
        ], self.fig)
