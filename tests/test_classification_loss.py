"""The fine-tuning losses against PyTorch's CrossEntropyLoss / BCEWithLogitsLoss."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mimjax.objectives import build_loss_fn, classification


class _FixedLogits:
    """Stands in for a classifier: returns preset logits, records the rng it got."""

    def __init__(self, logits):
        self.logits = jnp.asarray(logits)
        self.rng = "unset"

    def __call__(self, images, rng=None):
        self.rng = rng
        return self.logits[: images.shape[0]]


def _data(seed, n=16, c=4):
    r = np.random.default_rng(seed)
    return r.normal(size=(n, c)).astype(np.float32) * 3, r.integers(0, c, n), r


def _torch_weight(weights):
    return None if weights is None else torch.tensor(weights)


def _loss(logits, batch, label_key, weights, smoothing, **kwargs):
    """classification.loss_fn on preset logits, the class weights a list as configs give them."""
    return classification.loss_fn(
        _FixedLogits(logits),
        batch,
        None,
        label_key=label_key,
        class_weights=None if weights is None else list(weights),
        label_smoothing=smoothing,
        **kwargs,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_softmax_ce_matches_torch(seed, smoothing, weighted):
    logits, labels, r = _data(seed)
    weights = r.uniform(0.2, 3.0, 4).astype(np.float32) if weighted else None
    expected = torch.nn.CrossEntropyLoss(weight=_torch_weight(weights), label_smoothing=smoothing)(
        torch.tensor(logits), torch.tensor(labels)
    )
    batch = {"image_32": np.zeros((16, 32, 32, 1), np.float32), "label_pathology": labels}
    loss, metrics = _loss(logits, batch, "label_pathology", weights, smoothing)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == labels))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_sigmoid_bce_matches_torch(smoothing, weighted):
    r = np.random.default_rng(3)
    logits = r.normal(size=(16, 5)).astype(np.float32) * 2
    labels = (r.uniform(size=(16, 5)) < 0.3).astype(np.float32)
    weights = r.uniform(0.5, 2.0, 5).astype(np.float32) if weighted else None
    targets = labels * (1 - smoothing) + 0.5 * smoothing
    expected = torch.nn.BCEWithLogitsLoss(weight=_torch_weight(weights))(
        torch.tensor(logits), torch.tensor(targets)
    )
    batch = {"image": np.zeros((16, 8, 8, 1), np.float32), "label_margins": labels}
    loss, metrics = _loss(logits, batch, "label_margins", weights, smoothing, multilabel=True)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    exact = np.all((logits > 0) == (labels > 0.5), axis=1).mean()
    assert float(metrics["accuracy"]) == pytest.approx(exact)


def test_padding_is_excluded():
    logits, labels, _ = _data(5, n=12)
    valid = np.arange(12) < 9
    batch = {"image": np.zeros((12, 8, 8, 1)), "label_y": labels, "valid": valid}
    padded, m = classification.loss_fn(_FixedLogits(logits), batch, None, label_key="label_y")
    unpadded, m9 = classification.loss_fn(
        _FixedLogits(logits[:9]),
        {"image": np.zeros((9, 8, 8, 1)), "label_y": labels[:9]},
        None,
        label_key="label_y",
    )
    np.testing.assert_allclose(float(padded), float(unpadded), rtol=1e-6)
    assert float(m["accuracy"]) == pytest.approx(float(m9["accuracy"]))


def test_registry_passes_rng_and_checks_inputs():
    logits, labels, _ = _data(0)
    model = _FixedLogits(logits)
    loss_fn = build_loss_fn({"classification": {"weight": 1.0, "label_key": "label_y"}})
    batch = {"image": np.zeros((16, 8, 8, 1)), "label_y": labels}
    import jax

    loss_fn(model, batch, jax.random.key(0))
    assert model.rng is not None  # drop path gets a key in training
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        classification.loss_fn(model, batch, None, label_key="label_y", class_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="image_key"):
        classification.loss_fn(
            model, {**batch, "image_64": batch["image"]}, None, label_key="label_y"
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        classification.loss_fn(model, batch, None, label_key="label_y", label_smoothing=1.0)
