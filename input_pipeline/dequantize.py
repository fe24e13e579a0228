"""Device side of the pretraining batch format: unit-quantised images -> model inputs.

The pretraining pipeline (pipeline.make_pretrain_dataset, make_fixed_batch) ships
each `image_{S}` as uint16 [B, S, S, 1]: intensities in [0, 1] times the dtype's
maximum (transforms.quantize_unit). That is half the bytes of one float32 channel
and a sixth of three, and every byte costs a prefetch worker: each batch reaches
the trainer through a fresh shared-memory segment whose pages are faulted in one
at a time (see input_pipeline.pipeline). The jitted train step
(train.make_train_step's `prepare_batch`) turns them into the normalised float32
images the model reads, (u / max - mean) / std with the gray channel repeated to
data.channels: elementwise, so XLA can fuse it into the ops that read them.

jnp only (no grain, no OpenCV): the trainer imports this without the input
pipeline's dependencies, and no worker process imports JAX.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

_IMAGE_KEY = re.compile(r"image(_\d+)?")


def dequantize_image(quantized, *, mean: float, std: float, channels: int) -> jnp.ndarray:
    """Unsigned-integer images [..., 1] -> float32 [..., channels]:
    (quantized / dtype max - mean) / std, the gray channel repeated."""
    dtype = np.dtype(quantized.dtype)
    if dtype.kind != "u":
        raise TypeError(f"quantized images must be unsigned integers, got {dtype}")
    if quantized.shape[-1] != 1:
        raise ValueError(f"quantized images have one channel, got shape {quantized.shape}")
    # One multiply-add, as transforms.normalize (f32 scale, f32 shift).
    scale = np.float32(1.0 / (np.iinfo(dtype).max * std))
    x = jnp.asarray(quantized).astype(jnp.float32) * scale - np.float32(mean / std)
    if channels == 1:
        return x
    return jnp.broadcast_to(x, (*x.shape[:-1], channels))


def dequantize_images(batch: dict, data_cfg: Any) -> dict:
    """`batch` with every unsigned-integer "image" / "image_{S}" entry normalised
    by data_cfg's norm_mean, norm_std and channels (see the module docstring);
    other entries, float images included (the fine-tuning pipeline's), unchanged.
    Traceable: use it inside the jitted step."""
    keys = [
        k
        for k, v in batch.items()
        if _IMAGE_KEY.fullmatch(k) and np.dtype(getattr(v, "dtype", object)).kind == "u"
    ]
    if not keys:
        return batch
    try:
        mean, std = float(data_cfg.norm_mean), float(data_cfg.norm_std)
    except AttributeError as e:
        raise ValueError(
            f"batch entries {keys} are quantized images and need data.norm_mean and "
            "data.norm_std to be normalised; set them in config.data (see "
            "input_pipeline.pipeline.default_data_config)"
        ) from e
    if not std > 0:
        raise ValueError(f"data.norm_std must be > 0, got {std}")
    channels = int(getattr(data_cfg, "channels", 1))
    out = dict(batch)
    for k in keys:
        out[k] = dequantize_image(batch[k], mean=mean, std=std, channels=channels)
    return out
