"""Hand radiograph phantom: determinism, the 37 landmarks (order, placement on
the drawn anatomy, inside the image), physical size, resolution independence,
speed, and its shard cache."""

import time

import cv2
import numpy as np
import pytest

from input_pipeline import hand_phantom as hp
from input_pipeline import records, rendered, sources

SIZE = 256
HANDS = 12


@pytest.fixture(scope="module")
def hands():
    """[(image in [0, 1], landmarks (37, 2) px, meta)] of HANDS hands at SIZE px."""
    out = []
    for i in range(HANDS):
        image, meta = hp.render_hand(i, 0, SIZE)
        out.append((image.astype(np.float32) / hp.MAX_VALUE, np.array(meta["landmarks"]), meta))
    return out


def _sample(image: np.ndarray, points) -> np.ndarray:
    """Bilinear values of `image` at (x, y) pixel points (pixel centres at integers)."""
    pts = np.asarray(points, np.float32).reshape(-1, 1, 2)
    return cv2.remap(image, pts[..., 0], pts[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REFLECT)[:, 0]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.hypot(*v)


def _across(image: np.ndarray, point: np.ndarray, across: np.ndarray) -> float:
    """Mean of three samples across a ray at `point` (less noise, same gap)."""
    return float(_sample(image, [point + s * across for s in (-0.5, 0.0, 0.5)]).mean())


def test_render_is_deterministic_per_index_and_seed():
    image, meta = hp.render_hand(3, 7, 128)
    assert image.dtype == np.uint16 and image.shape == (128, 128)
    assert int(image.max()) <= hp.MAX_VALUE and meta["bits_stored"] == hp.BITS_STORED == 12
    again, meta_again = hp.render_hand(3, 7, 128)
    np.testing.assert_array_equal(image, again)
    assert meta == meta_again
    assert not np.array_equal(image, hp.render_hand(4, 7, 128)[0])
    assert not np.array_equal(image, hp.render_hand(3, 8, 128)[0])
    assert hp.render_hand(4, 7, 128)[1]["landmarks"] != meta["landmarks"]
    assert meta["phantom_index"] == 3 and meta["phantom_seed"] == 7 and "patient" not in meta
    records.encode_record(image, meta)  # JSON-serialisable metadata
    with pytest.raises(ValueError):
        hp.render_hand(0, 0, hp.MIN_SIZE - 1)


def test_landmark_names_follow_the_documented_order():
    names = hp.LANDMARK_NAMES
    assert len(names) == hp.NUM_LANDMARKS == 37 and len(set(names)) == 37
    assert names[0] == "ulnar styloid tip" and names[4] == "radial styloid tip"
    assert [names[i] for i in hp.RAYS[0]] == [
        "thumb CMC joint", "thumb MCP joint", "thumb IP joint", "thumb tip"]
    assert hp.RAYS[1] == (9, 10, 11, 12, 13) and hp.RAYS[4] == (24, 25, 26, 27, 28)
    assert names[9] == "index finger CMC joint" and names[28] == "little finger tip"
    assert [names[i] for i in hp.CARPAL_CENTRES] == [f"{c} centre" for c in hp.CARPALS]
    assert hp.CARPALS == ("scaphoid", "lunate", "triquetrum", "pisiform", "trapezium",
                          "trapezoid", "capitate", "hamate")


def test_landmarks_finite_and_inside_the_image():
    for i in range(40):
        _, meta = hp.render_hand(i, 1, 64)
        points = np.array(meta["landmarks"])
        assert points.shape == (37, 2) and np.isfinite(points).all()
        assert points.min() >= 2.0 and points.max() <= 64 - 1 - 2.0, i


def test_spacing_and_wrist_width():
    widths = []
    for i in range(30):
        for size in (64, 200):
            _, meta = hp.render_hand(i, 2, size)
            mm = hp.FIELD_OF_VIEW_MM / size
            assert meta["spacing"] == [mm, mm]
            p0, p4 = (np.array(meta["landmarks"][k]) for k in hp.WRIST_WIDTH_PAIR)
            assert meta["wrist_width_mm"] == pytest.approx(np.hypot(*(p0 - p4)) * mm, abs=0.01)
        widths.append(meta["wrist_width_mm"])
        # An adult-sized hand: the middle finger, tip to MCP joint.
        tip, mcp = hp.sample_hand(i, 2).landmarks[[18, 15]]
        assert 72.0 < np.hypot(*(tip - mcp)) < 105.0, i
    assert 40.0 <= min(widths) and max(widths) <= 65.0
    assert max(widths) - min(widths) > 5.0  # hand size varies by patient


def test_resolution_independent():
    for i in range(4):
        small, meta_small = hp.render_hand(i, 5, 128)
        big, meta_big = hp.render_hand(i, 5, 256)
        x128, x256 = np.array(meta_small["landmarks"]), np.array(meta_big["landmarks"])
        # Rounding to 4 decimals allows 1.5e-4 px on top of the 1e-6 relative.
        np.testing.assert_allclose(x256, (x128 + 0.5) * 2 - 0.5, rtol=1e-6, atol=2e-4)
        assert meta_small["wrist_width_mm"] == meta_big["wrist_width_mm"]
        # The same hand: the big image area-resized to 128 px matches the small one.
        down = cv2.resize(big.astype(np.float32), (128, 128), interpolation=cv2.INTER_AREA)
        assert np.corrcoef(down.ravel(), small.astype(np.float32).ravel())[0, 1] > 0.97, i


def test_bones_bright_at_carpal_centres_and_shafts(hands):
    for i, (x, points, _) in enumerate(hands):
        smooth = cv2.blur(x, (3, 3))
        # Soft tissue between the metacarpal heads, midway between MCP joints (the
        # darkest of three: two heads may touch).
        mcp = [ray[1] for ray in hp.RAYS[1:]]
        soft = _sample(smooth, [(points[a] + points[b]) / 2 for a, b in zip(mcp, mcp[1:])]).min()
        carpals = _sample(smooth, points[list(hp.CARPAL_CENTRES)])
        # Midpoints of every metacarpal and phalanx.
        shafts = _sample(smooth, [(points[r[k]] + points[r[k + 1]]) / 2
                                  for r in hp.RAYS for k in range(len(r) - 1)])
        assert carpals.min() > soft + 0.03, i
        assert shafts.min() > soft + 0.03, i
        background = np.median(x[:8, :8])
        assert background < soft - 0.1, i  # X-ray polarity: air dark, tissue grey


def test_joint_landmarks_sit_in_gaps_between_bone_ends(hands):
    """Along each ray, a joint landmark is darker than the brightest point of the
    bone end on either side of it (1.5-4 mm away): the gap between two bones."""
    for i, (x, points, meta) in enumerate(hands):
        mm = meta["spacing"][0]
        steps = np.linspace(1.5, 4.0, 6) / mm
        for ray in hp.RAYS:
            for j in range(len(ray) - 1):  # CMC ... DIP (IP)
                p = points[ray[j]]
                distal = _unit(points[ray[j + 1]] - p)
                proximal = distal if j == 0 else _unit(p - points[ray[j - 1]])
                across = np.array([-distal[1], distal[0]])
                gap = _across(x, p, across)
                before = max(_across(x, p - t * proximal, across) for t in steps)
                after = max(_across(x, p + t * distal, across) for t in steps)
                assert gap < min(before, after) - 0.01, (i, hp.LANDMARK_NAMES[ray[j]])


def test_tips_at_the_bone_end(hands):
    """Bone just proximal of a tip, soft tissue (the pad) just distal of it."""
    for i, (x, points, meta) in enumerate(hands):
        mm = meta["spacing"][0]
        smooth = cv2.blur(x, (3, 3))
        for ray in hp.RAYS:
            tip = points[ray[-1]]
            d = _unit(tip - points[ray[-2]])
            inside, at, beyond = _sample(smooth, [tip - 2.0 / mm * d, tip, tip + 2.5 / mm * d])
            assert inside > beyond + 0.08 and inside > at > beyond - 0.02, (i, ray[-1])
            assert beyond > np.median(x[:8, :8]) + 0.05  # the pad is soft tissue, not air


def test_anatomical_order(hands):
    for i, (_, points, _) in enumerate(hands):
        # Bones shorten distally along every ray (thumb: metacarpal > proximal
        # phalanx > distal phalanx; fingers: also middle phalanx > distal's tip).
        for ray in hp.RAYS:
            lengths = np.hypot(*np.diff(points[list(ray)], axis=0).T)
            assert np.all(np.diff(lengths) < 0), (i, ray, lengths)
        # Undo the in-plane rotation: the hand's axis runs from the middle of the
        # radius' articular surface to the middle finger's MCP joint.
        up = _unit(points[15] - points[3])
        height = points @ up
        for ray in hp.RAYS:
            assert np.all(np.diff(height[list(ray)]) > 0), (i, ray)  # tip highest
        assert height[list(hp.CARPAL_CENTRES)].max() < min(height[r[1]] for r in hp.RAYS[1:])
        # Left hand, PA: thumb and radius on the image right, ulna and little finger left.
        across = np.array([-up[1], up[0]])  # toward the image right for an upright hand
        side = points @ across
        assert side[4] > side[3] > side[2] > side[1] > side[0], i
        assert side[8] > side[13] > side[18] > side[23] > side[28], i


def test_render_speed():
    hp.render_hand(0, 0, SIZE)
    start = time.perf_counter()
    for i in range(25):
        hp.render_hand(i, 1, SIZE)
    assert time.perf_counter() - start < 25 * 0.04  # ~7 ms each on one core


def test_rendered_shards(tmp_path):
    paths = rendered.PHANTOMS["hand_phantom"].ensure(tmp_path, num_images=8, seed=0, size=64)
    src = sources.ArrayRecordImageSource(paths)
    assert len(src) == 8
    seen = set()
    for k in range(len(src)):
        element = src[k]
        meta = element["meta"]
        assert len(meta["landmarks"]) == hp.NUM_LANDMARKS
        index = meta["phantom_index"]
        seen.add(index)
        image, expected = hp.render_hand(index, 0, 64)
        np.testing.assert_array_equal(element["image"], image)
        assert meta == expected
    assert seen == set(range(8))
