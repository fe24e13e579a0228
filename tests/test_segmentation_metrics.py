"""Segmentation metrics and overlays (mimjax.evaluators.segmentation_metrics,
segmentation_overlays): HD95 against medpy (bit for bit), Dice / precision / recall
against medpy and direct formulas, MONAI's Hausdorff distance and Dice with their
documented differences, the empty-mask scores, aggregation over volumes, paired
comparisons, input errors, speed, and the overlay PNG."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mimjax.evaluators import segmentation_metrics as sm
from mimjax.evaluators import segmentation_overlays as so

FINE = ("background", "RV", "myocardium", "LV cavity")
COARSE = ("background", "heart")
FINE_TO_COARSE = (0, 1, 1, 1)
ACDC_SPACING = (10.0, 1.5, 1.5)  # (dz, dy, dx) mm: thick short-axis slices


def _medpy():
    return pytest.importorskip(
        "medpy.metric.binary",
        reason="medpy is not installed (the test extra pins it: pip install -e '.[test]')")


def _monai_metrics():
    pytest.importorskip("torch", reason="MONAI needs torch (the test extra pins it)")
    return pytest.importorskip(
        "monai.metrics",
        reason="monai is not installed (the test extra pins it: pip install -e '.[test]')")


def _mask_pairs(ndim: int, count: int = 40, seed: int = 0):
    """(a, b, spacing) pairs of non-empty masks of several kinds, anisotropic spacing:
    overlapping blobs, shifted blobs, sparse points, dense noise, an object with far
    outliers, and masks filling the array up to its edges."""
    rng = np.random.default_rng(seed + ndim)
    pairs = []
    while len(pairs) < count:
        shape = tuple(int(s) for s in rng.integers(4, 36, size=ndim))
        spacing = rng.uniform(0.3, 6.0, size=ndim)
        kind = len(pairs) % 6
        if kind == 0:
            a = ndimage.binary_opening(rng.random(shape) < 0.6)
            b = ndimage.binary_dilation(a) ^ (rng.random(shape) < 0.05)
        elif kind == 1:
            a = ndimage.binary_opening(rng.random(shape) < 0.6)
            b = np.roll(a, int(rng.integers(-6, 7)), axis=int(rng.integers(ndim)))
        elif kind == 2:
            a, b = rng.random(shape) < 0.02, rng.random(shape) < 0.02
        elif kind == 3:
            a, b = rng.random(shape) < 0.5, rng.random(shape) < 0.5
        elif kind == 4:
            a = np.zeros(shape, bool)
            a[tuple(slice(1, max(2, s // 2)) for s in shape)] = True
            b = a.copy()
            b[tuple(s - 1 for s in shape)] = True
        else:
            a, b = np.ones(shape, bool), rng.random(shape) < 0.9
        if a.any() and b.any():
            pairs.append((a, b, spacing))
    return pairs


def _heart_volume(rng, depth=20, size=256, shift=(3, -2)):
    """Fine ACDC-like labels (1 RV, 2 myocardium, 3 LV cavity) and a prediction that is
    a shifted, slightly resized version with one slice missing the RV."""
    yy, xx = np.mgrid[:size, :size]
    centre = size / 2
    truth = np.zeros((depth, size, size), np.int32)
    prediction = np.zeros_like(truth)
    for z in range(depth):
        scale = 1 - abs(z - depth / 2) / depth
        for labels, (dy, dx), grow in ((truth, (0, 0), 0.0), (prediction, shift, 0.05)):
            radius = np.hypot(yy - centre - dy, xx - centre - dx)
            outer, inner = size * 0.2 * scale * (1 + grow), size * 0.13 * scale * (1 - grow)
            labels[z][radius < outer] = 2
            labels[z][radius < inner] = 3
            rv = (np.abs(yy - centre - dy) < size * 0.1 * scale) & \
                (xx - centre - dx > outer) & (xx - centre - dx < outer + size * 0.12 * scale)
            if not (labels is prediction and z == depth // 3):
                labels[z][rv] = 1
    noise = rng.random(truth.shape) < 0.002
    prediction[noise] = rng.integers(0, 4, size=int(noise.sum()))
    return prediction, truth


# ----------------------------------------------------------------------------- medpy
@pytest.mark.parametrize("ndim", [2, 3])
def test_hd95_matches_medpy(ndim):
    """Bit-identical to medpy's hd95 for every connectivity medpy accepts (1 = medpy's
    default and ours, up to ndim = full connectivity), with anisotropic spacing."""
    binary = _medpy()
    checked = 0
    for a, b, spacing in _mask_pairs(ndim):
        for connectivity in range(1, ndim + 1):
            expected = binary.hd95(a, b, voxelspacing=spacing, connectivity=connectivity)
            got = sm.hd95(a, b, spacing, connectivity)
            assert got == expected, (a.shape, spacing, connectivity, got, expected)
            checked += 1
    assert checked == 40 * ndim


def test_surface_distances_match_medpy_per_direction():
    """Not only the percentile: each direction's distances equal medpy's, voxel by voxel
    (the near-offset search and the bounding-box crop change nothing)."""
    _medpy()
    from medpy.metric.binary import __surface_distances as medpy_surface_distances

    for a, b, spacing in _mask_pairs(3, count=12, seed=7):
        to_b, to_a = sm.surface_distances(a, b, spacing)
        np.testing.assert_array_equal(to_b, medpy_surface_distances(a, b, spacing, 1))
        np.testing.assert_array_equal(to_a, medpy_surface_distances(b, a, spacing, 1))


@pytest.mark.parametrize("path", ["offset shells", "k-d tree", "distance transform"])
def test_every_distance_path_matches_medpy(monkeypatch, path):
    """Surface distances come from a near-offset search, then a k-d tree or a distance
    transform for the voxels left (chosen by cost): each path alone gives medpy's
    distances."""
    binary = _medpy()
    huge = 10**15
    if path == "offset shells":  # never hand voxels over
        monkeypatch.setattr(sm, "_TREE_COST_PER_POINT", huge)
        monkeypatch.setattr(sm, "_TRANSFORM_COST_PER_VOXEL", huge)
    else:  # hand over after the first shell
        monkeypatch.setattr(sm, "_COST_PER_OFFSET", huge)
        cost = "_TRANSFORM_COST_PER_VOXEL" if path == "k-d tree" else "_TREE_COST_PER_POINT"
        monkeypatch.setattr(sm, cost, huge)
    for ndim in (2, 3):
        for a, b, spacing in _mask_pairs(ndim, count=18, seed=11):
            assert sm.hd95(a, b, spacing) == binary.hd95(a, b, voxelspacing=spacing)


def test_connectivity_changes_hd95():
    """The structuring element matters (so the default is stated): full connectivity
    marks more voxels as surface than medpy's default cross, and the values differ."""
    differences = [sm.hd95(a, b, s, 1) - sm.hd95(a, b, s, 3) for a, b, s in _mask_pairs(3)]
    assert max(abs(d) for d in differences) > 0.1


@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_precision_recall_match_medpy(ndim):
    binary = _medpy()
    for a, b, spacing in _mask_pairs(ndim):
        prediction, truth = a.astype(np.int32), b.astype(np.int32)
        row = sm.volume_metrics(prediction, truth, spacing, ("background", "object"))
        assert row["dice/object"] == pytest.approx(binary.dc(a, b), abs=1e-12)
        assert row["precision/object"] == pytest.approx(binary.precision(a, b), abs=1e-12)
        assert row["recall/object"] == pytest.approx(binary.recall(a, b), abs=1e-12)
        assert row["hd95/object"] == binary.hd95(a, b, voxelspacing=spacing)


def test_medpy_scores_empty_masks_differently():
    """The documented differences: medpy's hd95 raises on an empty mask, and its Dice,
    precision and recall are NaN where their denominator is 0 (with numpy 2's integer
    counts its fallbacks to 1 and 0 never run); we score 1 for both masks empty and 0
    for one empty, as the module docstring's table says."""
    binary = _medpy()
    empty, one = np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool)
    one[1, 2, 3] = True
    with pytest.raises(RuntimeError):
        binary.hd95(empty, one)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # medpy's 0 / 0
        assert np.isnan([binary.dc(empty, empty), binary.precision(empty, empty),
                         binary.recall(empty, empty), binary.precision(empty, one),
                         binary.recall(one, empty)]).all()
    # Where the denominator is not 0, medpy agrees: 0.
    assert binary.recall(empty, one) == binary.precision(one, empty) == binary.dc(one, empty) == 0
    row = sm.volume_metrics(empty.astype(int), empty.astype(int), 1.0, ("bg", "x"))
    assert (row["dice/x"], row["precision/x"], row["recall/x"], row["hd95/x"]) == (1, 1, 1, 0)
    for prediction, truth in ((empty, one), (one, empty)):
        row = sm.volume_metrics(prediction.astype(int), truth.astype(int), 1.0, ("bg", "x"))
        assert (row["dice/x"], row["precision/x"], row["recall/x"]) == (0, 0, 0)


# ----------------------------------------------------------------------------- formulas
def test_dice_precision_recall_match_direct_formulas():
    rng = np.random.default_rng(3)
    prediction = rng.integers(0, 4, (6, 20, 24))
    truth = np.where(rng.random(prediction.shape) < 0.7, prediction,
                     rng.integers(0, 4, prediction.shape))
    truth[truth == 2] = 0  # class 2 absent from the truth: Dice 0, recall 0
    row = sm.volume_metrics(prediction, truth, (3.0, 1.0, 1.0), FINE)
    for c, name in enumerate(FINE[1:], start=1):
        p, g = prediction == c, truth == c
        both = np.sum(p & g)
        assert row[f"dice/{name}"] == pytest.approx(2 * both / (p.sum() + g.sum()), abs=1e-12)
        assert row[f"precision/{name}"] == pytest.approx(both / p.sum(), abs=1e-12)
        assert row[f"recall/{name}"] == (both / g.sum() if g.sum() else 0.0)
    for metric in sm.METRICS:
        expected = np.mean([row[f"{metric}/{name}"] for name in FINE[1:]])
        assert row[f"{metric}/mean"] == pytest.approx(expected, abs=1e-12)


def test_empty_masks_are_scored_never_skipped():
    shape, spacing = (5, 8, 9), np.array([10.0, 1.5, 1.25])
    diagonal = float(np.sqrt(np.sum((np.array(shape) * spacing) ** 2)))
    truth = np.zeros(shape, np.int32)
    truth[2, 3:5, 3:6] = 1  # RV only
    prediction = np.zeros(shape, np.int32)
    prediction[1, 1:3, 1:3] = 3  # LV cavity only: RV missed, LV hallucinated
    row = sm.volume_metrics(prediction, truth, spacing, FINE)
    # RV missed (P empty, G not); LV cavity hallucinated (G empty); myocardium absent.
    assert (row["dice/RV"], row["hd95/RV"], row["precision/RV"], row["recall/RV"]) == \
        (0.0, pytest.approx(diagonal), 0.0, 0.0)
    assert (row["dice/LV cavity"], row["hd95/LV cavity"], row["precision/LV cavity"],
            row["recall/LV cavity"]) == (0.0, pytest.approx(diagonal), 0.0, 0.0)
    assert (row["dice/myocardium"], row["hd95/myocardium"], row["precision/myocardium"],
            row["recall/myocardium"]) == (1.0, 0.0, 1.0, 1.0)
    assert row["hd95/mean"] == pytest.approx(2 * diagonal / 3)
    # The diagonal exceeds every distance the volume can hold.
    corner_to_corner = np.sqrt(np.sum(((np.array(shape) - 1) * spacing) ** 2))
    assert diagonal > corner_to_corner
    # 2-D slices follow the same rules.
    assert sm.hd95(np.zeros((4, 4), bool), np.ones((4, 4), bool), (2.0, 1.0)) == \
        pytest.approx(np.hypot(8.0, 4.0))
    assert sm.hd95(np.zeros((4, 4), bool), np.zeros((4, 4), bool), (2.0, 1.0)) == 0.0


def test_to_coarse_and_coarse_metrics():
    rng = np.random.default_rng(4)
    prediction, truth = _heart_volume(rng, depth=4, size=64)
    coarse_truth = sm.to_coarse(truth, FINE_TO_COARSE)
    np.testing.assert_array_equal(coarse_truth, (truth > 0).astype(np.int32))
    row = sm.volume_metrics(sm.to_coarse(prediction, FINE_TO_COARSE), coarse_truth,
                            ACDC_SPACING, COARSE)
    assert set(row) == {f"{m}/{k}" for m in sm.METRICS for k in ("heart", "mean")}
    assert row["dice/heart"] == row["dice/mean"]
    with pytest.raises(ValueError, match="fine_to_coarse has 4 entries"):
        sm.to_coarse(np.array([0, 5]), FINE_TO_COARSE)


# ----------------------------------------------------------------------------- MONAI
def _one_hot(labels, num_classes):
    import torch

    eye = np.eye(num_classes, dtype=np.float32)
    return torch.from_numpy(np.moveaxis(eye[labels], -1, 0)[None])  # (1, C, *spatial)


@pytest.mark.parametrize("ndim", [2, 3])
def test_monai_hd95_is_the_larger_directed_percentile(ndim):
    """MONAI's percentile=95 Hausdorff distance uses the same surfaces and distances but
    takes the 95th percentile of each direction and reports the larger, where medpy
    (and we) take the percentile of both directions pooled. Checked exactly (up to
    MONAI's float32), and the gap measured on these 40 pairs per dimension: MONAI is
    larger by 0.27 mm (2-D) / 0.21 mm (3-D) in the median, 1.3 / 0.4 mm on average and
    up to 11 / 2.4 mm, equal on 15 / 12 pairs; it is smaller only when the surfaces are
    a few voxels, where the pooled percentile interpolates towards a larger value."""
    metrics = _monai_metrics()
    import torch

    gaps = []
    for a, b, spacing in _mask_pairs(ndim):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's own deprecation notices
            monai_value = float(metrics.compute_hausdorff_distance(
                torch.from_numpy(a[None, None].astype(np.float32)),
                torch.from_numpy(b[None, None].astype(np.float32)),
                include_background=True, percentile=95, spacing=spacing.tolist())[0, 0])
        to_b, to_a = sm.surface_distances(a, b, spacing)
        larger_directed = max(np.percentile(to_b, 95), np.percentile(to_a, 95))
        assert monai_value == pytest.approx(larger_directed, rel=1e-5, abs=1e-5)
        gap = larger_directed - sm.hd95(a, b, spacing)
        assert gap >= 0 or len(to_b) + len(to_a) < 20, (gap, len(to_b), len(to_a))
        gaps.append(gap)
    assert np.median(gaps) > 0.1 and max(gaps) > 2.0  # the two definitions really differ


def test_monai_empty_masks_are_nan():
    """MONAI returns NaN for a missed class (its reductions then skip it); we score the
    volume diagonal, so a miss cannot leave the mean."""
    metrics = _monai_metrics()
    empty, one = np.zeros((1, 4, 5, 6), np.int64), np.zeros((1, 4, 5, 6), np.int64)
    one[0, 1, 2, 3] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prediction, truth in ((empty, one), (one, empty), (empty, empty)):
            value = metrics.compute_hausdorff_distance(
                _one_hot(prediction[0], 2), _one_hot(truth[0], 2), percentile=95)
            assert np.isnan(float(value[0, 0]))
    assert sm.hd95(empty[0], one[0], 1.0) == pytest.approx(np.sqrt(4**2 + 5**2 + 6**2))


def test_monai_dice_agrees_with_ignore_empty_false():
    """MONAI's DiceMetric equals ours per class with ignore_empty=False (1 when both are
    empty); its default ignore_empty=True gives NaN wherever the truth is empty."""
    metrics = _monai_metrics()
    rng = np.random.default_rng(5)
    prediction = rng.integers(0, 4, (5, 16, 16))
    truth = np.where(rng.random(prediction.shape) < 0.6, prediction, 0)
    truth[truth == 3] = 0
    prediction[prediction == 2] = 0
    prediction[truth == 2] = 0  # class 2: empty in prediction, present in truth
    truth_absent = np.zeros_like(truth)  # a volume where no class is present
    row = sm.volume_metrics(prediction, truth, 1.0, FINE)
    monai_dice = metrics.DiceMetric(include_background=False, reduction="none",
                                    ignore_empty=False)
    values = monai_dice(_one_hot(prediction, 4), _one_hot(truth, 4)).numpy()[0]
    np.testing.assert_allclose(values, [row[f"dice/{n}"] for n in FINE[1:]], atol=1e-6)
    both_empty = monai_dice(_one_hot(truth_absent, 4), _one_hot(truth_absent, 4)).numpy()[0]
    np.testing.assert_array_equal(both_empty, [1, 1, 1])
    default = metrics.DiceMetric(include_background=False, reduction="none")
    values = default(_one_hot(prediction, 4), _one_hot(truth, 4)).numpy()[0]
    assert np.isnan(values[2]) and row["dice/LV cavity"] == 0.0  # LV hallucinated


# ----------------------------------------------------------------------------- test sets
def _volumes(seed, count=6, depth=4, size=48):
    rng = np.random.default_rng(seed)
    return {f"patient{i:03d}_{phase}": (*_heart_volume(rng, depth, size,
                                                      shift=tuple(rng.integers(-3, 4, 2))),
                                        ACDC_SPACING)
            for i in range(count // 2) for phase in ("ED", "ES")}


def _rows(seed):
    return sm.volume_rows(_volumes(seed), FINE)


def test_volume_rows_and_aggregate():
    volumes = _volumes(0)
    rows = sm.volume_rows(volumes, FINE)
    assert [row["volume"] for row in rows][:2] == ["patient000_ED", "patient000_ES"]
    # The iterable form gives the same rows as the mapping form.
    assert sm.volume_rows([(key, *value) for key, value in volumes.items()], FINE) == rows
    summary = sm.aggregate(rows)
    assert summary["num_volumes"] == 6
    for key in sm.metric_keys(rows):
        assert summary[key] == pytest.approx(np.mean([row[key] for row in rows]))
    for metric in sm.METRICS:  # mean of per-volume means == mean of per-class means
        per_class = np.mean([summary[f"{metric}/{name}"] for name in FINE[1:]])
        assert summary[f"{metric}/mean"] == pytest.approx(per_class)
    with pytest.raises(ValueError, match="other metric keys"):
        sm.aggregate([rows[0], sm.volume_rows({"c": volumes["patient000_ED"][:2] + (1.0,)},
                                              FINE)[0] | {"dice/extra": 1.0}])


def test_paired_difference_matches_rows_by_volume():
    rows_a, rows_b = _rows(0), _rows(1)
    ids, values_a, values_b = sm.paired_values(rows_a, list(reversed(rows_b)), "dice/mean")
    by_id = {row["volume"]: row["dice/mean"] for row in rows_b}
    np.testing.assert_array_equal(values_b, [by_id[i] for i in ids])
    difference = sm.paired_difference(rows_a, rows_b, "dice/mean", num_resamples=500)
    assert difference.estimate == pytest.approx(np.mean(values_a - values_b))
    assert difference.low <= difference.estimate <= difference.high
    same = sm.paired_difference(rows_a, rows_a, "hd95/RV")
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    shifted = [{**row, "dice/RV": row["dice/RV"] - 0.25} for row in rows_a]
    constant = sm.paired_difference(rows_a, shifted, "dice/RV")
    assert constant.low == pytest.approx(0.25) and constant.high == pytest.approx(0.25)
    assert constant.excludes_zero()
    with pytest.raises(ValueError, match="different volumes"):
        sm.paired_values(rows_a, rows_b[:-1], "dice/mean")
    with pytest.raises(ValueError, match="arm B needs one row per volume"):
        sm.paired_values(rows_a, rows_b + rows_b[:1], "dice/mean")
    with pytest.raises(ValueError, match="no metric 'dice/LV'"):
        sm.paired_values(rows_a, rows_b, "dice/LV")


def test_bad_inputs_name_the_problem():
    good = np.zeros((2, 4, 4), np.int32)
    with pytest.raises(ValueError, match="integer label map.*argmax"):
        sm.volume_metrics(good.astype(np.float32), good, 1.0, FINE)
    with pytest.raises(ValueError, match="labels in \\[0, 4\\].*4 classes"):
        sm.volume_metrics(good + 4 * (np.arange(4) == 1), good, 1.0, FINE)
    with pytest.raises(ValueError, match="same shape"):
        sm.volume_metrics(good, good[:1], 1.0, FINE)
    with pytest.raises(ValueError, match="one entry per axis"):
        sm.volume_metrics(good, good, (1.0, 1.0), FINE)
    with pytest.raises(ValueError, match="positive and finite"):
        sm.volume_metrics(good, good, (1.0, 0.0, 1.0), FINE)
    with pytest.raises(ValueError, match="background and at least one"):
        sm.volume_metrics(good, good, 1.0, ("background",))
    with pytest.raises(ValueError, match="connectivity must be in 1..3"):
        sm.hd95(good == 0, good == 0, 1.0, connectivity=4)
    with pytest.raises(ValueError, match="class_names must be unique"):
        sm.volume_metrics(good, good, 1.0, ("background", "RV", "RV"))
    with pytest.raises(ValueError, match="'a' appears twice"):
        sm.volume_rows([("a", good, good, 1.0), ("a", good, good, 1.0)], FINE)
    with pytest.raises(ValueError, match="volume 'b': prediction"):
        sm.volume_rows([("b", good + 9, good, 1.0)], FINE)


def test_speed_20_slices_256():
    """20 x 256 x 256, 3 foreground classes: ~0.1 s for a realistic prediction; ~0.5 s
    for pure label noise (surfaces everywhere), measured on a busy 2-core machine."""
    rng = np.random.default_rng(6)
    volumes = {"heart": _heart_volume(rng),
               "noise": (rng.integers(0, 4, (20, 256, 256)), rng.integers(0, 4, (20, 256, 256)))}
    for name, (prediction, truth) in volumes.items():
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            sm.volume_metrics(prediction, truth, ACDC_SPACING, FINE)
            seconds.append(time.perf_counter() - start)
        assert min(seconds) < 1.0, (name, seconds)


# ----------------------------------------------------------------------------- figures
def test_slice_dice_marks_absent_classes():
    truth = np.array([[1, 1, 0], [0, 0, 0]])
    prediction = np.array([[1, 0, 0], [0, 0, 3]])
    dice = sm.slice_dice(prediction, truth, 4)
    assert dice[0] == pytest.approx(2 / 3) and np.isnan(dice[1]) and dice[2] == 0.0


def test_overlay_figure(tmp_path):
    rng = np.random.default_rng(7)
    prediction, truth = _heart_volume(rng, depth=8, size=64)
    truth[0] = prediction[0] = 0  # an empty slice is never chosen
    image = np.stack([rng.normal(size=truth.shape) + (truth > 0), np.zeros(truth.shape)], -1)
    path = so.overlay_figure(
        str(tmp_path / "figures" / "seg_100.png"), image,
        fine=so.LabelMaps(truth, prediction, FINE),
        coarse=so.LabelMaps(sm.to_coarse(truth, FINE_TO_COARSE),
                            sm.to_coarse(prediction, FINE_TO_COARSE), COARSE),
        step=100, volume_id="patient001_ED", channel="cine", channel_names=("cine", "empty"))
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] >= 5 * 192  # five columns, small slices enlarged
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    # Opaque outlines: every class's colour appears exactly, coarse and fine apart.
    for c in range(1, 4):
        assert so.FINE_COLOURS[c - 1] in colours
    assert so.COARSE_COLOURS[0] in colours
    assert so.COARSE_COLOURS[1] not in colours  # no second superclass
    assert so.choose_slices([so.LabelMaps(truth, prediction, FINE)], 4)[0] >= 1

    fine_only = so.overlay_figure(str(tmp_path / "fine.png"), image[..., 0],
                                  fine=so.LabelMaps(truth, prediction, FINE), slices=[3])
    assert so.COARSE_COLOURS[0] not in {tuple(c) for c in np.asarray(
        Image.open(fine_only).convert("RGB")).reshape(-1, 3)}


def test_overlay_figure_errors(tmp_path):
    labels = np.zeros((2, 8, 8), np.int32)
    fine = so.LabelMaps(labels, labels, FINE)
    image = np.zeros((2, 8, 8, 2))
    with pytest.raises(ValueError, match=".png"):
        so.overlay_figure(str(tmp_path / "x.jpg"), image, fine=fine)
    with pytest.raises(ValueError, match="not among channel_names"):
        so.overlay_figure(str(tmp_path / "x.png"), image, fine=fine, channel="FLAIR",
                          channel_names=("T1", "T2"))
    with pytest.raises(ValueError, match="out of range for an image with 2 channels"):
        so.overlay_figure(str(tmp_path / "x.png"), image, fine=fine, channel=2)
    with pytest.raises(ValueError, match="fine and/or the coarse"):
        so.overlay_figure(str(tmp_path / "x.png"), image)
    with pytest.raises(ValueError, match="fine prediction has shape"):
        so.overlay_figure(str(tmp_path / "x.png"), image,
                          fine=so.LabelMaps(labels, labels[:1], FINE))
    with pytest.raises(ValueError, match="holds label 5 but only 4 fine class names"):
        so.overlay_figure(str(tmp_path / "x.png"), image,
                          fine=so.LabelMaps(labels + 5, labels, FINE))
    with pytest.raises(ValueError, match="slices must be"):
        so.overlay_figure(str(tmp_path / "x.png"), image, fine=fine, slices=[2])
