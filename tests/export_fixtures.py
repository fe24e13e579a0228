"""Tiny mimjax workdirs, parameters and images shared by the inference, export and
import tests, and the PyTorch-parity bookkeeping of the export tests."""

import json

import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from mimjax import checkpoint, run_config, train
from mimjax.export import convert
from mimjax.models import build_model
from mimjax.models import param_tree as tree

IMAGE_SIZE = 16
TOL = 1e-4  # PyTorch parity: max abs difference in float32

# Encoder fields every tiny test model shares: float32, XLA attention, no scan / remat.
ENCODER_FIELDS = {
    "channels": 1,
    "posemb": "sincos2d",
    "class_token": True,
    "dtype": "float32",
    "layer_norm_eps": 1e-6,
    "gelu_approximate": True,
    "scan": False,
    "remat": False,
    "attention": "xla",
}


def tiny_config(name="mae", *, scales=(16, 32), head="cls", **model) -> ml_collections.ConfigDict:
    """Run config of a tiny ViT (width 32, 2 blocks, patch 4, 16 px) with its data section."""
    m = {
        "name": name,
        "variant": "Ti/4",
        "width": 32,
        "depth": 2,
        "num_heads": 4,
        "mlp_dim": 64,
        "image_size": scales[0],
        **ENCODER_FIELDS,
    }
    if name == "mae":
        m.update(
            scales=list(scales),
            decoder={
                "width": 16,
                "depth": 1,
                "num_heads": 2,
                "mlp_dim": None,
                "posemb": "sincos2d",
            },
        )
    else:
        m.update(head=head, num_classes=3, drop_path_rate=0.0, head_init_std=2e-5)
    m.update(model)
    config = ml_collections.ConfigDict(
        {
            "model": m,
            "data": {"dir": "/secret/patient_data", "norm_mean": 0.19, "norm_std": 0.22},
            "objectives": {
                "masked_reconstruction": {
                    "weight": 1.0,
                    "mask_ratio": 0.75,
                    "norm_pix_loss": True,
                    "scale_weights": [1.0, 1.0],
                }
            }
            if name == "mae"
            else {"classification": {"weight": 1.0, "multilabel": False}},
        }
    )
    if name != "mae":
        config.finetune = {"class_names": ["benign", "malignant", "normal"]}
    return config


def random_params(config, seed=0) -> dict:
    """Random parameters in the model's layout (built abstractly: no eager init):
    kernels ~ N(0, 1/fan_in), LayerNorm scales ~ 1 + N(0, 0.1), the rest ~ N(0, 0.1)."""
    abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        if "kernel" in name:
            x = x / np.sqrt(leaf.shape[-2])
        else:
            x = 1.0 + 0.1 * x if "scale" in name else 0.1 * x
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def write_workdir(path, config, steps=(5,), seed=0, *, train_state=False) -> dict:
    """A workdir with checkpoints at `steps` and config.json; returns {step: params}.
    train_state: save the trainer's whole TrainState (optimizer state included), as
    main.py does; else only step and params (what the readers use; faster)."""
    tx = optax.adamw(1e-3)
    saved = {}
    ckpt = checkpoint.Checkpointer(str(path / "checkpoints"), save_every=1, async_save=False)
    for i, step in enumerate(steps):
        params = random_params(config, seed + i)
        state = {"step": np.asarray(step, np.int32), "params": params}
        if train_state:
            state = train.TrainState(
                step=state["step"],
                params=params,
                opt_state=tx.init(params),
                rng=np.zeros(2, np.uint32),
                ema_params={},
                model_state={},
                nonfinite_total=np.zeros((), np.int32),
                nonfinite_streak=np.zeros((), np.int32),
            )
        ckpt.save(step, state, force=True)
        saved[step] = params
    ckpt.close()
    run_config.save_run_config(config, str(path))
    return saved


def exported_workdir(root, config, fmt: str, **export_kwargs):
    """A workdir ROOT/run with a checkpoint at step 5, exported to ROOT/FMT; returns
    (the saved params, the export record)."""
    params = write_workdir(root / "run", config)[5]
    record = convert.export_checkpoint(str(root / "run"), str(root / fmt), fmt, **export_kwargs)
    return params, record


def bind(config, params):
    """The model with `params` (abstract build, no eager init)."""
    abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    nnx.replace_by_pure_dict(state, tree.unflatten(tree.flatten(params)))
    return nnx.merge(graphdef, state)


def reference_tokens(config, params, images):
    """The encoder's tokens straight from the model (no inference module involved)."""
    model = bind(config, params)
    return np.asarray(nnx.jit(lambda m, x: m.encoder(x))(model, images)), model


def images(batch, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, IMAGE_SIZE, IMAGE_SIZE, channels)).astype(np.float32)


def nchw(x):
    """Channels-last numpy images as the NCHW torch tensor PyTorch models take."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


class Parity:
    """The max abs difference each PyTorch-parity case measured: `record` asserts it is
    <= TOL; the module fixture `report_fixture()` prints them all after the module."""

    def __init__(self, title: str):
        self.title = title
        self.measured = {}

    def record(self, case: str, diff) -> None:
        self.measured[case] = max(self.measured.get(case, 0.0), float(diff))
        assert diff <= TOL, f"{case}: max abs difference {diff:.2e} > {TOL}"

    def report_fixture(self):
        @pytest.fixture(scope="module", autouse=True)
        def _report():
            yield
            print(f"\n{self.title}, max abs difference:", json.dumps(self.measured, indent=1))

        return _report
