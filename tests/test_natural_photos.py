"""Natural-photograph crops: determinism, pixel type and range, the photographs
used (natural, none medical), crops inside their photo, a cheap module import,
and the rendered shards read back through ArrayRecordImageSource."""

import os
import subprocess
import sys

import numpy as np
import pytest

from input_pipeline import natural_photos as nph
from input_pipeline import rendered, sources

INDICES = 200


@pytest.fixture(scope="module")
def metas():
    return [nph.render_photo(i, 0, 16)[1] for i in range(INDICES)]


def test_rendering_is_deterministic_and_indices_differ():
    a, b = nph.render_photo(5, 3, 64), nph.render_photo(5, 3, 64)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    for other in (nph.render_photo(6, 3, 64), nph.render_photo(5, 4, 64)):
        assert not np.array_equal(a[0], other[0])
    images = [nph.render_photo(i, 0, 32)[0] for i in range(8)]
    assert len({im.tobytes() for im in images}) == len(images)


@pytest.mark.parametrize("size", [16, 128, 224])
def test_pixels_are_16_bit_grayscale(size):
    image, meta = nph.render_photo(11, 0, size)
    assert image.dtype == np.uint16 and image.shape == (size, size)
    assert meta["bits_stored"] == 16 and meta["phantom_index"] == 11
    assert meta["phantom_seed"] == 0 and meta["licence"]
    # 8-bit photographs stretched to 16 bits: well above 255, and not flat.
    assert image.max() > 4096 and image.std() > 0


def test_photos_are_natural_and_present():
    assert len(set(nph.PHOTOS)) == len(nph.PHOTOS) == len(nph.CREDITS)
    medical = ("retina", "microaneurysms", "ihc", "cell", "phantom")
    assert not [p for p in nph.PHOTOS if any(m in p for m in medical)]
    for name in nph.PHOTOS:
        assert os.path.isfile(os.path.join(nph.data_dir(), name)), name
        photo = nph.load_photo(name)
        assert photo.ndim == 2 and photo.dtype == np.float32 and min(photo.shape) >= 256
        assert 0.0 <= photo.min() < photo.max() <= 1.0


def test_photos_are_drawn_across_the_set(metas):
    used = {m["photo"] for m in metas}
    assert used <= set(nph.PHOTOS) and len(used) >= len(nph.PHOTOS) - 2


def test_crops_lie_inside_their_photo(metas):
    for m in metas:
        top, left, h, w = m["crop"]
        height, width = nph.load_photo(m["photo"]).shape
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width, m
        short = min(height, width)
        # Rounding and clipping to the photo bend the area and aspect a little.
        assert 0.07 * short**2 <= h * w <= 1.01 * short**2, m
        assert 0.7 <= w / h <= 1.4, m
    areas = [m["crop"][2] * m["crop"][3] for m in metas]
    assert max(areas) > 4 * min(areas)


def test_module_import_leaves_scikit_image_alone():
    code = "import sys, input_pipeline.natural_photos; assert 'skimage' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_missing_scikit_image_says_what_to_install(monkeypatch):
    nph.data_dir.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'scikit-image"):
            nph.data_dir()
    finally:
        nph.data_dir.cache_clear()


def test_rendered_shards_read_back(tmp_path):
    paths = rendered.PHANTOMS["natural_photos"].ensure(
        str(tmp_path), num_images=16, seed=0, size=32
    )
    source = sources.ArrayRecordImageSource(paths)
    assert len(source) == 16
    seen = set()
    for i in range(len(source)):
        record = source[i]
        image, meta = record["image"], record["meta"]
        assert image.dtype == np.uint16 and image.shape == (32, 32)
        index = meta["phantom_index"]
        expected, expected_meta = nph.render_photo(index, 0, 32)
        np.testing.assert_array_equal(image, expected)
        assert meta["photo"] == expected_meta["photo"] and meta["crop"] == expected_meta["crop"]
        seen.add(index)
    assert seen == set(range(16))
