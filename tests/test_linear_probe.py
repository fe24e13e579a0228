"""Linear probe: ridge solver, l2 selection, feature extraction and the eval hook on a
tiny real ViT encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimjax.evaluators import classification
from mimjax.evaluators import linear_probe as lp
from mimjax.models.spec import ModelSpec

from helpers import tiny_model_config

# ----------------------------------------------------------------------------- ridge solver


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])  # N > D and N < D
def test_primal_and_dual_equal_augmented_lstsq(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    y = rng.normal(size=(shape[0], 3))
    penalty = 0.7
    # ||xW - y||^2 + p||W||^2 is least squares on x stacked over sqrt(p) I.
    augmented_x = np.vstack([x, np.sqrt(penalty) * np.eye(shape[1])])
    augmented_y = np.vstack([y, np.zeros((shape[1], 3))])
    expected = np.linalg.lstsq(augmented_x, augmented_y, rcond=None)[0]
    primal = lp.ridge_regression(x, y, penalty, form="primal")
    dual = lp.ridge_regression(x, y, penalty, form="dual")
    np.testing.assert_allclose(primal, expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dual, expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(lp.ridge_regression(x, y, penalty), expected, atol=1e-10)


def test_probe_solves_the_documented_objective():
    """Standardised features, unpenalised bias, penalty l2 * N, one-hot targets."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6)) * rng.uniform(0.1, 10.0, size=6) + rng.normal(size=6)
    labels = rng.integers(0, 3, 50)
    probe = lp.fit_ridge_probe(x, labels, num_classes=3, multilabel=False, l2_grid=(0.3,))
    assert probe.l2 == 0.3
    z = (x - x.mean(0)) / x.std(0)
    targets = np.eye(3)[labels]
    design = np.hstack([z, np.ones((50, 1))])
    # Penalise the weights, not the bias column.
    augmented_x = np.vstack([design, np.hstack([np.sqrt(0.3 * 50) * np.eye(6), np.zeros((6, 1))])])
    augmented_y = np.vstack([targets, np.zeros((6, 3))])
    solution = np.linalg.lstsq(augmented_x, augmented_y, rcond=None)[0]
    np.testing.assert_allclose(probe.scores(x), design @ solution, atol=1e-9)


def test_constant_feature_does_not_break_standardisation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 4))
    x[:, 2] = 5.0
    probe = lp.fit_ridge_probe(x, rng.integers(0, 2, 40), num_classes=2, multilabel=False)
    assert np.all(np.isfinite(probe.scores(x)))
    assert np.allclose(probe.weights[2], 0.0)


# ----------------------------------------------------------------------------- probe quality


def _gaussian_classes(n, num_classes, dim, separation, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * separation
    labels = rng.integers(0, num_classes, n)
    return centres[labels] + rng.normal(size=(n, dim)), labels


def _metrics(probe, x, labels, multilabel, num_classes):
    return classification.classification_metrics(
        labels,
        probe.scores(x),
        multilabel=multilabel,
        class_names=[str(c) for c in range(num_classes)],
    )


def test_separable_gaussians_reach_near_perfect_auc():
    x, labels = _gaussian_classes(600, 3, 16, separation=3.0, seed=0)
    train_x, train_y, eval_x, eval_y = x[:300], labels[:300], x[300:], labels[300:]
    probe = lp.fit_ridge_probe(train_x, train_y, num_classes=3, multilabel=False)
    metrics = _metrics(probe, eval_x, eval_y, False, 3)
    assert metrics["auc_macro"] > 0.99
    assert metrics["accuracy"] > 0.95


def test_pure_noise_is_at_chance():
    rng = np.random.default_rng(3)
    train_x, eval_x = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    train_y, eval_y = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    probe = lp.fit_ridge_probe(train_x, train_y, num_classes=4, multilabel=False)
    metrics = _metrics(probe, eval_x, eval_y, False, 4)
    assert abs(metrics["auc_macro"] - 0.5) < 0.06


def test_multilabel_probe():
    """Five labels, each shifting its own random direction; scores near the {0, 1} scale."""
    rng = np.random.default_rng(4)
    directions = rng.normal(size=(5, 24)) * 1.5
    labels = (rng.uniform(size=(800, 5)) < 0.3).astype(np.int64)
    x = labels @ directions + rng.normal(size=(800, 24))
    probe = lp.fit_ridge_probe(x[:500], labels[:500], num_classes=5, multilabel=True)
    metrics = _metrics(probe, x[500:], labels[500:], True, 5)
    assert metrics["auc_macro"] > 0.97
    assert metrics["hamming_accuracy"] > 0.9  # thresholding the scores at 0.5 works


def test_l2_selection_prefers_strong_penalty_on_overfit_prone_data():
    """A weak mean shift in isotropic noise, fewer examples per fold (32) than features
    (40): a nearly unpenalised fit interpolates the noise, a strong penalty averages it."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    x = 0.2 * (2 * labels - 1)[:, None] + rng.normal(size=(40, 40))
    probe = lp.fit_ridge_probe(x, labels, num_classes=2, multilabel=False)
    assert probe.l2 >= 1.0
    assert probe.heldout_auc[probe.l2] > probe.heldout_auc[1e-3] + 0.05


def test_l2_selection_prefers_weak_penalty_on_clean_data():
    """The label is the difference of two features that share a large nuisance term:
    only a nearly unpenalised fit can cancel the nuisance."""
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 2, n)
    nuisance = 10.0 * rng.normal(size=n)
    x = rng.normal(size=(n, 10))
    x[:, 0] = nuisance + 0.3 * (2 * labels - 1) + 0.05 * rng.normal(size=n)
    x[:, 1] = nuisance + 0.05 * rng.normal(size=n)
    probe = lp.fit_ridge_probe(x, labels, num_classes=2, multilabel=False)
    assert probe.l2 <= 1e-2
    assert probe.heldout_auc[probe.l2] > 0.95
    assert probe.heldout_auc[1e3] < 0.8


def test_fit_rejects_bad_input():
    x = np.zeros((20, 3))
    with pytest.raises(ValueError, match="class ids"):
        lp.fit_ridge_probe(x, np.full(20, 3), num_classes=3, multilabel=False)
    with pytest.raises(ValueError, match="multi-hot"):
        lp.fit_ridge_probe(x, np.zeros(20), num_classes=3, multilabel=True)
    with pytest.raises(ValueError, match="examples per fold"):
        lp.fit_ridge_probe(x[:6], np.zeros(6, int), num_classes=2, multilabel=False)
    with pytest.raises(ValueError, match="l2_grid"):
        lp.fit_ridge_probe(x, np.zeros(20, int), num_classes=2, multilabel=False, l2_grid=(0.0,))


# ----------------------------------------------------------------------------- features


def test_pool_tokens():
    tokens = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(lp.pool_tokens(tokens, "cls", True), tokens[:, 0])
    np.testing.assert_allclose(lp.pool_tokens(tokens, "gap", True), tokens[:, 1:].mean(1))
    np.testing.assert_allclose(lp.pool_tokens(tokens, "gap", False), tokens.mean(1))
    both = lp.pool_tokens(tokens, "cls+gap", True)
    assert both.shape == (2, 8)
    np.testing.assert_allclose(both[:, 4:], tokens[:, 1:].mean(1))
    assert lp.pool_tokens(tokens.astype(jnp.bfloat16), "gap", True).dtype == jnp.float32
    with pytest.raises(ValueError, match="class token"):
        lp.pool_tokens(tokens, "cls", False)
    with pytest.raises(ValueError, match="pool must be"):
        lp.pool_tokens(tokens, "max", True)


def test_extract_features_drops_padding_and_checks_image_key():
    batches = [
        {
            "image": np.full((3, 2), float(b)),
            "label_x": np.array([b, b, -1]),
            "valid": np.array([True, True, b == 0]),
        }
        for b in range(2)
    ]
    features, labels = lp.extract_features(lambda im: np.asarray(im) * 2, batches)
    assert features.dtype == np.float32 and features.shape == (5, 2)
    np.testing.assert_array_equal(labels["label_x"], [0, 0, -1, 1, 1])
    np.testing.assert_array_equal(features[:, 0], [0, 0, 0, 2, 2])
    two_scales = [{"image_32": np.zeros((1, 2)), "image_64": np.zeros((1, 2))}]
    with pytest.raises(ValueError, match="image_key"):
        lp.extract_features(lambda im: im, two_scales)
    features, _ = lp.extract_features(lambda im: im, two_scales, image_key="image_64")
    assert features.shape == (1, 2)


# ----------------------------------------------------------------------------- tiny ViT


@pytest.fixture(scope="module")
def mae_setup():
    cfg = tiny_model_config()
    spec = ModelSpec.from_config(cfg)
    return spec, spec.init_params(cfg, jax.random.PRNGKey(0))


def _quadrant_batches(n, seed, batch_size=32):
    """Noise images with a bright 8x8 square in one of four quadrants (the class);
    multi-label view: (square on the right, square at the bottom)."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 4, n)
    images = 0.5 * rng.normal(size=(n, 32, 32, 1)).astype(np.float32)
    for i, c in enumerate(classes):
        row, col = divmod(int(c), 2)
        images[i, row * 16 + 4 : row * 16 + 12, col * 16 + 4 : col * 16 + 12] += 2.0
    sides = np.stack([classes % 2, classes // 2], axis=1)
    return [
        {
            "image_32": images[s : s + batch_size],
            "label_pathology": classes[s : s + batch_size],
            "label_margins": sides[s : s + batch_size],
        }
        for s in range(0, n, batch_size)
    ]


def _quadrant_probe(encode, train_batches, eval_batches, label_key="pathology"):
    """A single-label probe of the four quadrant classes on `_quadrant_batches`."""
    return lp.LinearProbeEvaluator(
        encode,
        train_batches=lambda: train_batches,
        eval_batches=lambda: eval_batches,
        label_key=label_key,
        multilabel=False,
        class_names=list("abcd"),
        image_key="image_32",
    )


def test_evaluator_on_random_init_vit(mae_setup):
    spec, params = mae_setup
    before = jax.tree.map(np.array, params)
    encode = lp.encoder_features_fn(spec, pool="gap")
    train_batches, eval_batches = _quadrant_batches(192, 0), _quadrant_batches(96, 1)
    single = _quadrant_probe(encode, train_batches, eval_batches)
    metrics = single.run(params, step=0)
    assert all(key.startswith("probe/pathology/") for key in metrics)
    for name in ("accuracy", "ap_macro", "auc_macro", "l2", "num_train"):
        assert f"probe/pathology/{name}" in metrics
    assert metrics["probe/pathology/num_train"] == 192
    assert metrics["probe/pathology/auc_macro"] > 0.7
    assert metrics["probe/pathology/accuracy"] > 0.4  # chance is about 0.25
    assert single.run(params, step=1) == metrics  # deterministic
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))  # frozen

    multi = lp.LinearProbeEvaluator.from_config(
        {
            "label_key": "label_margins",
            "multilabel": True,
            "class_names": ["right", "bottom"],
            "image_key": "image_32",
        },
        encode=encode,
        train_batches=lambda: train_batches,
        eval_batches=lambda: eval_batches,
    )
    multi_metrics = multi.run(params, step=0)
    assert multi_metrics["probe/margins/auc_macro"] > 0.75
    assert "probe/margins/hamming_accuracy" in multi_metrics

    # Control: the same images with labels shuffled are at chance.
    rng = np.random.default_rng(5)
    shuffle = lambda bs: [
        dict(b, label_pathology=rng.permutation(b["label_pathology"])) for b in bs
    ]
    shuffled_train, shuffled_eval = shuffle(train_batches), shuffle(eval_batches)
    control = _quadrant_probe(encode, shuffled_train, shuffled_eval)
    assert control.run(params)["probe/pathology/auc_macro"] < 0.62


def test_encoder_features_same_for_mae_and_classifier(mae_setup):
    spec, params = mae_setup
    cls_cfg = tiny_model_config(name="vit_classifier", head="cls", num_classes=4)
    del cls_cfg.scales, cls_cfg.decoder
    cls_spec = ModelSpec.from_config(cls_cfg)
    cls_params = cls_spec.init_params(cls_cfg, jax.random.PRNGKey(1))
    cls_params["encoder"] = params["encoder"]
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 1)).astype(np.float32)
    from_mae = lp.encoder_features_fn(spec, "cls+gap")(params, images)
    from_classifier = lp.encoder_features_fn(cls_spec.bind, "cls+gap")(cls_params, images)
    assert from_mae.shape == (4, 128) and from_mae.dtype == jnp.float32
    np.testing.assert_allclose(from_mae, from_classifier, rtol=1e-5, atol=1e-5)


def test_evaluator_reports_missing_label_key(mae_setup):
    spec, params = mae_setup
    batches = _quadrant_batches(32, 0)
    evaluator = _quadrant_probe(lp.encoder_features_fn(spec), batches, batches, "density")
    with pytest.raises(KeyError, match="label_density"):
        evaluator.run(params)
