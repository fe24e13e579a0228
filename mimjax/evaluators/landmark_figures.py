"""Landmark figures: images with their ground-truth and predicted points, each pair
joined by its error line (PIL; no plotting library).

Each panel is drawn at `PANEL_PX` (upscaled from the model input with the points
scaled alike, so sub-pixel errors stay visible): ground truth green, prediction red,
the error line yellow, the landmark numbers beside the truth when the panel is large
enough to read them. Points are [x, y] pixels of the panel's image (pixel centres).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from mimjax.evaluators.classification import check_png_path, figure_font, save_figure, text_size

PANEL_PX = 384
TRUTH, PRED, ERROR = (40, 220, 60), (235, 50, 40), (250, 220, 40)
_MARGIN, _TITLE = 8, 18


class Panel(NamedTuple):
    image: np.ndarray  # (H, W) or (H, W, C) floats; the first channel is shown
    truth: np.ndarray  # (L, 2) [x, y]
    pred: np.ndarray  # (L, 2) [x, y]
    title: str


def _grey(image: np.ndarray) -> np.ndarray:
    plane = np.asarray(image, np.float64)
    plane = plane[..., 0] if plane.ndim == 3 else plane
    low, high = np.percentile(plane, [0.5, 99.5])
    if high <= low:
        return np.zeros(plane.shape, np.uint8)
    return (np.clip((plane - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)


def draw_panel(panel: Panel, size: int = PANEL_PX, numbers: bool = True) -> Image.Image:
    """One image with its points, `size` x `size` (the image's aspect is kept)."""
    grey = Image.fromarray(_grey(panel.image))
    scale = size / max(grey.size)
    grey = grey.resize((round(grey.size[0] * scale), round(grey.size[1] * scale)),
                       Image.Resampling.BILINEAR)
    canvas = Image.merge("RGB", (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    # Pixel centres: x_panel = (x + 0.5) * scale - 0.5.
    to_panel = lambda p: (np.asarray(p, np.float64) + 0.5) * scale - 0.5
    truth, pred = to_panel(panel.truth), to_panel(panel.pred)
    radius = max(2.0, size / 160)
    font = figure_font(max(9, size // 40))
    for k, (t, p) in enumerate(zip(truth, pred)):
        if np.isfinite(p).all():
            draw.line([tuple(t), tuple(p)], fill=ERROR, width=1)
            draw.ellipse([p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius], fill=PRED)
        draw.ellipse([t[0] - radius, t[1] - radius, t[0] + radius, t[1] + radius], fill=TRUTH)
        if numbers and size >= 256:
            draw.text((t[0] + radius + 1, t[1] - radius - 1), str(k), font=font, fill=TRUTH)
    return canvas


def landmark_figure(path: str, panels: Sequence[Panel], *, legend: str,
                    size: int = PANEL_PX) -> str:
    """A row of panels, each titled, with a one-line legend under them; writes `path`."""
    check_png_path(path)
    if not panels:
        raise ValueError("landmark_figure needs at least one panel")
    font = figure_font(12)
    width = len(panels) * (size + _MARGIN) + _MARGIN
    height = _TITLE + size + 2 * _MARGIN + _TITLE
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, panel in enumerate(panels):
        x = _MARGIN + j * (size + _MARGIN)
        title = panel.title
        while text_size(font, title)[0] > size and len(title) > 4:
            title = title[:-4] + "..."
        draw.text((x, 2), title, font=font, fill=(0, 0, 0))
        canvas.paste(draw_panel(panel, size), (x, _TITLE))
    return save_figure(canvas, path, legend, font, (_MARGIN, _TITLE + size + _MARGIN))
