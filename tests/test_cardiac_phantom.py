"""Cardiac cine-MRI phantom: determinism, anatomy (classes, a thin myocardium,
ES smaller than ED), stored spacing, the acdc builder's record layout, and the
per-patient split of its rendered shards."""

import cv2
import numpy as np
import pytest

from input_pipeline import cardiac_phantom as cp
from input_pipeline import records, sources
from input_pipeline.builders import acdc

SIZE = 192
PATIENTS = 10


@pytest.fixture(scope="module")
def rendered():
    """{index: (image, meta, extras)} of every record of PATIENTS patients."""
    return {i: cp.render_cardiac(i, 0, SIZE) for i in range(PATIENTS * cp.RECORDS_PER_PATIENT)}


def _record(patient, phase, slice_index):
    return (patient * len(cp.PHASES) + phase) * cp.SLICES + slice_index


def test_rendering_is_deterministic_by_seed():
    a, b = cp.render_cardiac(21, 3, SIZE), cp.render_cardiac(21, 3, SIZE)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2]["mask"], b[2]["mask"])
    assert a[1] == b[1]
    other = cp.render_cardiac(21, 4, SIZE)
    assert not np.array_equal(a[0], other[0])
    assert a[0].dtype == np.uint16 and a[0].shape == (SIZE, SIZE)
    assert a[2]["mask"].dtype == np.uint8 and a[2]["mask"].shape == (SIZE, SIZE)


def test_record_layout_matches_the_acdc_builder(rendered):
    image, meta, extras = rendered[_record(2, 1, 3)]
    assert set(extras) == {"mask"}
    assert meta["classes"] == acdc.CLASSES and meta["superclass"] == acdc.SUPERCLASS
    assert meta["group"] in acdc.GROUPS and meta["group_id"] == acdc.GROUPS.index(meta["group"])
    assert meta["patient"] == "cardiac-0002" and meta["phase"] == "ES"
    assert meta["source_index"] == {"slice": 3} and meta["bits_stored"] == 16
    assert meta["frame"] > 1  # ES frame number; ED is frame 1
    assert rendered[_record(2, 0, 3)][1]["frame"] == 1
    spacing = cp.FIELD_OF_VIEW_MM / SIZE
    assert meta["spacing"] == [spacing, spacing]
    assert 5 <= meta["slice_thickness"] <= meta["slice_spacing"] <= 12


def test_every_class_is_present_and_the_rv_ends_before_the_apex(rendered):
    for patient in range(PATIENTS):
        mid = rendered[_record(patient, 0, 2)][2]["mask"]
        assert set(np.unique(mid)) == {0, 1, 2, 3}, patient
        apex = rendered[_record(patient, 0, cp.SLICES - 1)][2]["mask"]
        assert 1 not in apex and 2 in apex, patient  # the RV is shorter than the LV


def _thickness_px(myocardium: np.ndarray) -> float:
    """Median wall thickness: twice the distance to the border along the wall's
    centre line (the ridge of the distance transform)."""
    dist = cv2.distanceTransform(myocardium.astype(np.uint8), cv2.DIST_L2, 5)
    ridge = (dist >= cv2.dilate(dist, np.ones((3, 3), np.uint8))) & (dist > 0)
    return float(2 * np.median(dist[ridge]))


def test_myocardium_is_a_few_pixels_thin(rendered):
    thickness = [
        _thickness_px(rendered[_record(p, phase, 3)][2]["mask"] == 2)
        for p in range(PATIENTS)
        for phase in (0, 1)
    ]
    # A few stored pixels, and at a 128 px model size less than one 16 px patch.
    assert 2 <= np.median(thickness) <= 9, thickness
    assert max(thickness) * 128 / SIZE < 16, thickness


def test_end_systole_is_smaller_than_end_diastole(rendered):
    for patient in range(PATIENTS):

        def volume(phase, label, patient=patient):
            return sum(
                int((rendered[_record(patient, phase, k)][2]["mask"] == label).sum())
                for k in range(cp.SLICES)
            )

        assert volume(1, 3) < 0.85 * volume(0, 3), patient  # LV cavity
        assert volume(1, 1) < volume(0, 1), patient  # RV cavity
        # The muscle keeps its volume (it thickens as the cavity shrinks).
        assert volume(1, 2) == pytest.approx(volume(0, 2), rel=0.2), patient


def test_patients_differ_and_contrast_matches_cine_mri(rendered):
    groups = {rendered[_record(p, 0, 0)][1]["group"] for p in range(PATIENTS)}
    assert len(groups) >= 3
    lv_sizes = [int((rendered[_record(p, 0, 2)][2]["mask"] == 3).sum()) for p in range(PATIENTS)]
    assert max(lv_sizes) > 1.5 * min(lv_sizes)
    image, _, extras = rendered[_record(0, 0, 2)]
    mask = extras["mask"]
    blood, muscle = image[mask == 3].mean(), image[mask == 2].mean()
    # bSSFP: bright blood, dark myocardium (the thin wall takes some blood by partial volume)
    assert blood > 1.6 * muscle


def test_render_speed():
    import time

    cp.render_cardiac(0, 0, SIZE)
    start = time.perf_counter()
    for i in range(100):
        cp.render_cardiac(i, 1, SIZE)
    assert time.perf_counter() - start < 3.0  # ~0.2 s on one core


def test_rendered_shards_hold_masks_and_split_by_patient(data_dir):
    cfg = dict(source="cardiac_phantom", dir=str(data_dir), phantom_num_images=8 * 16,
               phantom_size=96, phantom_seed=0, phantom_split=(0.5, 0.25, 0.25))
    from types import SimpleNamespace

    cfg = SimpleNamespace(**cfg)
    full = sources.resolve(cfg, None)
    assert len(full) == 8 * 16
    image, meta, extras = full.decoder.decode_with_extras(full.raw(0))
    assert image.shape == (96, 96) and extras["mask"].shape == (96, 96)
    patients = {}
    for split in sources.SPLITS:
        src = sources.resolve(cfg, split)
        patients[split] = {src.meta(i)["patient"] for i in range(len(src))}
        assert len(src) == 16 * len(patients[split])  # whole patients
    assert [len(patients[s]) for s in sources.SPLITS] == [4, 2, 2]
    assert not (patients["train"] & patients["val"]) and not (patients["val"] & patients["test"])
    assert not (patients["train"] & patients["test"])
    # The records round-trip through the shard writer with their masks.
    encoded = records.encode_record(image, meta, extras)
    assert records.decode_record_with_extras(encoded)[2]["mask"].tolist() == extras["mask"].tolist()
