"""Embedding images with a trained mimjax checkpoint, without the trainer.

    from mimjax import inference
    encoder = inference.Encoder.from_workdir("workdirs/demo")          # latest step
    features = encoder(images)        # uint8 / uint16 / float, (B, H, W) or (B, H, W, C)
    features.tokens   # (B, [1 +] N, D) float32: the encoder's output tokens
    features.pooled   # (B, D): the class token, or the mean patch token without one;
                      # a classifier checkpoint: what its head pools (cls / gap / map)
    features.logits   # (B, num_classes) for a classifier checkpoint, else None

Inputs are normalised exactly as in training (`input_pipeline.transforms`):
unsigned integer images become (image / max - norm_mean) / norm_std, where max is
2**bits_stored - 1 if `bits_stored` is given (e.g. 12-bit DICOM in uint16), else the
dtype's maximum, and norm_mean / norm_std come from the run's `config.data`.
Float images are taken as already normalised (the model's input space) and are
passed through unchanged. Gray images feed a 3-channel model replicated to RGB.
Images must already have the model's image size (resize them the way the data
pipeline does, e.g. `input_pipeline.transforms.resize_square`). Any batch size works:
images run in chunks of at most `batch_size`, padded to a power of two so that only a
few shapes are ever compiled. Computation is float32 unless `dtype` says otherwise.

The architecture comes from the run's config. The trainer records it as
WORKDIR/config.json (`mimjax.run_config.save_run_config`); for a workdir without one,
pass the config (`config=` a ConfigDict, a dict, a config.json path or "configs/NAME.py[:ARG]").
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mimjax import pretrained
from mimjax.models import build_model, classifier, vit
from mimjax.models import param_tree as tree
from mimjax.run_config import load_run_config, resolve_config
from mimjax.sharding import path_to_str


# --------------------------------------------------------------------------- checkpoint
@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's parameters (nested, numpy) with the config of its run."""

    params: dict
    config: ml_collections.ConfigDict
    step: int
    kind: str  # "mae" | "classifier" | "encoder" (see mimjax.models.param_tree.kind_of)


def load_checkpoint(
    path: str, step: int | None = None, *, config=None, use_ema: bool = False
) -> Checkpoint:
    """Parameters of step `step` (None = latest) of a workdir and the run's config.

    path: a workdir (holding checkpoints/) or its checkpoints/ directory;
    config: None = the workdir's config.json, else see `resolve_config`.
    """
    params, info = pretrained.load_pretrained_params(path, step, use_ema=use_ema)
    config = resolve_config(config) if config is not None else load_run_config(path)
    if "model" not in config:
        raise ValueError("The run config has no 'model' section; pass the config the run used.")
    flat = tree.flatten(params)
    return Checkpoint(tree.unflatten(flat), config, info["step"], tree.kind_of(flat))


# --------------------------------------------------------------------------- encoder
class Features(NamedTuple):
    tokens: np.ndarray  # (B, [1 +] N, D) encoder output (final norm applied)
    pooled: np.ndarray  # (B, D)
    logits: np.ndarray | None  # (B, num_classes) for classifier checkpoints


def _model_config(config, dtype: str | None) -> ml_collections.ConfigDict:
    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    if dtype is not None:
        model_cfg.dtype = dtype
    model_cfg.drop_path_rate = 0.0  # inference: no stochastic depth
    return model_cfg


class Encoder:
    """A checkpoint's encoder (and head, for a classifier) as a callable on images."""

    def __init__(
        self,
        params: dict,
        config,
        *,
        dtype: str | None = "float32",
        batch_size: int = 64,
        norm_mean: float | None = None,
        norm_std: float | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        config = resolve_config(config)
        flat = tree.flatten(params)
        self.kind = tree.kind_of(flat)
        self.step = None  # set by from_workdir
        model_cfg = _model_config(config, dtype)
        self.vit_config = vit.vit_config_from(model_cfg)
        if self.kind == "classifier":
            build = lambda: classifier.build_classifier(model_cfg, rngs=nnx.Rngs(0))
            flat = {n: v for n, v in flat.items() if n.split("/")[0] in ("encoder", "head")}
        else:
            build = lambda: _EncoderOnly(self.vit_config, rngs=nnx.Rngs(0))
            flat = {n: v for n, v in flat.items() if n.startswith("encoder/")}
        graphdef, abstract = nnx.split(nnx.eval_shape(build), nnx.Param)
        self._params = _fit_params(flat, abstract)
        self._graphdef, self._abstract = graphdef, abstract
        self._forward = jax.jit(self._apply)
        self.batch_size = int(batch_size)
        data = config.get("data", None) or {}
        self.norm_mean = float(norm_mean if norm_mean is not None else data.get("norm_mean", 0.0))
        self.norm_std = float(norm_std if norm_std is not None else data.get("norm_std", 1.0))
        self._has_norm = norm_mean is not None or "norm_mean" in data
        if self.norm_std <= 0:
            raise ValueError(f"norm_std must be positive, got {self.norm_std}.")

    @classmethod
    def from_workdir(
        cls, path: str, step: int | None = None, *, config=None, use_ema: bool = False, **kwargs
    ) -> Encoder:
        """Loads step `step` (None = latest) of a workdir; kwargs go to `Encoder`."""
        ckpt = load_checkpoint(path, step, config=config, use_ema=use_ema)
        encoder = cls(ckpt.params, ckpt.config, **kwargs)
        encoder.step = ckpt.step
        return encoder

    @property
    def image_size(self) -> int:
        return self.vit_config.image_size

    @property
    def channels(self) -> int:
        return self.vit_config.channels

    def _apply(self, params, images):
        state = jax.tree.map(lambda x: x, self._abstract)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(self._graphdef, state)
        if self.kind == "classifier":
            tokens = model.encoder(images)
            pooled = model.head.pool(tokens)
            return tokens.astype(jnp.float32), pooled.astype(jnp.float32), model.head(tokens)
        tokens = model.encoder(images)
        if self.vit_config.class_token:
            pooled = tokens[:, 0]
        else:
            pooled = tokens.mean(axis=1)
        return tokens.astype(jnp.float32), pooled.astype(jnp.float32), None

    def preprocess(self, images, *, bits_stored: int | None = None) -> np.ndarray:
        """images -> float32 (B, S, S, channels), normalised as in training."""
        x = np.asarray(images)
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 3:
            x = x[..., None]
        size = self.image_size
        if x.ndim != 4 or x.shape[1:3] != (size, size) or x.shape[-1] not in (1, self.channels):
            raise ValueError(
                f"Expected images of shape (B, {size}, {size}), (B, {size}, {size}, 1) or "
                f"(B, {size}, {size}, {self.channels}), got {tuple(np.shape(images))}; "
                "resize them to the model's image size first "
                "(input_pipeline.transforms.resize_square)."
            )
        if x.dtype.kind == "u":
            if not self._has_norm:
                raise ValueError(
                    "Integer images need norm_mean / norm_std: the run config has no "
                    "data.norm_mean; pass Encoder(..., norm_mean=..., norm_std=...)."
                )
            from input_pipeline import transforms  # the training pipeline's arithmetic

            meta = {"bits_stored": bits_stored} if bits_stored is not None else None
            max_value = transforms.intensity_max(x, meta)
            # transforms.normalize's fused form, so values match training bit for bit.
            scale = np.float32(1.0 / (max_value * self.norm_std))
            x = np.multiply(x, scale, dtype=np.float32)
            x -= np.float32(self.norm_mean / self.norm_std)
        elif x.dtype.kind == "f":
            x = x.astype(np.float32)
        else:
            raise ValueError(
                f"images must be unsigned integers (uint8 / uint16) or floats, got {x.dtype}."
            )
        if x.shape[-1] != self.channels:
            x = np.repeat(x, self.channels, axis=-1)  # gray -> RGB, as the pipeline does
        return x

    def __call__(self, images, *, bits_stored: int | None = None) -> Features:
        x = self.preprocess(images, bits_stored=bits_stored)
        outputs = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start : start + self.batch_size]
            n = chunk.shape[0]
            padded = min(self.batch_size, 1 << math.ceil(math.log2(n)))
            if padded > n:
                chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], x.dtype)])
            result = jax.device_get(self._forward(self._params, chunk))
            outputs.append([None if r is None else np.asarray(r)[:n] for r in result])
        tokens, pooled, logits = (
            None if parts[0] is None else np.concatenate(parts) for parts in zip(*outputs)
        )
        return Features(tokens, pooled, logits)


def check_params(params: dict, config) -> None:
    """Raises ValueError (naming the entries) unless `params` fit the model `config`
    describes: the check that the config really is the run's."""
    config = resolve_config(config)
    flat = tree.flatten(params)
    model_cfg = _model_config(config, None)
    if all(name.startswith("encoder/") for name in flat):  # an encoder alone (imports)
        build = lambda: _EncoderOnly(vit.vit_config_from(model_cfg), rngs=nnx.Rngs(0))
    else:
        build = lambda: build_model(model_cfg, rngs=nnx.Rngs(0))
    _fit_params(flat, nnx.state(nnx.eval_shape(build), nnx.Param))  # model state aside


class _EncoderOnly(nnx.Module):
    """The `encoder` subtree on its own (the parameter layout of every mimjax model)."""

    def __init__(self, cfg: vit.ViTConfig, *, rngs: nnx.Rngs):
        self.encoder = vit.ViTEncoder(cfg, rngs=rngs)


def _fit_params(flat: dict[str, np.ndarray], abstract) -> dict:
    """Checkpoint entries in the model's block layout, checked against its shapes."""
    shapes = {
        path_to_str(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))
    }
    target = set(shapes)
    stacked = any(
        "transformer/blocks/" in n and not n.split("transformer/blocks/")[1][0].isdigit()
        for n in target
    )
    flat = tree.stack(flat) if stacked else tree.unroll(flat)
    missing = sorted(set(target) - set(flat))
    extra = sorted(set(flat) - set(target))
    if missing or extra:
        raise ValueError(
            "The checkpoint's parameters do not match the config's model: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{extra[:6]}{'...' if len(extra) > 6 else ''}. Pass the config the run used."
        )
    for name, shape in shapes.items():
        if flat[name].shape != shape:
            raise ValueError(
                f"Parameter {name}: checkpoint shape {flat[name].shape} vs model shape "
                f"{shape}; pass the config the run used."
            )
    return tree.unflatten({n: jnp.asarray(v) for n, v in flat.items()})
