"""Procedural brain-tumour MRI phantom: skull-stripped axial slices with the four
BraTS sequences and BraTS's tumour labels.

Every patient is SLICES axial slices through a glioma, bottom to top: record
index i = patient * SLICES + slice. A record is a 4 x size x size uint16 stack
(FLAIR, T1, T1ce, T2, in that order, as the brats2021 builder stacks them)
with the mask in the extra array "mask", numbered as BraTS files: 0
background, 1 necrotic core (NCR), 2 peritumoral oedema (ED), 4 enhancing
tumour (ET). The segmentation pipeline maps file label 4 to fine class 3
through the record's "classes" (as for real BraTS records), so fine classes
are 1 necrotic core, 2 oedema, 3 enhancing rim; the superclass
"whole_tumour" is mask > 0.

Contrasts per tissue and sequence follow BraTS's appearance: white matter
bright on T1, CSF bright on T2 and dark on FLAIR (fluid suppressed); oedema
bright on FLAIR and T2; the enhancing rim bright on T1ce; the necrotic core
dark on T1ce and T1, bright on T2. Per patient (default_rng([seed,
patient])): brain size and shape, ventricle size, tumour site, size, shape
(a 3-D blob with a low-order wobble), rim thickness, whether it has a
necrotic core at all (some gliomas have none), contrasts, per-sequence bias
fields and noise. Outside the brain every sequence is exactly 0, as in
BraTS's skull-stripped volumes.

Geometry is in millimetres over a FIELD_OF_VIEW_MM square (240 mm, BraTS's
field of view), so `size` sets the pixel spacing (240 / size mm).

Meta, with the names and layout of the brats2021 builder's records after
tools/prepare_data.py: bits_stored 16, spacing [row_mm, col_mm], patient
("brain-0007"), source_index {"slice": k}, source_id, channels, classes
(a dict keyed by file label), superclass, regions; plus slice_spacing and
slice_thickness in mm.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from input_pipeline import mri_acquisition

SLICES = 8  # axial slices per patient
RECORDS_PER_PATIENT = SLICES
FIELD_OF_VIEW_MM = 240.0
MODALITIES = ("flair", "t1", "t1ce", "t2")  # as the brats2021 builder
CLASSES = {"0": "background", "1": "ncr", "2": "edema", "4": "enhancing"}  # as the builder
SUPERCLASS = "whole_tumour"
REGIONS = {"whole_tumour": [1, 2, 4], "tumour_core": [1, 4], "enhancing_tumour": [4]}
NECROTIC, OEDEMA, ENHANCING = 1, 2, 4  # file labels

# Mean intensity of each tissue in (FLAIR, T1, T1ce, T2), on [0, 1].
_TISSUES = {
    "white_matter": (0.45, 0.80, 0.72, 0.38),
    "grey_matter": (0.55, 0.58, 0.55, 0.58),
    "csf": (0.08, 0.15, 0.16, 0.98),
    "oedema": (0.90, 0.50, 0.48, 0.85),
    "enhancing": (0.72, 0.50, 0.98, 0.68),
    "necrotic": (0.42, 0.28, 0.12, 0.90),
}


@dataclasses.dataclass(frozen=True)
class Patient:
    """Everything fixed for one patient (mm, radians, [0, 1] intensities)."""

    index: int
    brain: tuple[float, float, float]  # semi-axes (x, y) at the widest slice, and height (z)
    brain_z: float  # z of the widest brain section, mm (slice z = 0 is the stack's middle)
    ventricles: float  # size factor
    cortex: float  # grey-matter ribbon thickness, mm
    tumour: tuple[float, float, float]  # centre (x, y, z) mm
    oedema: float  # radius, mm
    enhancing: float  # outer radius of the enhancing rim, mm
    rim: float  # rim thickness, mm; the necrotic core is what is inside it
    necrotic: bool  # whether the core is necrotic (else solid enhancing tumour)
    wobble: tuple[tuple[float, float, float], ...]  # (amplitude, phase, z-twist) per harmonic
    contrast: tuple[tuple[float, ...], ...]  # per tissue (as _TISSUES), per sequence
    bias: tuple[tuple[float, float, float], ...]  # per sequence: gradient (x, y), strength
    noise: tuple[float, ...]  # Rician sigma per sequence
    slice_spacing: float


@functools.lru_cache(maxsize=4)
def sample_patient(patient: int, seed: int) -> Patient:
    """The patient's anatomy and acquisition, from default_rng([seed, patient])."""
    rng = np.random.default_rng([int(seed), int(patient), 0xB7A5])
    brain = (float(rng.uniform(62, 72)), float(rng.uniform(78, 90)), float(rng.uniform(55, 65)))
    side = 1.0 if rng.random() < 0.5 else -1.0  # the hemisphere
    oedema = float(rng.uniform(22, 36))
    enhancing = float(rng.uniform(0.35, 0.6) * oedema)
    rim = float(rng.uniform(2.5, 5.0))
    contrast = tuple(
        tuple(float(v * rng.uniform(0.9, 1.1)) for v in values) for values in _TISSUES.values()
    )
    return Patient(
        index=int(patient),
        brain=brain,
        brain_z=float(rng.uniform(-10, 10)),
        ventricles=float(rng.uniform(0.7, 1.3)),
        cortex=float(rng.uniform(3.0, 5.0)),
        tumour=(
            float(side * rng.uniform(18, 40)),
            float(rng.uniform(-40, 40)),
            float(rng.uniform(-8, 8)),
        ),
        oedema=oedema,
        enhancing=enhancing,
        rim=rim,
        necrotic=bool(rng.random() < 0.85 and enhancing - rim > 3.0),
        wobble=tuple(
            (
                float(rng.uniform(0, 0.18)),
                float(rng.uniform(0, 2 * math.pi)),
                float(rng.uniform(-0.05, 0.05)),
            )
            for _ in range(3)
        ),
        contrast=contrast,
        bias=tuple(
            (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)), float(rng.uniform(0.05, 0.25)))
            for _ in MODALITIES
        ),
        noise=tuple(float(rng.uniform(0.012, 0.035)) for _ in MODALITIES),
        slice_spacing=float(rng.uniform(4.0, 6.0)),
    )


def record_position(index: int) -> tuple[int, int]:
    """Record index -> (patient, slice index)."""
    return divmod(int(index), SLICES)


def slice_z(p: Patient, slice_index: int) -> float:
    """Height of a slice (mm) relative to the middle of the stack."""
    return (slice_index - (SLICES - 1) / 2.0) * p.slice_spacing


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return mri_acquisition.pixel_grid(size, FIELD_OF_VIEW_MM)


def _section(radius: float, height: float, z: float) -> float:
    """Radius of an ellipsoid's section at height z (0 beyond it)."""
    return radius * math.sqrt(max(0.0, 1.0 - (z / height) ** 2))


def _window(p: Patient, size: int) -> tuple[slice, slice]:
    """Rows and columns of the square that holds the tumour on every slice."""
    reach = p.oedema * (1.0 + sum(a for a, _, _ in p.wobble)) + 2.0
    return mri_acquisition.window(p.tumour, reach, size, FIELD_OF_VIEW_MM)


def render_slice(p: Patient, slice_index: int, size: int, seed: int):
    """(image float32 (4, size, size) in [0, 1], mask uint8 with BraTS labels)."""
    x, y = _grid(size)
    z = slice_z(p, slice_index)
    ax, ay, az = p.brain
    scale = math.sqrt(max(0.0, 1.0 - ((z - p.brain_z) / az) ** 2))
    tissue = np.zeros((size, size), np.uint8)  # 0 outside, then _TISSUES' order + 1
    if scale > 0.05:
        # Brain: an ellipse slightly narrower at the front, white matter inside a
        # grey-matter ribbon, two lateral ventricles near the middle slices.
        bx, by = ax * scale, ay * scale
        e = (x / (bx * (1.0 - 0.08 * y / ay))) ** 2 + (y / by) ** 2
        tissue[e < 1.0] = 2  # grey matter
        inner = 1.0 - p.cortex / min(bx, by)
        tissue[e < inner * inner] = 1  # white matter
        v = p.ventricles * max(0.0, 1.0 - (z / 30.0) ** 2)
        if v > 0.1:
            for sx in (-1.0, 1.0):
                e_v = ((x - sx * 7.0 * v) / (4.5 * v)) ** 2 + ((y + 5.0) / (20.0 * v)) ** 2
                tissue[e_v < 1.0] = 3
    brain = tissue > 0

    # Tumour: three nested 3-D blobs sharing one wobbly outline, clipped to the
    # brain; computed in the square window that can hold it.
    mask = np.zeros((size, size), np.uint8)
    tx, ty, tz = p.tumour
    dz = z - tz
    rows, cols = _window(p, size)
    dx, dy = x[:, cols] - tx, y[rows, :] - ty
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k, (amplitude, phase, twist) in enumerate(p.wobble, start=2):
        outline += amplitude * np.cos(k * theta + phase + twist * dz)
    dist = np.sqrt(dx * dx + dy * dy) / outline
    r_oedema = _section(p.oedema, p.oedema * 0.9, dz)
    r_enh = _section(p.enhancing, p.enhancing * 0.85, dz)
    r_core = _section(p.enhancing - p.rim, (p.enhancing - p.rim) * 0.85, dz) if p.necrotic else 0
    labels, kinds, inside = mask[rows, cols], tissue[rows, cols], brain[rows, cols]
    for radius, label, kind in (
        (r_oedema, OEDEMA, 4),
        (r_enh, ENHANCING, 5),
        (r_core, NECROTIC, 6),
    ):
        if radius > 0:
            region = (dist < radius) & inside
            labels[region] = label
            kinds[region] = kind

    # Sequences: per-tissue contrast table, partial volume, bias field, Rician noise.
    table = np.zeros((len(_TISSUES) + 1, len(MODALITIES)), np.float32)
    table[1:] = np.asarray(p.contrast, np.float32)
    image = table[tissue].transpose(2, 0, 1).copy()  # (4, size, size)
    rng = np.random.default_rng([int(seed), p.index, slice_index, 0xB1A5])
    for c, (bias, noise) in enumerate(zip(p.bias, p.noise)):
        channel = mri_acquisition.acquire(
            image[c],
            blur_px=0.6 * size / 192.0,
            bias=bias,
            noise=noise,
            grid=(x, y),
            field_of_view_mm=FIELD_OF_VIEW_MM,
            rng=rng,
        )
        image[c] = np.where(brain, channel, 0.0)  # skull-stripped: exactly 0 outside
    return image, mask


def render_brain(index: int, seed: int, size: int = 192):
    """Record `index`: (uint16 (4, size, size) FLAIR/T1/T1ce/T2, meta, {"mask": uint8})."""
    patient, slice_index = record_position(index)
    p = sample_patient(patient, seed)
    image, mask = render_slice(p, slice_index, size, seed)
    spacing = FIELD_OF_VIEW_MM / size
    volume = f"brain-{patient:04d}"
    meta = {
        "bits_stored": 16,
        "spacing": [spacing, spacing],
        "patient": volume,
        "source_index": {"slice": slice_index},
        "source_id": volume,
        "channels": list(MODALITIES),
        "classes": dict(CLASSES),
        "superclass": SUPERCLASS,
        "regions": {k: list(v) for k, v in REGIONS.items()},
        "slice_spacing": p.slice_spacing,
        "slice_thickness": p.slice_spacing,
    }
    pixels = np.round(image * 65535.0).astype(np.uint16)
    return pixels, meta, {"mask": mask}
