"""Natural-photograph crops: random views of the photographs scikit-image ships,
as 16-bit grayscale images (the natural-image arm of a transfer study: MAE
pretraining on natural images with no download, against in-domain X-rays).

Every image is a pure function of ``(index, seed, size)``: one of PHOTOS drawn
uniformly, a random-resized crop (area 8-100 % of the photo's short side
squared, aspect 3/4-4/3), a rotation of up to 15 degrees about the crop centre
(reflected borders), a horizontal flip with p = 0.5, resizing to size x size
and a gamma of 0.7-1.4. Colour photographs become ITU-R BT.601 luma. Values use
all 16 bits (0..65535): the photographs are 8-bit, but resampling and gamma
fill the levels between.

Fourteen photographs give far less variety than ImageNet; the crops, angles,
flips and gammas multiply the distinct views, not the content. The set
deliberately leaves out scikit-image's medical and biological images (retina,
microaneurysms, ihc, cell, the Shepp-Logan phantom), so that this arm holds no
in-domain data, and its synthetic or non-photographic ones (text, page, logo,
chessboard, color, horse, the 25 x 25 lfw_subset faces).

Licences. The photographs ship inside the scikit-image wheel (skimage/data).
The installed skimage/data/README.txt only explains how to download the larger
optional images; the credits are in the docstrings of the skimage.data loaders
(``skimage.data.astronaut.__doc__`` and so on), summarised per photo in
CREDITS. Most are public domain or CC0 (NASA and SpaceX releases, CC0
textures, photographs released by scikit-image contributors); the Brooklyn
Museum's coins carry "no known copyright restrictions". Exceptions: moon.png
states no source or licence, and the motorcycle pair comes from the
Middlebury 2014 stereo benchmark, which scikit-image credits with a citation
(Scharstein et al., GCPR 2014) but redistributes without stating a licence.
Check both before publishing weights trained on them.

Rendering is one INTER_AREA pre-shrink of the region under the crop and one
warpAffine at the output size. Measured on one core (cv2.setNumThreads(1), as
the rendering workers run) once the photos are decoded: 0.6 ms per 128 px
image and 0.7 ms per 224 px image on average, 3 ms for the largest crop (the
whole 872 px short side of the Hubble field). Each photo is decoded once per
process (0.15 s, 16 MB of float32 for all of them).
"""

from __future__ import annotations

import functools
import math
import os

import cv2
import numpy as np

BITS_STORED = 16
MAX_VALUE = (1 << BITS_STORED) - 1

# The natural photographs among skimage/data's bundled files (scikit-image 0.26).
PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "clock_motion.png",
)

# Per photo: who took it and under what terms, as the skimage.data docstrings say.
CREDITS = {
    "astronaut.png": "public domain (NASA)",
    "brick.png": "CC0 (CC0Textures, Bricks25)",
    "camera.png": "CC0 (Lav Varshney)",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "coins.png": "no known copyright restrictions (Brooklyn Museum)",
    "grass.png": "CC0 (DeviantArt, linolafett)",
    "gravel.png": "CC0 (CC0Textures, Gravel04)",
    "hubble_deep_field.jpg": "public domain (NASA)",
    "moon.png": "no source or licence stated by scikit-image",
    "motorcycle_left.png": "Middlebury 2014 stereo benchmark, cite Scharstein et al. 2014",
    "motorcycle_right.png": "Middlebury 2014 stereo benchmark, cite Scharstein et al. 2014",
    "rocket.jpg": "public domain (SpaceX)",
    "clock_motion.png": "public domain (Stefan van der Walt)",
}

AREA = (0.08, 1.0)  # of the photo's short side squared
ASPECT = (3 / 4, 4 / 3)  # crop width / height
MAX_ROTATION_DEG = 15.0
GAMMA = (0.7, 1.4)

_MISSING = (
    "data.source='natural_photos' reads the photographs scikit-image ships: "
    "pip install 'scikit-image>=0.26,<0.27'"
)
# ITU-R BT.601 luma weights in OpenCV's channel order (B, G, R).
_LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)


@functools.lru_cache(maxsize=1)
def data_dir() -> str:
    """skimage/data of the installed scikit-image."""
    # Imported here, not at module level: spawned rendering workers import this
    # module, and importing skimage costs far more than rendering a few images.
    try:
        import skimage  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return os.path.join(os.path.dirname(skimage.__file__), "data")


@functools.lru_cache(maxsize=len(PHOTOS))
def load_photo(name: str) -> np.ndarray:
    """PHOTOS' `name` as read-only float32 grayscale in [0, 1], decoded once per process."""
    path = os.path.join(data_dir(), name)
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise FileNotFoundError(f"{path}: not in this scikit-image. {_MISSING}")
    if raw.dtype == np.uint8:
        image = raw.astype(np.float32) / 255.0
    elif raw.dtype == np.uint16:
        image = raw.astype(np.float32) / 65535.0
    else:
        raise ValueError(f"{path}: unexpected pixel type {raw.dtype}")
    if image.ndim == 3:
        # Alpha (a 4th channel) carries no scene content; cv2 stores colour as BGR.
        image = image[..., :3] @ _LUMA_BGR if image.shape[2] >= 3 else image[..., 0]
    image = np.ascontiguousarray(image, np.float32)
    image.setflags(write=False)  # shared by every render through the cache
    return image


def _sample(rng: np.random.Generator, height: int, width: int):
    """The crop (top, left, h, w), rotation (degrees) and flip for one image."""
    short = min(height, width)
    area = short * short * math.exp(rng.uniform(math.log(AREA[0]), math.log(AREA[1])))
    aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
    # A 4:3 crop of the whole short side is wider than a square photo: clip to it.
    h = min(height, max(1, round(math.sqrt(area / aspect))))
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    flip = bool(rng.random() < 0.5)
    return (top, left, h, w), angle, flip


def _view(photo: np.ndarray, crop, angle: float, flip: bool, size: int) -> np.ndarray:
    """The rotated, flipped crop resampled to size x size (float32)."""
    top, left, h, w = crop
    height, width = photo.shape
    # Output pixel (u, v) -> photo pixel, pixel centres at integers:
    # centre + R(angle) . F . (((u, v) + 0.5) * (w, h) / size - (w, h) / 2).
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = left + w / 2 - 0.5, top + h / 2 - 0.5
    sx, sy = w / size, h / size
    fx = -sx if flip else sx
    m = np.array(
        [
            [cos * fx, -sin * sy, 0.0],
            [sin * fx, cos * sy, 0.0],
        ]
    )
    m[:, 2] = [cx, cy] - m[:, :2] @ [size / 2 - 0.5, size / 2 - 0.5]

    # The photo region under the rotated crop (+2 px for interpolation), padded
    # by reflection where the corners leave the photo, like warpAffine's border.
    ex = (abs(cos) * w + abs(sin) * h) / 2 + 2
    ey = (abs(sin) * w + abs(cos) * h) / 2 + 2
    x0, x1 = math.floor(cx - ex), math.ceil(cx + ex) + 1
    y0, y1 = math.floor(cy - ey), math.ceil(cy + ey) + 1
    region = photo[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)]
    pads = (max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width))
    if any(pads):
        region = cv2.copyMakeBorder(region, *pads, cv2.BORDER_REFLECT_101)
    m[:, 2] -= [x0, y0]

    # Shrinking: INTER_AREA first, to about the output's resolution (warpAffine
    # has no area filter and would alias), then the rotation at near unit scale.
    # A region pixel's centre x maps to (x + 0.5) * k - 0.5 after resizing by k.
    kx, ky = min(1.0, 1.0 / sx), min(1.0, 1.0 / sy)
    if kx < 1.0 or ky < 1.0:
        rh, rw = region.shape
        nw, nh = max(1, round(rw * kx)), max(1, round(rh * ky))
        region = cv2.resize(region, (nw, nh), interpolation=cv2.INTER_AREA)
        kx, ky = nw / rw, nh / rh
        m[0] *= kx
        m[1] *= ky
        m[:, 2] += [0.5 * kx - 0.5, 0.5 * ky - 0.5]
    return cv2.warpAffine(
        region,
        m,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def render_photo(index: int, seed: int, size: int = 224) -> tuple[np.ndarray, dict]:
    """Image `index` of the set drawn with `seed`: uint16 (size, size), and its meta.

    meta: bits_stored, photo (file name in skimage/data), phantom_index,
    phantom_seed, crop ([top, left, h, w] in photo pixels, before rotation and
    flip) and licence (CREDITS[photo]).
    """
    if index < 0 or not 0 <= seed < 2**32 or size < 1:
        raise ValueError(
            f"need index >= 0, 0 <= seed < 2**32, size >= 1, got {index}, {seed}, {size}"
        )
    rng = np.random.default_rng([int(seed), int(index), 0x9407])
    name = PHOTOS[int(rng.integers(len(PHOTOS)))]
    photo = load_photo(name)
    crop, angle, flip = _sample(rng, *photo.shape)
    gamma = float(rng.uniform(*GAMMA))
    view = _view(photo, crop, angle, flip, size)
    view = np.clip(view, 0.0, 1.0) ** np.float32(gamma)
    image = np.rint(view * np.float32(MAX_VALUE)).astype(np.uint16)
    meta = {
        "bits_stored": BITS_STORED,
        "photo": name,
        "phantom_index": int(index),
        "phantom_seed": int(seed),
        "crop": [int(c) for c in crop],
        "licence": f"ships with scikit-image; {CREDITS[name]}",
    }
    return image, meta
