"""What the HF and timm converters share: the source checkpoint, tensor layouts, the
architecture of an imported model, writing a mimjax checkpoint, the export record.

Tensor layouts (mimjax -> PyTorch):
- Linear: mimjax kernels are (in, out), torch weights (out, in): a transpose;
- patch embedding: mimjax's Linear on patch vectors in (row, col, channel) order,
  kernel (p*p*C, D), is torch's stride-p Conv2d with weight (D, C, p, p):
  kernel.reshape(p, p, C, D).transpose(3, 2, 0, 1); big_vision stores it as HWIO
  (p, p, C, D), the reshape alone;
- position embeddings are materialised: mimjax's fixed sin-cos tables are not
  parameters, the exported files carry the values (PyTorch models hold them as
  tensors).
All conversions are reshapes, transposes and concatenations, so export -> import
gives back bit-identical parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from mimjax.models import param_tree as tree
from mimjax.models import vit

EXPORT_RECORD = "mimjax_export.json"


# --------------------------------------------------------------------------- tensors
def linear_to_torch(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(kernel).T)


def linear_from_torch(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(weight).T)


def patch_kernel_to_conv(kernel: np.ndarray, patch_size: int, channels: int) -> np.ndarray:
    """(p*p*C, D) -> (D, C, p, p)."""
    width = kernel.shape[-1]
    hwio = np.asarray(kernel).reshape(patch_size, patch_size, channels, width)
    return np.ascontiguousarray(hwio.transpose(3, 2, 0, 1))


def patch_kernel_from_conv(weight: np.ndarray) -> np.ndarray:
    """(D, C, p, p) -> (p*p*C, D)."""
    width, _channels, p, q = weight.shape
    if p != q:
        raise ValueError(f"Only square patches are supported, got {p}x{q}.")
    return np.ascontiguousarray(np.asarray(weight).transpose(2, 3, 1, 0).reshape(-1, width))


# --------------------------------------------------------------------------- source
@dataclasses.dataclass
class Source:
    """A mimjax checkpoint ready to convert: unrolled flat params + its run's config."""

    flat: dict[str, np.ndarray]
    config: ml_collections.ConfigDict
    kind: str  # "mae" | "classifier" | "encoder"
    step: int

    @property
    def model(self) -> ml_collections.ConfigDict:
        return self.config.model

    @property
    def vit(self) -> vit.ViTConfig:
        return vit.vit_config_from(self.config.model)

    def encoder_posemb(self) -> np.ndarray:
        """(1, N, D): the learned table, or the sin-cos table the encoder adds."""
        cfg = self.vit
        if cfg.posemb == "learn":
            return np.asarray(self.flat["encoder/pos_embedding"], np.float32)
        return vit.sincos_posemb_2d(cfg.transformer.width, cfg.grid_size)[None]

    def decoder_posemb(self, index: int = 0) -> np.ndarray:
        """(1, N_scale, D_dec) of decoder `index`."""
        name = f"decoders/{index}/pos_embedding"
        if name in self.flat:
            return np.asarray(self.flat[name], np.float32)
        width = self.flat[f"decoders/{index}/mask_token"].shape[-1]
        scale = list(self.model.scales)[index]
        grid = scale // self.vit.patch_size
        return vit.sincos_posemb_2d(width, grid)[None]

    def objective(self) -> dict[str, Any]:
        """mask_ratio / norm_pix_loss of the masked-reconstruction objective (MAE defaults)."""
        objectives = self.config.get("objectives", None) or {}
        recon = objectives.get("masked_reconstruction", None) or {}
        return {
            "mask_ratio": float(recon.get("mask_ratio", 0.75)),
            "norm_pix_loss": bool(recon.get("norm_pix_loss", True)),
        }

    def class_names(self) -> list[str] | None:
        finetune = self.config.get("finetune", None) or {}
        names = finetune.get("class_names", None)
        return [str(n) for n in names] if names else None

    def multilabel(self) -> bool:
        objectives = self.config.get("objectives", None) or {}
        return bool((objectives.get("classification", None) or {}).get("multilabel", False))


def load_source(path: str, step: int | None = None, *, config=None, use_ema: bool = False):
    """A workdir's checkpoint (step None = latest) for conversion; see inference.load_checkpoint."""
    from mimjax import inference

    ckpt = inference.load_checkpoint(path, step, config=config, use_ema=use_ema)
    inference.check_params(ckpt.params, ckpt.config)
    flat = tree.unroll(tree.flatten(ckpt.params))
    return Source(flat, ckpt.config, ckpt.kind, ckpt.step)


# --------------------------------------------------------------------------- records
def export_record(source: Source, fmt: str, **extra) -> dict[str, Any]:
    """Architecture and preprocessing only: no paths, data settings or run history."""
    data = source.config.get("data", None) or {}
    record = {
        "exported_by": "mimjax",
        "format": fmt,
        "kind": source.kind,
        "step": int(source.step),
        "model": source.model.to_dict(),
        "preprocessing": {
            "image_size": source.vit.image_size,
            "channels": source.vit.channels,
            "intensity": "x = (image / max - norm_mean) / norm_std, max = 2**bits_stored - 1 "
            "or the dtype maximum; gray replicated to 3 channels for a 3-channel model",
            "norm_mean": float(data["norm_mean"]) if "norm_mean" in data else None,
            "norm_std": float(data["norm_std"]) if "norm_std" in data else None,
        },
    }
    if source.kind == "mae":
        record["objective"] = source.objective()
    if source.kind == "classifier":
        record["class_names"] = source.class_names()
        record["multilabel"] = source.multilabel()
    record.update(extra)
    return record


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")


def read_export_record(directory: str) -> dict | None:
    path = os.path.join(directory, EXPORT_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- import
def model_config(
    *,
    width: int,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    patch_size: int,
    image_size: int,
    channels: int,
    posemb: str,
    class_token: bool,
    layer_norm_eps: float,
    gelu_approximate: bool,
    scan: bool = False,
) -> ml_collections.ConfigDict:
    """A `config.model` section for an imported encoder (fields as configs/pretrain_base.py)."""
    if channels not in (1, 3):
        raise ValueError(f"mimjax models take 1 or 3 input channels, the source has {channels}.")
    return ml_collections.ConfigDict(
        {
            "name": "vit_encoder",  # replaced by "mae" / "vit_classifier" when those parts exist
            "variant": f"B/{patch_size}",  # patch size; the numbers below override B's
            "width": width,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_dim": mlp_dim,
            "image_size": image_size,
            "channels": channels,
            "posemb": posemb,
            "class_token": class_token,
            "dtype": "float32",
            "layer_norm_eps": float(layer_norm_eps),
            "gelu_approximate": bool(gelu_approximate),
            "scan": scan,
            "remat": False,
            "attention": "xla",
        }
    )


def is_sincos(table: np.ndarray, grid_size: int) -> bool:
    """Whether a (1, N, D) table is mimjax's fixed sin-cos table (to float32 precision)."""
    width = table.shape[-1]
    if width % 4 or table.shape[1] != grid_size**2:
        return False
    reference = vit.sincos_posemb_2d(width, grid_size)[None]
    return bool(np.allclose(table, reference, rtol=0, atol=1e-6))


def import_posemb(flat: dict, name: str, table: np.ndarray, grid_size: int) -> str:
    """The `posemb` setting of an imported (1, grid_size**2, D) position table: "sincos2d"
    when it is mimjax's fixed table (not a parameter then), else "learn", with the table
    kept in `flat[name]`."""
    if is_sincos(table, grid_size):
        return "sincos2d"
    flat[name] = table
    return "learn"


def write_checkpoint(out_dir: str, flat: dict[str, np.ndarray], config, *, step: int = 0) -> str:
    """Writes parameters as a mimjax checkpoint (OUT/checkpoints/<step>/state, the layout
    `mimjax.pretrained.load_pretrained_params` and `--config.init` read) plus
    OUT/config.json; returns the checkpoints directory."""
    from mimjax import checkpoint, run_config

    out_dir = os.path.abspath(os.fspath(out_dir))
    directory = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(
            f"{directory} already holds checkpoints; choose an empty --out directory."
        )
    params = tree.unflatten({n: np.asarray(v, np.float32) for n, v in flat.items()})
    state = {"step": np.asarray(step, np.int32), "params": params}
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=1, async_save=False)
    ckpt.save(step, state, force=True)
    ckpt.close()
    run_config.save_run_config(config, out_dir)
    return directory
