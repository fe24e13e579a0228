"""MCR objective: one masked stream, report masking, CLIP baseline, sharded gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mimjax import sharding
from mimjax.models import build_model, example_rng, mae, text
from mimjax.objectives import OBJECTIVES, build_loss_fn, contrastive, mcr

from helpers import training_setup
from mcr_fixtures import VOCAB, random_pairs, tiny_mcr_config, token_rows

RNG = jax.random.PRNGKey(7)


def _model(**overrides):
    return build_model(tiny_mcr_config(**overrides), rngs=nnx.Rngs(0))


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


@nnx.jit(static_argnames="kwargs")
def _loss(model, batch, rng, kwargs):
    return mcr.loss_fn(model, batch, rng, **dict(kwargs))


def _run(model, batch, **kwargs):
    return _loss(model, batch, RNG, tuple(sorted(kwargs.items())))


# ----------------------------------------------------------------- report masking
def test_mask_text_never_masks_specials_and_masks_a_quarter():
    ids, mask = token_rows(64, length=16, seed=3)
    masked, positions, weights, targets = mcr.mask_text(
        jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(mask), 0.25, vocab_size=VOCAB
    )
    masked, positions, weights, targets = map(np.asarray, (masked, positions, weights, targets))
    changed = masked != ids
    special = np.isin(ids, [text.PAD_ID, text.CLS_ID, text.SEP_ID])
    assert not changed[special].any()
    assert np.all(masked[changed] == text.MASK_ID)
    words = (~special).sum(axis=1)
    np.testing.assert_array_equal(changed.sum(axis=1), np.maximum(np.floor(0.25 * words + 0.5), 1))
    assert positions.shape == (64, mcr.max_masked_tokens(16, 0.25)) == (64, 4)
    for row in range(64):  # the weighted slots are exactly the masked tokens, with targets
        used = positions[row][weights[row] > 0]
        assert set(used) == set(np.flatnonzero(changed[row]))
        np.testing.assert_array_equal(targets[row][weights[row] > 0], ids[row, used])


def test_mask_text_bert_mode_replaces_80_10_10():
    ids, mask = token_rows(512, length=64, seed=4, min_words=40)
    masked, positions, weights, targets = mcr.mask_text(
        jax.random.PRNGKey(1),
        jnp.asarray(ids),
        jnp.asarray(mask),
        0.25,
        vocab_size=VOCAB,
        mode="bert",
    )
    picked = np.take_along_axis(np.asarray(masked), np.asarray(positions), axis=1)
    picked, targets = picked[np.asarray(weights) > 0], np.asarray(targets)[np.asarray(weights) > 0]
    as_mask = np.mean(picked == text.MASK_ID)
    unchanged = np.mean(picked == targets)
    assert abs(as_mask - 0.8) < 0.02 and 0.08 < unchanged < 0.14  # random may hit the target
    assert np.all(picked[(picked != text.MASK_ID)] >= text.NUM_SPECIAL_TOKENS)
    untouched = np.ones_like(ids, bool)
    np.put_along_axis(untouched, np.asarray(positions), np.asarray(weights) == 0, axis=1)
    np.testing.assert_array_equal(np.asarray(masked)[untouched], ids[untouched])


# ----------------------------------------------------------------- one masked stream
def _masks(batch, model, image_ratio=0.5, text_ratio=0.25):
    """Recomputes the objective's masks from its rng convention."""
    keys = example_rng.example_keys(RNG, batch, len(batch["image"]))  # one key per example
    image_rng, text_rng = example_rng.split(keys, 2)
    noise = example_rng.uniform(image_rng, (model.num_patches,))
    info = mae.random_masking(noise, image_ratio)
    _, positions, weights, _ = mcr.mask_text(
        text_rng, batch["text_ids"], batch["text_mask"], text_ratio, vocab_size=VOCAB
    )
    return np.asarray(info.mask), np.asarray(positions), np.asarray(weights)


def test_contrastive_term_sees_only_the_masked_inputs():
    """Changing masked image patches or masked report tokens leaves the contrastive
    term unchanged (they are not inputs), while the reconstruction terms change."""
    model, batch = _model(), _jnp(random_pairs(16))
    loss, metrics = _run(model, batch)
    assert {"loss_itc", "loss_mim", "loss_mlm", "logit_scale", "accuracy_i2t"} <= set(metrics)
    np.testing.assert_allclose(
        loss, metrics["loss_itc"] + metrics["loss_mim"] + metrics["loss_mlm"], rtol=1e-6
    )
    patch_mask, positions, weights = _masks(batch, model)

    patch_pixels = np.repeat(np.repeat(patch_mask.reshape(16, 4, 4), 8, 1), 8, 2)[..., None]
    images = np.where(patch_pixels > 0, 5.0, np.asarray(batch["image"]))
    _, changed = _run(model, dict(batch, image=jnp.asarray(images)))
    np.testing.assert_allclose(changed["loss_itc"], metrics["loss_itc"], rtol=1e-6)
    np.testing.assert_allclose(changed["loss_mlm"], metrics["loss_mlm"], rtol=1e-6)
    assert abs(float(changed["loss_mim"]) - float(metrics["loss_mim"])) > 1e-3

    ids = np.asarray(batch["text_ids"]).copy()
    rows = np.repeat(np.arange(16)[:, None], positions.shape[1], 1)[weights > 0]
    ids[rows, positions[weights > 0]] = text.NUM_SPECIAL_TOKENS + (
        ids[rows, positions[weights > 0]] - text.NUM_SPECIAL_TOKENS + 1
    ) % (VOCAB - text.NUM_SPECIAL_TOKENS)  # another regular word at every masked position
    _, changed = _run(model, dict(batch, text_ids=jnp.asarray(ids)))
    np.testing.assert_allclose(changed["loss_itc"], metrics["loss_itc"], rtol=1e-6)
    np.testing.assert_allclose(changed["loss_mim"], metrics["loss_mim"], rtol=1e-6)
    assert abs(float(changed["loss_mlm"]) - float(metrics["loss_mlm"])) > 1e-3


def _clip_reference(model, batch):
    scale = contrastive.logit_scale_from(model.logit_scale[...])
    return contrastive.info_nce_loss(
        model.embed_image(batch["image"]),
        model.embed_text(batch["text_ids"], batch["text_mask"]),
        scale,
    )[0]


def test_zero_masks_and_weights_reproduce_clip():
    model, batch = _model(pooling="cls"), _jnp(random_pairs(16))
    clip = {"image_mask_ratio": 0.0, "text_mask_ratio": 0.0, "mim_weight": 0.0, "mlm_weight": 0.0}
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)

    def objective(p):
        return mcr.loss_fn(nnx.merge(graphdef, p), batch, RNG, **clip)[0]

    def reference(p):
        return _clip_reference(nnx.merge(graphdef, p), batch)

    loss, grads = jax.jit(jax.value_and_grad(objective))(params)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
    )
    assert float(jnp.abs(grads["logit_scale"][...])) > 0


def test_two_stream_baseline_uses_unmasked_inputs_for_the_contrastive_term():
    model, batch = _model(), _jnp(random_pairs(16))
    _, metrics = _run(model, batch, itc_inputs="unmasked")
    clip = nnx.jit(_clip_reference)(model, batch)
    np.testing.assert_allclose(metrics["loss_itc"], clip, rtol=1e-5)
    _, one_stream = _run(model, batch)
    assert abs(float(one_stream["loss_itc"]) - float(metrics["loss_itc"])) > 1e-4
    np.testing.assert_allclose(one_stream["loss_mim"], metrics["loss_mim"], rtol=1e-6)


def test_siglip_chunked_bert_and_scale_clamp_options():
    model, batch = _model(), _jnp(random_pairs(16))
    options = {"loss": "siglip", "text_mask_mode": "bert", "max_logit_scale": 5.0}
    _, dense = _run(model, batch, **options)
    _, chunked = _run(model, batch, chunk_size=4, **options)
    np.testing.assert_allclose(dense["logit_bias"], -10.0)
    np.testing.assert_allclose(dense["logit_scale"], 5.0, rtol=1e-6)
    for key in ("loss_itc", "loss_mlm", "accuracy_i2t"):
        np.testing.assert_allclose(chunked[key], dense[key], rtol=1e-5, err_msg=key)


def test_settings_errors():
    model, batch = _model(), _jnp(random_pairs(8))
    with pytest.raises(ValueError, match="image_mask_ratio > 0"):
        mcr.loss_fn(model, batch, RNG, image_mask_ratio=0.0)
    with pytest.raises(ValueError, match="text_mask_ratio > 0"):
        mcr.loss_fn(model, batch, RNG, text_mask_ratio=0.0)
    with pytest.raises(ValueError, match="at least one positive"):
        mcr.loss_fn(model, batch, RNG, itc_weight=0.0, mim_weight=0.0, mlm_weight=0.0)
    with pytest.raises(ValueError, match="text_ids"):
        mcr.loss_fn(model, {"image": batch["image"]}, RNG)
    with pytest.raises(ValueError, match="needs an image decoder"):
        mcr.loss_fn(_model(decoder=None), batch, RNG)
    assert OBJECTIVES["mcr"] is mcr.loss_fn


# ----------------------------------------------------------------- sharded == one device
def _sharded_grads(mesh_cfg, devices):
    setup = training_setup(mesh_cfg, devices, tiny_mcr_config())
    objectives = {
        "mcr": {"weight": 1.0, "image_mask_ratio": 0.5, "text_mask_ratio": 0.25, "chunk_size": 4}
    }
    loss_fn = build_loss_fn(ml_collections.ConfigDict(objectives))
    grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(setup.spec.bind(p), b, r), has_aux=True)
    with jax.set_mesh(setup.mesh):
        batch = sharding.global_batch(random_pairs(16), setup.mesh)
        (loss, metrics), grads = jax.jit(grad_fn)(setup.state.params, batch, RNG)
    return jax.device_get((loss, metrics, grads))


@pytest.mark.slow
def test_sharded_objective_equals_single_device():
    """The whole MCR loss (chunked InfoNCE + MIM + MLM) and its gradients on 8 devices
    (data x fsdp x tensor = 2 x 2 x 2) equal the one-device global-batch values."""
    ref_loss, ref_metrics, ref_grads = _sharded_grads(
        {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]
    )
    loss, metrics, grads = _sharded_grads({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for key in ("loss_itc", "loss_mim", "loss_mlm", "accuracy_i2t"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        np.testing.assert_allclose(
            g, flat_ref[path], rtol=1e-4, atol=1e-5, err_msg=sharding.path_to_str(path)
        )
