"""Per-finding probes on image and report embeddings: what each tower encodes."""

import numpy as np
import pytest

from mimjax.evaluators import finding_probe


def _pairs(num: int, seed: int):
    """Findings A and B; the image embedding encodes only A, the report both."""
    rng = np.random.default_rng(seed)
    findings = rng.integers(0, 2, size=(num, 2))
    noise = lambda: rng.normal(size=(num, 6))
    image = noise()
    image[:, 0] += 3.0 * findings[:, 0]
    text = noise()
    text[:, 0] += 3.0 * findings[:, 0]
    text[:, 1] += 3.0 * findings[:, 1]
    return {"image_emb": image, "text_emb": text, "findings": findings}


def test_probe_tells_which_tower_encodes_which_finding():
    metrics = finding_probe.finding_probe_auc(_pairs(400, 0), _pairs(300, 1), ("A", "B"))
    assert metrics["image_auc/A"] > 0.95 and metrics["text_auc/A"] > 0.95
    assert metrics["text_auc/B"] > 0.95
    assert abs(metrics["image_auc/B"] - 0.5) < 0.1  # not encoded: chance
    assert metrics["image_auc/macro"] == pytest.approx(
        (metrics["image_auc/A"] + metrics["image_auc/B"]) / 2)
    assert metrics["probe_train_pairs"] == 400
    # The probes learn from the train pairs only: flipped train labels invert the scores.
    flipped = _pairs(400, 0)
    flipped["findings"] = 1 - flipped["findings"]
    metrics = finding_probe.finding_probe_auc(flipped, _pairs(300, 1), ("A", "B"))
    assert metrics["image_auc/A"] < 0.05 and metrics["text_auc/B"] < 0.05


def test_undefined_findings_and_missing_labels():
    evaluated = _pairs(50, 2)
    evaluated["findings"][:, 1] = 0  # B never present: its AUC is undefined
    metrics = finding_probe.finding_probe_auc(_pairs(200, 3), evaluated, ("A", "B"))
    assert np.isnan(metrics["image_auc/B"]) and np.isnan(metrics["text_auc/B"])
    assert metrics["image_auc/macro"] == metrics["image_auc/A"]
    with pytest.raises(ValueError, match="finding labels"):
        finding_probe.finding_probe_auc(_pairs(200, 3), {"image_emb": 1, "text_emb": 1}, "AB")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        finding_probe.finding_probe_auc(_pairs(200, 3), evaluated, ("A", "B", "C"))
