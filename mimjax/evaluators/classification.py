"""Classification metrics for fine-tuning: accuracy, AP and ROC-AUC, confusion matrices.

Host-side numpy, computed once over the whole evaluation set (never averaged per
batch: AP and AUC are not means over examples). Two task shapes:

- single-label (e.g. CBIS pathology, 4 classes): labels int (N,), scores (N, C).
  Accuracy is top-1 (argmax). AP and AUC are one-vs-rest per class.
- multi-label (e.g. mass margins, 5 labels): labels (N, C) in {0, 1}, scores (N, C).
  Accuracy is exact-match (subset) accuracy; `hamming_accuracy` is the fraction of
  correct (example, label) decisions. Both threshold probabilities at `threshold`
  (positive where p >= threshold), so they need probabilities: pass
  `from_logits=True` for logits.

Definitions (the same as scikit-learn's, checked against it in the tests):

- AP is step-wise: sum over distinct score thresholds t (descending) of
  (R(t) - R(t_prev)) * P(t). Tied scores form one threshold, never an order.
- ROC-AUC is the trapezoidal area over the same distinct thresholds, which equals
  the Mann-Whitney statistic with half credit for tied positive/negative pairs.
  It is computed from integer counts, so it is exact up to one division.
- micro averages pool every (example, class) pair: the one-hot (single-label) or
  multi-hot indicator matrix and the scores are flattened together.
- macro averages are the unweighted mean over classes whose metric is defined.
  A class with no positives has no AP and no AUC; a class with no negatives has no
  AUC. Such a class is reported as NaN ("ap/NAME", "auc/NAME") and left out of the
  macro mean (scikit-learn raises or warns there instead); the number of classes
  that entered each macro mean is reported as "ap_macro_classes"/"auc_macro_classes".

Logits or probabilities: AP and AUC are rank-based, and the sigmoid is monotone
elementwise, so multi-label AP/AUC (per class, macro and micro) are the same for
logits and probabilities; only the thresholded accuracies need probabilities. The
softmax is not: the probability of class c depends on the other logits of the row,
so ranking examples by logit c is a different (and unusual) score. Single-label
logits therefore need `from_logits=True` (softmax first); accuracy (argmax) is the
same either way. All metrics are then reported on probabilities, as scikit-learn's
multiclass ROC-AUC also requires.

Best-checkpoint selection uses `is_better` (macro-AUC by default; NaN never wins).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ----------------------------------------------------------------------------- binary metrics


def _check_binary(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.ndim != 1 or scores.shape != y_true.shape:
        raise ValueError(
            f"y_true and scores must be 1-D arrays of the same length, got shapes "
            f"{y_true.shape} and {scores.shape}; pass one class column at a time."
        )
    if not np.all((y_true == 0) | (y_true == 1)):
        raise ValueError("y_true must hold only 0 and 1 (binary indicator of the positive class).")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; check the model outputs before evaluating.")
    return y_true.astype(np.int64), scores


def _threshold_counts(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive counts at each distinct score, thresholds descending.

    All examples sharing a score cross the threshold together: this is what makes
    tied scores count as one step rather than in some arbitrary order.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_true = scores[order], y_true[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_true)[last_of_group]
    false_positives = last_of_group + 1 - true_positives
    return true_positives, false_positives


def average_precision(y_true_binary, scores) -> float:
    """Step-wise average precision of one binary problem; NaN without positives."""
    y_true, scores = _check_binary(y_true_binary, scores)
    num_positive = int(y_true.sum())
    if num_positive == 0:
        return math.nan
    true_positives, false_positives = _threshold_counts(y_true, scores)
    precision = true_positives / (true_positives + false_positives)
    new_positives = np.diff(np.r_[0, true_positives])  # recall gain times num_positive
    return float(np.sum(new_positives * precision)) / num_positive


def roc_auc(y_true_binary, scores) -> float:
    """ROC-AUC of one binary problem (ties get half credit); NaN without both classes."""
    y_true, scores = _check_binary(y_true_binary, scores)
    num_positive = int(y_true.sum())
    num_negative = y_true.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return math.nan
    true_positives, false_positives = _threshold_counts(y_true, scores)
    true_positives = np.r_[0, true_positives]
    false_positives = np.r_[0, false_positives]
    # Twice the trapezoid area in integer counts: exact, no rounding before the division.
    twice_area = np.sum(np.diff(false_positives) * (true_positives[1:] + true_positives[:-1]))
    return float(twice_area) / (2.0 * num_positive * num_negative)


# ----------------------------------------------------------------------------- task metrics


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # overflow-free form of 1 / (1 + exp(-x))


def _check_inputs(
    labels, scores, multilabel: bool, class_names=None
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 labels, f64 scores), validated; class_names=None skips the name check."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (N, num_classes), got {scores.shape}.")
    num_examples, num_classes = scores.shape
    if num_examples == 0:
        raise ValueError("no examples to evaluate (empty eval set, or every example masked out).")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} entries but scores have {num_classes} columns; "
            "pass one name per class in score-column order."
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf; check the model outputs before evaluating.")
    if multilabel:
        if labels.shape != scores.shape:
            raise ValueError(
                f"multi-label labels must have the shape of scores {scores.shape}, got "
                f"{labels.shape}; pass the multi-hot label matrix."
            )
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("multi-label labels must be multi-hot (only 0 and 1).")
    else:
        if labels.shape != (num_examples,):
            raise ValueError(
                f"single-label labels must have shape ({num_examples},), got {labels.shape}; "
                "pass integer class ids (not one-hot), or use multilabel=True."
            )
        if (
            not np.all(np.equal(np.mod(labels, 1), 0))
            or labels.min() < 0
            or (labels.max() >= num_classes)
        ):
            raise ValueError(
                f"single-label labels must be integer class ids in [0, {num_classes}), got values "
                f"in [{labels.min()}, {labels.max()}]."
            )
    return labels.astype(np.int64), scores


def _nanmean(values: list[float]) -> tuple[float, int]:
    defined = [v for v in values if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else math.nan), len(defined)


def _per_class(metric, indicator: np.ndarray, scores: np.ndarray) -> list[float]:
    return [metric(indicator[:, c], scores[:, c]) for c in range(scores.shape[1])]


def class_indicator(labels, scores, *, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validated (class indicator (N, C) int64: one-hot, or the multi-hot labels;
    scores (N, C) float64), as `classification_metrics` reads its inputs."""
    labels, scores = _check_inputs(labels, scores, multilabel)
    if multilabel:
        return labels, scores
    return np.eye(scores.shape[1], dtype=np.int64)[labels], scores


def macro_average(metric, indicator: np.ndarray, scores: np.ndarray) -> float:
    """Mean of `metric` (average_precision or roc_auc) over the classes where it is
    defined, as "ap_macro" / "auc_macro" (NaN when no class is)."""
    return _nanmean(_per_class(metric, indicator, scores))[0]


def classification_metrics(
    labels,
    scores,
    *,
    multilabel: bool,
    class_names: Sequence[str],
    threshold: float = 0.5,
    from_logits: bool = False,
) -> dict:
    """All metrics of one evaluation set (see the module docstring for definitions).

    Returns scalars "accuracy", "ap_macro", "ap_micro", "auc_macro", "auc_micro",
    "ap_macro_classes", "auc_macro_classes", "num_examples", per class "ap/NAME" and
    "auc/NAME" (NaN where undefined), and counts: "confusion_matrix" (C, C) int
    (rows true, columns predicted) for single-label; "hamming_accuracy" and
    "multilabel_confusion_matrix" (C, 2, 2) int ([[tn, fp], [fn, tp]] per class,
    scikit-learn's layout) for multi-label.
    """
    labels, scores = _check_inputs(labels, scores, multilabel, class_names)
    if from_logits:
        scores = _sigmoid(scores) if multilabel else _softmax(scores)
    num_examples, num_classes = scores.shape
    metrics: dict = {"num_examples": num_examples}
    if multilabel:
        indicator = labels
        predicted = (scores >= threshold).astype(np.int64)
        metrics["accuracy"] = float(np.mean(np.all(predicted == indicator, axis=1)))
        metrics["hamming_accuracy"] = float(np.mean(predicted == indicator))
        true_positive = np.sum(predicted & indicator, axis=0)
        false_positive = np.sum(predicted & (1 - indicator), axis=0)
        false_negative = np.sum((1 - predicted) & indicator, axis=0)
        true_negative = num_examples - true_positive - false_positive - false_negative
        metrics["multilabel_confusion_matrix"] = np.stack(
            [true_negative, false_positive, false_negative, true_positive], axis=1
        ).reshape(num_classes, 2, 2)
    else:
        indicator = np.eye(num_classes, dtype=np.int64)[labels]
        predicted = np.argmax(scores, axis=1)
        metrics["accuracy"] = float(np.mean(predicted == labels))
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        metrics["confusion_matrix"] = confusion
    ap_per_class = _per_class(average_precision, indicator, scores)
    auc_per_class = _per_class(roc_auc, indicator, scores)
    metrics["ap_macro"], metrics["ap_macro_classes"] = _nanmean(ap_per_class)
    metrics["auc_macro"], metrics["auc_macro_classes"] = _nanmean(auc_per_class)
    metrics["ap_micro"] = average_precision(indicator.ravel(), scores.ravel())
    metrics["auc_micro"] = roc_auc(indicator.ravel(), scores.ravel())
    for name, ap, auc in zip(class_names, ap_per_class, auc_per_class, strict=True):
        metrics[f"ap/{name}"] = ap
        metrics[f"auc/{name}"] = auc
    return metrics


def scalar_metrics(metrics: Mapping) -> dict[str, float]:
    """The scalar entries (for metrics.jsonl / TensorBoard); count matrices dropped."""
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def json_safe(metrics: Mapping) -> dict:
    """A copy that json.dumps accepts strictly: NaN/inf -> None, arrays -> nested lists."""

    def convert(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        if isinstance(value, np.integer):
            return int(value)
        return value

    return {key: convert(value) for key, value in metrics.items()}


def is_better(new, best, key: str = "auc_macro") -> bool:
    """Whether `new` beats `best` (higher wins; ties keep the earlier checkpoint).

    Each of new/best is a metrics dict, a number, or None (no result yet). A NaN or
    missing new value never wins; anything defined beats a NaN or missing best.
    """

    def value(entry) -> float:
        if entry is None:
            return math.nan
        if isinstance(entry, Mapping):
            entry = entry.get(key)
            if entry is None:
                return math.nan
        return float(entry)

    new_value, best_value = value(new), value(best)
    if math.isnan(new_value):
        return False
    return math.isnan(best_value) or new_value > best_value


# ----------------------------------------------------------------------------- accumulation


class MetricAccumulator:
    """Collects (labels, scores) batch by batch on the host; `compute()` evaluates once.

    Arrays may come from jax (they must be fully addressable on this process: gather
    globally sharded arrays first). `valid` (B,) bool drops padded examples, e.g. the
    tail of an eval set whose size is not a multiple of the batch size.
    """

    def __init__(
        self,
        *,
        multilabel: bool,
        class_names: Sequence[str],
        threshold: float = 0.5,
        from_logits: bool = False,
    ):
        self.multilabel = multilabel
        self.class_names = tuple(class_names)
        self.threshold = threshold
        self.from_logits = from_logits
        self.reset()

    def reset(self) -> None:
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []

    @property
    def num_examples(self) -> int:
        return sum(len(labels) for labels in self._labels)

    def add(self, labels, scores, valid=None) -> None:
        labels = np.asarray(labels)
        scores = np.asarray(scores).astype(np.float64)  # also converts bfloat16
        if scores.ndim != 2 or len(labels) != len(scores):
            raise ValueError(
                f"a batch needs scores (B, num_classes) and labels with the same B; got "
                f"labels {labels.shape} and scores {scores.shape}."
            )
        if valid is not None:
            valid = np.asarray(valid)
            if valid.shape != (len(scores),) or valid.dtype != bool:
                raise ValueError(
                    f"valid must be a bool mask of shape ({len(scores)},), got {valid.dtype} "
                    f"{valid.shape}."
                )
            labels, scores = labels[valid], scores[valid]
        self._labels.append(labels.copy())
        self._scores.append(scores)

    def compute(self) -> dict:
        if not self._scores:
            raise ValueError("no batches were added before compute().")
        return classification_metrics(
            np.concatenate(self._labels),
            np.concatenate(self._scores),
            multilabel=self.multilabel,
            class_names=self.class_names,
            threshold=self.threshold,
            from_logits=self.from_logits,
        )


# ----------------------------------------------------------------------------- figure

_CELL = 96
_PANEL_GAP = 28
_LIGHT = np.array([247, 251, 255], np.float64)  # colour of fraction 0
_DARK = np.array([8, 48, 107], np.float64)  # colour of fraction 1


def figure_font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled scalable font at `size` px (no system fonts needed)."""
    try:
        return ImageFont.load_default(size=size)  # scalable bundled font, no system fonts
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text_size(font, text: str) -> tuple[int, int]:
    """(width, height) of `text` drawn in `font`."""
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def check_png_path(path: str) -> None:
    if not path.lower().endswith(".png"):
        raise ValueError(f"path must name a .png file, got {path!r}.")


def save_figure(canvas: Image.Image, path: str, legend: str, font, legend_xy) -> str:
    """Draws the grey one-line `legend` at `legend_xy` (its bottom-left corner, under the
    content) and writes `canvas` to `path`, creating its folder; returns `path`."""
    ImageDraw.Draw(canvas).text(legend_xy, legend, font=font, fill=(90, 90, 90))
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    canvas.save(path)
    return path


def _abbreviate(name: str, font, max_width: int) -> str:
    if text_size(font, name)[0] <= max_width:
        return name
    while len(name) > 1 and text_size(font, name + "…")[0] > max_width:
        name = name[:-1]
    return name + "…"


def _vertical_text(text: str, font, fill) -> Image.Image:
    width, height = text_size(font, text)
    strip = Image.new("RGBA", (width + 4, height + 8), (0, 0, 0, 0))
    ImageDraw.Draw(strip).text((2, 2), text, font=font, fill=fill, anchor="lt")
    return strip.rotate(90, expand=True)


def _draw_panel(canvas, draw, origin, matrix, row_names, col_names, fonts, label_width) -> None:
    """One confusion matrix: cells coloured by row fraction, count and percent inside."""
    x0, y0 = origin
    small, regular = fonts
    row_totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)
    for r, name in enumerate(row_names):
        cy = y0 + r * _CELL + _CELL // 2
        label = _abbreviate(name, regular, label_width - 8)
        draw.text((x0 - 6, cy), label, font=regular, fill=(0, 0, 0), anchor="rm")
        for c in range(len(col_names)):
            fraction = fractions[r, c]
            colour = tuple(int(v) for v in _LIGHT + fraction * (_DARK - _LIGHT))
            box = (x0 + c * _CELL, y0 + r * _CELL, x0 + (c + 1) * _CELL, y0 + (r + 1) * _CELL)
            draw.rectangle(box, fill=colour, outline=(160, 160, 160))
            ink = (255, 255, 255) if fraction > 0.5 else (0, 0, 0)
            cx = x0 + c * _CELL + _CELL // 2
            draw.text((cx, cy - 9), str(int(matrix[r, c])), font=regular, fill=ink, anchor="mm")
            percent = f"{100 * fraction:.0f}%" if row_totals[r, 0] > 0 else "-"
            draw.text((cx, cy + 13), percent, font=small, fill=ink, anchor="mm")
    horizontal = all(text_size(regular, name)[0] <= _CELL - 8 for name in col_names)
    for c, name in enumerate(col_names):
        cx = x0 + c * _CELL + _CELL // 2
        if horizontal:
            draw.text((cx, y0 - 6), name, font=regular, fill=(0, 0, 0), anchor="mb")
            continue
        # Long names run vertically so every column keeps its full cell width.
        strip = _vertical_text(_abbreviate(name, regular, label_width - 8), regular, (0, 0, 0))
        canvas.paste(strip, (cx - strip.width // 2, y0 - 6 - strip.height), strip)


def confusion_matrix_figure(matrix, class_names: Sequence[str], path: str, title: str = "") -> str:
    """Writes a confusion-matrix PNG to `path` (e.g. WORKDIR/figures/confusion_STEP.png).

    `matrix` is (C, C) (rows true, columns predicted; single-label) or (C, 2, 2)
    (per-class [[tn, fp], [fn, tp]]; multi-label, drawn as C small panels). Cells
    show the count and the row-normalised percentage, which also sets the colour,
    so rare classes are as readable as common ones. Long names are abbreviated.
    """
    matrix = np.asarray(matrix)
    if not np.issubdtype(matrix.dtype, np.integer) or np.any(matrix < 0):
        raise ValueError("matrix must hold non-negative integer counts.")
    multilabel = matrix.ndim == 3
    if multilabel:
        if matrix.shape[1:] != (2, 2):
            raise ValueError(f"a multi-label matrix must be (C, 2, 2), got {matrix.shape}.")
    elif matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be (C, C) or (C, 2, 2), got shape {matrix.shape}.")
    if len(class_names) != matrix.shape[0]:
        raise ValueError(
            f"class_names has {len(class_names)} entries but the matrix has {matrix.shape[0]} "
            "classes."
        )
    check_png_path(path)
    small, regular, large = figure_font(13), figure_font(15), figure_font(17)
    label_width = 170
    margin = 12
    title_height = 34
    if multilabel:
        panels = [(name, matrix[c]) for c, name in enumerate(class_names)]
        cell_names = ("neg", "pos")
        name_height = 24
        header = title_height + name_height + 30
        panel_width = label_width // 3 + 2 * _CELL
        width = margin + len(panels) * panel_width + (len(panels) - 1) * _PANEL_GAP + margin
        height = header + 2 * _CELL + 34
    else:
        axis_height = 22
        name_widths = [text_size(regular, name)[0] for name in class_names]
        label_width = min(label_width, max(name_widths) + 16)
        fits = max(name_widths) <= _CELL - 8  # column names then run horizontally
        header = title_height + axis_height + (30 if fits else label_width)
        width = margin + 30 + label_width + len(class_names) * _CELL + margin
        height = header + len(class_names) * _CELL + 34
    canvas = Image.new("RGB", (max(width, 420), height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 8), title, font=large, fill=(0, 0, 0))
    if multilabel:
        for index, (name, panel) in enumerate(panels):
            x0 = margin + index * (panel_width + _PANEL_GAP) + label_width // 3
            centre = x0 + _CELL
            draw.text(
                (centre, title_height + 8),
                _abbreviate(name, regular, panel_width),
                font=regular,
                fill=(0, 0, 0),
                anchor="mt",
            )
            _draw_panel(
                canvas,
                draw,
                (x0, header),
                panel,
                cell_names,
                cell_names,
                (small, regular),
                label_width // 3,
            )
        legend = "rows: true, columns: predicted; colour and % normalised per true row"
    else:
        x0 = margin + 30 + label_width
        _draw_panel(
            canvas,
            draw,
            (x0, header),
            matrix,
            class_names,
            class_names,
            (small, regular),
            label_width,
        )
        centre = x0 + len(class_names) * _CELL // 2
        draw.text((centre, title_height), "predicted", font=regular, fill=(90, 90, 90), anchor="mt")
        axis = _vertical_text("true", regular, (90, 90, 90))
        canvas.paste(axis, (margin, header + (len(class_names) * _CELL - axis.height) // 2), axis)
        legend = "rows: true, columns: predicted; colour and % normalised per row"
    return save_figure(canvas, path, legend, small, (margin, height - 24))
