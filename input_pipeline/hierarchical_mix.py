"""HierarchicalMix (Dai, Lei, Zhang, MICCAI 2023): paste a labelled image's
subclass region into a superclass-only image, inside that image's superclass.

For a target image with only a superclass (coarse) mask and a donor with a
subclass (fine) mask, as the authors' 2-D data generator does:

  1. the donor's fine-label bounding box (all fine classes > 0) and the
     target's superclass bounding box (all coarse classes > 0);
  2. the donor's image and fine labels cut to their box and resized to the
     target box's size: the image bilinearly, the labels by nearest neighbour
     (pixel-centre aligned, skimage's order=0);
  3. the pasted labels kept only where they fall inside the target's
     superclass: a fine class c survives where the target's coarse label is
     fine_to_coarse[c] (with one superclass: where coarse > 0, the official
     rule);
  4. inside the kept paste the image is blended, mixed = (1 - alpha) * target
     + alpha * donor, with alpha drawn from {0.5, 0.6, ..., 1.0}; everywhere
     else the target's pixels are untouched. The mixed label is the kept paste
     (fine classes), 0 elsewhere.

A donor or target without foreground gives no mix (alpha 0, mixed = target,
label all 0), as in the official code. Images are float (H, W, C) arrays on one
intensity scale (the pipeline mixes [0, 1] intensities before normalising).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from input_pipeline import geometry

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclasses.dataclass
class Mixed:
    """One HierarchicalMix result: the mixed image (H, W, C) float32, the pasted
    fine labels (H, W) int32 (0 outside the paste), and alpha (0 = no mix)."""

    image: np.ndarray
    label: np.ndarray
    alpha: float


def sample_alpha(rng: np.random.Generator) -> float:
    """Alpha uniform over {0.5, 0.6, ..., 1.0} (the official randint(5, 10) / 10)."""
    return ALPHAS[int(rng.integers(len(ALPHAS)))]


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), half-open, of the non-zero pixels; None if none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def hierarchical_mix(
    image: np.ndarray,
    coarse: np.ndarray,
    donor_image: np.ndarray,
    donor_fine: np.ndarray,
    *,
    alpha: float,
    fine_to_coarse: Sequence[int],
) -> Mixed:
    """The target (`image` (H, W, C), `coarse` (H, W)) mixed with the donor
    (`donor_image` (h, w, C), `donor_fine` (h, w)); see the module docstring."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or np.asarray(donor_image).ndim != 3:
        raise ValueError(f"images must be (H, W, C), got {image.shape} and {np.shape(donor_image)}")
    if image.shape[2] != donor_image.shape[2]:
        raise ValueError(
            f"target and donor must have the same channels, got {image.shape} and "
            f"{donor_image.shape}"
        )
    mixed_label = np.zeros(coarse.shape, np.int32)
    donor_box, target_box = bounding_box(donor_fine > 0), bounding_box(coarse > 0)
    if donor_box is None or target_box is None or not alpha:
        return Mixed(image.copy(), mixed_label, 0.0)
    d_top, d_bottom, d_left, d_right = donor_box
    top, bottom, left, right = target_box
    size = (right - left, bottom - top)  # cv2's (width, height)
    donor_crop = np.ascontiguousarray(donor_image[d_top:d_bottom, d_left:d_right], np.float32)
    pasted_image = geometry.per_channel(
        donor_crop, lambda x: cv2.resize(x, size, interpolation=cv2.INTER_LINEAR)
    )
    label_crop = np.ascontiguousarray(donor_fine[d_top:d_bottom, d_left:d_right], np.uint16)
    pasted = cv2.resize(label_crop, size, interpolation=cv2.INTER_NEAREST_EXACT).astype(np.int32)
    lut = np.asarray(fine_to_coarse, np.int32)
    target_coarse = coarse[top:bottom, left:right]
    keep = (pasted > 0) & (lut[pasted] == target_coarse)
    pasted[~keep] = 0

    mixed = image.copy()
    window = mixed[top:bottom, left:right]
    a = np.float32(alpha)
    window[keep] = (1 - a) * window[keep] + a * pasted_image[keep]
    mixed_label[top:bottom, left:right] = pasted
    return Mixed(mixed, mixed_label, float(alpha))
