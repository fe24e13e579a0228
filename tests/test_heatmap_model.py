"""The landmark heatmap model: one float32 logit map per landmark at the input's
resolution on both backbones, the head starting at the configured prior, an encoder
subtree that pretrainings load into (and exports treat as an encoder), and config
mistakes named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from mimjax.models import build_model, param_tree


def _cfg(**overrides):
    cfg = ConfigDict(dict(name="heatmap", backbone="vit", num_landmarks=5, image_size=32,
                          channels=1, variant="Ti/8", width=64, depth=2, num_heads=4,
                          mlp_dim=128, unet_base_channels=4, head_bias=-3.0))
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("backbone", ["vit", "unet"])
def test_logits_per_landmark_at_input_resolution(backbone):
    model = build_model(_cfg(backbone=backbone), rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 1)), jnp.float32)
    logits = model(images)
    assert logits.shape == (2, 32, 32, 5) and logits.dtype == jnp.float32
    np.testing.assert_allclose(model.heatmap_head.conv.bias[...], -3.0)
    trained = model(images, rng=jax.random.key(0))  # batch statistics, drop path
    assert trained.shape == logits.shape and bool(jnp.all(jnp.isfinite(trained)))


def test_vit_parameters_hold_an_encoder_that_pretrainings_fill():
    model = build_model(_cfg(), rngs=nnx.Rngs(0))
    flat = param_tree.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert {name.split("/")[0] for name in flat} == {"encoder", "dense_decoder", "heatmap_head"}
    assert param_tree.kind_of(flat) == "encoder"  # exports write the encoder alone
    mae = build_model(ConfigDict(dict(
        name="mae", variant="Ti/8", width=64, depth=2, num_heads=4, mlp_dim=128, image_size=32,
        scales=[32], channels=1, decoder=dict(width=32, depth=1, num_heads=2, mlp_dim=None))),
        rngs=nnx.Rngs(1))
    mae_flat = param_tree.flatten(nnx.to_pure_dict(nnx.state(mae, nnx.Param)))
    encoder = {n for n in flat if n.startswith("encoder/")}
    assert encoder <= set(mae_flat)  # the same names: config.init loads them one to one


@pytest.mark.parametrize("overrides, message", [
    ({"num_landmarks": 0}, "num_landmarks must be a positive integer"),
    ({"num_landmarks": None}, "num_landmarks must be a positive integer"),
    ({"backbone": "resnet"}, "model.backbone must be one of"),
    ({"backbone": "unet", "image_size": 36}, "divisible by"),
    ({"variant": "Ti/12", "image_size": 36}, "power-of-two patch size"),
])
def test_bad_model_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(_cfg(**overrides), rngs=nnx.Rngs(0))
