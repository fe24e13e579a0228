"""Classification metrics checked against scikit-learn on random inputs and edge cases."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from mimjax.evaluators import classification as cl

PATHOLOGY = ("benign_mass", "malignant_mass", "benign_calcification", "malignant_calcification")
MARGINS = ("circumscribed", "obscured", "ill_defined", "microlobulated", "spiculated")
TOL = {"rel": 1e-12, "abs": 1e-12}


def _single_label_data(seed: int, n: int = 300, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(PATHOLOGY), n)
    logits = rng.normal(size=(n, len(PATHOLOGY)))
    logits[np.arange(n), labels] += 1.0  # informative, so AP/AUC are far from chance
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if decimals is not None:
        probs = np.round(probs, decimals)  # many ties
    return labels, probs


def _multilabel_data(seed: int, n: int = 300, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(MARGINS))) < rng.uniform(0.1, 0.5, len(MARGINS))).astype(int)
    probs = np.clip(0.6 * rng.random((n, len(MARGINS))) + 0.35 * labels, 0.0, 1.0)
    if decimals is not None:
        probs = np.round(probs, decimals)
    return labels, probs


def _assert_ranking_metrics(metrics, indicator, scores, names):
    """AP/AUC per class, macro over the defined classes, and micro, against sklearn."""
    has_pos = indicator.sum(0) > 0
    has_both = has_pos & (indicator.sum(0) < len(indicator))
    ap_sk = skm.average_precision_score(indicator[:, has_pos], scores[:, has_pos], average=None)
    auc_sk = skm.roc_auc_score(indicator[:, has_both], scores[:, has_both], average=None)
    for value, name in zip(ap_sk, np.array(names)[has_pos], strict=True):
        assert metrics[f"ap/{name}"] == pytest.approx(value, **TOL)
    for value, name in zip(auc_sk, np.array(names)[has_both], strict=True):
        assert metrics[f"auc/{name}"] == pytest.approx(value, **TOL)
    for name in np.array(names)[~has_pos]:
        assert math.isnan(metrics[f"ap/{name}"])
    for name in np.array(names)[~has_both]:
        assert math.isnan(metrics[f"auc/{name}"])
    assert metrics["ap_macro"] == pytest.approx(np.mean(ap_sk), **TOL)
    assert metrics["auc_macro"] == pytest.approx(np.mean(auc_sk), **TOL)
    assert metrics["ap_macro_classes"] == has_pos.sum()
    assert metrics["auc_macro_classes"] == has_both.sum()
    flat_true, flat_scores = indicator.ravel(), scores.ravel()
    assert metrics["ap_micro"] == pytest.approx(
        skm.average_precision_score(flat_true, flat_scores), **TOL
    )
    assert metrics["auc_micro"] == pytest.approx(skm.roc_auc_score(flat_true, flat_scores), **TOL)
    # sklearn's own micro path on the indicator matrix agrees with the flattening.
    assert metrics["auc_micro"] == pytest.approx(
        skm.roc_auc_score(indicator, scores, average="micro"), **TOL
    )


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", range(4))
def test_single_label_matches_sklearn(seed, decimals):
    labels, probs = _single_label_data(seed, decimals=decimals)
    metrics = cl.classification_metrics(labels, probs, multilabel=False, class_names=PATHOLOGY)
    predicted = np.argmax(probs, axis=1)
    assert metrics["num_examples"] == len(labels)
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted), **TOL)
    np.testing.assert_array_equal(
        metrics["confusion_matrix"], skm.confusion_matrix(labels, predicted, labels=range(4))
    )
    indicator = np.eye(len(PATHOLOGY), dtype=int)[labels]
    _assert_ranking_metrics(metrics, indicator, probs, PATHOLOGY)
    # sklearn's multiclass one-vs-rest macro AUC on integer labels is the same number.
    if decimals is None:
        assert metrics["auc_macro"] == pytest.approx(
            skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), **TOL
        )


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("seed", range(4))
def test_multilabel_matches_sklearn(seed, decimals):
    labels, probs = _multilabel_data(seed, decimals=decimals)
    metrics = cl.classification_metrics(labels, probs, multilabel=True, class_names=MARGINS)
    predicted = (probs >= 0.5).astype(int)
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted), **TOL)
    assert metrics["hamming_accuracy"] == pytest.approx(
        1.0 - skm.hamming_loss(labels, predicted), **TOL
    )
    np.testing.assert_array_equal(
        metrics["multilabel_confusion_matrix"], skm.multilabel_confusion_matrix(labels, predicted)
    )
    _assert_ranking_metrics(metrics, labels, probs, MARGINS)


def test_multilabel_threshold_argument():
    labels, probs = _multilabel_data(7)
    metrics = cl.classification_metrics(
        labels, probs, multilabel=True, class_names=MARGINS, threshold=0.3
    )
    predicted = (probs >= 0.3).astype(int)
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert (
        metrics["accuracy"]
        != cl.classification_metrics(labels, probs, multilabel=True, class_names=MARGINS)[
            "accuracy"
        ]
    )


def test_tied_scores_are_one_threshold():
    # One positive and one negative with the same score: half credit, not an order.
    assert cl.roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert cl.average_precision([1, 0], [0.5, 0.5]) == 0.5
    assert cl.average_precision([0, 1], [0.5, 0.5]) == 0.5
    # A tie block in the middle of the ranking.
    y, s = [1, 0, 1, 0, 0, 1], [0.9, 0.7, 0.7, 0.7, 0.2, 0.1]
    assert cl.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), **TOL)
    assert cl.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_heavy_ties_binary(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    scores = rng.integers(0, 4, 500) / 3.0 + 0.2 * y * rng.integers(0, 2, 500)
    assert cl.roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), **TOL)
    assert cl.average_precision(y, scores) == pytest.approx(
        skm.average_precision_score(y, scores), **TOL
    )


def test_all_equal_scores():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 50)
    scores = np.full((50, 4), 0.25)
    metrics = cl.classification_metrics(labels, scores, multilabel=False, class_names=PATHOLOGY)
    indicator = np.eye(4, dtype=int)[labels]
    _assert_ranking_metrics(metrics, indicator, scores, PATHOLOGY)
    assert metrics["auc_macro"] == 0.5  # no information: chance, exactly
    for c, name in enumerate(PATHOLOGY):
        assert metrics[f"ap/{name}"] == pytest.approx(indicator[:, c].mean())  # prevalence
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == 0))  # argmax takes class 0


def test_absent_class_is_nan_and_left_out_of_macro():
    labels, probs = _single_label_data(11, n=120)
    labels[labels == 2] = 1  # class 2 never occurs
    metrics = cl.classification_metrics(labels, probs, multilabel=False, class_names=PATHOLOGY)
    assert math.isnan(metrics["ap/benign_calcification"])
    assert math.isnan(metrics["auc/benign_calcification"])
    assert metrics["ap_macro_classes"] == metrics["auc_macro_classes"] == 3
    present = [0, 1, 3]
    indicator = np.eye(4, dtype=int)[labels]
    assert metrics["auc_macro"] == pytest.approx(
        skm.roc_auc_score(indicator[:, present], probs[:, present], average="macro"), **TOL
    )
    assert metrics["ap_macro"] == pytest.approx(
        skm.average_precision_score(indicator[:, present], probs[:, present], average="macro"),
        **TOL,
    )
    _assert_ranking_metrics(metrics, indicator, probs, PATHOLOGY)
    assert not math.isnan(metrics["ap_micro"]) and not math.isnan(metrics["auc_micro"])


def test_multilabel_all_positive_and_all_negative_labels():
    labels, probs = _multilabel_data(5, n=80)
    labels[:, 0] = 0  # no positives: AP and AUC undefined
    labels[:, 4] = 1  # no negatives: AUC undefined, AP defined (= 1)
    metrics = cl.classification_metrics(labels, probs, multilabel=True, class_names=MARGINS)
    assert math.isnan(metrics["ap/circumscribed"]) and math.isnan(metrics["auc/circumscribed"])
    assert metrics["ap/spiculated"] == 1.0 and math.isnan(metrics["auc/spiculated"])
    assert metrics["ap_macro_classes"] == 4 and metrics["auc_macro_classes"] == 3
    _assert_ranking_metrics(metrics, labels, probs, MARGINS)


def test_single_example():
    probs = np.array([[0.1, 0.6, 0.2, 0.1]])
    metrics = cl.classification_metrics([1], probs, multilabel=False, class_names=PATHOLOGY)
    assert metrics["num_examples"] == 1 and metrics["accuracy"] == 1.0
    assert metrics["ap/malignant_mass"] == 1.0
    assert all(math.isnan(metrics[f"auc/{name}"]) for name in PATHOLOGY)
    assert math.isnan(metrics["auc_macro"]) and metrics["auc_macro_classes"] == 0
    assert metrics["ap_macro"] == 1.0 and metrics["ap_macro_classes"] == 1
    assert metrics["auc_micro"] == skm.roc_auc_score([0, 1, 0, 0], probs[0]) == 1.0
    wrong = cl.classification_metrics([2], probs, multilabel=False, class_names=PATHOLOGY)
    assert wrong["accuracy"] == 0.0 and wrong["confusion_matrix"][2, 1] == 1


def test_logits_and_probabilities():
    labels, probs = _single_label_data(2)
    logits = np.log(probs) + np.random.default_rng(0).normal(size=(len(probs), 1))  # row shifts
    from_probs = cl.classification_metrics(labels, probs, multilabel=False, class_names=PATHOLOGY)
    from_logits = cl.classification_metrics(
        labels, logits, multilabel=False, class_names=PATHOLOGY, from_logits=True
    )
    for key, value in from_probs.items():
        if key != "confusion_matrix":
            assert from_logits[key] == pytest.approx(value, **TOL), key
    # Softmax is not monotone in one logit: raw logits rank examples differently.
    raw_logits = cl.classification_metrics(labels, logits, multilabel=False, class_names=PATHOLOGY)
    assert raw_logits["accuracy"] == from_probs["accuracy"]
    assert raw_logits["auc_macro"] != pytest.approx(from_probs["auc_macro"], **TOL)

    # Sigmoid is monotone elementwise: every AP/AUC is the same for logits and probabilities.
    ml_labels, ml_probs = _multilabel_data(2)
    ml_probs = np.clip(ml_probs, 1e-6, 1 - 1e-6)
    ml_logits = np.log(ml_probs) - np.log1p(-ml_probs)
    expected = cl.classification_metrics(ml_labels, ml_probs, multilabel=True, class_names=MARGINS)
    converted = cl.classification_metrics(
        ml_labels, ml_logits, multilabel=True, class_names=MARGINS, from_logits=True
    )
    raw = cl.classification_metrics(ml_labels, ml_logits, multilabel=True, class_names=MARGINS)
    for key, value in expected.items():
        if key != "multilabel_confusion_matrix":
            assert converted[key] == pytest.approx(value, rel=1e-9), key
        if key.startswith(("ap", "auc")):
            assert raw[key] == pytest.approx(value, **TOL), key
    assert raw["accuracy"] != expected["accuracy"]  # thresholds at 0.5 need probabilities


@pytest.mark.parametrize("multilabel", [False, True])
def test_accumulator_masks_padding_and_takes_jax_arrays(multilabel):
    import jax.numpy as jnp

    names = MARGINS if multilabel else PATHOLOGY
    labels, probs = (_multilabel_data if multilabel else _single_label_data)(9, n=45)
    expected = cl.classification_metrics(labels, probs, multilabel=multilabel, class_names=names)
    batch, rng = 8, np.random.default_rng(0)
    padded = -(-len(labels) // batch) * batch
    pad_labels = np.concatenate([labels, np.ones((padded - len(labels),) + labels.shape[1:], int)])
    pad_probs = np.concatenate([probs, rng.random((padded - len(labels), len(names)))])
    valid = np.arange(padded) < len(labels)
    accumulator = cl.MetricAccumulator(multilabel=multilabel, class_names=names)
    for start in range(0, padded, batch):
        window = slice(start, start + batch)
        accumulator.add(
            jnp.asarray(pad_labels[window]), jnp.asarray(pad_probs[window]), valid[window]
        )
    assert accumulator.num_examples == len(labels)
    got = accumulator.compute()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value)
        else:
            assert got[key] == pytest.approx(value, nan_ok=True, **TOL), key
    # Without the mask the padding changes the result: the test can tell.
    unmasked = cl.MetricAccumulator(multilabel=multilabel, class_names=names)
    unmasked.add(pad_labels, pad_probs)
    assert unmasked.compute()["num_examples"] == padded
    assert unmasked.compute()["auc_macro"] != pytest.approx(expected["auc_macro"])
    accumulator.reset()
    with pytest.raises(ValueError, match="no batches"):
        accumulator.compute()


def test_accumulator_takes_bfloat16_scores():
    import jax.numpy as jnp

    labels, probs = _single_label_data(4, n=40)
    accumulator = cl.MetricAccumulator(multilabel=False, class_names=PATHOLOGY)
    accumulator.add(jnp.asarray(labels), jnp.asarray(probs, dtype=jnp.bfloat16))
    rounded = np.asarray(jnp.asarray(probs, dtype=jnp.bfloat16).astype(jnp.float32))
    expected = cl.classification_metrics(labels, rounded, multilabel=False, class_names=PATHOLOGY)
    assert accumulator.compute()["auc_macro"] == pytest.approx(expected["auc_macro"], **TOL)


def test_is_better():
    assert cl.is_better({"auc_macro": 0.7}, None)
    assert cl.is_better({"auc_macro": 0.7}, {"auc_macro": math.nan})
    assert cl.is_better({"auc_macro": 0.71}, {"auc_macro": 0.7})
    assert not cl.is_better({"auc_macro": 0.7}, {"auc_macro": 0.7})  # tie keeps the earlier
    assert not cl.is_better({"auc_macro": 0.6}, {"auc_macro": 0.7})
    assert not cl.is_better({"auc_macro": math.nan}, {"auc_macro": 0.1})
    assert not cl.is_better({"auc_macro": math.nan}, None)
    assert not cl.is_better({}, None)
    assert cl.is_better({"ap_macro": 0.5, "auc_macro": 0.1}, {"ap_macro": 0.4}, key="ap_macro")
    assert cl.is_better(0.8, 0.5) and not cl.is_better(math.nan, math.nan)


def test_json_safe_and_scalars():
    labels, probs = _single_label_data(1, n=30)
    labels[labels == 3] = 0
    metrics = cl.classification_metrics(labels, probs, multilabel=False, class_names=PATHOLOGY)
    decoded = json.loads(json.dumps(cl.json_safe(metrics), allow_nan=False))
    assert decoded["ap/malignant_calcification"] is None
    assert decoded["confusion_matrix"] == metrics["confusion_matrix"].tolist()
    assert decoded["auc_macro"] == pytest.approx(metrics["auc_macro"])
    scalars = cl.scalar_metrics(metrics)
    assert "confusion_matrix" not in scalars and scalars["num_examples"] == 30.0


def test_bad_inputs_are_named():
    probs = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="class_names"):
        cl.classification_metrics([0, 1, 2], probs, multilabel=False, class_names=MARGINS)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cl.classification_metrics([0, 1, 4], probs, multilabel=False, class_names=PATHOLOGY)
    with pytest.raises(ValueError, match="one-hot"):
        cl.classification_metrics(np.eye(4)[:3], probs, multilabel=False, class_names=PATHOLOGY)
    with pytest.raises(ValueError, match="multi-hot"):
        cl.classification_metrics(np.full((3, 4), 2), probs, multilabel=True, class_names=PATHOLOGY)
    with pytest.raises(ValueError, match="NaN"):
        cl.classification_metrics(
            [0, 1, 2], np.full((3, 4), np.nan), multilabel=False, class_names=PATHOLOGY
        )
    with pytest.raises(ValueError, match="no examples"):
        cl.classification_metrics(
            np.zeros(0, int), np.zeros((0, 4)), multilabel=False, class_names=PATHOLOGY
        )
    with pytest.raises(ValueError, match="valid"):
        cl.MetricAccumulator(multilabel=False, class_names=PATHOLOGY).add(
            [0, 1, 2], probs, valid=[1, 1, 0]
        )


def _png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.load()
        return np.asarray(image)


def test_confusion_figure_written_and_depends_on_matrix(tmp_path):
    first = np.array([[30, 2, 1, 0], [5, 20, 0, 3], [0, 0, 12, 1], [2, 2, 2, 9]])
    second = first.T.copy()
    path_a = cl.confusion_matrix_figure(
        first, PATHOLOGY, str(tmp_path / "figures" / "confusion_10.png"), "step 10"
    )
    path_b = cl.confusion_matrix_figure(
        second, PATHOLOGY, str(tmp_path / "figures" / "confusion_20.png"), "step 10"
    )
    image_a, image_b = _png(path_a), _png(path_b)
    assert 300 <= image_a.shape[0] <= 2000 and 300 <= image_a.shape[1] <= 2000
    assert image_a.shape == image_b.shape and np.any(image_a != image_b)
    assert image_a.std() > 10  # not a blank canvas
    # Multi-label: one 2x2 panel per label.
    labels, probs = _multilabel_data(0, n=60)
    matrices = cl.classification_metrics(labels, probs, multilabel=True, class_names=MARGINS)[
        "multilabel_confusion_matrix"
    ]
    multi = _png(cl.confusion_matrix_figure(matrices, MARGINS, str(tmp_path / "m.png"), "margins"))
    assert multi.shape[1] > multi.shape[0] > 200
    with pytest.raises(ValueError, match=".png"):
        cl.confusion_matrix_figure(first, PATHOLOGY, str(tmp_path / "c.jpg"))
    with pytest.raises(ValueError, match="class_names"):
        cl.confusion_matrix_figure(first, MARGINS, str(tmp_path / "c.png"))
