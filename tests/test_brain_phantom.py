"""Brain-tumour MRI phantom: determinism, BraTS's record layout (four sequences,
file labels 1 / 2 / 4), every subregion's contrast per sequence, and speed."""

import time

import numpy as np
import pytest

from input_pipeline import brain_phantom as bp
from input_pipeline.builders import brats

SIZE = 192
PATIENTS = 8
FLAIR, T1, T1CE, T2 = range(4)


@pytest.fixture(scope="module")
def rendered():
    return [bp.render_brain(i, 0, SIZE) for i in range(PATIENTS * bp.RECORDS_PER_PATIENT)]


def test_rendering_is_deterministic_by_seed():
    a, b = bp.render_brain(13, 2, SIZE), bp.render_brain(13, 2, SIZE)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2]["mask"], b[2]["mask"])
    assert a[1] == b[1]
    assert not np.array_equal(a[0], bp.render_brain(13, 3, SIZE)[0])


def test_record_layout_matches_the_brats_builder(rendered):
    image, meta, extras = rendered[3]
    assert image.shape == (4, SIZE, SIZE) and image.dtype == np.uint16
    assert meta["channels"] == list(brats.MODALITIES)
    assert meta["classes"] == brats.CLASSES and meta["superclass"] == brats.SUPERCLASS
    assert meta["regions"] == brats.REGIONS
    assert meta["patient"] == "brain-0000" and meta["source_index"] == {"slice": 3}
    spacing = bp.FIELD_OF_VIEW_MM / SIZE
    assert meta["spacing"] == [spacing, spacing] and 4 <= meta["slice_spacing"] <= 6
    assert set(extras) == {"mask"} and extras["mask"].dtype == np.uint8


def test_labels_are_brats_file_labels_and_every_subregion_appears(rendered):
    values = set()
    for _, _, extras in rendered:
        values |= set(np.unique(extras["mask"]).tolist())
    assert values == {0, 1, 2, 4}  # 3 unused, as in BraTS files
    for patient in range(PATIENTS):
        masks = [rendered[patient * bp.SLICES + k][2]["mask"] for k in range(bp.SLICES)]
        assert any((m == 2).any() for m in masks) and any((m == 4).any() for m in masks)
    # Slices through the core have all three nested: oedema around rim around core.
    with_core = [e["mask"] for _, _, e in rendered if (e["mask"] == 1).any()]
    assert len(with_core) > 10


def test_subregion_contrasts_per_sequence(rendered):
    """Mean intensity of each region per sequence, pooled over every slice."""
    sums = {}
    for image, _, extras in rendered:
        mask, x = extras["mask"], image.astype(np.float64) / 65535
        brain = x[T1] > 0
        regions = {
            "oedema": mask == 2,
            "enhancing": mask == 4,
            "necrotic": mask == 1,
            "brain": brain & (mask == 0),
        }
        for name, region in regions.items():
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + x[:, region].sum(axis=1), count + region.sum())
    mean = {name: total / count for name, (total, count) in sums.items()}
    # Oedema bright on FLAIR and T2, against normal brain.
    assert mean["oedema"][FLAIR] > 1.4 * mean["brain"][FLAIR]
    assert mean["oedema"][T2] > 1.2 * mean["brain"][T2]
    # Enhancing rim the brightest region on T1ce; the necrotic core dark on T1ce.
    assert mean["enhancing"][T1CE] > 1.3 * max(mean[r][T1CE] for r in ("oedema", "brain"))
    assert mean["necrotic"][T1CE] < 0.5 * mean["enhancing"][T1CE]
    assert mean["necrotic"][T1CE] < mean["brain"][T1CE]
    assert mean["necrotic"][T2] > mean["brain"][T2]


def test_skull_stripped_background_is_exactly_zero(rendered):
    image, _, extras = rendered[4]
    outside = image[1] == 0
    assert outside.mean() > 0.3
    assert (image[:, outside] == 0).all() and (extras["mask"][outside] == 0).all()


def test_render_speed():
    bp.render_brain(0, 0, SIZE)
    start = time.perf_counter()
    for i in range(100):
        bp.render_brain(i, 1, SIZE)
    assert time.perf_counter() - start < 5.0  # ~0.4 s on one core
