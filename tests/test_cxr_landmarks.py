"""Chest X-ray phantom landmarks (meta "landmarks", CHEST_LANDMARK_NAMES): six
points inside the image, on the correct sides, in anatomical order, scaling
with the image size, and on the drawn lung boundary."""

import cv2
import numpy as np
import pytest

from input_pipeline import cxr_phantom as cp
from input_pipeline import records

APEX, COSTOPHRENIC, CARDIOPHRENIC = 0, 1, 2  # + 3 for the left lung


def _points(index: int, seed: int, size: int) -> np.ndarray:
    return np.array(cp.render_cxr(index, seed, size)[1]["landmarks"])


def _sample(image: np.ndarray, points) -> np.ndarray:
    pts = np.asarray(points, np.float32).reshape(-1, 1, 2)
    return cv2.remap(image, pts[..., 0], pts[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT)[:, 0]


def _warp(case: cp.Case, size: int) -> np.ndarray:
    """The final rotation and shift `render_case` applies (2 x 3, pixels)."""
    return cp._warp(cp._look(case, size)[0], size)


def _to_pixels(case: cp.Case, size: int, points) -> np.ndarray:
    """Image-width units -> pixels of the rendered image, as the outlines are drawn."""
    matrix = _warp(case, size)
    return (np.asarray(points) * size - 0.5) @ matrix[:, :2].T + matrix[:, 2]


def test_names_and_meta():
    assert cp.CHEST_LANDMARK_NAMES == (
        "right lung apex", "right costophrenic angle", "right cardiophrenic angle",
        "left lung apex", "left costophrenic angle", "left cardiophrenic angle")
    image, meta = cp.render_cxr(3, 7, 64)
    assert len(meta["landmarks"]) == 6 and all(len(p) == 2 for p in meta["landmarks"])
    assert all(round(v, 4) == v for p in meta["landmarks"] for v in p)
    records.encode_record(image, meta)  # JSON-serialisable metadata
    np.testing.assert_allclose(meta["landmarks"], cp.chest_landmarks(cp.sample_case(3, 7), 64),
                               atol=1e-4)


@pytest.mark.parametrize("size", [32, 64, 256])
def test_inside_the_image_on_the_correct_sides_in_order(size):
    for i in range(30):
        case = cp.sample_case(i, 1)
        points = _points(i, 1, size)
        assert points.shape == (6, 2) and np.isfinite(points).all()
        assert points.min() >= 0.0 and points.max() <= size - 1.0, i
        # The thorax midline where each point lies: patient right = image left.
        for k, point in enumerate(points):
            mid = _to_pixels(case, size, [[case.center_x, (point[1] + 0.5) / size]])[0]
            assert (point[0] < mid[0]) == (k < 3), (i, cp.CHEST_LANDMARK_NAMES[k])
        for right, left in ((0, 3), (1, 4), (2, 5)):
            assert points[right, 0] < points[left, 0]
        for s in (0, 3):  # per lung
            apex, costophrenic, cardiophrenic = points[s : s + 3]
            assert apex[1] < cardiophrenic[1] < costophrenic[1]
            assert costophrenic[1] - apex[1] > 0.4 * size  # the lung is tall
            # The costophrenic angle is lateral, the cardiophrenic angle medial.
            lateral = abs(costophrenic[0] - size / 2) > abs(cardiophrenic[0] - size / 2)
            assert lateral, (i, s)


def test_scale_with_the_image_size():
    """x_big = (x_small + 0.5) * ratio - 0.5, up to a few hundredths of a pixel:
    cv2 rotates about (size / 2, size / 2), half a pixel off the image centre in
    this convention, which moves the big image's points by (R - I) (ratio - 1) / 2
    (1, 1) against the scaled small ones, < 0.037 (ratio - 1) px for rotations of
    at most 3 degrees."""
    for i in range(10):
        big = _points(i, 2, 256)
        for small_size in (64, 128):
            small = _points(i, 2, small_size)
            ratio = 256 / small_size
            np.testing.assert_allclose(big, (small + 0.5) * ratio - 0.5,
                                       atol=0.04 * (ratio - 1) + 2e-4)


def test_apex_and_costophrenic_angle_on_the_lung_outline():
    size = 256
    for i in range(20):
        case = cp.sample_case(i, 3)
        points = _points(i, 3, size)
        for s, side in enumerate(cp.SIDES):
            outline = _to_pixels(case, size, cp._lung(case, side).outline).astype(np.float32)
            for k in (APEX, COSTOPHRENIC, CARDIOPHRENIC):
                x, y = points[3 * s + k]
                distance = cv2.pointPolygonTest(outline, (float(x), float(y)), True)
                assert abs(distance) < 1.5, (i, side, k, distance)


def test_apex_and_costophrenic_angle_on_the_drawn_lung_boundary():
    """The aerated lung is darker than the soft tissue around it: 4 px inside the
    lung (toward its middle) is darker than 4 px outside. Fluid fills the
    costophrenic angle on an effusion's side, so only the apex is checked there."""
    size, step = 256, 4.0
    checked = 0
    for i in range(24):
        image, meta = cp.render_cxr(i, 4, size)
        x = cv2.blur(image.astype(np.float32) / cp.MAX_VALUE, (3, 3))
        points = np.array(meta["landmarks"])
        effusion = cp.sample_case(i, 4).findings.effusion_sides()
        for s, side in enumerate(cp.SIDES):
            apex, costophrenic, cardiophrenic = points[3 * s : 3 * s + 3]
            middle = (apex + costophrenic + cardiophrenic) / 3  # inside the lung
            for k, point in ((APEX, apex), (COSTOPHRENIC, costophrenic)):
                if k == COSTOPHRENIC and side in effusion:
                    continue
                inward = (middle - point) / np.hypot(*(middle - point))
                inside, outside = _sample(x, [point + step * inward, point - step * inward])
                assert inside + 0.1 < outside, (i, side, cp.CHEST_LANDMARK_NAMES[3 * s + k])
                checked += 1
    assert checked > 60
