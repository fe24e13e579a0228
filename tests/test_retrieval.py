"""Retrieval metrics (vs brute force, ties), figure, and the trainer eval hook."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mimjax.evaluators import retrieval

from helpers import training_setup
from mcr_fixtures import random_pairs, report_strings, tiny_mcr_config


def _brute_force_ranks(scores, query_groups, gallery_groups):
    """Sort each row by score, wrong items first among equal scores (pessimistic);
    the rank is the position of the first correct item."""
    ranks = []
    for i, row in enumerate(scores):
        correct = [gallery_groups[j] == query_groups[i] for j in range(len(row))]
        order = sorted(range(len(row)), key=lambda j: (-row[j], correct[j]))
        ranks.append(1 + next(p for p, j in enumerate(order) if correct[j]))
    return np.asarray(ranks)


def _brute_force_metrics(img, txt, groups):
    out = {}
    for name, q, g in (("i2t", img, txt), ("t2i", txt, img)):
        scores = [[float(np.dot(a.astype(np.float64), b.astype(np.float64))) for b in g] for a in q]
        ranks = _brute_force_ranks(scores, groups, groups)
        out.update({f"{name}_R@{k}": np.mean(ranks <= k) for k in (1, 5, 10)})
        out[f"{name}_median_rank"] = np.median(ranks)
    return out


def _embeddings_with_ties(n=40, dim=4, seed=0):
    """Coarse integer embeddings (many exact score ties) plus duplicated rows."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    txt = img + rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    txt[5] = txt[6] = txt[7]  # identical reports -> identical text embeddings
    img[10] = img[11]
    return img, txt


@pytest.mark.parametrize("grouped", [False, True])
def test_metrics_match_brute_force_with_ties(grouped):
    img, txt = _embeddings_with_ties()
    groups = np.arange(len(img))
    if grouped:
        groups[[6, 7]] = 5  # identical reports count as one another's match
        groups[20:24] = 20
    got = retrieval.retrieval_metrics(img, txt, groups=groups if grouped else None)
    expected = _brute_force_metrics(img, txt, groups)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert got["num_pairs"] == len(img)


def test_ties_count_against_the_query():
    img = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    txt = img.copy()  # pairs 0 and 2 are identical in both modalities
    ranks = retrieval.retrieval_ranks(img, txt, np.arange(3), np.arange(3))
    np.testing.assert_array_equal(ranks, [2, 1, 2])
    grouped = retrieval.retrieval_ranks(img, txt, np.asarray([0, 1, 0]), np.asarray([0, 1, 0]))
    np.testing.assert_array_equal(grouped, [1, 1, 1])
    metrics = retrieval.retrieval_metrics(img, txt)
    assert metrics["i2t_R@1"] == pytest.approx(1 / 3) and metrics["i2t_median_rank"] == 2


def test_perfect_and_reversed_retrieval():
    eye = np.eye(12, dtype=np.float32)
    metrics = retrieval.retrieval_metrics(eye, eye)
    assert metrics["i2t_R@1"] == metrics["t2i_R@1"] == 1.0 and metrics["t2i_median_rank"] == 1
    # Each image's own report is the least similar one: rank 12 for everyone.
    txt = 1.0 - eye
    metrics = retrieval.retrieval_metrics(eye, txt)
    assert metrics["i2t_R@10"] == 0.0 and metrics["i2t_median_rank"] == 12


def test_findings_precision():
    img = np.eye(4, dtype=np.float32)
    txt = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    findings = np.asarray([[1, 0], [1, 0], [0, 1], [0, 0]])
    metrics = retrieval.retrieval_metrics(img, txt, findings=findings, ks=(1, 2))
    assert metrics["i2t_findings_P@1"] == 1.0
    # Top-2 per query: itself and the lowest-index other report (all others score 0).
    # 0 -> {0, 1}: 2/2; 1 -> {1, 0}: 2/2; 2 -> {2, 0}: 1/2; 3 -> {3, 0}: 1/2.
    assert metrics["i2t_findings_P@2"] == pytest.approx(0.75)


def test_report_groups():
    np.testing.assert_array_equal(
        retrieval.report_groups(["a b", "c", "a b ", "d"], None), [0, 1, 0, 2]
    )
    ids = np.asarray([[2, 5, 3], [2, 6, 3], [2, 5, 3]])
    groups = retrieval.report_groups(None, ids)
    assert groups[0] == groups[2] != groups[1]


def test_figure(tmp_path):
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 1))
    retrieved = [
        [("a long report " * 30, 0.9, True), ("other", 0.5, False), ("x", 0.1, False)],
        [("y", 0.7, False), ("z", 0.6, True), ("w", 0.2, False)],
    ]
    path = retrieval.retrieval_figure(
        images, ["a long report", "z"], retrieved, str(tmp_path / "figs" / "r.png"), "title"
    )
    with Image.open(path) as figure:
        assert figure.mode == "RGB" and figure.width > 800 and figure.height > 2 * 160
        pixels = np.asarray(figure)
    assert ((pixels[..., 1] > 100) & (pixels[..., 0] < 60)).any()  # green (correct) text
    assert ((pixels[..., 0] > 150) & (pixels[..., 1] < 60)).any()  # red (wrong) text
    with pytest.raises(ValueError, match=".png"):
        retrieval.retrieval_figure(images, ["a", "b"], retrieved, str(tmp_path / "r.jpg"))


class _Writer:
    def __init__(self):
        self.rows = []

    def write(self, step, metrics):
        self.rows.append((step, dict(metrics)))


def _eval_batches():
    """Two padded batches of 8 (the last half padding); report 3 duplicates report 1."""
    batches = []
    for b in range(2):
        batch = random_pairs(8, seed=10 + b)
        if b == 0:
            batch["text_ids"][3] = batch["text_ids"][1]
            batch["text_mask"][3] = batch["text_mask"][1]
        batch["valid"] = np.arange(8) < (8 if b == 0 else 4)
        batch["report"] = np.asarray(report_strings(batch["text_ids"]), dtype=object)
        batch["finding_labels"] = (batch["text_ids"][:, 1:3] % 2).astype(np.int32)
        batches.append(batch)
    return batches


def test_hooks_evaluate_log_draw_and_finish(tmp_path):
    setup = training_setup(model=tiny_mcr_config())
    setup.config.eval_every = 5
    writer = _Writer()
    hooks = retrieval.RetrievalHooks(
        setup.config, setup.spec, setup.mesh, str(tmp_path), writer, iter(_eval_batches())
    )  # a one-shot iterator
    assert hooks.due(5, 12) and hooks.due(12, 12) and not hooks.due(6, 12)
    logged = hooks.after_step(5, setup.state)
    assert logged["retrieval/num_pairs"] == 12  # padding excluded
    for key in (
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "t2i_R@1",
        "i2t_median_rank",
        "t2i_median_rank",
        "i2t_findings_P@1",
    ):
        assert 0 <= logged[f"retrieval/{key}"] <= 12, key
    assert writer.rows == [(5, logged)]
    assert os.path.exists(tmp_path / "figures" / "retrieval_5.png")

    # The hook's embeddings are the model's unmasked embeddings of the valid rows.
    metrics, data = hooks.evaluate(setup.state.params)  # the iterator was kept: works again
    model = setup.spec.bind(jax.device_get(setup.state.params))
    batch = _eval_batches()[0]
    np.testing.assert_allclose(data["image_emb"][:8], model.embed_image(batch["image"]), atol=1e-5)
    assert data["groups"][3] == data["groups"][1]  # identical reports share a group
    expected = retrieval.retrieval_metrics(
        data["image_emb"], data["text_emb"], groups=data["groups"], findings=data["findings"]
    )
    assert metrics == expected

    result = hooks.finish(setup.state, trained=True)
    with open(tmp_path / "retrieval_metrics.json") as f:
        saved = json.load(f)
    assert saved["i2t_R@1"] == result["i2t_R@1"] and saved["step"] == 0
    assert hooks.finish(setup.state, trained=False) is None  # a re-run of a finished job
    hooks.close()
