"""Supervised classification losses for fine-tuning: softmax cross-entropy
(single-label, e.g. CBIS pathology 4-class) and sigmoid binary cross-entropy
(multi-label, e.g. the 5 mass-margin labels).

Conventions match PyTorch's `CrossEntropyLoss(weight=..., label_smoothing=...)`
and `BCEWithLogitsLoss(weight=...)`, so numbers compare one to one with the
fine-tuning recipes users know:
- single-label class weights give each example the weight of its true class and
  the mean is weighted: sum_i w[y_i] * ce_i / sum_i w[y_i] (with smoothing, the
  uniform part weights each class by its own weight, as PyTorch does);
- label smoothing e mixes the one-hot target with the uniform distribution
  (single-label) or pulls each binary target towards 0.5 (multi-label);
- multi-label class weights scale each label's column before the plain mean.
A boolean `batch["valid"]` (padding of the last eval batch) excludes examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mimjax.models import example_rng


def _images(batch, image_key):
    if image_key is not None:
        return batch[image_key]
    keys = sorted(k for k in batch if k.startswith("image"))
    if len(keys) != 1:
        raise ValueError(
            f"batch has image keys {keys}; set the objective's image_key to the one to classify"
        )
    return batch[keys[0]]


def softmax_cross_entropy(logits, labels, *, num_classes, class_weights=None,
                          label_smoothing=0.0, valid=None):
    """Weighted mean CE over examples (see the module docstring). With class
    weights AND smoothing, each class's share of the smoothing term carries that
    class's weight, as in PyTorch."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    w = (jnp.ones((num_classes,), jnp.float32) if class_weights is None
         else jnp.asarray(class_weights, jnp.float32))
    true_term = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0] * w[labels]
    smooth_term = -jnp.sum(log_probs * w, axis=-1) / num_classes
    per_example = (1.0 - label_smoothing) * true_term + label_smoothing * smooth_term
    weights = w[labels]
    if valid is not None:
        keep = valid.astype(jnp.float32)
        per_example, weights = per_example * keep, weights * keep
    return jnp.sum(per_example) / jnp.maximum(jnp.sum(weights), 1e-12)


def sigmoid_cross_entropy(logits, labels, *, class_weights=None, label_smoothing=0.0,
                          valid=None):
    """Mean BCE over examples and labels (see the module docstring)."""
    targets = labels.astype(jnp.float32) * (1.0 - label_smoothing) + 0.5 * label_smoothing
    per_entry = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
    if class_weights is not None:
        per_entry = per_entry * jnp.asarray(class_weights, jnp.float32)
    example_weights = jnp.ones(per_entry.shape[:1], jnp.float32)
    if valid is not None:
        example_weights = valid.astype(jnp.float32)
    total = jnp.sum(per_entry * example_weights[:, None])
    return total / jnp.maximum(jnp.sum(example_weights) * per_entry.shape[1], 1e-12)


def loss_fn(model, batch, rng, *, label_key: str, multilabel: bool = False,
            class_weights=None, label_smoothing: float = 0.0, image_key: str | None = None):
    """Returns (loss, {"loss_cls", "accuracy"}); `model(images, rng)` gives f32 logits
    (rng enables drop path in training)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    images = _images(batch, image_key)
    # Drop path per example, keyed by its global id (models.example_rng).
    keys = None if rng is None else example_rng.example_keys(rng, batch, images.shape[0])
    logits = model(images, rng=keys).astype(jnp.float32)
    labels = batch[label_key]
    valid = batch.get("valid")
    num_classes = logits.shape[-1]
    if class_weights is not None and len(class_weights) != num_classes:
        raise ValueError(
            f"class_weights has {len(class_weights)} entries, the model {num_classes} classes"
        )
    mask = jnp.ones(logits.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    if multilabel:
        if labels.shape != logits.shape:
            raise ValueError(
                f"multi-label {label_key!r} has shape {labels.shape}, logits {logits.shape}"
            )
        loss = sigmoid_cross_entropy(logits, labels, class_weights=class_weights,
                                     label_smoothing=label_smoothing, valid=valid)
        exact = jnp.all((logits > 0) == (labels > 0.5), axis=-1).astype(jnp.float32)
    else:
        labels = labels.astype(jnp.int32)
        loss = softmax_cross_entropy(logits, labels, num_classes=num_classes,
                                     class_weights=class_weights,
                                     label_smoothing=label_smoothing, valid=valid)
        exact = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    accuracy = jnp.sum(exact * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, {"loss_cls": loss, "accuracy": accuracy}
