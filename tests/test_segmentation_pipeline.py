"""Segmentation data: joint geometry (image, masks and points), HierarchicalMix,
per-patient fine subsets and the two-stream batches, determinism and resume,
evaluation volumes, paper-scale layouts (label mapping, patient re-split) and
the bad-input errors.

The cardiac phantom (small: 96 px, 10 patients) supplies realistic slices; a
tiny prepared tree written here supplies exact, hand-made masks.
"""

import gc
import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from input_pipeline import geometry, hierarchical_mix, records, segmentation, segmentation_eval
from input_pipeline import segmentation_records as seg_records
from input_pipeline.segmentation_records import SegmentationDataError

from helpers import assert_batches_equal, take

PATIENTS = 10
SIZE = 64  # model side
BATCH = 8


@pytest.fixture
def cfg(data_dir):
    c = segmentation.default_segmentation_data_config()
    c.update(dir=str(data_dir), phantom_num_images=PATIENTS * 16, phantom_size=96,
             phantom_split=(0.6, 0.2, 0.2), image_size=SIZE, num_workers=0, num_threads=1)
    c.fine_label_patients = 2
    c.labeled_per_batch = 3
    return c


def _train(c, workers=0, **kw):
    c = c.copy_and_resolve_references()
    c.num_workers = workers
    return segmentation.make_segmentation_train_dataset(
        c, **{"global_batch_size": BATCH, "seed": 0, **kw})


def _quiet(c):
    """No intensity augmentation, [0, 1] intensities kept (fixed normalisation)."""
    c.update(gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=0.0, noise_std=0.0,
             intensity_norm="fixed", norm_mean=0.0, norm_std=1.0)
    return c


# ----------------------------------------------------------- a prepared tree
LEVEL = {0: 6000, 1: 21000, 2: 36000, 3: 51000}  # stored intensity of each class


def _slice_mask(rng, shape, values=(1, 2, 3)):
    """Nested, off-centre, asymmetric blobs: a flip or a rotation would show."""
    size = min(shape)
    mask = np.zeros(shape, np.uint8)
    top, left = (int(v) for v in rng.integers(4, size // 3, size=2))
    h, w = (int(v) for v in rng.integers(size // 3, size // 2, size=2))
    mask[top:top + h, left:left + w] = values[0]
    mask[top + 3:top + h - 3, left + 3:left + w // 2] = values[1]
    mask[top + 5:top + h - 5, left + 4:left + 8] = values[2]
    return mask


def write_tree(root, *, patients=None, slices=4, shape=(48, 48), mask_values=(1, 2, 3),
               classes=("background", "rv", "myocardium", "lv"), edit=None):
    """tools/prepare_data.py's layout (root/train, root/val) with ACDC-like
    records: image = LEVEL of each pixel's class, mask "mask", meta as ingested.
    `edit(split, patient, slice, image, meta, extras)` may change a record."""
    patients = patients or {"train": 6, "val": 2}
    rng = np.random.default_rng(0)
    number = 0
    for split, count in patients.items():
        rows = []
        for _ in range(count):
            patient = f"p{number:03d}"
            number += 1
            for k in range(slices):
                mask = _slice_mask(rng, shape, mask_values)
                lut = dict(zip((0, *mask_values), LEVEL.values()))
                image = np.vectorize(lut.get)(mask).astype(np.uint16)
                meta = {"patient": patient, "phase": "ED", "source_index": {"slice": k},
                        "spacing": [1.5, 1.25], "bits_stored": 16, "slice_spacing": 10.0,
                        "classes": classes if not isinstance(classes, dict) else dict(classes)}
                extras = {"mask": mask}
                if edit is not None:
                    edit(split, patient, k, image, meta, extras)
                rows.append((image, meta, extras))
        records.write_shards(rows, str(root / split), "data", 2)
    return str(root)


def tree_cfg(root, **overrides):
    c = segmentation.default_segmentation_data_config()
    c.update(**{"source": "prepared", "dir": root, "image_size": 32, "num_workers": 0,
                "num_threads": 1, "labeled_per_batch": 2, **overrides})
    return c


# ------------------------------------------------------------------ geometry


def test_a_marked_point_moves_with_the_image_and_its_mask():
    rng = np.random.default_rng(0)
    augment = geometry.AffineAugment(zoom=(0.7, 1.4), rotate_degrees=40, translate=0.15,
                                     hflip=True, vflip=True)
    for shape in ((90, 120), (120, 90), (100, 100)):
        for _ in range(10):
            point = np.array([[rng.uniform(20, shape[1] - 20), rng.uniform(20, shape[0] - 20)]])
            image = np.zeros((*shape, 3), np.float32)
            col, row = (int(round(v)) for v in point[0])
            image[row - 1:row + 2, col - 1:col + 2] = (1.0, 0.5, 0.25)
            mask = np.zeros(shape, np.uint8)
            mask[row - 1:row + 2, col - 1:col + 2] = 7
            point = np.array([[col, row]], np.float64)  # the spot's centre
            matrix = geometry.sample_affine(shape, 64, rng, augment)
            moved = geometry.transform_points(point, matrix)[0]
            if not (3 <= moved[0] <= 60 and 3 <= moved[1] <= 60):
                continue  # moved out of view
            out = geometry.warp_image(image, matrix, 64)
            assert out.shape == (64, 64, 3)
            ys, xs = np.nonzero(out[..., 0] > 0.05)
            weights = out[ys, xs, 0]
            centroid = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)])
            np.testing.assert_allclose(centroid, moved, atol=0.75)
            np.testing.assert_allclose(out[ys, xs, 1] / out[ys, xs, 0], 0.5, rtol=1e-4)
            sample = geometry.warp_sample(matrix, 64, image=image, masks={"m": mask},
                                          points=point)
            np.testing.assert_array_equal(sample["image"], out)
            np.testing.assert_array_equal(sample["points"][0], moved)
            warped = sample["masks"]["m"]
            assert set(np.unique(warped)) <= {0, 7}  # labels are never blended
            ys, xs = np.nonzero(warped)
            if len(xs):
                np.testing.assert_allclose([xs.mean(), ys.mean()], moved, atol=1.5)


def test_fit_is_centred_aspect_preserving_and_invertible():
    matrix = geometry.fit_matrix((50, 100), 64)
    corners = np.array([[-0.5, -0.5], [99.5, 49.5]])  # outer pixel edges
    np.testing.assert_allclose(geometry.transform_points(corners, matrix), [[-0.5, 15.5],
                                                                          [63.5, 47.5]])
    assert geometry.scale_of(matrix) == pytest.approx(0.64)
    back = geometry.transform_points(geometry.transform_points(corners, matrix),
                                     geometry.invert(matrix))
    np.testing.assert_allclose(back, corners, atol=1e-9)
    image = np.ones((50, 100), np.float32)
    out = geometry.warp_image(image, matrix, 64)
    assert out[:15].max() == 0 and out[48:].max() == 0 and out[17:46].min() > 0.99
    # Switched-off augmentation is the fit itself.
    off = geometry.sample_affine((50, 100), 64, np.random.default_rng(1), geometry.AffineAugment())
    np.testing.assert_allclose(off, matrix)


def test_shrinking_averages_thin_structures_instead_of_skipping_them():
    image = np.zeros((192, 192), np.float32)
    image[:, 96:98] = 1.0  # a 2 px line
    out = geometry.warp_image(image, geometry.fit_matrix(image.shape, 48), 48)
    assert out.sum(axis=1).min() == pytest.approx(0.5, abs=0.05)  # 2 px / 4 per output px


# ---------------------------------------------------------- HierarchicalMix


def _target_and_donor():
    image = np.full((40, 50, 2), 0.2, np.float32)
    image[..., 1] = 0.4
    coarse = np.zeros((40, 50), np.int32)
    coarse[10:30, 12:40] = 1
    coarse[10:15, 12:20] = 0  # a notch: the paste must avoid it
    donor = np.full((30, 30, 2), 0.9, np.float32)
    fine = np.zeros((30, 30), np.int32)
    fine[5:25, 6:20] = 1
    fine[8:22, 9:14] = 2
    fine[10:20, 15:19] = 3
    return image, coarse, donor, fine


def test_mix_pastes_inside_the_target_superclass_and_blends_there():
    image, coarse, donor, fine = _target_and_donor()
    mixed = hierarchical_mix.hierarchical_mix(image, coarse, donor, fine, alpha=0.7,
                                              fine_to_coarse=(0, 1, 1, 1))
    pasted = mixed.label > 0
    assert mixed.alpha == 0.7 and pasted.any()
    assert (coarse[pasted] == 1).all()  # only inside the target's superclass
    assert set(np.unique(mixed.label[pasted])) == {1, 2, 3}
    ys, xs = np.nonzero(pasted)  # the donor's box fills the target's box
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (10, 30, 12, 40)
    np.testing.assert_array_equal(mixed.image[~pasted], image[~pasted])  # untouched outside
    expected = 0.3 * image[pasted] + 0.7 * 0.9  # (1 - alpha) target + alpha donor
    np.testing.assert_allclose(mixed.image[pasted], expected, rtol=1e-6)


def test_mix_keeps_a_subclass_only_inside_its_own_superclass():
    image, coarse, donor, fine = _target_and_donor()
    coarse[10:30, 26:40] = 2  # right half of the target is superclass 2
    mixed = hierarchical_mix.hierarchical_mix(image, coarse, donor, fine, alpha=1.0,
                                              fine_to_coarse=(0, 1, 1, 2))
    assert (coarse[mixed.label == 3] == 2).all() and (coarse[mixed.label == 1] == 1).all()
    assert (mixed.label == 3).any()


def test_no_box_means_no_mix():
    image, coarse, donor, fine = _target_and_donor()
    for c, f in ((coarse, np.zeros_like(fine)), (np.zeros_like(coarse), fine)):
        mixed = hierarchical_mix.hierarchical_mix(image, c, donor, f, alpha=0.8,
                                                  fine_to_coarse=(0, 1, 1, 1))
        assert mixed.alpha == 0 and not mixed.label.any()
        np.testing.assert_array_equal(mixed.image, image)


def test_alpha_is_one_of_half_to_one_in_tenths():
    rng = np.random.default_rng(0)
    draws = {hierarchical_mix.sample_alpha(rng) for _ in range(300)}
    assert draws == {0.5, 0.6, 0.7, 0.8, 0.9, 1.0}


# -------------------------------------------------------------- fine subsets


def test_fine_patients_by_count_or_fraction_deterministic_and_nested():
    names = [f"p{i:02d}" for i in range(12)]
    pick = seg_records.select_fine_patients
    assert pick(names, 3, 0) == pick(list(reversed(names)), 3, 0)  # order-free
    assert len(pick(names, 3, 0)) == 3 and len(pick(names, 0.25, 0)) == 3
    assert len(pick(names, 0.01, 0)) == 1 and pick(names, None, 0) == names
    assert set(pick(names, 2, 0)) <= set(pick(names, 5, 0))  # a smaller count is a subset
    assert any(pick(names, 3, s) != pick(names, 3, 0) for s in range(1, 5))
    for bad in (13, -1, 1.5, "3", True):
        with pytest.raises(SegmentationDataError, match="fine_label_patients"):
            pick(names, bad, 0)


def test_every_batch_has_its_labelled_rows_from_the_chosen_patients(cfg):
    plan = segmentation.plan_training(cfg, global_batch_size=BATCH)
    assert len(plan.subset.patients) == 2 and plan.labelled_rows == 3
    chosen = set(plan.subset.patients)
    assert set(plan.index.patients[plan.subset.labelled]) == chosen
    again = segmentation.plan_training(cfg, global_batch_size=BATCH)
    assert again.subset.patients == plan.subset.patients  # deterministic
    cfg.fine_label_seed = 1
    others = [segmentation.plan_training(cfg, global_batch_size=BATCH).subset.patients]
    assert others[0] != plan.subset.patients
    cfg.fine_label_seed = 0
    it = iter(_train(cfg))
    seen = set()
    epoch = -(-len(plan.subset.unlabelled) // (BATCH - 3))  # batches per coarse-only epoch
    for batch in take(it, epoch):
        np.testing.assert_array_equal(batch["has_fine"], np.arange(BATCH) < 3)
        patients = plan.index.patients[batch["index"]]
        assert set(patients[:3]) <= chosen and not set(patients[3:]) & chosen
        assert not batch["label_fine"][3:].any()  # coarse-only rows carry no fine labels
        assert batch["label_fine"][:3].max() == 3
        seen |= set(batch["index"].tolist())
    # One epoch of the coarse-only stream reads each of its records.
    assert set(plan.subset.unlabelled) <= seen
    it.close()
    # A task that planned already (to log the split) hands the plan over: same batches.
    assert_batches_equal(take(iter(_train(cfg, plan=plan)), 2), take(iter(_train(cfg)), 2))


def test_full_supervision_and_superclass_only(cfg):
    cfg.fine_label_patients = None  # every patient labelled: every row
    batch = take(iter(_train(cfg)), 1)[0]
    assert batch["has_fine"].all() and not batch["mix_alpha"].any()
    cfg.update(fine_label_patients=0, labeled_per_batch=0)
    batch = take(iter(_train(cfg)), 1)[0]
    assert not batch["has_fine"].any() and not batch["mix_alpha"].any()
    assert batch["label_coarse"].any()
    # The few fine patients and nothing else: every row from them, all labelled.
    cfg.update(fine_label_patients=2, labeled_per_batch=None, use_coarse_only=False)
    plan = segmentation.plan_training(cfg, global_batch_size=BATCH)
    assert len(plan.subset.unlabelled) == 0 and plan.labelled_rows == BATCH
    batch = take(iter(_train(cfg)), 1)[0]
    assert batch["has_fine"].all() and not batch["mix_alpha"].any()
    assert set(plan.index.patients[batch["index"]]) <= set(plan.subset.patients)


# ---------------------------------------------------------------- batches


def test_batch_format(cfg):
    batch = take(iter(_train(cfg)), 1)[0]
    expected = {
        "image": ((BATCH, SIZE, SIZE, 1), np.float32),
        "label_fine": ((BATCH, SIZE, SIZE), np.int32),
        "label_coarse": ((BATCH, SIZE, SIZE), np.int32),
        "has_fine": ((BATCH,), np.bool_),
        "mixed_image": ((BATCH, SIZE, SIZE, 1), np.float32),
        "mixed_label": ((BATCH, SIZE, SIZE), np.int32),
        "mix_alpha": ((BATCH,), np.float32),
        "index": ((BATCH,), np.int32),
        "example_id": ((BATCH,), np.uint32),
    }
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    # Per-image z-score (the default): mean 0, std 1 before the intensity augmentation.
    assert abs(batch["image"].mean()) < 0.3 and 0.7 < batch["image"].std() < 1.3
    assert set(np.unique(batch["label_coarse"])) == {0, 1}
    np.testing.assert_array_equal(  # coarse = fine's superclass on labelled rows
        batch["label_coarse"][:3], (batch["label_fine"][:3] > 0).astype(np.int32))


def test_joint_augmentation_keeps_image_and_masks_aligned(tmp_path):
    root = write_tree(tmp_path, patients={"train": 4, "val": 1})
    c = _quiet(tree_cfg(root, rotate_degrees=30, zoom=(0.8, 1.5), translate=0.1, hflip=True,
                        vflip=True, fine_label_patients=2, hierarchical_mix=False))
    batches = take(iter(_train(c, global_batch_size=4)), 6)
    for batch in batches:
        for row in range(4):
            image = batch["image"][row, ..., 0]
            labels = batch["label_fine"][row] if batch["has_fine"][row] else \
                batch["label_coarse"][row]
            for label in np.unique(labels):
                # Interior pixels (bilinear and area sampling blend 1-2 px at edges; the
                # output's border may hide a neighbour, so it counts as an edge).
                inner = cv2.erode((labels == label).astype(np.uint8), np.ones((5, 5)),
                                  borderType=cv2.BORDER_CONSTANT, borderValue=0)
                if label == 0 or not inner.any():
                    continue
                level = LEVEL[label] if batch["has_fine"][row] else None
                values = image[inner > 0]
                if level is not None:  # a class's pixels show that class's intensity
                    np.testing.assert_allclose(values, level / 65535, atol=0.02)
                else:  # the superclass covers the three classes' intensities only
                    assert values.min() > LEVEL[1] / 65535 - 0.02


@pytest.mark.parametrize("augmented", [False, True])
def test_mixed_rows_follow_the_definition(cfg, augmented):
    # Augmented: the mixed image takes its target's gamma, statistics and noise,
    # so outside the paste it still equals the image exactly.
    cfg = cfg if augmented else _quiet(cfg)
    for batch in take(iter(_train(cfg)), 6):
        for row in range(BATCH):
            alpha, label = batch["mix_alpha"][row], batch["mixed_label"][row]
            image, mixed = batch["image"][row], batch["mixed_image"][row]
            if batch["has_fine"][row] or alpha == 0:  # labelled or unmixed: untouched
                assert alpha == 0 and not label.any()
                np.testing.assert_array_equal(mixed, image)
                continue
            assert round(float(alpha), 1) in hierarchical_mix.ALPHAS
            assert (batch["label_coarse"][row][label > 0] > 0).all()  # inside the superclass
            assert label.max() <= 3
            near = cv2.dilate((label > 0).astype(np.uint8), np.ones((9, 9))) > 0
            np.testing.assert_array_equal(mixed[~near], image[~near])  # untouched elsewhere
    assert any(b["mix_alpha"].any() for b in take(iter(_train(cfg)), 6))


def test_mix_off_gives_unmixed_rows(cfg):
    cfg.hierarchical_mix = False
    batch = take(iter(_train(cfg)), 1)[0]
    assert not batch["mix_alpha"].any() and not batch["mixed_label"].any()
    np.testing.assert_array_equal(batch["mixed_image"], batch["image"])


def test_resume_from_saved_state(cfg):
    it = iter(_train(cfg))
    take(it, 13)  # past the first epoch of both streams
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 3)
    fresh = iter(_train(cfg))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    it.close()
    fresh.close()


def test_processes_share_out_the_global_batch(cfg):
    whole = take(iter(_train(cfg)), 2)
    parts = [take(iter(_train(cfg, process_index=p, process_count=2)), 2) for p in (0, 1)]
    for g, batch in enumerate(whole):
        for p in (0, 1):
            for k, v in batch.items():
                rows = len(v) // 2  # process p holds the p-th contiguous block
                np.testing.assert_array_equal(parts[p][g][k], v[p * rows:(p + 1) * rows],
                                              err_msg=k)


@pytest.mark.slow
def test_workers_give_the_same_batches(cfg):
    reference = take(iter(_train(cfg, workers=0)), 3)
    it = iter(_train(cfg, workers=2))
    assert_batches_equal(take(it, 3), reference)
    it.close()
    gc.collect()


def test_brain_phantom_batches_have_four_channels_and_all_fine_classes(data_dir):
    c = segmentation.default_segmentation_data_config()
    c.update(source="brain_phantom", dir=str(data_dir), phantom_num_images=10 * 8,
             phantom_size=96, image_size=SIZE, channels=4, hflip=True,
             intensity_norm="zscore_nonzero", num_workers=0, num_threads=1)
    c.fine_label_patients = 3
    batches = take(iter(_train(c)), 4)
    assert batches[0]["image"].shape == (BATCH, SIZE, SIZE, 4)
    labels = set()
    for b in batches:
        labels |= set(np.unique(b["label_fine"]).tolist())
        # Skull-stripped background stays exactly 0 in every sequence (zscore_nonzero),
        # through the augmentation's brightness and noise.
        zero = b["image"] == 0
        assert zero.mean() > 0.3 and (zero.all(axis=-1) == zero.any(axis=-1)).mean() > 0.99
        assert not (zero.all(axis=-1) & (b["label_coarse"] > 0)).any()
    assert labels == {0, 1, 2, 3}  # BraTS's file label 4 arrives as fine class 3


# ------------------------------------------------------------------ eval


def test_eval_set_covers_every_slice_once_volume_by_volume(cfg):
    ev = segmentation_eval.make_segmentation_eval(cfg, "val", batch_size=5)
    src = segmentation.split_source(cfg, "val")
    assert ev.num_slices == len(src) == 2 * 16 and len(ev) == 7  # 32 slices, padded
    assert [v.name for v in ev.volumes] == sorted(v.name for v in ev.volumes)
    assert all(v.name.endswith(("/ED", "/ES")) and v.num_slices == 8 for v in ev.volumes)
    batches = list(ev)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 32 and not valid[32:].any()
    index = np.concatenate([b["index"] for b in batches])[valid]
    assert sorted(index.tolist()) == list(range(32))
    for b in batches:
        for row in np.flatnonzero(b["valid"]):
            volume = ev.volumes[b["volume"][row]]
            meta = src.meta(b["index"][row])
            assert volume.name == f"{meta['patient']}/{meta['phase']}"
            assert meta["source_index"]["slice"] == volume.slice_numbers[b["slice"][row]]
            assert b["slice"][row] == meta["source_index"]["slice"]
        assert not b["image"][~b["valid"]].any() and (b["index"][~b["valid"]] == -1).all()
    # Spacing at the model resolution: stored spacing x stored side / model side.
    meta = src.meta(int(ev.volumes[0].record_indices[0]))
    assert ev.volumes[0].spacing == pytest.approx(
        (meta["slice_spacing"], *(s * 96 / SIZE for s in meta["spacing"])))
    # Re-stacking: the batches' labels are the volumes' ground truth, in order.
    fine = np.concatenate([b["label_fine"] for b in batches])[valid]
    stacked = ev.stack(fine)
    for v in range(len(ev.volumes)):
        truth_fine, truth_coarse = ev.volume_labels(v)
        np.testing.assert_array_equal(stacked[v], truth_fine)
        np.testing.assert_array_equal(truth_coarse, (truth_fine > 0).astype(np.int32))
    assert_batches_equal(list(ev), batches)  # every pass is the same


def test_eval_of_a_non_square_tree_places_and_spaces_the_slices(tmp_path):
    root = write_tree(tmp_path, shape=(40, 60), patients={"train": 3, "val": 2})
    ev = segmentation_eval.make_segmentation_eval(tree_cfg(root), "val", batch_size=4)
    # 60 px wide -> 32: spacing x 60 / 32 on both axes; the slices' own 10 mm apart.
    assert len(ev.volumes) == 2 and ev.volumes[0].spacing == pytest.approx((10, 2.8125, 2.34375))
    batch = ev[0]
    assert batch["image"].shape == (4, 32, 32, 1) and batch["has_fine"].all()
    # Fitted and centred: 40 rows -> 21.3 rows in the middle, the rest padding.
    rows = np.flatnonzero(batch["image"][0, :, :, 0].std(axis=1) > 0)
    assert rows.min() >= 5 and rows.max() <= 26
    _, fine, _ = ev.slice_arrays(0)
    record = ev.rows.reader(int(ev.order[0]))
    matrix = geometry.fit_matrix((40, 60), 32)
    np.testing.assert_array_equal(fine, geometry.warp_mask(record.fine, matrix, 32))


# ------------------------------------------------------- paper-scale layouts


def test_brats_file_label_four_becomes_fine_class_three(tmp_path):
    classes = {"0": "background", "1": "ncr", "2": "edema", "4": "enhancing"}
    root = write_tree(tmp_path, mask_values=(1, 2, 4), classes=classes)
    c = tree_cfg(root, fine_label_patients=None)
    batch = take(iter(_train(c, global_batch_size=4)), 1)[0]
    assert set(np.unique(batch["label_fine"])) == {0, 1, 2, 3}
    c.mask_values = (0, 1, 2, 4)  # the same, stated
    again = take(iter(_train(c, global_batch_size=4)), 1)[0]
    assert_batches_equal([again], [batch])


def test_patient_resplit_pools_splits_by_patient(tmp_path):
    root = write_tree(tmp_path, patients={"train": 14, "val": 6}, slices=3)
    c = tree_cfg(root, patient_split=(0.7, 0.1, 0.2))
    patients = {}
    for split in ("train", "val", "test"):
        src = segmentation.split_source(c, split)
        patients[split] = {src.meta(i)["patient"] for i in range(len(src))}
        assert len(src) == 3 * len(patients[split])
    assert [len(patients[s]) for s in ("train", "val", "test")] == [14, 2, 4]
    assert set.union(*patients.values()) == {f"p{i:03d}" for i in range(20)}


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize("problem, match", [
    ("value", r"record \d+ \(patient p001\).*values \[7\].*data.mask_values"),
    ("size", r"record \d+ \(patient p001\).*mask 'mask' is \(20, 20\), its image is \(48, 48\)"),
    ("missing", r"record \d+ \(patient p001\).*has no mask 'mask'"),
])
def test_bad_masks_are_named_before_any_batch(tmp_path, problem, match):
    def edit(split, patient, k, image, meta, extras):
        if patient == "p001" and k == 2:
            if problem == "value":
                extras["mask"][0, 0] = 7
            elif problem == "size":
                extras["mask"] = extras["mask"][:20, :20].copy()
            else:
                del extras["mask"]

    root = write_tree(tmp_path, edit=edit)
    with pytest.raises(SegmentationDataError, match=match):
        _train(tree_cfg(root), global_batch_size=4)  # raised when built, not when iterated


def test_fine_labels_for_patients_without_fine_masks(tmp_path):
    def coarse_only(split, patient, k, image, meta, extras):
        if patient != "p000":
            extras["heart"] = (extras.pop("mask") > 0).astype(np.uint8)

    root = write_tree(tmp_path, edit=coarse_only)
    c = tree_cfg(root, coarse_mask_key="heart", fine_label_patients=1)
    plan = segmentation.plan_training(c, global_batch_size=4)
    assert plan.subset.patients == ["p000"]  # the only patient with fine masks
    batch = take(iter(_train(c, global_batch_size=4)), 1)[0]
    assert batch["has_fine"].tolist() == [True, True, False, False]
    c.fine_label_patients = 2
    with pytest.raises(SegmentationDataError, match=r"asks for 2 patients.*has 1 patients.*"
                       r"5 patients lack a fine mask"):
        segmentation.plan_training(c, global_batch_size=4)


@pytest.mark.parametrize("overrides, match", [
    (dict(fine_label_patients=7), r"asks for 7 patients.*has 6 patients"),
    (dict(labeled_per_batch=5), r"labeled_per_batch=5 must be in \[0, global batch 4\]"),
    (dict(labeled_per_batch=4, fine_label_patients=2), r"fills the whole batch"),
    (dict(fine_label_patients=0), r"no patient keeps fine masks"),
    (dict(channels=3, intensity_norm="zscore"), None),  # 1 -> 3 replication works
    (dict(channels=4), r"has 1 channel\(s\) but data.channels=4"),
    (dict(fine_to_coarse=(0, 1, 1)), r"declares 4 classes but data.fine_to_coarse has 3"),
    (dict(intensity_norm="minmax"), r"intensity_norm='minmax' must be one of"),
])
def test_bad_settings_are_named(tmp_path, overrides, match):
    root = write_tree(tmp_path)
    c = tree_cfg(root, **overrides)
    if match is None:
        assert take(iter(_train(c, global_batch_size=4)), 1)[0]["image"].shape[-1] == 3
        return
    with pytest.raises(SegmentationDataError, match=match):
        take(iter(_train(c, global_batch_size=4)), 1)


def test_phantom_of_partial_patients_is_refused(cfg):
    cfg.phantom_num_images = 100
    with pytest.raises(SegmentationDataError, match=r"16 records per patient.*multiple of 16"):
        _train(cfg)


def test_volume_records_are_refused(tmp_path):
    volume = np.zeros((3, 16, 16), np.uint16)
    records.write_shards([(volume, {"patient": "a"}, {"mask": np.zeros((16, 16), np.uint8)})],
                         str(tmp_path / "train"), "data", 1)
    reader = seg_records.SliceReader(
        segmentation.split_source(tree_cfg(str(tmp_path)), "train"),
        seg_records.LabelSpec((0, 1, 1, 1), (0, 1, 2, 3)))
    with pytest.raises(SegmentationDataError, match="ingest volumes as slices"):
        reader(0)


def test_records_without_a_patient_are_named(tmp_path):
    root = write_tree(tmp_path, edit=lambda s, p, k, i, meta, e: meta.pop("patient"))
    with pytest.raises(SegmentationDataError, match=r"no 'patient' in its meta.*data.patient_key"):
        _train(tree_cfg(root), global_batch_size=4)


def test_spacing_missing_for_eval_is_named(tmp_path):
    root = write_tree(tmp_path, edit=lambda s, p, k, i, meta, e: meta.pop("slice_spacing"))
    with pytest.raises(SegmentationDataError, match=r"no slice spacing.*data.slice_spacing_mm"):
        segmentation_eval.make_segmentation_eval(tree_cfg(root), "val", batch_size=2)
    ev = segmentation_eval.make_segmentation_eval(tree_cfg(root, slice_spacing_mm=8.0), "val",
                                                  batch_size=2)
    assert ev.volumes[0].spacing[0] == 8.0


def test_sources_resolve_phantoms_for_other_pipelines(data_dir):
    from input_pipeline import sources

    c = SimpleNamespace(source="brain_phantom", dir=str(data_dir), phantom_num_images=80,
                        phantom_size=96, phantom_seed=0, phantom_split=(0.8, 0.1, 0.1))
    assert "brain_phantom" in sources.source_names() and "cardiac_phantom" in sources.PHANTOMS
    src = sources.resolve(c, "train")
    assert src[0]["image"].shape == (4, 96, 96)


def test_tfds_masks_feed_the_pipeline(tmp_path):
    """A TFDS dataset with a mask feature (test_tfds's tiny one): patients from a
    mapped feature, one subclass (mask values 0 / 1), training and eval batches."""
    pytest.importorskip("tensorflow_datasets")
    import test_tfds

    data_dir = str(tmp_path)
    test_tfds._builder_class()(data_dir=data_dir, file_format="array_record").download_and_prepare()
    c = segmentation.default_segmentation_data_config()
    c.update(source="tfds", image_size=32, num_workers=0, num_threads=1, fine_to_coarse=(0, 1),
             patient_key="case", volume_keys=("case",), slice_key="none",
             pixel_spacing_mm=(1.0, 1.0), slice_spacing_mm=1.0)
    c.tfds.update(name=test_tfds.DATASET, data_dir=data_dir, masks={"mask": "mask"},
                  labels={"case": "case_id"})
    c.fine_label_patients = 0.25
    batch = take(iter(_train(c)), 1)[0]
    assert batch["has_fine"].tolist() == [True] * 4 + [False] * 4
    assert set(np.unique(batch["label_coarse"])) == {0, 1}
    ev = segmentation_eval.make_segmentation_eval(c, "val", batch_size=8)
    assert ev.num_slices == 16 and len(ev.volumes) == 16
