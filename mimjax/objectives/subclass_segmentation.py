"""Subclass segmentation from hierarchical labels: a few images with fine (subclass)
masks, many with only coarse (superclass) masks (Dai, Lei, Zhang, "Efficient Subclass
Segmentation in Medical Images", MICCAI 2023, arXiv 2307.00257).

The loss follows the authors' training loop (`train_c2f` in EfficientSubclassLearning's
trainutils/train_branched.py) with its defaults. The model returns coarse logits
(K + 1 classes) and fine logits (F classes) for one image batch:

    loss = coarse_weight * 0.5 * (CE + Dice)(coarse logits, coarse labels)   every row
         + fine_weight   * 0.5 * (CE + Dice)(fine logits, fine labels)       has_fine rows
         + mix_weight    * ramp(step) * 0.5 * (CE + masked Dice)(..., target) other rows

CE is torch.nn.CrossEntropyLoss's: the mean over every pixel of the rows it covers
(hard or soft targets). Dice is the authors' DiceLoss: per class, background included,
on softmax probabilities, summed over the covered rows and all pixels,
1 - (2 sum(p t m) + s) / (sum(p p m) + sum(t t m) + s), averaged over classes.

The third term, on the rows without a fine mask (`has_fine` false), is one of:
- HierarchicalMix (`hierarchical_mix=True`): a forward on `mixed_image`; the target per
  row is (1 - alpha) * pseudo + alpha * onehot(mixed_label) (onehot includes the
  background class, so pixels outside the pasted region lean to background), or
  alpha * onehot(mixed_label) with `pseudo_labels=False`. Rows with alpha 0 (nothing
  pasted: mixed_image = image) train on their own pseudo-labels. The Dice mask is the
  target itself, as the authors' `dice_loss_fine(soft, target, mask=target)`.
- pseudo-labels only (`hierarchical_mix=False, pseudo_labels=True`): the main forward's
  fine logits against the pseudo-labels, the same CE + masked Dice.
- nothing (both False): the plain "few fine masks plus superclass masks" arm.

Pseudo-labels (no gradient flows through them): fine class c is set at a pixel where the
main forward's softmax AND that of a second forward on a rotated (k x 90 degrees) and
flipped view, mapped back, both exceed tau = max(threshold_decay ** (step //
threshold_every), threshold_floor), and the pixel's coarse label is fine_to_coarse[c].
The view (k in 0..3, flip along H or W; eight views, uniformly) is drawn from `rng`.

The ramp is the authors' arithmetic, 1 / (1 + math.exp(-iter_num // 1000)): Python
parses that as exp((-step) // ramp_length) = exp(-ceil(step / ramp_length)), so it is
0.5 at step 0 and 1 / (1 + e^-1) from step 1 to ramp_length. (The issue writes
exp(-floor(step / ramp_length)), which stays 0.5 until ramp_length; the two agree at
multiples of ramp_length.)

Where this differs from the authors' code, and why:
- Rows are chosen by the per-row flag `has_fine`, not by position in the batch (their
  sampler puts the labelled rows first), so shapes stay static. The second (view) and
  mixed forwards run on every row and the loss keeps the unflagged ones; a model with
  batch-norm batch statistics therefore normalises those forwards over the whole batch
  where the authors' normalise over the unlabelled rows only.
- Their `gen_mixup_labels` runs under torch.no_grad, forward on the mixed image
  included, so the HierarchicalMix term is logged but sends no gradient to the network.
  Here the mixed forward carries gradient (`mix_gradient=True`), as the method
  describes; `mix_gradient=False` reproduces their behaviour.
- An all-labelled batch, or a batch without any fine-labelled row, gives 0 for the
  missing term (not NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimjax.models import example_rng

NUM_VIEWS = 8  # rotations by k x 90 degrees (k = 0..3) times a flip along H or W


# --------------------------------------------------------------------------- loss pieces
def cross_entropy(logits: jax.Array, targets: jax.Array, pixel_mask: jax.Array) -> jax.Array:
    """torch.nn.CrossEntropyLoss with probability targets, over the pixels where the 0/1
    `pixel_mask` [B,H,W] is 1: mean of -sum_c t_c log softmax(logits)_c; 0 without any."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_pixel = -jnp.sum(targets * log_probs, axis=-1)
    return jnp.sum(per_pixel * pixel_mask) / jnp.maximum(jnp.sum(pixel_mask), 1.0)


def dice_loss(probs: jax.Array, targets: jax.Array, mask: jax.Array,
              smooth: float = 1e-5) -> jax.Array:
    """The authors' DiceLoss: per class (last axis), sums over all other axes, averaged
    over classes. `mask` broadcasts against `probs`."""
    axes = tuple(range(probs.ndim - 1))
    intersect = jnp.sum(probs * targets * mask, axis=axes)
    target_sum = jnp.sum(targets * targets * mask, axis=axes)
    pred_sum = jnp.sum(probs * probs * mask, axis=axes)
    dice = (2.0 * intersect + smooth) / (pred_sum + target_sum + smooth)
    return jnp.mean(1.0 - dice)


def threshold_at(step, *, decay: float = 0.999, every: int = 10,
                 floor: float = 0.4) -> jax.Array:
    """Pseudo-label confidence threshold max(decay ** (step // every), floor)."""
    exponent = (jnp.asarray(step, jnp.int32) // every).astype(jnp.float32)
    return jnp.maximum(jnp.power(jnp.float32(decay), exponent), jnp.float32(floor))


def ramp_at(step, *, length: int = 1000) -> jax.Array:
    """The authors' ramp 1 / (1 + exp((-step) // length)) (see the module docstring)."""
    exponent = jnp.floor_divide(-jnp.asarray(step, jnp.int32), length).astype(jnp.float32)
    return 1.0 / (1.0 + jnp.exp(exponent))


def make_pseudo_labels(q_soft: jax.Array, k_soft: jax.Array, label_coarse: jax.Array,
                  threshold, fine_to_coarse) -> jax.Array:
    """[B,H,W,F] 0/1 targets: class c where both views' probability of c exceeds
    `threshold` and the coarse label is fine_to_coarse[c] (the authors'
    `gen_pseudo_labels`; several classes can pass when threshold < 0.5)."""
    allowed = label_coarse[..., None] == jnp.asarray(fine_to_coarse, jnp.int32)
    confident = (q_soft > threshold) & (k_soft > threshold)
    return jax.lax.stop_gradient((confident & allowed).astype(jnp.float32))


def mixed_targets(pseudo: jax.Array | None, mixed_label: jax.Array, alpha: jax.Array,
                  num_fine: int) -> jax.Array:
    """HierarchicalMix targets per row: (1 - alpha) * pseudo + alpha * onehot(mixed_label),
    or alpha * onehot(mixed_label) without pseudo-labels (`pseudo` None)."""
    alpha = alpha.astype(jnp.float32)[:, None, None, None]
    pasted = jax.nn.one_hot(mixed_label, num_fine, dtype=jnp.float32)
    if pseudo is None:
        return alpha * pasted
    return (1.0 - alpha) * pseudo + alpha * pasted


# --------------------------------------------------------------------------- the view
def _view(images: jax.Array, k: int, flip_axis: int) -> jax.Array:
    """The authors' flip(rot90(x, k, dims=(H, W)), dims=flip_axis), channels last."""
    return jnp.flip(jnp.rot90(images, k, axes=(1, 2)), axis=flip_axis)


def _unview(images: jax.Array, k: int, flip_axis: int) -> jax.Array:
    """Inverse of `_view`: rot90(flip(x, flip_axis), -k)."""
    return jnp.rot90(jnp.flip(images, axis=flip_axis), -k, axes=(1, 2))


def view_params(view) -> tuple[int, int]:
    """(k, flip axis) of view index 0..7, channels-last axes (1 = H, 2 = W)."""
    return view // 2, 1 + view % 2


def apply_view(images: jax.Array, view, *, inverse: bool = False) -> jax.Array:
    """Rotate and flip [B,S,S,...] arrays by view index `view` (traced int32 is fine)."""
    fn = _unview if inverse else _view
    branches = [lambda x, v=v: fn(x, *view_params(v)) for v in range(NUM_VIEWS)]
    return jax.lax.switch(jnp.asarray(view, jnp.int32), branches, images)


def _rngs(rng):
    """Keys for (main forward, view draw, view forward, mixed forward); None without rng."""
    if rng is None:
        return None, None, None, None
    return tuple(jax.random.split(rng, 4))


def pseudo_label_view(rng) -> jax.Array:
    """The view index loss_fn uses with this rng (view 0, no rotation and a flip along H,
    without rng). The authors draw k and the flip axis once per batch, uniformly."""
    view_rng = _rngs(rng)[1]
    if view_rng is None:
        return jnp.int32(0)
    return jax.random.randint(view_rng, (), 0, NUM_VIEWS, dtype=jnp.int32)


# --------------------------------------------------------------------------- checks
_BATCH_KEYS = ("image", "label_coarse", "label_fine", "has_fine")
_MIX_KEYS = ("mixed_image", "mixed_label", "mix_alpha")


def _check_settings(fine_to_coarse, threshold_every, ramp_length, threshold_decay):
    if not fine_to_coarse or fine_to_coarse[0] != 0 or min(fine_to_coarse) < 0:
        raise ValueError(
            f"fine_to_coarse={tuple(fine_to_coarse)} must map fine class 0 (background) to "
            "coarse class 0 and every subclass to a coarse class >= 0, e.g. (0, 1, 1, 1).")
    if threshold_every < 1 or ramp_length < 1:
        raise ValueError(f"threshold_every={threshold_every} and ramp_length={ramp_length} "
                         "are step counts: both must be >= 1.")
    if not 0.0 < threshold_decay <= 1.0:
        raise ValueError(f"threshold_decay={threshold_decay} must be in (0, 1].")


def _check_batch(batch, *, needs_mix: bool, needs_step: bool):
    needed = list(_BATCH_KEYS) + (list(_MIX_KEYS) if needs_mix else [])
    missing = [k for k in needed if k not in batch]
    if missing:
        raise ValueError(
            f"subclass_segmentation: the batch lacks {missing} (it has {sorted(batch)}); the "
            "subclass-segmentation pipeline produces them" +
            ("; set hierarchical_mix=False to train without mixed images"
             if any(k in _MIX_KEYS for k in missing) else "") + ".")
    if needs_step and "step" not in batch:
        raise ValueError("subclass_segmentation: the batch has no 'step' (the pseudo-label "
                         "threshold and ramp need it); the trainer adds it, so add an int32 "
                         "scalar batch['step'] when calling the loss directly.")


def _check_logits(coarse_logits, fine_logits, fine_to_coarse, image_shape):
    if fine_logits.shape[-1] != len(fine_to_coarse):
        raise ValueError(
            f"the model has {fine_logits.shape[-1]} fine classes but fine_to_coarse="
            f"{tuple(fine_to_coarse)} names {len(fine_to_coarse)}; give one coarse class "
            "per fine class (background included).")
    if coarse_logits.shape[-1] != max(fine_to_coarse) + 1:
        raise ValueError(
            f"the model has {coarse_logits.shape[-1]} coarse classes but fine_to_coarse="
            f"{tuple(fine_to_coarse)} implies {max(fine_to_coarse) + 1} (background included).")
    if fine_logits.shape[:3] != image_shape[:3]:
        raise ValueError(f"fine logits {fine_logits.shape} do not cover the image "
                         f"{image_shape} pixel for pixel; segmentation models must return "
                         "[B, S, S, classes] logits at the input resolution.")


# --------------------------------------------------------------------------- the loss
def loss_fn(model, batch, rng, *, coarse_weight: float = 1.0, fine_weight: float = 1.0,
            mix_weight: float = 1.0, pseudo_labels: bool = True,
            hierarchical_mix: bool = True, fine_to_coarse=(0, 1, 1, 1),
            ramp_length: int = 1000, threshold_decay: float = 0.999,
            threshold_every: int = 10, threshold_floor: float = 0.4,
            dice_smooth: float = 1e-5, mix_gradient: bool = True):
    """Returns (loss, metrics); see the module docstring.

    `model(images, rng)` -> {"coarse_logits" [B,S,S,K+1], "fine_logits" [B,S,S,F]}. The
    batch holds "image", "label_coarse", "label_fine", "has_fine" and, with
    hierarchical_mix, "mixed_image", "mixed_label", "mix_alpha"; "step" when a third
    term is on. Metrics: loss_coarse, loss_fine, loss_mix or loss_pseudo (after the
    ramp), pseudo_threshold, ramp_weight, pseudo_label_fraction (of the pixels of the
    rows without a fine mask), accuracy_fine (pixels of the has_fine rows) and
    accuracy_coarse (all pixels).
    """
    fine_to_coarse = tuple(int(c) for c in fine_to_coarse)
    _check_settings(fine_to_coarse, threshold_every, ramp_length, threshold_decay)
    third_term = hierarchical_mix or pseudo_labels
    _check_batch(batch, needs_mix=hierarchical_mix, needs_step=third_term)
    images = jnp.asarray(batch["image"])
    if pseudo_labels and images.shape[1] != images.shape[2]:
        raise ValueError(f"pseudo-labels rotate the image by 90 degrees, so images must be "
                         f"square; got {images.shape[1]}x{images.shape[2]}.")
    main_rng, _, view_rng, mix_rng = _rngs(rng)
    if rng is not None:  # drop path / dropout per example, keyed by its global id
        main_rng, view_rng, mix_rng = (example_rng.example_keys(key, batch, images.shape[0])
                                       for key in (main_rng, view_rng, mix_rng))

    out = model(images, rng=main_rng)
    coarse_logits = out["coarse_logits"].astype(jnp.float32)
    fine_logits = out["fine_logits"].astype(jnp.float32)
    _check_logits(coarse_logits, fine_logits, fine_to_coarse, images.shape)
    num_coarse, num_fine = coarse_logits.shape[-1], fine_logits.shape[-1]
    label_coarse = jnp.asarray(batch["label_coarse"], jnp.int32)
    label_fine = jnp.asarray(batch["label_fine"], jnp.int32)
    has_fine = jnp.asarray(batch["has_fine"], bool)
    all_pixels = jnp.ones(label_coarse.shape, jnp.float32)
    fine_rows = jnp.broadcast_to(has_fine[:, None, None], label_fine.shape).astype(jnp.float32)
    coarse_rows = 1.0 - fine_rows  # the superclass-only rows

    coarse_soft = jax.nn.softmax(coarse_logits, axis=-1)
    fine_soft = jax.nn.softmax(fine_logits, axis=-1)
    coarse_onehot = jax.nn.one_hot(label_coarse, num_coarse, dtype=jnp.float32)
    fine_onehot = jax.nn.one_hot(label_fine, num_fine, dtype=jnp.float32)
    loss_coarse = 0.5 * (cross_entropy(coarse_logits, coarse_onehot, all_pixels)
                         + dice_loss(coarse_soft, coarse_onehot, 1.0, dice_smooth))
    loss_fine = 0.5 * (cross_entropy(fine_logits, fine_onehot, fine_rows)
                       + dice_loss(fine_soft, fine_onehot, fine_rows[..., None], dice_smooth))
    total = coarse_weight * loss_coarse + fine_weight * loss_fine

    metrics = {"loss_coarse": loss_coarse, "loss_fine": loss_fine}
    fine_right = (jnp.argmax(fine_logits, axis=-1) == label_fine).astype(jnp.float32)
    metrics["accuracy_fine"] = jnp.sum(fine_right * fine_rows) / jnp.maximum(
        jnp.sum(fine_rows), 1.0)
    metrics["accuracy_coarse"] = jnp.mean(
        (jnp.argmax(coarse_logits, axis=-1) == label_coarse).astype(jnp.float32))
    if not third_term:
        return total, metrics

    step = jnp.asarray(batch["step"], jnp.int32)
    threshold = threshold_at(step, decay=threshold_decay, every=threshold_every,
                             floor=threshold_floor)
    ramp = ramp_at(step, length=ramp_length)
    metrics.update(pseudo_threshold=threshold, ramp_weight=ramp)

    pseudo = None
    if pseudo_labels:
        view = pseudo_label_view(rng)
        view_logits = model(apply_view(images, view), rng=view_rng)["fine_logits"]
        view_soft = apply_view(jax.nn.softmax(view_logits.astype(jnp.float32), axis=-1),
                               view, inverse=True)
        pseudo = make_pseudo_labels(jax.lax.stop_gradient(fine_soft),
                                    jax.lax.stop_gradient(view_soft), label_coarse, threshold,
                                    fine_to_coarse)
        labelled_pixel = jnp.any(pseudo > 0, axis=-1).astype(jnp.float32)
        metrics["pseudo_label_fraction"] = jnp.sum(labelled_pixel * coarse_rows) / jnp.maximum(
            jnp.sum(coarse_rows), 1.0)

    if hierarchical_mix:
        name = "loss_mix"
        logits = model(jnp.asarray(batch["mixed_image"]), rng=mix_rng)["fine_logits"]
        logits = logits.astype(jnp.float32)
        if not mix_gradient:
            logits = jax.lax.stop_gradient(logits)
        target = mixed_targets(pseudo, jnp.asarray(batch["mixed_label"], jnp.int32),
                               jnp.asarray(batch["mix_alpha"]), num_fine)
    else:
        name, logits, target = "loss_pseudo", fine_logits, pseudo
    probs = jax.nn.softmax(logits, axis=-1)
    loss_third = ramp * 0.5 * (
        cross_entropy(logits, target, coarse_rows)
        + dice_loss(probs, target, target * coarse_rows[..., None], dice_smooth))
    metrics[name] = loss_third
    return total + mix_weight * loss_third, metrics
