"""One-pass evaluation batches held in memory, shared by fine-tuning
(finetune.make_eval_batches) and image-report retrieval (pairs.make_eval_pairs).

A split is decoded and resized once, when its batches are built, and kept as
integer pixels (a 224 px uint16 image is 100 kB, so 1,000 records take 100 MB);
batches are normalized on access, so every eval pass reuses the decoding. The
last batch is padded with rows whose batch["valid"] is False.

Building one: `eval_resize` checks the settings before any data is read,
`resize_split` decodes and resizes the split, `EvalBatches` batches it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from input_pipeline import transforms


def eval_resize(data_cfg: Any, *, image_size: int, batch_size: int) -> transforms.MultiScaleResize:
    """The evaluation resize and normalization of `data_cfg` at `image_size`:
    batch_size, image_size, norm_mean, norm_std and channels checked exactly as
    training checks them, before anything is read (or a tokenizer trained)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return transforms.MultiScaleResize(
        (int(image_size),),
        mean=float(data_cfg.norm_mean),
        std=float(data_cfg.norm_std),
        channels=int(getattr(data_cfg, "channels", 1)),
    )


def resize_split(
    images: Iterable[tuple[np.ndarray, dict]], resize: transforms.MultiScaleResize
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Every (2-D image, meta) of a split, in order, resized once to the square
    of `resize` (area averaging when shrinking, as MultiScaleResize): (integer
    pixels [N, S, S] in the images' dtype, intensity maxima float64 [N], metas)."""
    (size,) = resize.scales
    pixels, max_values, metas = [], [], []
    for image, meta in images:
        pixels.append(transforms.resize_square(image, size))
        max_values.append(transforms.intensity_max(image, meta))
        metas.append(meta)
    return np.stack(pixels), np.asarray(max_values, np.float64), metas


class EvalBatches(Sequence):
    """One deterministic pass over a split in fixed-size batches, held in memory.

    batches[i]: {"image": float32 [B, S, S, C], "index": int32 [B] (-1 on
    padding), "valid": bool [B], "label_{k}": [B, ...] (zeros on padding)}.
    Also: `num_records`, `labels` ({"label_{k}": [num_records, ...]}) and
    `indices` for metrics over the whole split.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        max_values: np.ndarray,
        labels: dict[str, np.ndarray],
        *,
        batch_size: int,
        resize: transforms.MultiScaleResize,
    ):
        self._pixels, self._max_values = pixels, max_values
        self.labels = labels
        self.indices = np.arange(len(pixels), dtype=np.int32)
        self.batch_size = int(batch_size)
        self._mean, self._std, self._channels = resize.mean, resize.std, resize.channels

    @property
    def num_records(self) -> int:
        return len(self._pixels)

    def __len__(self) -> int:
        return math.ceil(self.num_records / self.batch_size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} out of range for {len(self)} batches")
        start = (i % len(self)) * self.batch_size
        rows = slice(start, min(start + self.batch_size, self.num_records))
        n, pad = rows.stop - rows.start, self.batch_size - (rows.stop - rows.start)
        # transforms.normalize's arithmetic (same float32 results), one pass for
        # the whole batch, straight into the padded output.
        image = np.zeros((self.batch_size, *self._pixels.shape[1:], self._channels), np.float32)
        scale = (1.0 / (self._max_values[rows] * self._std)).astype(np.float32)
        x = np.multiply(self._pixels[rows], scale[:, None, None], dtype=np.float32)
        x -= np.float32(self._mean / self._std)
        image[:n] = x[..., None]
        batch = {
            "image": image,
            "index": np.concatenate([self.indices[rows], np.full(pad, -1, np.int32)]),
            "valid": np.arange(self.batch_size) < n,
        }
        for k, v in self.labels.items():
            batch[k] = np.concatenate([v[rows], np.zeros((pad, *v.shape[1:]), v.dtype)])
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"EvalBatches({self.num_records} records, {len(self)} x {self.batch_size})"
