"""Global-batch contrastive losses: values, chunking, 8-device gradients, memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mimjax import sharding
from mimjax.objectives import contrastive


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_info_nce(img, txt, scale):
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    i2t = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    t2i = logits - np.log(np.exp(logits).sum(axis=0, keepdims=True))
    return -0.5 * (np.mean(np.diag(i2t)) + np.mean(np.diag(t2i)))


def _numpy_sigmoid(img, txt, scale, bias):
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T + bias
    labels = 2 * np.eye(len(img)) - 1
    return np.sum(np.log1p(np.exp(-labels * logits))) / len(img)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_losses_match_numpy_definitions(chunk_size):
    rng = np.random.default_rng(0)
    img, txt = _unit_rows(rng, 16, 8), _unit_rows(rng, 16, 8)
    loss, metrics = contrastive.info_nce_loss(img, txt, 10.0, chunk_size=chunk_size)
    np.testing.assert_allclose(loss, _numpy_info_nce(img, txt, 10.0), rtol=1e-5)
    loss, _ = contrastive.sigmoid_loss(img, txt, 10.0, -5.0, chunk_size=chunk_size)
    np.testing.assert_allclose(loss, _numpy_sigmoid(img, txt, 10.0, -5.0), rtol=1e-5)
    # In-batch accuracy: perfectly aligned pairs are all retrieved, shuffled ones not.
    _, metrics = contrastive.info_nce_loss(img, img, 10.0, chunk_size=chunk_size)
    assert float(metrics["accuracy_i2t"]) == 1.0
    _, metrics = contrastive.info_nce_loss(
        img, np.roll(img, 1, axis=0), 10.0, chunk_size=chunk_size
    )
    assert float(metrics["accuracy_i2t"]) == 0.0


def test_logit_scale_is_clamped():
    value, grad = jax.value_and_grad(lambda s: contrastive.logit_scale_from(s, 100.0))(
        jnp.float32(np.log(500.0))
    )
    np.testing.assert_allclose(value, 100.0, rtol=1e-6)
    assert float(grad) == 0.0  # held at the clamp
    value, grad = jax.value_and_grad(contrastive.logit_scale_from)(jnp.float32(np.log(20.0)))
    np.testing.assert_allclose((value, grad), (20.0, 20.0), rtol=1e-6)


def test_bad_inputs_are_refused():
    x = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="chunk_size 4"):
        contrastive.info_nce_loss(x, x, 1.0, chunk_size=4)
    with pytest.raises(ValueError, match="both be"):
        contrastive.info_nce_loss(x, x[:4], 1.0)
    with pytest.raises(ValueError, match="Unknown contrastive loss"):
        contrastive.contrastive_loss("triplet", x, x, 1.0)


# ----------------------------------------------------------- a tiny two-tower "model"
# Linear towers with replicated parameters: the case where a shard_map + pmean of
# gradients would be N times too large.
BATCH, IN_DIM, EMB_DIM = 32, 12, 8


def _params():
    rng = np.random.default_rng(1)
    return {
        "image": rng.normal(size=(IN_DIM, EMB_DIM)).astype(np.float32),
        "text": rng.normal(size=(IN_DIM, EMB_DIM)).astype(np.float32),
        "log_scale": np.float32(np.log(8.0)),
        "bias": np.float32(-3.0),
    }


def _inputs():
    rng = np.random.default_rng(2)
    return (
        rng.normal(size=(BATCH, IN_DIM)).astype(np.float32),
        rng.normal(size=(BATCH, IN_DIM)).astype(np.float32),
    )


def _loss(params, x_img, x_txt, kind, chunk_size):
    normalize = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    img = sharding.constrain_batch(normalize(x_img @ params["image"]))
    txt = sharding.constrain_batch(normalize(x_txt @ params["text"]))
    scale = contrastive.logit_scale_from(params["log_scale"])
    loss, _ = contrastive.contrastive_loss(
        kind, img, txt, scale, params["bias"], chunk_size=chunk_size
    )
    return loss


def _loss_and_grads(kind, chunk_size, mesh=None):
    fn = jax.jit(jax.value_and_grad(_loss), static_argnums=(3, 4))
    params, (x_img, x_txt) = _params(), _inputs()
    if mesh is None:
        device = jax.devices()[0]
        args = jax.device_put((params, x_img, x_txt), device)
        return jax.device_get(fn(*args, kind, chunk_size))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, sharding.replicated(mesh))
        x_img, x_txt = (jax.device_put(x, sharding.batch_sharding(mesh)) for x in (x_img, x_txt))
        return jax.device_get(fn(params, x_img, x_txt, kind, chunk_size))


@pytest.mark.parametrize("mesh_cfg", [{"data": 8}, {"data": 2, "fsdp": 4}], ids=["dp8", "dp2fsdp4"])
@pytest.mark.parametrize(
    "kind,chunk_size", [("infonce", None), ("infonce", 8), ("siglip", None), ("siglip", 8)]
)
def test_eight_device_gradients_equal_single_device_global_batch(mesh_cfg, kind, chunk_size):
    mesh = sharding.make_mesh(mesh_cfg)
    assert mesh.devices.size == 8
    ref_loss, ref_grads = _loss_and_grads(kind, None)  # dense, one device, global batch
    loss, grads = _loss_and_grads(kind, chunk_size, mesh)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_negatives_come_from_the_global_batch():
    """The sharded loss is not the mean of per-shard (local-batch) losses."""
    params, (x_img, x_txt) = _params(), _inputs()
    local = np.mean(
        [
            _loss(params, x_img[i : i + 4], x_txt[i : i + 4], "infonce", None)
            for i in range(0, BATCH, 4)
        ]
    )
    loss, _ = _loss_and_grads("infonce", None, sharding.make_mesh({"data": 8}))
    assert abs(float(loss) - float(local)) > 0.1


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_chunked_equals_dense(kind):
    loss, grads = _loss_and_grads(kind, None)
    for chunk_size in (1, 4, 32):
        chunked_loss, chunked_grads = _loss_and_grads(kind, chunk_size)
        np.testing.assert_allclose(chunked_loss, loss, rtol=1e-5)
        for name in grads:
            np.testing.assert_allclose(chunked_grads[name], grads[name], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- per-device memory
def _compiled(kind, chunk_size, batch, dim=16):
    mesh = sharding.make_mesh({"data": 8})
    spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

    def loss(img, txt, scale, bias):
        return contrastive.contrastive_loss(kind, img, txt, scale, bias, chunk_size=chunk_size)[0]

    with jax.set_mesh(mesh):
        return (
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
            .lower(spec, spec, scalar, scalar)
            .compile()
        )


def _matrix_shapes(compiled):
    return {tuple(map(int, m)) for m in re.findall(r"f32\[(\d+),(\d+)\]", compiled.as_text())}


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_similarity_memory_is_local_rows_times_global_batch(kind):
    """Loss + gradients on 8 devices, global batch 1024: each device materialises
    its 128 rows x 1024 columns, never the 1024 x 1024 matrix; chunks of 64 columns
    keep it to 128 x 64."""
    batch, local = 1024, 1024 // 8
    full_bytes = batch * batch * 4
    dense = _compiled(kind, None, batch)
    shapes = _matrix_shapes(dense)
    assert (local, batch) in shapes and (batch, batch) not in shapes
    dense_temp = dense.memory_analysis().temp_size_in_bytes
    assert dense_temp < full_bytes / 2  # measured ~1.6 MB (3 x 0.5 MB) vs 4 MB for B x B
    chunked = _compiled(kind, 64, batch)
    shapes = _matrix_shapes(chunked)
    assert (local, 64) in shapes and (local, batch) not in shapes
    chunked_temp = chunked.memory_analysis().temp_size_in_bytes
    assert chunked_temp < dense_temp / 4  # measured ~0.24 MB
