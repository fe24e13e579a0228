"""Reconstruction figures of pretraining: WORKDIR/figures/recon_STEP.png, drawn by
the `ReconstructionFigureHook` every `config.figure_every` steps and at the last step.

Columns per image: original (highest scale) | masked input (base scale) | for each
scale, the reconstruction (predicted masked patches, visible patches pasted back).
Shown honestly in image intensities: with norm_pix_loss the model predicts
per-patch-normalised pixels, so predictions are mapped back with the *target*
patch's mean and std (as the MAE paper's visualisations do; the figure title says
so), then the input normalisation is inverted. No per-panel contrast stretching.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from input_pipeline.dequantize import dequantize_images
from mimjax import sharding
from mimjax.evaluators.hooks import EvalHook
from mimjax.models import mae, vit


def reconstruct(model: mae.MaskedAutoencoder, images: dict, noise, mask_ratio: float,
                norm_pix_loss: bool) -> dict:
    """Returns {'masked_input': (B,S0,S0,C), 'recon_{S}': (B,S,S,C)} in model input space."""
    scales = model.scales
    p, channels = model.patch_size, model.encoder.cfg.channels
    preds, info = model(images[f"image_{scales[0]}"], noise, mask_ratio)
    out = {}
    base_patches = vit.patchify(images[f"image_{scales[0]}"].astype(jnp.float32), p)
    gray = jnp.full_like(base_patches, base_patches.min())
    out["masked_input"] = vit.unpatchify(
        jnp.where(info.mask[..., None] > 0, gray, base_patches), p, channels)
    for scale in scales:
        raw = vit.patchify(images[f"image_{scale}"].astype(jnp.float32), p)
        pred = preds[scale].astype(jnp.float32)
        if norm_pix_loss:
            mean = raw.mean(-1, keepdims=True)
            std = (raw.var(-1, keepdims=True, ddof=1) + 1e-6) ** 0.5
            pred = pred * std + mean
        mask = mae.upsample_grid(info.mask, scale // scales[0])[..., None]
        out[f"recon_{scale}"] = vit.unpatchify(jnp.where(mask > 0, pred, raw), p, channels)
    return out


def _to_uint8(image: np.ndarray, mean: float, std: float, size: int) -> np.ndarray:
    pixels = np.clip(image[..., 0] * std + mean, 0.0, 1.0)
    factor = size // pixels.shape[0]
    pixels = np.kron(pixels, np.ones((factor, factor)))  # nearest: no invented detail
    return (pixels * 255 + 0.5).astype(np.uint8)


def render(images: dict, outputs: dict, scales, mean: float, std: float, title: str) -> Image.Image:
    top = scales[-1]
    columns = [("original", images[f"image_{top}"]), ("masked input", outputs["masked_input"])]
    columns += [(f"recon {s}px", outputs[f"recon_{s}"]) for s in scales]
    num_images = columns[0][1].shape[0]
    header, gap = 28, 4
    width = len(columns) * (top + gap)
    canvas = Image.new("L", (width, header + num_images * (top + gap)), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=255)
    for c, (name, _) in enumerate(columns):
        draw.text((c * (top + gap) + 4, 15), name, fill=200)
    for r in range(num_images):
        for c, (_, array) in enumerate(columns):
            tile = Image.fromarray(_to_uint8(np.asarray(array[r]), mean, std, top))
            canvas.paste(tile, (c * (top + gap), header + r * (top + gap)))
    return canvas


class FigureWriter:
    """Runs `reconstruct` on a fixed batch with fixed noise (the same masks at every
    step, so figures are comparable over training). Every process computes (the
    parameters may be sharded across hosts); process 0 writes."""

    def __init__(self, config, spec, workdir: str, num_images: int = 4):
        from input_pipeline import pipeline

        self.scales = tuple(config.model.scales)
        fixed = pipeline.make_fixed_batch(config.data, scales=self.scales,
                                          num_images=num_images, seed=config.seed)
        # Normalised once, as the train step does per batch: the figures show what the
        # model reads.
        fixed = dequantize_images({k: v for k, v in fixed.items() if k.startswith("image_")},
                                  config.data)
        self.images = {k: np.asarray(v) for k, v in fixed.items()}
        objective = config.objectives.get("masked_reconstruction", {})
        self.mask_ratio = float(objective.get("mask_ratio", 0.75))
        self.norm_pix = bool(objective.get("norm_pix_loss", True))
        self.mean, self.std = float(config.data.norm_mean), float(config.data.norm_std)
        patch = vit.parse_variant(config.model.variant)["patch_size"]
        num_patches = (config.model.image_size // patch) ** 2
        self.noise = jax.random.uniform(jax.random.PRNGKey(config.seed + 1),
                                        (num_images, num_patches))
        self.directory = os.path.join(workdir, "figures")
        self._fn = jax.jit(lambda params, images, noise: reconstruct(
            spec.bind(params), images, noise, self.mask_ratio, self.norm_pix))

    def write(self, step: int, params) -> str | None:
        outputs = sharding.to_host(self._fn(params, self.images, self.noise))
        if jax.process_index() != 0:
            return None
        os.makedirs(self.directory, exist_ok=True)
        title = f"step {step}, mask {self.mask_ratio:.2f}" + (
            "; norm_pix predictions shown with target patch mean/std" if self.norm_pix else "")
        path = os.path.join(self.directory, f"recon_{step}.png")
        render(self.images, outputs, self.scales, self.mean, self.std, title).save(path)
        return path


class ReconstructionFigureHook(EvalHook):
    """Writes figures/recon_STEP.png every `config.figure_every` steps and at the
    last step (the current parameters, the same images and masks each time)."""

    def __init__(self, config, spec, workdir: str):
        super().__init__(config.get("figure_every", 0))
        self.figures = FigureWriter(config, spec, workdir)

    def after_step(self, step: int, state) -> dict[str, float]:
        self.figures.write(step, state.params)
        return {}
