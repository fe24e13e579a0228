"""Which findings the shared image-report space encodes: linear probes per finding.

Retrieval metrics say how often the right report comes first, not why it does not.
Probes finding by finding answer that. Ridge probes (`linear_probe.fit_ridge_probe`:
multi-label, standardised features, l2 chosen by cross-validated macro-AUC) are fit
on the train pairs' embeddings and predict every finding of the evaluated pairs, once
from the image embeddings and once from the report embeddings.

Reading: a finding whose report-side AUC is high but whose image-side AUC is near 0.5
is one the image tower has not learned. Reports that differ only by it cannot be told
apart from the image, which caps image-to-text R@1 however well the rest is learned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mimjax.evaluators import classification, linear_probe

SIDES = (("image", "image_emb"), ("text", "text_emb"))


def finding_probe_auc(
    train: Mapping[str, np.ndarray],
    evaluated: Mapping[str, np.ndarray],
    label_names: Sequence[str],
) -> dict[str, float]:
    """train / evaluated: "image_emb", "text_emb" (N, P) and "findings" (N, K) multi-hot,
    as `retrieval.EmbeddingExtractor` gives them. Returns {"image_auc/NAME",
    "text_auc/NAME", "image_auc/macro", "text_auc/macro", "probe_train_pairs"}; a finding
    absent from or present in every evaluated pair gets NaN (its AUC is undefined)."""
    names = tuple(label_names)
    for split, data in (("train", train), ("evaluated", evaluated)):
        findings = data.get("findings", None)
        if findings is None or np.ndim(findings) != 2 or np.shape(findings)[1] != len(names):
            shape = None if findings is None else np.shape(findings)
            raise ValueError(
                f"the {split} pairs need multi-hot 'findings' of shape (N, {len(names)}) for "
                f"the finding probe, got {shape}; the data must carry finding labels "
                "(the phantom's finding_labels or MIMIC-CXR's chexpert)."
            )
    metrics = {"probe_train_pairs": len(train["findings"])}
    for side, key in SIDES:
        probe = linear_probe.fit_ridge_probe(
            train[key], np.asarray(train["findings"]), num_classes=len(names), multilabel=True
        )
        indicator, scores = classification.class_indicator(
            np.asarray(evaluated["findings"]), probe.scores(evaluated[key]), multilabel=True
        )
        for column, name in enumerate(names):
            metrics[f"{side}_auc/{name}"] = classification.roc_auc(
                indicator[:, column], scores[:, column]
            )
        metrics[f"{side}_auc/macro"] = classification.macro_average(
            classification.roc_auc, indicator, scores
        )
    return metrics
