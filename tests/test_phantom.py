"""Tests for the procedural mammography phantom (input_pipeline/phantom.py)."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from input_pipeline import phantom as P

REPO = Path(__file__).resolve().parents[1]
SEED = 0


def _one_hot(name):
    return tuple(int(m == name) for m in P.MARGIN_TYPES)


def _find(predicate, size=256, seed=SEED, count=1, limit=400):
    """First ``count`` indices whose (cheap) labels satisfy ``predicate``."""
    found = [i for i in range(limit) if predicate(P.sample_labels(i, seed, size))]
    assert len(found) >= count, "label sampler never produced the requested case"
    return found[:count]


def _disc(shape, labels, r_in, r_out):
    """Annulus around the labelled lesion, radii in units of lesion_radius_px."""
    row, col = labels["lesion_center"]
    radius = labels["lesion_radius_px"]
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    d = np.hypot(yy - row, xx - col)
    return (d >= r_in * radius) & (d < r_out * radius)


def _radial_power_slope(patch):
    """Log-log slope of the radially averaged power spectrum (white noise ~ 0)."""
    n = patch.shape[0]
    p = patch.astype(np.float64) - patch.mean()
    w = np.hanning(n)
    p *= w[:, None] * w[None, :]
    power = np.abs(np.fft.fftshift(np.fft.fft2(p))) ** 2
    yy, xx = np.indices(power.shape)
    r = np.hypot(yy - n // 2, xx - n // 2).astype(int)
    radial = np.bincount(r.ravel(), power.ravel()) / np.bincount(r.ravel())
    f = np.arange(len(radial))
    sel = (f >= 3) & (f <= n // 4)
    return np.polyfit(np.log(f[sel]), np.log(radial[sel]), 1)[0]


# --------------------------------------------------------------------------
# Determinism, dtype, range.
# --------------------------------------------------------------------------


def test_deterministic_and_order_independent():
    a, la = P.render_phantom(3, 7, 128)
    P.render_phantom(4, 7, 128)  # interleaved calls must not matter
    b, lb = P.render_phantom(3, 7, 128)
    assert a.tobytes() == b.tobytes() and la == lb
    c, _ = P.render_phantom(4, 7, 128)
    d, _ = P.render_phantom(3, 8, 128)
    assert a.tobytes() != c.tobytes()
    assert a.tobytes() != d.tobytes()


def test_identical_across_processes():
    img, labels = P.render_phantom(5, 11, 128)
    code = (
        "import hashlib, json; from input_pipeline import phantom as P; "
        "i, l = P.render_phantom(5, 11, 128); "
        "print(hashlib.sha256(i.tobytes()).hexdigest()); print(json.dumps(l, sort_keys=True))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    digest, label_json = out.stdout.strip().splitlines()
    assert digest == hashlib.sha256(img.tobytes()).hexdigest()
    assert label_json == json.dumps(labels, sort_keys=True)


@pytest.mark.parametrize("size", [128, 448])
def test_dtype_shape_range(size):
    img, labels = P.render_phantom(1, SEED, size)
    assert img.dtype == np.uint16 and img.shape == (size, size)
    assert img.max() <= P.MAX_VALUE == 4095
    assert labels["bits_stored"] == 12
    # Uses the 12-bit range: black air and bright tissue.
    assert img.min() < 100 and img.max() > 2500


# --------------------------------------------------------------------------
# Breast anatomy.
# --------------------------------------------------------------------------


def _chest_wall_profile(img):
    """Mean intensity of the outer 8% columns: (left, right)."""
    k = max(img.shape[1] // 12, 2)
    return img[:, :k].mean(), img[:, -k:].mean()


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_breast_silhouette_and_laterality(laterality):
    for index in _find(lambda lab: lab["laterality"] == laterality, count=3):
        img, _ = P.render_phantom(index, SEED, 256)
        left, right = _chest_wall_profile(img)
        chest, nipple_side = (left, right) if laterality == "L" else (right, left)
        assert chest > 400, "tissue should be bright along the chest wall"
        assert nipple_side < 60, "air beyond the nipple should be near zero"
        # Air pixels are near zero, tissue pixels much brighter; a real silhouette.
        air = img < 100
        assert 0.15 < air.mean() < 0.7
        assert np.median(img[~air]) > 1000


def test_pectoral_muscle_only_on_mlo():
    for view, expect_bright in (("MLO", True), ("CC", False)):
        for index in _find(lambda lab, v=view: lab["view"] == v, count=3):
            img, labels = P.render_phantom(index, SEED, 256)
            corner = img[:8, :8] if labels["laterality"] == "L" else img[:8, -8:]
            if expect_bright:
                assert corner.mean() > 1900, (
                    "MLO: dense pectoral muscle fills the upper chest-wall corner"
                )
            else:
                assert corner.mean() < 100, "CC: upper chest-wall corner is air"


def _glandular_window(img, case, n=96):
    """A tissue-only window in the glandular cone (behind the nipple), off the lesion."""
    size = img.shape[0]
    labels = case.labels()
    avoid = 1.5 * labels["lesion_radius_px"] + 0.75 * n  # lesion centre to window centre
    candidates = [(d, o) for d in (0.5, 0.35, 0.65) for o in (0.0, 0.3, -0.3, 0.5, -0.5)]
    for depth, offset in candidates:
        x, y = P._unrotate(depth * case.depth, offset * case.half_height, case.tilt)
        row, col = int(y + case.center_row), int(x)
        if case.laterality == "R":
            col = size - 1 - col
        if np.hypot(row - labels["lesion_center"][0], col - labels["lesion_center"][1]) < avoid:
            continue
        r, c = np.clip(row - n // 2, 0, size - n), np.clip(col - n // 2, 0, size - n)
        window = img[r : r + n, c : c + n]
        if window.min() > 300:
            return window
    raise AssertionError("no tissue-only window found")


@pytest.mark.parametrize("index", [2, 9])
def test_parenchyma_is_power_law_not_white_noise(index):
    img, _ = P.render_phantom(index, SEED, 448)
    patch = _glandular_window(img, P.sample_case(index, SEED, 448))
    assert _radial_power_slope(patch) < -1.5
    assert patch.std() > 100, "texture should not be flat"
    white = np.random.default_rng(0).normal(2000, 200, patch.shape)
    assert _radial_power_slope(white) > -0.5  # the metric itself discriminates


# --------------------------------------------------------------------------
# Labels.
# --------------------------------------------------------------------------


def test_label_consistency():
    for index in range(200):
        labels = P.sample_labels(index, SEED)
        assert json.loads(json.dumps(labels)) == labels  # plain JSON types only
        margins = labels["margins"]
        assert len(margins) == 5 and set(margins) <= {0, 1}
        is_calc = labels["abnormality"] == "calcification"
        assert (sum(margins) == 0) == is_calc
        assert sum(margins) <= 2
        expected = P.PATHOLOGY_CLASSES.index(
            f"{'malignant' if labels['malignant'] else 'benign'}_"
            f"{'calcification' if is_calc else 'mass'}"
        )
        assert labels["pathology"] == expected
        assert labels["laterality"] in ("L", "R") and labels["view"] in ("CC", "MLO")
        row, col = labels["lesion_center"]
        assert 0 <= row < 448 and 0 <= col < 448 and labels["lesion_radius_px"] > 0


def test_sample_labels_match_render():
    for index in range(3):
        _, labels = P.render_phantom(index, SEED, 128)
        assert labels == P.sample_labels(index, SEED, 128)


def test_label_distribution():
    labels = [P.sample_labels(i, 123) for i in range(400)]
    masses = [lab for lab in labels if lab["abnormality"] == "mass"]
    calcs = [lab for lab in labels if lab["abnormality"] == "calcification"]
    assert abs(len(masses) / len(labels) - P.P_MASS) < 0.08
    assert abs(np.mean([lab["malignant"] for lab in calcs]) - P.P_MALIGNANT_CALCIFICATION) < 0.12
    assert 0.4 < np.mean([lab["laterality"] == "L" for lab in labels]) < 0.6
    assert 0.4 < np.mean([lab["view"] == "CC" for lab in labels]) < 0.6
    counts = np.sum([lab["margins"] for lab in masses], axis=0)
    assert (counts > 0).all(), "every margin type occurs"
    assert 0 < sum(sum(lab["margins"]) == 2 for lab in masses) < 0.3 * len(masses)

    def p_malignant(name):
        only = [lab["malignant"] for lab in masses if lab["margins"] == list(_one_hot(name))]
        return np.mean(only)

    # Correlated, not determined: both outcomes occur, ordering follows the prior.
    assert p_malignant("spiculated") > 0.7
    assert p_malignant("circumscribed") < 0.3
    assert 0 < p_malignant("circumscribed") and p_malignant("spiculated") < 1

    # Malignant masses are larger on average.
    def mean_radius(malignant):
        return np.mean([lab["lesion_radius_px"] for lab in masses if lab["malignant"] == malignant])

    assert mean_radius(True) > mean_radius(False)


# --------------------------------------------------------------------------
# Lesion morphology.
# --------------------------------------------------------------------------


def test_mass_is_brighter_than_surroundings():
    for index in _find(lambda lab: lab["abnormality"] == "mass", count=6):
        img, labels = P.render_phantom(index, SEED, 256)
        inside = img[_disc(img.shape, labels, 0.0, 0.7)].mean()
        around = img[_disc(img.shape, labels, 1.6, 2.6)].mean()
        assert inside > around + 150, (index, labels)


def test_calcifications_are_small_bright_specks():
    for index in _find(lambda lab: lab["abnormality"] == "calcification", count=4):
        img, labels = P.render_phantom(index, SEED, 448)
        f = img.astype(np.float32)
        tophat = f - cv2.GaussianBlur(f, (0, 0), 2.0)  # small bright structure only
        cluster = tophat[_disc(img.shape, labels, 0.0, 1.1)]
        around = tophat[_disc(img.shape, labels, 2.0, 4.0)]
        specks = cluster > 500
        assert specks.sum() >= 5, "cluster should contain several bright specks"
        assert (around > 500).mean() < 0.1 * specks.mean(), "specks are concentrated in the cluster"


def _same_case_with_margin(index, margin, size=256):
    case = P.sample_case(index, SEED, size)
    return P.render_case(dataclasses.replace(case, margins=_one_hot(margin))), case.labels()


def _highpass_energy(img, mask, sigma=1.5):
    f = img.astype(np.float32)
    detail = f - cv2.GaussianBlur(f, (0, 0), sigma)
    return float((detail[mask] ** 2).mean())


def _edge_strength(img, mask):
    f = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.7)
    gx, gy = cv2.Sobel(f, cv2.CV_32F, 1, 0), cv2.Sobel(f, cv2.CV_32F, 0, 1)
    return float(np.hypot(gx, gy)[mask].mean())


def _compare_margins(margin_a, margin_b, inner, outer, measure, count=5):
    """Mean `measure` in the annulus [inner, outer] x lesion radius, for the same
    breast and lesion site rendered with two margin types."""
    a_values, b_values = [], []
    for index in _find(lambda lab: lab["abnormality"] == "mass", count=count):
        a, labels = _same_case_with_margin(index, margin_a)
        b, _ = _same_case_with_margin(index, margin_b)
        ring = _disc(a.shape, labels, inner, outer)
        a_values.append(measure(a, ring))
        b_values.append(measure(b, ring))
    return np.mean(a_values), np.mean(b_values)


def test_spiculated_has_more_fine_structure_around_the_core():
    # Only the margin differs: spicules add thin high-frequency structure
    # in the annulus around the core.
    spic, circ = _compare_margins("spiculated", "circumscribed", 1.1, 2.3, _highpass_energy)
    assert spic > 1.2 * circ


def test_ill_defined_boundary_is_blurred():
    sharp, blurred = _compare_margins("circumscribed", "ill_defined", 0.8, 1.2, _edge_strength)
    assert sharp > 1.3 * blurred


def test_microlobulated_outline_undulates():
    # The outline model itself: high angular harmonics carry the lobules.
    theta = np.linspace(0, 2 * np.pi, 1024, endpoint=False)

    def high_harmonic_energy(margin):
        rng = np.random.default_rng(0)
        radius = P._mass_boundary(
            rng, 15.0, dict(zip(P.MARGIN_TYPES, _one_hot(margin), strict=True)), 1.0
        )(theta)
        spectrum = np.abs(np.fft.rfft(radius / radius.mean())) ** 2
        return spectrum[8:40].sum()

    assert high_harmonic_energy("microlobulated") > 20 * high_harmonic_energy("circumscribed")


def test_obscured_mass_is_partly_covered():
    # Same case rendered obscured vs circumscribed: the difference is overlapping
    # tissue on one side only.
    for index in _find(lambda lab: lab["abnormality"] == "mass", count=4):
        a, labels = _same_case_with_margin(index, "obscured")
        b, _ = _same_case_with_margin(index, "circumscribed")
        diff = a.astype(np.float32) - b.astype(np.float32)
        row, col = labels["lesion_center"]
        ring = _disc(a.shape, labels, 1.1, 1.8)
        yy, xx = np.nonzero(ring)
        angles = np.arctan2(yy - row, xx - col)
        starts = np.linspace(-np.pi, np.pi, 8, endpoint=False)
        sectors = [diff[yy, xx][(angles >= s) & (angles < s + np.pi / 4)].mean() for s in starts]
        assert max(sectors) > 150, "overlapping tissue brightens one side"
        assert min(sectors) < 0.35 * max(sectors), "...but not all sides"


def test_same_anatomy_across_resolutions():
    # Textures are drawn on a shared frequency grid, so a 224 render is close to
    # a downsampled 448 render of the same (seed, index).
    big, big_labels = P.render_phantom(9, SEED, 448)
    small, small_labels = P.render_phantom(9, SEED, 224)
    down = cv2.resize(big.astype(np.float32), (224, 224), interpolation=cv2.INTER_AREA)
    tissue = down > 300  # compare texture, not just the silhouette
    assert np.corrcoef(down[tissue], small[tissue].astype(np.float32))[0, 1] > 0.95
    assert big_labels["pathology"] == small_labels["pathology"]
    assert np.allclose(
        np.array(big_labels["lesion_center"]) / 2, small_labels["lesion_center"], atol=1.5
    )
