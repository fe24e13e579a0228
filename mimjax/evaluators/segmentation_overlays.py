"""Segmentation overlay figures: WORKDIR/figures/*.png a person reads at a glance.

One row per chosen slice of a volume; columns image | coarse truth | coarse
prediction | fine truth | fine prediction (either label set may be left out). Labels
are drawn over the image in one fixed colour per class (filled at `FILL_OPACITY`,
outlined opaquely so thin structures such as the myocardium stay visible), with a
legend naming the classes. Each row's caption gives the slice's Dice per foreground
class and their mean over the classes present in the slice ("-" marks a class absent
from both truth and prediction there: its perfect score would say nothing). The title
gives the step and the volume.

The image panel shows one channel (the first, or one named through `channel_names`
for multi-channel MRI), windowed to its 0.5-99.5 percentiles over the whole volume so
that every row uses the same grey scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from mimjax.evaluators.classification import check_png_path, figure_font, save_figure, text_size
from mimjax.evaluators.segmentation_metrics import slice_dice

FILL_OPACITY = 0.45
# Colour-blind-safe colours (Okabe & Ito), one per class index; coarse and fine use
# different ones so a superclass is never mistaken for one of its subclasses.
COARSE_COLOURS = ((230, 159, 0), (86, 180, 233), (240, 228, 66), (204, 121, 167))
FINE_COLOURS = ((213, 94, 0), (0, 158, 115), (0, 114, 178), (240, 228, 66), (204, 121, 167),
                (230, 159, 0), (86, 180, 233))
_MIN_TILE = 192  # slices smaller than this are enlarged (nearest neighbour)


class LabelMaps(NamedTuple):
    """Truth and prediction of one label set, (D, H, W) integer maps, and its class names
    (position = label value, background first)."""

    ground_truth: np.ndarray
    prediction: np.ndarray
    class_names: Sequence[str]


def _colour(colours, class_index: int) -> tuple[int, int, int]:
    return colours[(class_index - 1) % len(colours)]


def choose_slices(label_sets: Sequence[LabelMaps], num_slices: int) -> list[int]:
    """Up to `num_slices` slice indices spread evenly over the slices where any truth or
    prediction has foreground (over all slices if none has)."""
    depth = label_sets[0].ground_truth.shape[0]
    foreground = np.zeros(depth, bool)
    for maps in label_sets:
        for labels in (maps.ground_truth, maps.prediction):
            foreground |= np.asarray(labels).reshape(depth, -1).any(axis=1)
    candidates = np.flatnonzero(foreground) if foreground.any() else np.arange(depth)
    picks = np.linspace(0, len(candidates) - 1, min(num_slices, len(candidates)))
    return sorted({int(candidates[int(round(p))]) for p in picks})


def _channel_index(image: np.ndarray, channel, channel_names) -> tuple[int, str]:
    num_channels = image.shape[-1]
    if isinstance(channel, str):
        if channel_names is None or channel not in channel_names:
            raise ValueError(f"channel {channel!r} is not among channel_names {channel_names}; "
                             "pass channel_names (one per image channel) or a channel index")
        channel = list(channel_names).index(channel)
    if not 0 <= channel < num_channels:
        raise ValueError(f"channel {channel} is out of range for an image with {num_channels} "
                         "channels")
    if channel_names is not None and len(channel_names) != num_channels:
        raise ValueError(f"channel_names has {len(channel_names)} names for {num_channels} "
                         "image channels")
    name = channel_names[channel] if channel_names is not None else f"channel {channel}"
    return channel, name


def _grey(volume: np.ndarray) -> np.ndarray:
    """(D, H, W) floats -> uint8, windowed over the whole volume."""
    low, high = np.percentile(volume, [0.5, 99.5])
    if high <= low:
        return np.zeros(volume.shape, np.uint8)
    return (np.clip((volume - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)


def _overlay(grey: np.ndarray, labels: np.ndarray, colours, num_classes: int) -> np.ndarray:
    """RGB uint8 slice: each class filled at FILL_OPACITY, its outline opaque."""
    rgb = np.repeat(grey[..., None].astype(np.float64), 3, axis=-1)
    for c in range(1, num_classes):
        mask = labels == c
        if not mask.any():
            continue
        colour = np.array(_colour(colours, c), np.float64)
        rgb[mask] = (1 - FILL_OPACITY) * rgb[mask] + FILL_OPACITY * colour
        rgb[mask & ~ndimage.binary_erosion(mask)] = colour
    return (rgb + 0.5).astype(np.uint8)


def _tile(pixels: np.ndarray, factor: int) -> Image.Image:
    tile = Image.fromarray(pixels)
    return tile.resize((tile.width * factor, tile.height * factor), Image.NEAREST)


def _dice_caption(label_set: str, maps: LabelMaps, z: int) -> str:
    names = list(maps.class_names)
    dice = slice_dice(maps.prediction[z], maps.ground_truth[z], len(names))
    parts = [f"{name} {'-' if math.isnan(d) else f'{d:.2f}'}"
             for name, d in zip(names[1:], dice, strict=True)]
    present = dice[~np.isnan(dice)]
    mean = f" (mean {present.mean():.2f})" if len(present) > 1 else ""
    return f"{label_set} Dice: " + ", ".join(parts) + mean


def _check(image, label_sets: dict[str, LabelMaps]) -> np.ndarray:
    image = np.asarray(image, np.float64)
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise ValueError(f"image must be (D, H, W) or (D, H, W, C), got shape {image.shape}")
    if not label_sets:
        raise ValueError("give the fine and/or the coarse label maps to draw")
    for label_set, maps in label_sets.items():
        for what in ("ground_truth", "prediction"):
            labels = np.asarray(getattr(maps, what))
            if labels.shape != image.shape[:3]:
                raise ValueError(f"{label_set} {what} has shape {labels.shape}; the image's "
                                 f"slices are {image.shape[:3]} (D, H, W)")
            if labels.size and labels.min() < 0:
                raise ValueError(f"{label_set} {what} holds negative label {labels.min()}")
            if labels.size and labels.max() >= len(maps.class_names):
                raise ValueError(f"{label_set} {what} holds label {labels.max()} but only "
                                 f"{len(maps.class_names)} {label_set} class names are given")
    return image


def overlay_figure(path: str, image, *, fine: LabelMaps | None = None,
                   coarse: LabelMaps | None = None, slices: Sequence[int] | None = None,
                   num_slices: int = 4, channel: int | str = 0,
                   channel_names: Sequence[str] | None = None, step: int | None = None,
                   volume_id: str | None = None) -> str:
    """Writes the overlay PNG of one volume to `path` and returns `path`.

    `image` is the volume's (D, H, W) or (D, H, W, C) image as the model reads it;
    `fine` / `coarse` its label maps (`LabelMaps`). `slices` picks the rows (default:
    `choose_slices`); `channel` (index, or a name in `channel_names`) the channel shown.
    """
    check_png_path(path)
    label_sets = {name: maps for name, maps in (("coarse", coarse), ("fine", fine))
                  if maps is not None}
    image = _check(image, label_sets)
    label_sets = {name: LabelMaps(np.asarray(m.ground_truth), np.asarray(m.prediction),
                                  tuple(m.class_names)) for name, m in label_sets.items()}
    depth, height, width = image.shape[:3]
    index, channel_name = _channel_index(image, channel, channel_names)
    rows = list(slices) if slices is not None else choose_slices(list(label_sets.values()),
                                                                 num_slices)
    if not rows or any(not 0 <= z < depth for z in rows):
        raise ValueError(f"slices must be a non-empty list of indices in [0, {depth}), "
                         f"got {rows}")
    grey = _grey(image[..., index])
    colours = {"coarse": COARSE_COLOURS, "fine": FINE_COLOURS}

    small, regular, large = figure_font(13), figure_font(15), figure_font(17)
    factor = max(1, math.ceil(_MIN_TILE / max(height, width)))
    tile_w, tile_h = width * factor, height * factor
    margin, gap = 12, 6
    columns = [f"image ({channel_name})"]
    for name in label_sets:
        columns += [f"{name} truth", f"{name} prediction"]
    canvas_width = max(margin * 2 + len(columns) * (tile_w + gap) - gap, 480)
    line = text_size(regular, "Ag")[1] + 6
    captions = []
    for z in rows:
        parts = [f"slice {z} (of 0-{depth - 1})"]
        parts += [_dice_caption(name, maps, z) for name, maps in label_sets.items()]
        joined = "    ".join(parts)
        fits = text_size(regular, joined)[0] <= canvas_width - 2 * margin
        captions.append([joined] if fits else parts)

    swatch = 14
    title_h, header_h, legend_h = 30, line + 4, swatch + 14
    body_h = sum(len(c) * line + tile_h + 2 * gap for c in captions)
    canvas_height = title_h + legend_h + header_h + body_h + 30
    canvas = Image.new("RGB", (canvas_width, canvas_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    title = [f"step {step}"] if step is not None else []
    title += [f"volume {volume_id}"] if volume_id is not None else []
    title = " | ".join(title + ["segmentation overlays"])
    draw.text((margin, 8), title, font=large, fill=(0, 0, 0))

    # Legend: one swatch per class, coarse then fine.
    x, y = margin, title_h + 4
    for name, maps in label_sets.items():
        draw.text((x, y), f"{name}:", font=regular, fill=(60, 60, 60))
        x += text_size(regular, f"{name}:")[0] + 8
        for c, class_name in enumerate(maps.class_names[1:], start=1):
            draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch),
                           fill=_colour(colours[name], c), outline=(90, 90, 90))
            x += swatch + 5
            draw.text((x, y), class_name, font=regular, fill=(0, 0, 0))
            x += text_size(regular, class_name)[0] + 14
        x += 16

    y = title_h + legend_h
    for col, name in enumerate(columns):
        draw.text((margin + col * (tile_w + gap), y), name, font=regular, fill=(60, 60, 60))
    y += header_h
    for z, caption in zip(rows, captions, strict=True):
        for text in caption:
            draw.text((margin, y), text, font=regular, fill=(0, 0, 0))
            y += line
        tiles = [np.repeat(grey[z][..., None], 3, axis=-1)]
        for name, maps in label_sets.items():
            for labels in (maps.ground_truth, maps.prediction):
                tiles.append(_overlay(grey[z], labels[z], colours[name], len(maps.class_names)))
        for col, pixels in enumerate(tiles):
            canvas.paste(_tile(pixels, factor), (margin + col * (tile_w + gap), y))
        y += tile_h + 2 * gap
    legend = (f"classes filled at {FILL_OPACITY:.0%} opacity with opaque outlines; "
              "Dice per slice, '-' where the class is absent from truth and prediction")
    return save_figure(canvas, path, legend, small, (margin, canvas_height - 22))
