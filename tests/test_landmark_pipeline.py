"""The landmark pipeline: points travel with the image through the training affine,
mirroring is refused without a declared left/right mapping, few-label subsets are
nested, evaluation rows map back to the ORIGINAL pixels (through the ingestion's
resize-and-pad and the eval placement) with the right millimetres, and bad records get
errors that name them."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from input_pipeline import geometry, landmarks, records
from input_pipeline.landmarks import LandmarkDataError

L = 3


def _image_with_dots(shape, points, value=4000):
    """A uint16 image, dark, with a bright 3x3 square at each (rounded) point."""
    image = np.full(shape, 200, np.uint16)
    for x, y in np.round(points).astype(int):
        image[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = value
    return image


def _write_split(root, split, rows):
    records.write_shards(rows, str(root / split), "lm", 1, overwrite=True)


def _rows(rng, count, *, shape=(48, 64), spacing=(0.5, 0.25), geometry_json=None, **meta):
    rows = []
    for i in range(count):
        # Well apart (a dot is found as the brightest pixel near its point), jittered.
        anchors = np.array([[0.2, 0.25], [0.75, 0.35], [0.45, 0.75]]) * [shape[1], shape[0]]
        points = anchors + rng.uniform(-3, 3, (L, 2))
        row_meta = {"landmarks": points.round(3).tolist(), "bits_stored": 12,
                    "source_id": f"img{i}", **meta}
        if spacing is not None:
            row_meta["spacing"] = list(spacing)
        if geometry_json is not None:
            row_meta["geometry"] = geometry_json
        rows.append((_image_with_dots(shape, points), row_meta))
    return rows


@pytest.fixture
def prepared(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4), ("test", 5)):
        _write_split(tmp_path, split, _rows(rng, count))
    return tmp_path


def _cfg(root, **overrides):
    c = ConfigDict(landmarks.default_landmark_data_config().to_dict())
    c.source, c.dir, c.num_landmarks, c.image_size = "prepared", str(root), L, 32
    c.norm_mean, c.norm_std, c.num_workers = 0.0, 1.0, 0
    c.gamma, c.contrast, c.brightness, c.noise_std = (1.0, 1.0), (1.0, 1.0), 0.0, 0.0
    c.update(overrides)
    return c


def _peak_error(row):
    """Distance from each returned point to the brightest pixel near it (the dot)."""
    image = row["image"][..., 0]
    errors = []
    for x, y in row["landmarks"]:
        xi, yi = int(round(x)), int(round(y))
        window = image[max(yi - 3, 0):yi + 4, max(xi - 3, 0):xi + 4]
        wy, wx = np.unravel_index(np.argmax(window), window.shape)
        errors.append(np.hypot(max(xi - 3, 0) + wx - x, max(yi - 3, 0) + wy - y))
    return np.array(errors)


def test_training_rows_move_points_with_the_image(prepared):
    cfg = _cfg(prepared, zoom=(0.9, 1.2), rotate_degrees=20.0, translate=0.05)
    plan = landmarks.plan_training(cfg, global_batch_size=4)
    augment = landmarks.LandmarkAugment(plan.reader, cfg, 32)
    for seed in range(6):
        row = augment.random_map(seed % 12, np.random.default_rng(seed))
        assert row["image"].shape == (32, 32, 1) and row["landmarks"].shape == (L, 2)
        inside = row["landmark_valid"]
        # The dots (3 source px, ~1.5 output px) stay under their points.
        assert np.all(_peak_error(row)[inside] <= 1.5)


def test_train_batches_have_the_objectives_keys(prepared):
    dataset = landmarks.make_landmark_train_dataset(_cfg(prepared), global_batch_size=4, seed=0,
                                                    image_size=32)
    batch = next(iter(dataset))
    assert batch["image"].shape == (4, 32, 32, 1)
    assert batch["landmarks"].shape == (4, L, 2) and batch["landmark_valid"].shape == (4, L)


def test_mirroring_needs_declared_pairs_and_swaps_them(prepared):
    with pytest.raises(LandmarkDataError, match="flip_pairs"):
        landmarks.flip_permutation(_cfg(prepared, hflip=True))
    cfg = _cfg(prepared, hflip=True, flip_pairs=((0, 2),))
    assert landmarks.flip_permutation(cfg).tolist() == [2, 1, 0]
    plan = landmarks.plan_training(cfg, global_batch_size=4)
    augment = landmarks.LandmarkAugment(plan.reader, cfg, 32)
    record = plan.reader(0)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        matrix = geometry.sample_affine(record.image.shape[:2], 32, np.random.default_rng(seed),
                                        augment.affine)
        row = augment.random_map(0, rng)
        expected = geometry.transform_points(record.points, matrix)
        if np.linalg.det(matrix[:, :2]) < 0:
            expected = expected[[2, 1, 0]]
        np.testing.assert_allclose(row["landmarks"], expected, atol=1e-4)
    with pytest.raises(LandmarkDataError, match="different landmark indices"):
        landmarks.flip_permutation(_cfg(prepared, hflip=True, flip_pairs=((0, 0),)))


def test_label_subsets_are_nested_and_seeded(prepared):
    cfg = _cfg(prepared)
    full = landmarks.labelled_records(100, cfg)
    quarter = landmarks.labelled_records(100, _cfg(prepared, label_fraction=0.25))
    tenth = landmarks.labelled_records(100, _cfg(prepared, label_fraction=0.1))
    assert len(full) == 100 and len(quarter) == 25 and len(tenth) == 10
    assert set(tenth) <= set(quarter)
    other = landmarks.labelled_records(100, _cfg(prepared, label_fraction=0.1, label_seed=1))
    assert set(other) != set(tenth)
    assert len(landmarks.labelled_records(100, _cfg(prepared, num_labelled=7))) == 7
    with pytest.raises(LandmarkDataError, match="one of"):
        landmarks.labelled_records(100, _cfg(prepared, num_labelled=7, label_fraction=0.5))
    with pytest.raises(LandmarkDataError, match="label_fraction"):
        landmarks.labelled_records(100, _cfg(prepared, label_fraction=1.5))


def test_eval_rows_map_back_to_original_pixels_and_millimetres(tmp_path):
    """Records as the ingestion writes them: a 100 x 60 (H x W) original resized to 40 x 24
    and padded to 40 x 40, points and spacing in stored pixels."""
    rng = np.random.default_rng(1)
    original = np.stack([rng.uniform(5, 55, (4, L)), rng.uniform(5, 95, (4, L))], -1)
    g = {"source_shape": [100, 60], "resized_shape": [40, 24], "pad": [0, 8],
         "output_shape": [40, 40], "scale": 0.4}
    to_stored, shape = landmarks.stored_geometry({"geometry": g}, (40, 40))
    assert shape == (100, 60)
    rows = []
    for i in range(4):
        stored = geometry.transform_points(original[i], to_stored)
        meta = {"landmarks": stored.tolist(), "geometry": g, "spacing": [0.25, 0.25],
                "source_id": f"p{i}"}
        rows.append((_image_with_dots((40, 40), stored), meta))
    for split in ("val",):
        _write_split(tmp_path, split, rows)
    data = landmarks.LandmarkEvalSet(_cfg(tmp_path), "val", image_size=32, batch_size=3)
    np.testing.assert_allclose(data.truth, original, atol=1e-9)
    # An original pixel is 0.4 stored pixels: 0.25 mm / 2.5 = 0.1 mm.
    np.testing.assert_allclose(data.record_spacing, 0.1)
    assert data.names[0] == "val/p0"
    back = [geometry.transform_points(data.truth[i], data.matrices[i]) for i in range(4)]
    from mimjax.evaluators import landmark_decoding
    np.testing.assert_allclose(landmark_decoding.to_original(np.stack(back),
                                                             data.geometries()), original)
    batches = list(data)
    assert [b["valid"].sum() for b in batches] == [3, 1] and batches[1]["image"].shape[0] == 3


def test_eval_spacing_modes(prepared):
    from mimjax.evaluators.landmark_eval import spacing_of

    def spacing(**overrides):
        cfg = _cfg(prepared, **overrides)
        return spacing_of(landmarks.LandmarkEvalSet(cfg, "test", image_size=32, batch_size=4),
                          cfg)

    record = spacing()
    assert record.unit == "mm"
    np.testing.assert_allclose(record.values, [[0.5, 0.25]] * 5)
    data = landmarks.LandmarkEvalSet(_cfg(prepared), "test", image_size=32, batch_size=4)
    d = np.linalg.norm(data.truth[:, 0] - data.truth[:, 2], axis=-1)
    np.testing.assert_allclose(spacing(spacing="hand_wrist", wrist_landmarks=(0, 2)).values[:, 0],
                               50.0 / d)
    chest = spacing(spacing="chest")
    assert chest.unit == "px@512x512"
    np.testing.assert_allclose(chest.values[0], [512 / 48, 512 / 64])
    assert spacing(spacing="pixels") is None
    with pytest.raises(LandmarkDataError, match="data.spacing must be one of"):
        spacing(spacing="inches")


@pytest.mark.parametrize("meta, match", [
    ({"landmarks": [[5.0, 5.0]] * (L - 1)}, "has 2 landmarks, the config 3"),
    # JSON has no NaN: a missing coordinate is null.
    ({"landmarks": [[5.0, 5.0], [None, 3.0], [4.0, 4.0]]}, "landmark 1.*not finite"),
    ({"landmarks": [[5.0, 5.0], [70.0, 3.0], [4.0, 4.0]]}, "landmark 1.*outside the 64 x 48"),
    ({}, "has no meta\\['landmarks'\\]"),
])
def test_bad_records_are_named(tmp_path, meta, match):
    rng = np.random.default_rng(2)
    rows = _rows(rng, 4)
    image, good = rows[2]
    rows[2] = (image, {**{k: v for k, v in good.items() if k != "landmarks"}, **meta})
    _write_split(tmp_path, "train", rows)
    with pytest.raises(LandmarkDataError, match=match) as error:
        landmarks.plan_training(_cfg(tmp_path), global_batch_size=2)
    assert "record 2 (train/img2)" in str(error.value)


def test_missing_spacing_says_what_to_set(tmp_path):
    _write_split(tmp_path, "train", _rows(np.random.default_rng(3), 4, spacing=None))
    with pytest.raises(LandmarkDataError, match="data.spacing='hand_wrist'"):
        landmarks.plan_training(_cfg(tmp_path), global_batch_size=2)
    landmarks.plan_training(_cfg(tmp_path, spacing="pixels"), global_batch_size=2)
