"""Procedural cardiac cine-MRI phantom: short-axis slices with ACDC's labels.

Every patient is a stack of SLICES short-axis slices from the base (slice 0)
to the apex, at end-diastole (ED) and end-systole (ES): RECORDS_PER_PATIENT
records, record index i = (patient * 2 + phase) * SLICES + slice, phase 0 = ED.
Each record is one uint16 slice (bSSFP-like contrast: bright blood, dark
myocardium, bright fat, black lungs) with an ACDC-numbered mask in the extra
array "mask": 0 background, 1 right-ventricle cavity, 2 left-ventricle
myocardium, 3 left-ventricle cavity (papillary muscles included, as ACDC
draws them). The superclass "heart" is mask > 0.

Per patient (drawn from default_rng([seed, patient])): a diagnosis group
(NOR, MINF, DCM, HCM, RV as in ACDC) that sets the size of the left ventricle,
its wall thickness, how much it contracts, and the size of the right
ventricle; on top of that the position, orientation, ellipticity and a
low-order wobble of the outlines, the body habitus, the tissue contrasts, a
smooth coil-sensitivity (bias) field, the noise level and the slice spacing.
ES is ED contracted: the cavities shrink and the myocardium thickens so that
its area is kept (incompressible muscle), so ES cavities are always smaller.

Geometry is in millimetres over a FIELD_OF_VIEW_MM square, so `size` sets the
pixel spacing (320 mm / size; 1.67 mm at 192 px, ACDC's slices are
1.3-1.9 mm): the myocardium (5-15 mm) is a few pixels wide at the stored size
and thinner than one 16-px patch at any model size.

Meta, with the names and layout the acdc builder's records carry after
tools/prepare_data.py (so one pipeline reads both): bits_stored 16, spacing
[row_mm, col_mm], patient ("cardiac-0007"), phase ("ED"/"ES"), frame,
source_index {"slice": k}, source_id (one per volume), classes, superclass,
group, group_id; and slice_spacing / slice_thickness in mm, which the
ingested records do not carry (readers know it; the engine drops it).

Rendering is vectorised numpy + OpenCV on one size x size grid: ~2 ms per
192 px slice on one core.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from input_pipeline import mri_acquisition

SLICES = 8  # short-axis slices per volume, base to apex
PHASES = ("ED", "ES")
RECORDS_PER_PATIENT = SLICES * len(PHASES)
FIELD_OF_VIEW_MM = 320.0
CLASSES = ["background", "rv", "myocardium", "lv"]  # as the acdc builder
SUPERCLASS = "heart"
GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")  # as the acdc builder
RV, MYOCARDIUM, LV = 1, 2, 3

# Per group: LV endocardial radius at the base at ED (mm, mean/sd), wall
# thickness (mm), ES/ED endocardial radius ratio (range), RV size factor (range).
_GROUP_SHAPES = {
    "NOR": dict(radius=(25.0, 2.5), wall=(8.0, 1.0), contraction=(0.62, 0.72), rv=(0.9, 1.1)),
    "MINF": dict(radius=(29.0, 3.0), wall=(8.0, 1.0), contraction=(0.78, 0.88), rv=(0.9, 1.1)),
    "DCM": dict(radius=(33.0, 3.0), wall=(6.0, 0.7), contraction=(0.85, 0.93), rv=(1.0, 1.2)),
    "HCM": dict(radius=(21.0, 2.0), wall=(13.0, 1.5), contraction=(0.45, 0.58), rv=(0.8, 1.0)),
    "RV": dict(radius=(24.0, 2.5), wall=(7.5, 1.0), contraction=(0.62, 0.75), rv=(1.45, 1.75)),
}


@dataclasses.dataclass(frozen=True)
class Patient:
    """Everything that is fixed for one patient (mm, radians, [0, 1] intensities)."""

    index: int
    group: str
    lv_center: tuple[float, float]  # (x, y) mm from the image centre, y down
    lv_radius: float  # endocardial radius at the base, ED
    wall: float  # myocardial thickness, ED
    contraction: float  # ES / ED endocardial radius
    ellipticity: float  # minor / major axis of the LV outlines
    orientation: float  # of the major axis
    wobble: tuple[tuple[float, float], ...]  # (amplitude, phase) of harmonics 2, 3, 4
    infarct: tuple[float, float, float] | None  # (angle, half-width, remaining wall fraction)
    rv_size: float
    rv_angle: float  # direction LV centre -> RV, about image left (pi)
    apex: float  # fraction of the stack where the LV cavity closes (> 1: never)
    rv_extent: float  # fraction of the stack the RV reaches
    body: tuple[float, float, float, float]  # torso semi-axes (x, y) and centre (x, y), mm
    fat: float  # subcutaneous fat thickness, mm
    tissue: dict  # intensities: blood, myocardium, fat, muscle, liver, lung
    bias: tuple[float, float, float]  # coil-field gradient (x, y) and strength
    noise: float  # Rician noise sigma, on [0, 1] intensities
    slice_spacing: float  # mm between slice centres
    slice_thickness: float  # mm
    es_frame: int


@functools.lru_cache(maxsize=4)
def sample_patient(patient: int, seed: int) -> Patient:
    """The patient's anatomy and acquisition, from default_rng([seed, patient])."""
    rng = np.random.default_rng([int(seed), int(patient), 0xCA4D])
    group = GROUPS[int(rng.integers(len(GROUPS)))]
    shape = _GROUP_SHAPES[group]
    lv_radius = float(np.clip(rng.normal(*shape["radius"]), 16.0, 42.0))
    wall = float(np.clip(rng.normal(*shape["wall"]), 4.5, 17.0))
    infarct = None
    if group == "MINF":  # a thinned, akinetic sector
        infarct = (
            float(rng.uniform(0, 2 * math.pi)),
            float(rng.uniform(0.4, 0.9)),
            float(rng.uniform(0.45, 0.65)),
        )
    tissue = {
        "blood": rng.uniform(0.78, 0.95),
        "myocardium": rng.uniform(0.22, 0.34),
        "fat": rng.uniform(0.65, 0.85),
        "muscle": rng.uniform(0.28, 0.4),
        "liver": rng.uniform(0.38, 0.5),
        "lung": rng.uniform(0.03, 0.08),
    }
    spacing = float(rng.uniform(8.0, 11.0))
    return Patient(
        index=int(patient),
        group=group,
        lv_center=(float(rng.uniform(-10, 35)), float(rng.uniform(-25, 15))),
        lv_radius=lv_radius,
        wall=wall,
        contraction=float(rng.uniform(*shape["contraction"])),
        ellipticity=float(rng.uniform(0.82, 1.0)),
        orientation=float(rng.uniform(0, math.pi)),
        wobble=tuple(
            (float(rng.uniform(0.0, 0.05)), float(rng.uniform(0, 2 * math.pi))) for _ in range(3)
        ),
        infarct=infarct,
        rv_size=float(rng.uniform(*shape["rv"])),
        rv_angle=float(math.pi + rng.uniform(-0.45, 0.15)),
        apex=float(rng.uniform(1.02, 1.2)),
        rv_extent=float(rng.uniform(0.75, 0.95)),
        body=(
            float(rng.uniform(135, 160)),
            float(rng.uniform(95, 120)),
            float(rng.uniform(-8, 8)),
            float(rng.uniform(-5, 10)),
        ),
        fat=float(rng.uniform(5, 16)),
        tissue={k: float(v) for k, v in tissue.items()},
        bias=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)), float(rng.uniform(0.1, 0.35))),
        noise=float(rng.uniform(0.015, 0.045)),
        slice_spacing=spacing,
        slice_thickness=float(min(spacing, rng.uniform(6.0, 8.0))),
        es_frame=int(rng.integers(9, 15)),
    )


def record_position(index: int) -> tuple[int, int, int]:
    """Record index -> (patient, phase index (0 = ED), slice index)."""
    patient, rest = divmod(int(index), RECORDS_PER_PATIENT)
    phase, slice_index = divmod(rest, SLICES)
    return patient, phase, slice_index


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return mri_acquisition.pixel_grid(size, FIELD_OF_VIEW_MM)


_inside_ellipse = mri_acquisition.inside_ellipse


@dataclasses.dataclass
class _Slice:
    """The LV's and RV's outlines on one slice (mm)."""

    endo: float  # endocardial radius, 0 = no cavity
    wall: float
    rv: float  # RV size factor on this slice, 0 = none


def _slice_shape(p: Patient, phase: int, slice_index: int) -> _Slice:
    u = slice_index / (SLICES - 1)  # 0 base .. 1 apex
    taper = math.sqrt(max(0.0, 1.0 - (u / p.apex) ** 2))  # a half-ellipsoid LV
    endo_ed = p.lv_radius * taper
    # Myocardial area at ED, kept at ES (incompressible muscle).
    wall_ed = p.wall * (1.0 - 0.25 * u)
    area = math.pi * ((endo_ed + wall_ed) ** 2 - endo_ed**2)
    endo = endo_ed * (p.contraction if phase == 1 else 1.0)
    wall = math.sqrt(endo**2 + area / math.pi) - endo if endo > 0 else wall_ed
    rv_taper = math.sqrt(max(0.0, 1.0 - (u / p.rv_extent) ** 2))
    rv = p.rv_size * rv_taper * (0.72 if phase == 1 else 1.0)
    return _Slice(endo=endo, wall=wall, rv=rv)


def _polar(x, y, p: Patient) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic radius (mm along the major axis) and angle about the LV centre."""
    dx, dy = x - p.lv_center[0], y - p.lv_center[1]
    c, s = math.cos(p.orientation), math.sin(p.orientation)
    u, v = dx * c + dy * s, (-dx * s + dy * c) / p.ellipticity
    return np.sqrt(u * u + v * v), np.arctan2(dy, dx)


def _outline(theta: np.ndarray, p: Patient) -> np.ndarray:
    """1 + the patient's radial wobble, per pixel angle."""
    r = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(p.wobble, start=2):
        r += amplitude * np.cos(k * theta + phase)
    return r


def _wall_profile(theta: np.ndarray, p: Patient) -> np.ndarray | float:
    """Wall thickness factor per angle: 1, except in an infarct's thinned sector."""
    if p.infarct is None:
        return 1.0
    angle, half_width, remaining = p.infarct
    d = np.abs(np.angle(np.exp(1j * (theta - angle))))
    return 1.0 - (1.0 - remaining) * np.clip(1.5 - d / half_width, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _body(patient: int, seed: int, size: int) -> np.ndarray:
    """The patient's torso without the heart and liver (the same on every slice):
    air, muscle inside subcutaneous fat, lungs either side of the heart, spine.
    Cached: the records of one patient are rendered one after the other."""
    p = sample_patient(patient, seed)
    x, y = _grid(size)
    t = p.tissue
    bx, by, bcx, bcy = p.body
    image = np.full((size, size), 0.02, np.float32)
    torso = _inside_ellipse(x, y, bcx, bcy, bx, by)
    image[torso] = t["fat"]
    image[_inside_ellipse(x, y, bcx, bcy, bx - p.fat, by - p.fat)] = t["muscle"]
    for side in (-1.0, 1.0):
        lung = _inside_ellipse(x, y, bcx + side * 0.58 * bx, bcy + 0.05 * by, 0.34 * bx, 0.6 * by)
        image[lung & torso] = t["lung"]
    image[_inside_ellipse(x, y, bcx, bcy + 0.72 * by, 14.0, 13.0)] = t["muscle"] * 0.6
    image[_inside_ellipse(x, y, bcx, bcy + 0.72 * by, 9.0, 8.0)] = t["fat"] * 0.9
    image.flags.writeable = False  # shared by the slices of the cache
    return image


def _heart_window(p: Patient, size: int) -> tuple[slice, slice]:
    """Rows and columns of the square that holds the heart on every slice."""
    reach = 3.2 * (p.lv_radius + p.wall + 3.0) * max(1.0, p.rv_size)
    return mri_acquisition.window(p.lv_center, reach, size, FIELD_OF_VIEW_MM)


def render_slice(p: Patient, phase: int, slice_index: int, size: int, seed: int):
    """(image float32 [0, 1], mask uint8) of one slice of patient `p`."""
    t = p.tissue
    shape = _slice_shape(p, phase, slice_index)
    u = slice_index / (SLICES - 1)
    image = _body(p.index, seed, size).copy()
    x, y = _grid(size)
    bx, by, bcx, bcy = p.body
    if u > 0.35:  # the liver dome rises into apical slices, on the patient's right (image left)
        liver = _inside_ellipse(x, y, bcx - 0.3 * bx, bcy + 0.45 * by, 0.5 * bx, 0.9 * by * u)
        liver &= _inside_ellipse(x, y, bcx, bcy, bx - p.fat, by - p.fat)
        image[liver] = t["liver"]

    # Heart, drawn in a window around it: pericardial fat, the RV (a crescent
    # wrapped around the septum), the LV myocardium and cavity.
    mask = np.zeros((size, size), np.uint8)
    rows, cols = _heart_window(p, size)
    x, y = x[:, cols], y[rows, :]
    view, labels = image[rows, cols], mask[rows, cols]
    lx, ly = p.lv_center
    radius, theta = _polar(x, y, p)
    wobble = _outline(theta, p)
    epi_r = (shape.endo + shape.wall * _wall_profile(theta, p)) * wobble
    epi_mean = shape.endo + shape.wall
    epicardium = radius < epi_r
    view[radius < epi_r + 3.0] = t["fat"] * 0.9
    if shape.rv > 0:
        c, s = math.cos(p.rv_angle), math.sin(p.rv_angle)
        rcx, rcy = lx + 0.7 * epi_mean * c, ly + 0.7 * epi_mean * s
        ra, rb = 0.95 * epi_mean * shape.rv, 1.45 * epi_mean * shape.rv
        du, dv = (x - rcx) * c + (y - rcy) * s, -(x - rcx) * s + (y - rcy) * c
        rv_wall = (du / (ra + 3.0)) ** 2 + (dv / (rb + 3.0)) ** 2 < 1.0
        view[rv_wall & ~epicardium] = t["myocardium"]
        rv_cavity = ((du / ra) ** 2 + (dv / rb) ** 2 < 1.0) & ~epicardium
        view[rv_cavity] = t["blood"]
        labels[rv_cavity] = RV
    view[epicardium] = t["myocardium"]
    labels[epicardium] = MYOCARDIUM
    if shape.endo > 0:
        cavity = radius < shape.endo * wobble
        view[cavity] = t["blood"]
        labels[cavity] = LV
        if shape.endo > 8.0:  # papillary muscles: dark blobs inside the cavity, labelled LV
            for angle in (p.orientation + 0.8, p.orientation + 3.1):
                d = 0.68 * shape.endo
                px, py = lx + d * math.cos(angle), ly + d * math.sin(angle)
                r = 0.16 * shape.endo
                view[_inside_ellipse(x, y, px, py, r, r) & cavity] = t["myocardium"] * 1.1

    rng = np.random.default_rng([int(seed), p.index, phase, slice_index, 0x401E])
    image = mri_acquisition.acquire(
        image,
        blur_px=0.6 * size / 192.0,
        bias=p.bias,
        noise=p.noise,
        grid=_grid(size),
        field_of_view_mm=FIELD_OF_VIEW_MM,
        rng=rng,
    )
    return image, mask


def render_cardiac(index: int, seed: int, size: int = 192):
    """Record `index` of the phantom: (uint16 image (size, size), meta, {"mask": uint8})."""
    patient, phase, slice_index = record_position(index)
    p = sample_patient(patient, seed)
    image, mask = render_slice(p, phase, slice_index, size, seed)
    spacing = FIELD_OF_VIEW_MM / size
    volume = f"cardiac-{patient:04d}"
    meta = {
        "bits_stored": 16,
        "spacing": [spacing, spacing],
        "patient": volume,
        "phase": PHASES[phase],
        "frame": 1 if phase == 0 else p.es_frame,
        "source_index": {"slice": slice_index},
        "source_id": f"{volume}-{PHASES[phase]}",
        "classes": list(CLASSES),
        "superclass": SUPERCLASS,
        "group": p.group,
        "group_id": GROUPS.index(p.group),
        "slice_spacing": p.slice_spacing,
        "slice_thickness": p.slice_thickness,
    }
    pixels = np.round(image * 65535.0).astype(np.uint16)
    return pixels, meta, {"mask": mask}
