"""Text encoder (padding mask in the shared transformer), MLM head, MCR model pooling."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mimjax.evaluators import reconstruction
from mimjax.models import build_model, mcr, text, vit

from mcr_fixtures import VOCAB, tiny_mcr_config, token_rows


@nnx.jit
def _encode(encoder, ids, mask):
    return encoder(ids, mask)


@nnx.jit
def _embed(model, images, ids, mask):
    return model.embed_image(images), model.embed_text(ids, mask)


def _text_encoder(**overrides):
    cfg = ml_collections.ConfigDict(
        {
            "vocab_size": VOCAB,
            "max_length": 16,
            "width": 32,
            "depth": 2,
            "num_heads": 2,
            "mlp_dim": None,
        }
    )
    image = vit.TransformerConfig(width=32, depth=1, num_heads=2, mlp_dim=64, **overrides)
    return text.TextEncoder(text.text_config_from(cfg, image), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention": "fused"}, {"scan": True, "remat": True}],
    ids=["xla", "fused", "scan_remat"],
)
def test_padding_is_never_attended(overrides):
    """Real-token features do not depend on what or how much padding follows."""
    encoder = _text_encoder(**overrides)
    ids, mask = token_rows(4, length=8, seed=1)
    out = _encode(encoder, jnp.asarray(ids), jnp.asarray(mask))
    junk = np.where(mask == 1, ids, 7 + np.arange(8)[None] % 5)  # padding ids != [PAD]
    longer_ids = np.concatenate([junk, np.full((4, 4), 9, np.int32)], axis=1)
    longer_mask = np.concatenate([mask, np.zeros((4, 4), np.int32)], axis=1)
    out_longer = _encode(encoder, jnp.asarray(longer_ids), jnp.asarray(longer_mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(out_longer)[:, :8][real], np.asarray(out)[real], atol=2e-5
    )
    # Without the mask the padding would leak into the real tokens.
    unmasked = _encode(encoder, jnp.asarray(longer_ids), jnp.ones_like(jnp.asarray(longer_mask)))
    assert np.abs(np.asarray(unmasked)[:, :8][real] - np.asarray(out)[real]).max() > 1e-3


@pytest.mark.parametrize("attention", ["xla", "fused"])
def test_all_ones_mask_equals_no_mask(attention):
    cfg = vit.TransformerConfig(width=32, depth=2, num_heads=4, mlp_dim=64, attention=attention)
    stack = vit.Transformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32))
    np.testing.assert_allclose(stack(x, mask=jnp.ones((2, 5), jnp.int32)), stack(x), atol=1e-6)


def test_mlm_head_is_tied_to_the_token_embedding():
    model = build_model(tiny_mcr_config(), rngs=nnx.Rngs(0))
    ids, mask = token_rows(3, seed=2)
    tokens = model.text_encoder(jnp.asarray(ids), jnp.asarray(mask))
    positions = jnp.asarray([[1, 2], [1, 3], [2, 1]], jnp.int32)
    logits = model.mlm_logits(tokens, positions)
    assert logits.shape == (3, 2, VOCAB) and logits.dtype == jnp.float32
    head = model.mlm_head
    hidden = jnp.take_along_axis(tokens, positions[..., None], axis=1)
    h = head.norm(jax.nn.gelu(head.dense(hidden)))
    expected = h @ model.text_encoder.token_embed.embedding[...].T + head.bias[...]
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    params = nnx.state(model, nnx.Param)
    assert "embedding" not in str(jax.tree_util.tree_structure(params.mlm_head))


def test_text_errors():
    encoder = _text_encoder()
    ids = jnp.full((1, 17), text.CLS_ID, jnp.int32)
    with pytest.raises(ValueError, match="max_length"):
        encoder(ids, jnp.ones_like(ids))
    with pytest.raises(ValueError, match="vocab_size"):
        text.TextConfig(vit.TransformerConfig(32, 1, 2, 64), vocab_size=5, max_length=8)
    with pytest.raises(ValueError, match="model.text.depth"):
        text.text_config_from(
            ml_collections.ConfigDict(
                {"vocab_size": 10, "max_length": 8, "width": 32, "num_heads": 2}
            ),
            vit.TransformerConfig(32, 1, 2, 64),
        )


def _embeddings(pooling, hidden_dim):
    model = build_model(
        tiny_mcr_config(pooling=pooling, projection_hidden_dim=hidden_dim), rngs=nnx.Rngs(0)
    )
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 32, 32, 1))
    ids, mask = token_rows(3, seed=4)
    return _embed(model, images, jnp.asarray(ids), jnp.asarray(mask))


def test_mapping_before_aggregation_differs_only_with_a_nonlinear_head():
    for a, b in zip(_embeddings("map_then_mean", 0), _embeddings("mean_then_map", 0)):
        np.testing.assert_allclose(a, b, atol=1e-5)  # linear map commutes with the mean
    mapped_first = _embeddings("map_then_mean", 32)
    for a, b in zip(mapped_first, _embeddings("mean_then_map", 32)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    for emb in mapped_first:
        np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


def test_mae_interface_serves_reconstruction_figures():
    """`model(images, noise, ratio)` is the MAE call, so MAE tooling works unchanged."""
    model = build_model(tiny_mcr_config(), rngs=nnx.Rngs(0))
    images = {"image_32": jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))}
    noise = jax.random.uniform(jax.random.PRNGKey(1), (2, model.num_patches))
    out = reconstruction.reconstruct(model, images, noise, 0.5, True)
    assert out["recon_32"].shape == out["masked_input"].shape == (2, 32, 32, 1)


def test_text_embedding_ignores_padding():
    model = build_model(tiny_mcr_config(), rngs=nnx.Rngs(0))
    ids, mask = token_rows(4, length=10, seed=5)
    padded = np.concatenate([ids, np.full((4, 6), 11, np.int32)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((4, 6), np.int32)], axis=1)
    images = jnp.zeros((4, 32, 32, 1))
    _, padded_emb = _embed(model, images, jnp.asarray(padded), jnp.asarray(padded_mask))
    _, emb = _embed(model, images, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(padded_emb, emb, atol=2e-5)


def test_build_options_and_errors():
    model = build_model(tiny_mcr_config(decoder=None, text={"mlm_head": False}), rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "decoders" not in params and "mlm_head" not in params
    assert set(params) >= {
        "encoder",
        "text_encoder",
        "image_projection",
        "text_projection",
        "logit_scale",
        "logit_bias",
    }
    np.testing.assert_allclose(params["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    with pytest.raises(ValueError, match="base scale only"):
        build_model(tiny_mcr_config(scales=[32, 64]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pooling"):
        build_model(tiny_mcr_config(pooling="max"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="class token"):
        build_model(tiny_mcr_config(pooling="cls", class_token=False), rngs=nnx.Rngs(0))
    assert mcr.POOLINGS[0] == "map_then_mean"
