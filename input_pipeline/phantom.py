"""Procedural, deterministic mammography phantom (the embedded default dataset).

Every image is a pure function of ``(seed, index)``: a compressed-breast
silhouette against the chest wall, power-law (1/f^3) parenchymal texture that
converges on the nipple, ducts and Cooper's ligaments, a pectoral muscle on MLO
views, and exactly one lesion -- a mass with CBIS-DDSM style margin labels or a
calcification cluster.  Pixel values are 12-bit (0..4095) stored in uint16,
"for presentation" polarity: air is black, dense tissue and calcium are bright.

Orientation convention: ``laterality == "L"`` puts the chest wall at column 0,
``"R"`` mirrors the image so the chest wall is at the last column (the usual
back-to-back hanging).  Internally everything is drawn with the chest wall on
the left and flipped at the very end.

Label sampling (``sample_case`` / ``sample_labels``) only draws a few scalars,
so label statistics can be computed without rendering pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np

# The phantom draws CBIS-DDSM's labels, so configs and heads read either the same way.
from input_pipeline.builders.cbis_ddsm import (  # noqa: F401  (PATHOLOGY_CLASSES re-exported)
    MARGIN_TYPES,
    PATHOLOGY_CLASSES,
)

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1

# Lengths below are specified at this reference resolution and scaled with size.
_REF_SIZE = 448.0

# Label model (roughly CBIS-DDSM-like proportions).
P_MASS = 0.55
MARGIN_PRIOR = {  # frequency of the primary margin label among masses
    "circumscribed": 0.26,
    "obscured": 0.14,
    "ill_defined": 0.26,
    "microlobulated": 0.09,
    "spiculated": 0.25,
}
# Pathology correlates with morphology without being determined by it.
P_MALIGNANT_GIVEN_MARGIN = {
    "circumscribed": 0.15,
    "obscured": 0.40,
    "ill_defined": 0.65,
    "microlobulated": 0.60,
    "spiculated": 0.85,
}
P_MALIGNANT_CALCIFICATION = 0.40
P_SECOND_MARGIN = 0.12
# Second labels that co-occur in CBIS-DDSM (e.g. "OBSCURED-ILL_DEFINED").
_SECOND_MARGIN = {
    "circumscribed": ("obscured", "microlobulated"),
    "obscured": ("ill_defined", "circumscribed"),
    "ill_defined": ("obscured", "spiculated"),
    "microlobulated": ("ill_defined", "obscured"),
    "spiculated": ("ill_defined",),
}


# --------------------------------------------------------------------------
# Case sampling: cheap scalars only (labels + geometry), no pixels.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """Everything random about one phantom except the pixel-level textures.

    Geometry is in pixels, canonical orientation (chest wall at column 0).
    """

    seed: int
    index: int
    size: int
    laterality: str
    view: str
    abnormality: str
    margins: tuple[int, ...]
    malignant: bool
    density: float  # 0 = fatty ... 1 = extremely dense (BI-RADS a..d as a continuum)
    depth: float  # breast semi-axis from the chest wall to the nipple
    half_height: float  # breast semi-axis along the chest wall
    center_row: float  # row where the nipple axis meets the chest wall
    tilt: float  # radians; MLO breasts droop, nipple axis points slightly down
    pect_width: float  # MLO pectoral triangle legs (0 for CC)
    pect_height: float
    lesion_row: float
    lesion_col: float
    lesion_radius: float  # mass core radius or calcification cluster radius

    @property
    def pathology(self) -> int:
        base = 0 if self.abnormality == "mass" else 2
        return base + int(self.malignant)

    def labels(self) -> dict:
        col = self.lesion_col if self.laterality == "L" else self.size - 1 - self.lesion_col
        return {
            "pathology": self.pathology,
            "margins": [int(m) for m in self.margins],
            "abnormality": self.abnormality,
            "malignant": bool(self.malignant),
            "laterality": self.laterality,
            "view": self.view,
            "lesion_center": [round(self.lesion_row), round(col)],
            "lesion_radius_px": float(round(self.lesion_radius, 3)),
            "bits_stored": BITS_STORED,
        }


def _streams(index: int, seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent label and texture streams, both derived from (seed, index) only."""
    root = np.random.default_rng([int(seed), int(index)])
    label_rng, render_rng = root.spawn(2)
    return label_rng, render_rng


def _sample_margins(rng: np.random.Generator) -> tuple[tuple[int, ...], str]:
    names = list(MARGIN_PRIOR)
    primary = names[rng.choice(len(names), p=list(MARGIN_PRIOR.values()))]
    chosen = {primary}
    if rng.random() < P_SECOND_MARGIN:
        options = _SECOND_MARGIN[primary]
        chosen.add(options[rng.integers(len(options))])
    return tuple(int(m in chosen) for m in MARGIN_TYPES), primary


def _sample_breast(rng: np.random.Generator, size: int, view: str) -> dict:
    """Silhouette and pectoral parameters (canonical orientation)."""
    if view == "CC":
        geo = {
            "depth": rng.uniform(0.58, 0.80) * size,
            "half_height": rng.uniform(0.34, 0.43) * size,
            "center_row": rng.uniform(0.47, 0.53) * size,
            "tilt": rng.uniform(-0.06, 0.06),
            "pect_width": 0.0,
            "pect_height": 0.0,
        }
    else:
        geo = {
            "depth": rng.uniform(0.60, 0.80) * size,
            "half_height": rng.uniform(0.44, 0.52) * size,
            "center_row": rng.uniform(0.52, 0.60) * size,
            "tilt": rng.uniform(0.08, 0.25),
            "pect_width": rng.uniform(0.22, 0.40) * size,
            "pect_height": rng.uniform(0.45, 0.80) * size,
        }
    return geo


def _inside_breast(geo: dict, row: float, col: float, margin: float) -> bool:
    """Is (row, col) at least ``margin`` px inside the silhouette and off the muscle?"""
    xr, yr = _rotate(col, row - geo["center_row"], geo["tilt"])
    a, b = geo["depth"] - margin, geo["half_height"] - margin
    if col < margin or a <= 0 or b <= 0 or (xr / a) ** 2 + (yr / b) ** 2 >= 1.0:
        return False
    if geo["pect_width"] > 0:
        pw, ph = geo["pect_width"] + margin, geo["pect_height"] + margin
        if col / pw + row / ph < 1.15:
            return False
    return True


def _sample_lesion_site(rng: np.random.Generator, geo: dict, extent: float) -> tuple[float, float]:
    """Rejection-sample a site in the glandular region (lesions live there)."""
    a, b = geo["depth"], geo["half_height"]
    for _ in range(200):
        u, v = rng.uniform(0.22, 0.80), rng.uniform(-0.6, 0.6)
        x, y = _unrotate(u * a, v * b, geo["tilt"])
        row, col = y + geo["center_row"], x
        if _inside_breast(geo, row, col, extent):
            return row, col
    x, y = _unrotate(0.5 * a, 0.0, geo["tilt"])  # always inside for sane geometry
    return y + geo["center_row"], x


def sample_case(index: int, seed: int, size: int = 448) -> Case:
    """Draw labels and geometry for one phantom (cheap: no pixels)."""
    rng, _ = _streams(index, seed)
    scale = size / _REF_SIZE
    laterality = "L" if rng.random() < 0.5 else "R"
    view = "CC" if rng.random() < 0.5 else "MLO"
    density = float(rng.beta(2.0, 2.0))
    geo = _sample_breast(rng, size, view)
    if rng.random() < P_MASS:
        abnormality = "mass"
        margins, primary = _sample_margins(rng)
        malignant = bool(rng.random() < P_MALIGNANT_GIVEN_MARGIN[primary])
        # Malignant masses are slightly larger on average.
        radius = rng.lognormal(math.log(15.0 if malignant else 12.5), 0.22)
        extent = radius * (2.2 if margins[MARGIN_TYPES.index("spiculated")] else 1.3)
    else:
        abnormality = "calcification"
        margins = (0,) * len(MARGIN_TYPES)
        malignant = bool(rng.random() < P_MALIGNANT_CALCIFICATION)
        radius = rng.uniform(9.0, 20.0) if malignant else rng.uniform(7.0, 15.0)
        extent = radius * 1.1
    radius = float(np.clip(radius, 6.0, 30.0)) * scale
    row, col = _sample_lesion_site(rng, geo, extent * scale + 6.0 * scale)
    return Case(
        seed=int(seed),
        index=int(index),
        size=int(size),
        laterality=laterality,
        view=view,
        abnormality=abnormality,
        margins=margins,
        malignant=malignant,
        density=density,
        lesion_row=float(row),
        lesion_col=float(col),
        lesion_radius=radius,
        **{k: float(v) for k, v in geo.items()},
    )


def sample_labels(index: int, seed: int, size: int = 448) -> dict:
    """Labels of ``render_phantom(index, seed, size)`` without rendering it."""
    return sample_case(index, seed, size).labels()


# --------------------------------------------------------------------------
# Small geometry / noise helpers.
# --------------------------------------------------------------------------


def _rotate(x, y, angle):
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, -x * s + y * c


def _unrotate(x, y, angle):
    return _rotate(x, y, -angle)


def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable (rows, cols) coordinate vectors, cached per size."""
    rows = np.arange(size, dtype=np.float32)[:, None]
    cols = np.arange(size, dtype=np.float32)[None, :]
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


@functools.lru_cache(maxsize=8)
def _freqs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared frequency grids (cycles per image) for an rfft2 spectrum."""
    fy = (np.fft.fftfreq(size) * size).astype(np.float32)[:, None] ** 2
    fx = (np.fft.rfftfreq(size) * size).astype(np.float32)[None, :] ** 2
    fy.flags.writeable = False
    fx.flags.writeable = False
    return fy, fx


def _power_law_noise(rng, size, beta, stretch=1.0, f_low=2.0):
    """Zero-mean, unit-std Gaussian field with a 1/f^beta power spectrum.

    Mammographic anatomical noise follows a power law with beta ~ 3; ``stretch``
    > 1 elongates structures along x (used for radially oriented tissue).
    The field is periodic, so it can be sampled with wrap-around.

    Random Fourier coefficients are always drawn on the (at least) 448-px
    frequency grid and the low-frequency block is kept for smaller sizes, so
    the same (seed, index) shows the same anatomy at every resolution.
    """
    full = max(size, int(_REF_SIZE))
    coeffs = rng.standard_normal((2, full, full // 2 + 1), dtype=np.float32)
    half = size // 2
    rows = np.r_[0 : size - half, full - half : full]  # non-negative then negative frequencies
    spectrum = coeffs[0][rows, : half + 1] + 1j * coeffs[1][rows, : half + 1]
    fy, fx = _freqs(size)
    f2 = fx * (stretch * stretch) + fy + f_low * f_low
    amplitude = f2 ** np.float32(-beta / 4.0)
    amplitude[0, 0] = 0.0
    field = np.fft.irfft2(spectrum * amplitude, s=(size, size))
    field -= field.mean()
    field /= field.std() + 1e-8
    return field.astype(np.float32, copy=False)


def _smooth_noise(rng, shape, cells):
    """Cheap band-limited noise: a coarse random grid upsampled with bicubic."""
    h, w = shape
    coarse = rng.standard_normal((max(cells, 2), max(cells, 2))).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _blur(img, sigma):
    if sigma <= 0.05:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------
# Breast anatomy.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class _Anatomy:
    """Per-pixel maps shared by the tissue layers (canonical orientation)."""

    mask: np.ndarray  # soft (anti-aliased) silhouette in [0, 1]
    skin_dist: np.ndarray  # distance to the skin line, px (0 outside)
    u: np.ndarray  # depth fraction: 0 chest wall .. 1 nipple
    v: np.ndarray  # normalised distance from the nipple axis
    nipple: tuple[float, float]  # (row, col)


def _silhouette(case: Case) -> _Anatomy:
    """Half-ellipse against the chest wall; MLO adds the axillary tail."""
    rows, cols = _grid(case.size)
    xr, yr = _rotate(cols, rows - case.center_row, case.tilt)
    u = xr / case.depth
    v = yr / case.half_height
    inside = u * u + v * v < 1.0
    if case.view == "MLO":
        # Tissue reaches the top edge above the pectoral muscle (axillary tail).
        tail = cols / (1.9 * case.pect_width) + rows / (1.3 * case.pect_height) < 1.0
        inside = inside | tail
        # Round off the kink where the tail joins the ellipse (blurred at 1/4
        # resolution: a wide blur at full size would cost several ms).
        small = cv2.resize(
            inside.astype(np.float32), (case.size // 4,) * 2, interpolation=cv2.INTER_AREA
        )
        small = _blur(small, 0.05 * case.size / 4)
        smooth = cv2.resize(small, (case.size, case.size), interpolation=cv2.INTER_LINEAR)
        binary = (smooth > 0.5).astype(np.float32)
    else:
        binary = inside.astype(np.float32)
    # The image border at the chest wall is not skin: measure from the curved edge only.
    padded = np.pad(binary.astype(np.uint8), ((0, 0), (1, 0)), mode="edge")
    skin_dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[:, 1:]
    mask = _blur(binary, 0.6)
    nx, ny = _unrotate(case.depth, 0.0, case.tilt)
    return _Anatomy(
        mask, skin_dist, u.astype(np.float32), v.astype(np.float32), (ny + case.center_row, nx)
    )


def _gland_prior(case: Case, anat: _Anatomy) -> np.ndarray:
    """Where fibroglandular tissue may be: a cone behind the nipple.

    Fades into the subcutaneous fat under the skin and the retroglandular fat
    at the chest wall; denser breasts have a wider glandular region.
    """
    spread = 0.75 + 0.45 * case.density
    q = ((anat.u - 0.48) / (0.42 * spread)) ** 2 + (anat.v / (0.60 * spread)) ** 2
    prior = np.exp(-q * q * 0.8)
    sub_fat = 0.028 * case.size
    prior *= 1.0 - np.exp(-((anat.skin_dist / sub_fat) ** 2))
    prior *= np.clip((anat.u + 0.02) / 0.18, 0.0, 1.0)
    return prior.astype(np.float32)


def _fan_texture(rng, case: Case, anat: _Anatomy) -> np.ndarray:
    """Power-law texture remapped to polar coordinates around the nipple.

    Structures elongated along the noise x axis become strands converging on
    the nipple, as ducts and supporting tissue do in real mammograms.
    """
    size = case.size
    field = _power_law_noise(rng, size, beta=3.0, stretch=rng.uniform(2.0, 3.0), f_low=3.0)
    rows, cols = _grid(size)
    # Converge slightly beyond the nipple so there is no visible singularity.
    n_row, n_col = anat.nipple
    beyond = 0.12 * case.depth
    n_row, n_col = n_row + beyond * math.sin(case.tilt), n_col + beyond * math.cos(case.tilt)
    dy, dx = rows - n_row, n_col - cols
    radius = np.sqrt(dx * dx + dy * dy)
    angle = np.arctan2(dy, dx)
    map_x = radius.astype(np.float32)
    map_y = (angle * (size / math.pi) * 0.8 + size / 2).astype(np.float32)
    return cv2.remap(field, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def _parenchyma(rng, case: Case, anat: _Anatomy, prior: np.ndarray) -> np.ndarray:
    """Fibroglandular density: thresholded 1/f^3 texture inside the gland cone."""
    fan = _fan_texture(rng, case, anat)
    fine = _power_law_noise(rng, case.size, beta=2.8, f_low=4.0)
    # Soft threshold: more tissue where the prior and breast density are high.
    bias = 2.6 * prior + 1.6 * (case.density - 0.5) - 1.4
    gland = _sigmoid((fan + bias) / 0.35) * prior
    tissue = 0.40 * gland * (0.85 + 0.15 * fine)
    # Faint texture in the fat too (vessels, septa, lobule walls).
    tissue += 0.025 * fine * anat.mask + 0.02 * fan * anat.mask
    return tissue.astype(np.float32)


def _ducts_and_ligaments(rng, case: Case, anat: _Anatomy, prior: np.ndarray) -> np.ndarray:
    """Curvilinear structures: ducts fanning from the nipple, Cooper's ligaments."""
    size, scale = case.size, case.size / _REF_SIZE
    canvas = np.zeros((size, size), np.uint8)
    n_row, n_col = anat.nipple
    base_angle = math.pi + case.tilt  # pointing from the nipple to the chest wall
    for _ in range(int(rng.integers(25, 45))):
        angle = base_angle + rng.normal(0.0, 0.5)
        length = rng.uniform(0.25, 0.8) * case.depth
        steps = 12
        pts = []
        r, c = n_row + rng.normal(0, 4 * scale), n_col - rng.uniform(0, 10) * scale
        for _ in range(steps):
            pts.append((c, r))
            angle += rng.normal(0.0, 0.10)
            r += math.sin(angle) * length / steps
            c += math.cos(angle) * length / steps
        pts = np.round(np.array(pts) * 16).astype(np.int32)  # 4 fractional bits
        cv2.polylines(canvas, [pts], False, int(rng.integers(90, 256)), 1, cv2.LINE_AA, shift=4)
    ducts = canvas.astype(np.float32) * (0.07 / 255.0)
    ducts *= 0.35 + 0.65 * prior

    # Cooper's ligaments: thin arcs in the subcutaneous fat, bowing toward the skin.
    arcs = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(10, 22))):
        u, v = rng.uniform(0.3, 0.95), rng.uniform(-0.9, 0.9)
        if u * u + v * v > 0.92:
            continue
        x, y = _unrotate(u * case.depth, v * case.half_height, case.tilt)
        center = (round(x * 16), round((y + case.center_row) * 16))
        axes = (int(rng.uniform(8, 22) * scale * 16), int(rng.uniform(4, 10) * scale * 16))
        outward = math.degrees(math.atan2(v * case.half_height, u * case.depth))
        cv2.ellipse(
            arcs,
            center,
            axes,
            outward,
            -70,
            70,
            int(rng.integers(80, 200)),
            1,
            cv2.LINE_AA,
            shift=4,
        )
    ligaments = arcs.astype(np.float32) * (0.05 / 255.0)
    return _blur(ducts + ligaments, 0.5 * scale)


def _pectoral(rng, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """MLO pectoral muscle: bright, fibrous triangle in the upper chest-wall corner."""
    size = case.size
    if case.view != "MLO":
        zero = np.zeros((size, size), np.float32)
        return zero, zero
    rows, cols = _grid(size)
    x, y = cols / case.pect_width, rows / case.pect_height
    bow = rng.uniform(0.0, 0.35)  # the muscle edge is slightly convex
    level = x + y + bow * x * y - 1.0
    grad = math.hypot(1.0 / case.pect_width, 1.0 / case.pect_height)
    signed_px = -level / grad
    muscle = _sigmoid(signed_px / (1.2 * size / _REF_SIZE)).astype(np.float32)
    fibres = _muscle_fibres(rng, case)
    density = 0.28 + 0.10 * np.clip(-level, 0.0, 1.0) + 0.015 * fibres
    return (muscle * density).astype(np.float32), muscle


def _muscle_fibres(rng, case: Case) -> np.ndarray:
    """Streaks running along the muscle edge: slow along the fibres, fast across.

    A small random grid is stretched straight onto the image with one affine
    warp (output pixel -> grid coordinates), which is much cheaper than
    rendering a large texture and rotating it.
    """
    size = case.size
    along = np.array([-case.pect_width, case.pect_height]) / math.hypot(
        case.pect_width, case.pect_height
    )
    across = np.array([along[1], -along[0]])
    grid = rng.standard_normal((6, 64)).astype(np.float32)  # rows: along, cols: across
    span = 1.5 * size
    to_grid = np.array(
        [
            [across[0] * 64 / span, across[1] * 64 / span, 32.0],
            [along[0] * 6 / span, along[1] * 6 / span, 3.0],
        ],
        dtype=np.float64,
    )
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    return cv2.warpAffine(grid, to_grid, (size, size), flags=flags, borderMode=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------
# Lesions.
# --------------------------------------------------------------------------


def _patch(case: Case, half: float):
    """Slices and local coordinates of a square window around the lesion."""
    size = case.size
    r0 = max(int(case.lesion_row - half), 0)
    r1 = min(int(case.lesion_row + half) + 2, size)
    c0 = max(int(case.lesion_col - half), 0)
    c1 = min(int(case.lesion_col + half) + 2, size)
    dy = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(case.lesion_row)
    dx = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(case.lesion_col)
    return (slice(r0, r1), slice(c0, c1)), dy, dx


def _mass_boundary(rng, r0, margins, scale):
    """Boundary radius as a function of angle, shaped by the margin labels.

    Returns a function so the same outline can be evaluated on the pixel grid
    and at the scalar angles where spicules take root.
    """
    aspect = rng.uniform(0.72, 1.0)
    orient = rng.uniform(0.0, math.pi)
    irregular = 0.03
    if margins["ill_defined"] or margins["spiculated"]:
        irregular = 0.12
    elif margins["obscured"] or margins["microlobulated"]:
        irregular = 0.06
    harmonics = [
        (k, rng.normal(0.0, irregular / k), rng.uniform(0, 2 * math.pi)) for k in range(2, 6)
    ]
    lobes = 0
    if margins["microlobulated"]:
        # Small scallops: convex lobules a few px wide with inward cusps; the
        # lobule phase and depth drift around the outline so it is not a gear.
        lobes = max(round(2 * math.pi * r0 / (rng.uniform(6.0, 8.5) * scale)), 6)
        lobe_depth = rng.uniform(0.09, 0.13)
        drift = [(k, rng.normal(0.0, 0.8 / k), rng.uniform(0, 2 * math.pi)) for k in (1, 2, 3)]
        swell = [(k, rng.normal(0.0, 0.45), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 5)]

    def radius_at(theta):
        c, s = np.cos(theta - orient), np.sin(theta - orient)
        radius = r0 / np.sqrt(c * c * aspect + s * s / aspect)  # ellipse in polar form
        wobble = sum(a * np.cos(k * theta + p) for k, a, p in harmonics)
        radius = radius * (1.0 + wobble)
        if lobes:
            phase = 0.5 * lobes * theta + sum(a * np.sin(k * theta + p) for k, a, p in drift)
            depth = lobe_depth * (1.0 + sum(a * np.cos(k * theta + p) for k, a, p in swell))
            scallop = np.abs(np.cos(phase)) - 0.64
            radius = radius * (1.0 + np.clip(depth, 0.02, 0.25) * scallop)
        return radius

    return radius_at


def _spicules(rng, shape, origin, r0, boundary_at, scale):
    """Thin, tapering, slightly curved spicules radiating from the core.

    Each spicule is one anti-aliased polygon whose half-width shrinks to zero at
    the tip, so after a light blur it also fades along its length.
    """
    canvas = np.zeros(shape, np.uint8)
    count = int(rng.integers(10, 24))
    for angle in rng.uniform(0, 2 * math.pi, count):
        root = 0.6 * float(boundary_at(np.float32(angle)))
        length = r0 * rng.uniform(0.7, 2.4)
        base_half_width = rng.uniform(0.6, 1.3) * scale
        steps = 6
        heading, curl = angle, rng.normal(0.0, 0.06)
        point = root * np.array([math.cos(angle), math.sin(angle)])
        left, right = [], []
        for i in range(steps + 1):
            half_width = base_half_width * (1.0 - i / steps) ** 0.8
            normal = np.array([-math.sin(heading), math.cos(heading)])
            left.append(point + half_width * normal)
            right.append(point - half_width * normal)
            heading += curl + rng.normal(0.0, 0.05)
            point = point + (length / steps) * np.array([math.cos(heading), math.sin(heading)])
        poly = np.array(left + right[::-1]) - origin  # local (x, y) -> patch pixels
        pts = np.round(poly * 16).astype(np.int32)  # 4 fractional bits for sub-pixel AA
        cv2.fillPoly(canvas, [pts], int(rng.integers(120, 256)), cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _render_mass(rng, case: Case, density: np.ndarray) -> None:
    """Add a mass whose boundary morphology follows its margin labels (in place)."""
    scale = case.size / _REF_SIZE
    margins = dict(zip(MARGIN_TYPES, case.margins, strict=True))
    r0 = case.lesion_radius
    half = r0 * (3.6 if margins["spiculated"] else 2.6) + 4
    window, dy, dx = _patch(case, half)
    dist = np.sqrt(dy * dy + dx * dx)
    theta = np.arctan2(dy, dx)
    boundary_at = _mass_boundary(rng, r0, margins, scale)
    boundary = boundary_at(theta)
    signed = boundary - dist  # > 0 inside, px

    # Masses are only a little denser than fibroglandular tissue; malignant ones more so.
    amplitude = rng.uniform(0.19, 0.28) if case.malignant else rng.uniform(0.15, 0.23)
    edge = np.float32(0.6 * scale)  # circumscribed: sharp, about one pixel
    if margins["ill_defined"]:
        edge = max(edge, 0.30 * r0)
        signed = signed + 0.2 * r0 * _smooth_noise(rng, dist.shape, 9)
    if margins["spiculated"]:
        edge = max(edge, 0.10 * r0)
    if margins["microlobulated"]:
        edge = max(edge, 0.8 * scale)  # keeps the tiny lobules from aliasing
    overlay = 0.0
    if margins["obscured"]:
        overlay, covered = _obscuring_tissue(rng, dy, dx, dist, r0, amplitude)
        edge = edge + covered * (0.25 * r0)  # the hidden side loses its sharp edge
    core = _sigmoid(signed / np.maximum(edge, 0.35) * 1.7)
    dome = np.clip(1.0 - (dist / (boundary + 1e-3)) ** 2, 0.0, 1.0)
    # Mild internal heterogeneity so the interior is not a flat plateau.
    grain = 0.06 * _smooth_noise(rng, dist.shape, 6) + 0.06 * _smooth_noise(rng, dist.shape, 14)
    lesion = amplitude * core * (0.82 + 0.18 * dome) * (1.0 + grain)

    if margins["spiculated"]:
        origin = np.array([float(dx[0, 0]), float(dy[0, 0])])
        spic = _spicules(rng, dist.shape, origin, r0, boundary_at, scale)
        # max, not sum: overlapping spicule roots must not draw a bright ring.
        lesion = np.maximum(lesion, 0.6 * amplitude * _blur(spic, 0.5 * scale))
    # A mass displaces the fat and gland it grows into, so under the core the
    # texture is partly replaced by a uniform level (at least mid-gland) before
    # the mass density is added; otherwise a mass on a fat lobule looks hollow.
    background = density[window]
    fill = 0.5 * core
    level = max(float(background.mean()), 0.2)
    density[window] = background * (1.0 - fill) + fill * level + lesion + overlay


def _obscuring_tissue(rng, dy, dx, dist, r0, amplitude):
    """Overlapping dense tissue over one side of the mass.

    Returns the added density and the 0..1 map of the covered side (used to
    soften the mass edge there, so that part of the boundary is hidden).
    """
    phi = rng.uniform(0, 2 * math.pi)
    along = dx * math.cos(phi) + dy * math.sin(phi)
    covered = _sigmoid((along + rng.uniform(-0.1, 0.3) * r0) / (0.18 * r0))
    window = np.exp(-((dist / (2.0 * r0)) ** 2))
    clumps = _sigmoid(2.5 * _smooth_noise(rng, dist.shape, 8) + 1.0)
    overlay = (rng.uniform(0.7, 1.0) * amplitude) * covered * window * clumps
    return overlay, covered


def _calcification_specks(rng, case: Case):
    """Speck centres (local px), sizes, orientations and brightness.

    Malignant: numerous, tiny, pleomorphic specks along linear/branching
    paths.  Benign: fewer, larger, rounder, scattered specks.
    """
    scale = case.size / _REF_SIZE
    radius = case.lesion_radius
    if case.malignant:
        count = int(rng.integers(12, 31))
        points, dirs = _branching_paths(rng, radius, count)
        points = points + rng.normal(0.0, 0.6 * scale, points.shape)
        major = rng.uniform(0.45, 1.1, count) * scale
        aspect = rng.uniform(0.35, 1.0, count)
        orient = dirs + rng.normal(0.0, 0.3, count)
        bright = rng.uniform(0.25, 0.55, count)
    else:
        count = int(rng.integers(5, 15))
        r = radius * np.sqrt(rng.uniform(0.0, 1.0, count))
        a = rng.uniform(0, 2 * math.pi, count)
        points = np.stack([r * np.sin(a), r * np.cos(a)], axis=1)
        major = rng.uniform(0.8, 1.4, count) * scale
        aspect = rng.uniform(0.8, 1.0, count)
        orient = rng.uniform(0, math.pi, count)
        bright = rng.uniform(0.40, 0.55, count)
    # Keep everything within the labelled cluster radius.
    norm = np.linalg.norm(points, axis=1, keepdims=True)
    points = points * np.minimum(1.0, radius / np.maximum(norm, 1e-6))
    sigma_min = 0.45  # below this a speck aliases to nothing
    major = np.maximum(major, sigma_min)
    minor = np.maximum(major * aspect, sigma_min)
    return points, major, minor, orient, bright


def _branching_paths(rng, radius, count):
    """Points along a main line through the centre plus 1-2 side branches."""
    angle = rng.uniform(0, 2 * math.pi)
    segments = [
        (np.array([-math.sin(angle), -math.cos(angle)]) * radius, angle)
    ]  # (start (row,col), angle)
    for _ in range(int(rng.integers(1, 3))):
        t = rng.uniform(0.3, 1.6)
        start = segments[0][0] + t * radius * np.array([math.sin(angle), math.cos(angle)])
        segments.append((start, angle + rng.choice([-1, 1]) * rng.uniform(0.5, 0.9)))
    lengths = np.array([2.0 * radius] + [rng.uniform(0.5, 0.9) * radius] * (len(segments) - 1))
    which = rng.choice(len(segments), size=count, p=lengths / lengths.sum())
    t = rng.uniform(0.0, 1.0, count) * lengths[which]
    starts = np.stack([segments[i][0] for i in which])
    angles = np.array([segments[i][1] for i in which])
    points = starts + t[:, None] * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return points, angles


def _render_calcifications(rng, case: Case, density: np.ndarray) -> None:
    """Add a cluster of small, very bright specks (in place)."""
    points, major, minor, orient, bright = _calcification_specks(rng, case)
    window, dy, dx = _patch(case, case.lesion_radius + 6.0)
    specks = np.zeros(np.broadcast_shapes(dy.shape, dx.shape), np.float32)
    for (py, px), sa, sb, th, b in zip(points, major, minor, orient, bright, strict=True):
        ry, rx = dy - py, dx - px
        c, s = math.cos(th), math.sin(th)
        along, across = rx * c + ry * s, -rx * s + ry * c
        q = (along / sa) ** 2 + (across / sb) ** 2
        specks = np.maximum(specks, b * np.exp(-0.5 * q))
    density[window] += specks


# --------------------------------------------------------------------------
# Assembly.
# --------------------------------------------------------------------------


def _thickness(case: Case, anat: _Anatomy) -> np.ndarray:
    """Compressed-breast thickness falls off over the last few mm to the skin."""
    ramp = np.clip(anat.skin_dist / (0.07 * case.size), 0.0, 1.0)
    return 0.45 + 0.55 * np.sqrt(ramp * (2.0 - ramp))


def _tone_curve(signal: np.ndarray) -> np.ndarray:
    """Linear up to a knee, then a soft shoulder so dense regions do not clip."""
    knee = 0.8
    over = np.maximum(signal - knee, 0.0)
    out = np.minimum(signal, knee) + (1.0 - knee) * np.tanh(over / (1.0 - knee))
    return np.clip(out, 0.0, 1.0)


def render_case(case: Case) -> np.ndarray:
    """Rasterise a sampled case into a 12-bit image (uint16)."""
    _, rng = _streams(case.index, case.seed)
    size, scale = case.size, case.size / _REF_SIZE
    anat = _silhouette(case)
    prior = _gland_prior(case, anat)
    muscle_density, muscle = _pectoral(rng, case)
    prior *= 1.0 - muscle
    density = _parenchyma(rng, case, anat, prior)
    density += _ducts_and_ligaments(rng, case, anat, prior)
    density = density * (1.0 - muscle) + muscle_density
    if case.abnormality == "mass":
        _render_mass(rng, case, density)
    else:
        _render_calcifications(rng, case, density)

    fat = 0.26
    skin = 0.16 * np.exp(-anat.skin_dist / (1.2 * scale))
    signal = anat.mask * (_thickness(case, anat) * (fat + density) + skin)
    signal += 0.004  # detector offset: air is near zero but not exactly
    # Quantum noise grows with the signal (Poisson-like), kept subtle.
    signal += rng.standard_normal((size, size), dtype=np.float32) * (0.006 * np.sqrt(signal))
    image = _tone_curve(signal) * MAX_VALUE
    image = np.rint(image).astype(np.uint16)
    if case.laterality == "R":
        image = np.ascontiguousarray(image[:, ::-1])
    return image


def render_phantom(index: int, seed: int, size: int = 448) -> tuple[np.ndarray, dict]:
    """Image (size x size, np.uint16, 12-bit values 0..4095 stored in uint16) and labels."""
    case = sample_case(index, seed, size)
    return render_case(case), case.labels()


def render_phantom_batch(indices, seed: int, size: int = 448) -> tuple[np.ndarray, list[dict]]:
    """Stacked images (N, size, size) and their label dicts."""
    pairs = [render_phantom(int(i), seed, size) for i in indices]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]
