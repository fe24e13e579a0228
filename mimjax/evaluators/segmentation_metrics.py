"""Segmentation metrics per 3-D volume: Dice, HD95 (mm), precision and recall per class.

Host-side numpy and scipy.ndimage. The caller re-stacks 2-D slice predictions by
patient and phase into volumes: integer label maps `prediction` and `ground_truth`
of shape (D, H, W) (2-D (H, W) maps work too) and the voxel `spacing` in mm, one
entry per axis ((dz, dy, dx) for a volume). Classes are given as a list of names
indexed by label value, position 0 the background, so the same functions score fine
labels (e.g. ACDC: background, RV, myocardium, LV cavity) and coarse labels
(background, heart); `to_coarse` maps a fine label map to its coarse one. Only the
foreground classes are scored.

Definitions, per class c on the binary masks P = (prediction == c), G = (ground_truth == c):

- Dice = 2|P & G| / (|P| + |G|); precision = |P & G| / |P|; recall = |P & G| / |G|.
- HD95 as `medpy.metric.binary.hd95` computes it (checked against medpy in the tests):
  the surface of a mask is the mask minus its binary erosion with
  `scipy.ndimage.generate_binary_structure(ndim, connectivity)`, the array edge
  counting as background (a mask touching the edge has a surface there);
  connectivity 1 (face neighbours) is medpy's default and what the paper's code
  (OvO1111/EfficientSubclassLearning val.py / test.py) calls. The distances of every
  surface voxel of P to the nearest surface voxel of G, and of every surface voxel of
  G to the nearest of P, Euclidean with the voxel spacing, are pooled into one list;
  HD95 is its 95th percentile with numpy's linear interpolation. Distances are exact
  (bit-identical to medpy's, which runs scipy's Euclidean distance transform with the
  spacing): offsets are searched near each surface voxel first, since a noisy
  prediction would otherwise cost one full distance transform per class and
  direction (see `_distances_to`); everything runs on the bounding box of P | G, which
  gives the same distances as the whole volume (no surface voxel lies outside it, and
  outside it is background).

Empty masks (a class absent from a volume, or missed by the model) are always scored,
never skipped, so that a miss cannot improve a mean:

| P | G | Dice | HD95 | precision | recall |
| --- | --- | --- | --- | --- | --- |
| empty | empty | 1 | 0 | 1 | 1 |
| non-empty | empty | 0 | volume diagonal | 0 | 0 |
| empty | non-empty | 0 | volume diagonal | 0 | 0 |

The volume diagonal is sqrt(sum((shape * spacing)^2)) mm, the physical extent of the
volume, larger than any distance between two of its voxel centres, so a missed or
hallucinated class always scores worse than any prediction that found it. The
reference implementations score these cases differently, which is why they are not
used as is: medpy raises for HD95 and gives precision / recall 0 when their
denominator is 0 (also when both masks are empty); the paper's code scores every
metric 0 whenever either mask is empty (a miss then gets the best possible HD95, and
an absent class that is correctly absent gets Dice 0); MONAI's 95th-percentile
Hausdorff distance returns NaN when either mask is empty (inf for the plain maximum),
which its NaN-aware mean reductions then skip, and its DiceMetric gives NaN when the
truth is empty unless `ignore_empty=False`.
Precision with P non-empty and G empty is 0 by its formula; recall there is 0/0 and is
scored 0 (the prediction names a class the volume does not have), and symmetrically
for precision when P is empty.

MONAI's `compute_hausdorff_distance(..., percentile=95)` uses the same surfaces (scipy
erosion with the default cross structuring element) and exact Euclidean distances (in
float32), but takes the 95th percentile of each direction separately and reports the
larger of the two instead of the percentile of the pooled distances, so it is usually
larger (tests/test_segmentation_metrics.py measures the gap).

Aggregation over a test set: `volume_rows` gives one row per volume
({"volume": id, "dice/NAME": ..., "dice/mean": ..., ...}, the mean being over the
foreground classes of that volume); `aggregate` averages the rows over volumes, per
class and of the per-volume means (the same number as the mean of the per-class
means, since no row is ever skipped). `paired_difference` compares two arms scored on
the same volumes with a paired bootstrap over volumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage, spatial

from mimjax.evaluators import bootstrap

METRICS = ("dice", "hd95", "precision", "recall")
# Larger is better for all but HD95 (for tables and best-checkpoint choices).
HIGHER_IS_BETTER = {"dice": True, "hd95": False, "precision": True, "recall": True}


# ----------------------------------------------------------------------------- inputs
def _check_spacing(spacing, ndim: int) -> np.ndarray:
    spacing = np.asarray(spacing, np.float64).reshape(-1)
    if spacing.size == 1:
        spacing = np.repeat(spacing, ndim)
    if spacing.size != ndim:
        raise ValueError(
            f"spacing needs one entry per axis of the {ndim}-D label maps ((dz, dy, dx) in mm "
            f"for a volume), got {spacing.size}: {spacing.tolist()}")
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be positive and finite (mm), got {spacing.tolist()}")
    return spacing


def _check_connectivity(connectivity: int, ndim: int) -> None:
    if not 1 <= connectivity <= ndim:
        raise ValueError(
            f"connectivity must be in 1..{ndim} (1: face neighbours, medpy's default; {ndim}: "
            f"all neighbours), got {connectivity}")


def _check_label_map(name: str, labels, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer label map (class index per voxel), got dtype "
            f"{labels.dtype}; take the argmax over the class axis of logits first")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} holds labels in [{labels.min()}, {labels.max()}] but only "
            f"{num_classes} classes are named (0..{num_classes - 1}); pass the class names "
            "of this label set (fine or coarse), background first")
    return labels


def check_inputs(prediction, ground_truth, spacing, class_names: Sequence[str]):
    """Validated (prediction, ground_truth, spacing float64) for `len(class_names)` classes."""
    if len(class_names) < 2:
        raise ValueError(
            f"class_names needs the background and at least one foreground class, got "
            f"{list(class_names)}")
    if len(set(class_names)) != len(class_names) or "mean" in class_names[1:]:
        raise ValueError(f"class_names must be unique and not 'mean' (they name the metric "
                         f"keys, beside 'dice/mean', ...), got {list(class_names)}")
    num_classes = len(class_names)
    prediction = _check_label_map("prediction", prediction, num_classes)
    ground_truth = _check_label_map("ground_truth", ground_truth, num_classes)
    if prediction.shape != ground_truth.shape:
        raise ValueError(
            f"prediction {prediction.shape} and ground_truth {ground_truth.shape} must have the "
            "same shape (one volume, (D, H, W))")
    if prediction.ndim not in (2, 3):
        raise ValueError(
            f"label maps must be (D, H, W) volumes or (H, W) slices, got shape {prediction.shape}")
    return prediction, ground_truth, _check_spacing(spacing, prediction.ndim)


def to_coarse(labels, fine_to_coarse: Sequence[int]) -> np.ndarray:
    """The coarse label map of a fine one (`fine_to_coarse[f]` is fine class f's superclass)."""
    labels = np.asarray(labels)
    table = np.asarray(fine_to_coarse, np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= len(table)):
        raise ValueError(
            f"fine labels in [{labels.min()}, {labels.max()}] but fine_to_coarse has "
            f"{len(table)} entries")
    return table[labels]


# ----------------------------------------------------------------------------- overlap
def overlap_counts(prediction, ground_truth, num_classes: int) -> np.ndarray:
    """(num_classes, 3) int64 voxel counts [true positives, false positives, false
    negatives] per class, from one pass over the volume."""
    pairs = prediction.astype(np.int64).reshape(-1) * num_classes + ground_truth.reshape(-1)
    confusion = np.bincount(pairs, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)  # rows predicted, columns true
    tp = np.diagonal(confusion)
    return np.stack([tp, confusion.sum(axis=1) - tp, confusion.sum(axis=0) - tp], axis=1)


def dice_precision_recall(counts) -> np.ndarray:
    """(C, 3) [Dice, precision, recall] from `overlap_counts` rows, with the empty-mask
    scores of the module docstring."""
    tp, fp, fn = (np.asarray(counts, np.float64)[:, k] for k in range(3))
    predicted, true = tp + fp, tp + fn
    both_empty = (predicted == 0) & (true == 0)

    def ratio(numerator, denominator):
        safe = np.where(denominator > 0, denominator, 1.0)
        return np.where(both_empty, 1.0, np.where(denominator > 0, numerator / safe, 0.0))

    return np.stack([ratio(2 * tp, predicted + true), ratio(tp, predicted), ratio(tp, true)],
                    axis=1)


# ----------------------------------------------------------------------------- surfaces
def volume_diagonal(shape, spacing) -> float:
    """The physical extent sqrt(sum((shape * spacing)^2)) in mm: HD95 of a missed class."""
    return float(np.sqrt(np.sum((np.asarray(shape, np.float64) * spacing) ** 2)))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    # binary_erosion's border_value=0: voxels on the array edge belong to the surface.
    return mask & ~ndimage.binary_erosion(mask, structure=structure)


# Relative costs, in units of one gather of the offset search (~3 ns on the 2-core
# development machine): scipy's distance transform per voxel of the box, a k-d tree
# per point built or queried, and the Python overhead of trying one more offset.
_TRANSFORM_COST_PER_VOXEL = 100
_TREE_COST_PER_POINT = 200
_COST_PER_OFFSET = 1500


def _reach(outer: float, spacing: np.ndarray, shape) -> np.ndarray:
    """Per axis, the largest offset (voxels) within `outer` mm that stays in the array."""
    return np.minimum(np.floor(outer / spacing).astype(np.int64), np.array(shape) - 1)


def _offsets_in_shell(spacing: np.ndarray, reach: np.ndarray, inner: float, outer: float):
    """Integer voxel offsets within `reach` with inner < length <= outer (mm), shortest
    first, and their lengths."""
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    offsets = np.stack([g.reshape(-1) for g in grids], axis=1)
    lengths = _lengths(offsets, spacing)
    order = np.argsort(lengths, kind="stable")
    order = order[(lengths[order] > inner) & (lengths[order] <= outer)]
    return offsets[order], lengths[order]


def _lengths(offsets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Lengths (mm) of integer voxel offsets (N, ndim), the squares summed axis by axis
    in the order scipy's distance transform sums them, so that the same offset gives a
    bit-identical distance."""
    squared = np.zeros(len(offsets))
    for axis in range(len(spacing)):
        squared = squared + (offsets[:, axis].astype(np.float64) * spacing[axis]) ** 2
    return np.sqrt(squared)


def _distances_to(sources: np.ndarray, targets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from each True voxel of `sources` (in C order, as
    `array[sources]` lists them) to the nearest True voxel of `targets`.

    Exact, and fast for noisy predictions as for clean ones. Most surface voxels lie
    within a voxel or two of the other surface, and a noisy prediction has surfaces
    everywhere, where one full distance transform per class and direction would cost
    ~0.3 s per 20 x 256 x 256 volume. So voxel offsets are tried in shells of growing
    radius, shortest first within a shell, which makes a voxel's first hit its exact
    nearest distance. When the next shell would cost more than answering the voxels
    still pending at once, `_far_distances` answers them."""
    coords = np.argwhere(sources)
    distances = np.empty(len(coords))
    pending = np.arange(len(coords))
    num_targets = int(np.count_nonzero(targets))
    diagonal = volume_diagonal(targets.shape, spacing)
    inner, outer = -1.0, 2 * spacing.min()
    while pending.size and inner < diagonal:
        far_cost = _far_cost(targets.size, num_targets, pending.size)
        reach = _reach(outer, spacing, targets.shape)
        if inner > 0 and np.prod(2 * reach + 1) > far_cost:
            break
        offsets, lengths = _offsets_in_shell(spacing, reach, inner, outer)
        # The first shell always runs: it answers most voxels of noisy masks, at a cost
        # bounded by its few offsets (at most 33 in 3-D).
        if inner > 0 and len(offsets) * (pending.size + _COST_PER_OFFSET) > far_cost:
            break
        padded = np.pad(targets, [(r, r) for r in reach]).reshape(-1)
        shape = np.array(targets.shape) + 2 * reach
        strides = np.append(np.cumprod(shape[::-1])[::-1][1:], 1)  # C order, in elements
        flat = (coords + reach) @ strides
        for step, length in zip(offsets @ strides, lengths, strict=True):
            hit = padded[flat[pending] + step]
            distances[pending[hit]] = length
            pending = pending[~hit]
            if not pending.size:
                break
        inner, outer = outer, 2 * outer
    if pending.size:
        distances[pending] = _far_distances(coords[pending], targets, num_targets, spacing)
    return distances


def _far_cost(box_size: int, num_targets: int, num_points: int) -> int:
    return min(_TRANSFORM_COST_PER_VOXEL * box_size,
               _TREE_COST_PER_POINT * (num_targets + num_points))


def _far_distances(points: np.ndarray, targets: np.ndarray, num_targets: int,
                   spacing: np.ndarray) -> np.ndarray:
    """Exact distances from voxel `points` (N, ndim) to the nearest True voxel of
    `targets`: a k-d tree over the target voxels when they are few (a clean surface and
    a few far outliers), else scipy's Euclidean distance transform of the box."""
    tree_cost = _TREE_COST_PER_POINT * (num_targets + len(points))
    if tree_cost > _TRANSFORM_COST_PER_VOXEL * targets.size:
        return ndimage.distance_transform_edt(~targets, sampling=spacing)[tuple(points.T)]
    target_coords = np.argwhere(targets)
    _, nearest = spatial.cKDTree(target_coords * spacing).query(points * spacing)
    # The length again from the integer offset, summed as scipy's transform sums it.
    return _lengths(target_coords[nearest] - points, spacing)


def surface_distances(mask_a, mask_b, spacing, connectivity: int = 1):
    """(distances from each surface voxel of a to b's surface, and from b's to a's), in
    the units of `spacing`. Both masks must be non-empty."""
    mask_a, mask_b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    if not mask_a.any() or not mask_b.any():
        raise ValueError("surface distances need two non-empty masks; hd95 scores empty ones")
    spacing = _check_spacing(spacing, mask_a.ndim)
    _check_connectivity(connectivity, mask_a.ndim)
    box = _bounding_box(mask_a | mask_b)
    structure = ndimage.generate_binary_structure(mask_a.ndim, connectivity)
    surface_a, surface_b = _surface(mask_a[box], structure), _surface(mask_b[box], structure)
    return (_distances_to(surface_a, surface_b, spacing),
            _distances_to(surface_b, surface_a, spacing))


def hd95(prediction_mask, ground_truth_mask, spacing, connectivity: int = 1) -> float:
    """95th percentile of the pooled symmetric surface distances (medpy's hd95), with the
    empty-mask scores of the module docstring (0 when both are empty, the volume
    diagonal when one is)."""
    prediction_mask = np.asarray(prediction_mask, bool)
    ground_truth_mask = np.asarray(ground_truth_mask, bool)
    if prediction_mask.shape != ground_truth_mask.shape:
        raise ValueError(f"mask shapes differ: {prediction_mask.shape} and "
                         f"{ground_truth_mask.shape}")
    spacing = _check_spacing(spacing, prediction_mask.ndim)
    _check_connectivity(connectivity, prediction_mask.ndim)
    has_prediction, has_truth = prediction_mask.any(), ground_truth_mask.any()
    if not has_prediction and not has_truth:
        return 0.0
    if not has_prediction or not has_truth:
        return volume_diagonal(prediction_mask.shape, spacing)
    distances = surface_distances(prediction_mask, ground_truth_mask, spacing, connectivity)
    return float(np.percentile(np.concatenate(distances), 95))


# ----------------------------------------------------------------------------- volumes
def volume_metrics(prediction, ground_truth, spacing, class_names: Sequence[str], *,
                   connectivity: int = 1) -> dict[str, float]:
    """{"dice/NAME", "hd95/NAME", "precision/NAME", "recall/NAME"} for every foreground
    class (class_names[1:]) of one volume, and "METRIC/mean", their mean over those
    classes. `class_names[k]` names label value k; position 0 is the background."""
    prediction, ground_truth, spacing = check_inputs(prediction, ground_truth, spacing,
                                                     class_names)
    num_classes = len(class_names)
    overlap = dice_precision_recall(overlap_counts(prediction, ground_truth, num_classes))
    scores = {metric: [] for metric in METRICS}
    for c in range(1, num_classes):
        scores["dice"].append(overlap[c, 0])
        scores["precision"].append(overlap[c, 1])
        scores["recall"].append(overlap[c, 2])
        scores["hd95"].append(hd95(prediction == c, ground_truth == c, spacing, connectivity))
    row = {}
    for metric in METRICS:
        for name, value in zip(class_names[1:], scores[metric], strict=True):
            row[f"{metric}/{name}"] = float(value)
        row[f"{metric}/mean"] = float(np.mean(scores[metric]))
    return row


def volume_rows(volumes: Iterable, class_names: Sequence[str], *,
                connectivity: int = 1) -> list[dict]:
    """One `volume_metrics` row per volume, with its id under "volume".

    `volumes` yields (volume_id, prediction, ground_truth, spacing), or is a mapping
    volume_id -> (prediction, ground_truth, spacing). Ids must be unique: paired
    comparisons match the rows of two arms by id."""
    if isinstance(volumes, Mapping):
        volumes = ((key, *value) for key, value in volumes.items())
    rows, seen = [], set()
    for volume_id, prediction, ground_truth, spacing in volumes:
        if volume_id in seen:
            raise ValueError(f"volume id {volume_id!r} appears twice; give each volume "
                             "(patient and phase) its own id")
        seen.add(volume_id)
        try:
            metrics = volume_metrics(prediction, ground_truth, spacing, class_names,
                                     connectivity=connectivity)
        except ValueError as error:
            raise ValueError(f"volume {volume_id!r}: {error}") from None
        rows.append({"volume": volume_id, **metrics})
    return rows


def metric_keys(rows: Sequence[Mapping]) -> list[str]:
    """The metric keys of `rows` ("dice/RV", ..., "dice/mean", ...), in row order."""
    return [key for key in rows[0] if key != "volume"] if rows else []


def aggregate(rows: Sequence[Mapping]) -> dict[str, float]:
    """The mean over volumes of every metric key of `rows` (per class, and of the
    per-volume class means under "METRIC/mean"), and "num_volumes"."""
    if not rows:
        raise ValueError("aggregate needs at least one volume row")
    keys = metric_keys(rows)
    for row in rows:
        if sorted(k for k in row if k != "volume") != sorted(keys):
            raise ValueError(f"volume {row.get('volume')!r} has other metric keys than "
                             f"{rows[0].get('volume')!r}: score every volume with the same "
                             "class names")
    summary = {key: float(np.mean([row[key] for row in rows])) for key in keys}
    summary["num_volumes"] = len(rows)
    return summary


# ----------------------------------------------------------------------------- two arms
def paired_values(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], key: str):
    """(volume ids, values of arm A, values of arm B) of metric `key` on the volumes both
    arms scored, matched by "volume" id; refuses arms that scored different volumes."""
    by_id_a = {row["volume"]: row for row in rows_a}
    by_id_b = {row["volume"]: row for row in rows_b}
    for name, rows, table in (("A", rows_a, by_id_a), ("B", rows_b, by_id_b)):
        if len(table) != len(rows) or not rows:
            raise ValueError(f"arm {name} needs one row per volume, each volume once; got "
                             f"{len(rows)} rows for {len(table)} volume ids")
    if by_id_a.keys() != by_id_b.keys():
        only_a = sorted(map(str, by_id_a.keys() - by_id_b.keys()))[:5]
        only_b = sorted(map(str, by_id_b.keys() - by_id_a.keys()))[:5]
        raise ValueError(f"the two arms scored different volumes (only A: {only_a}, only B: "
                         f"{only_b}); a paired comparison needs the same test volumes")
    ids = [row["volume"] for row in rows_a]
    for name, table in (("A", by_id_a), ("B", by_id_b)):
        if key not in table[ids[0]]:
            raise ValueError(f"arm {name} has no metric {key!r}; it has "
                             f"{metric_keys([table[ids[0]]])}")
    values_a = np.array([by_id_a[i][key] for i in ids], np.float64)
    values_b = np.array([by_id_b[i][key] for i in ids], np.float64)
    return ids, values_a, values_b


def paired_difference(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping], key: str, *,
                      num_resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> bootstrap.Difference:
    """mean_volumes(A[key]) - mean_volumes(B[key]) and its paired bootstrap percentile
    interval: volumes are resampled with replacement, both arms scored on each resample
    (see mimjax.evaluators.bootstrap). For HD95 a negative difference favours A."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    _, values_a, values_b = paired_values(rows_a, rows_b, key)
    differences = values_a - values_b
    n = len(differences)
    rng = np.random.default_rng(seed)
    resampled = differences[rng.integers(0, n, (int(num_resamples), n))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return bootstrap.Difference(float(differences.mean()), float(low), float(high), confidence,
                                int(num_resamples))


def slice_dice(prediction, ground_truth, num_classes: int) -> np.ndarray:
    """Dice per foreground class of one slice (or volume), NaN where the class is absent
    from both (for figure titles, where a perfect score for an absent class would
    say nothing)."""
    counts = overlap_counts(np.asarray(prediction), np.asarray(ground_truth), num_classes)[1:]
    dice = dice_precision_recall(counts)[:, 0]
    absent = counts.sum(axis=1) == 0
    return np.where(absent, math.nan, dice)
