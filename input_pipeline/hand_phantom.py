"""Procedural, deterministic hand radiograph phantom with 37 landmarks.

A left-hand PA radiograph in the style of the Digital Hand Atlas (the images
of Payer et al.'s 37-landmark hand data set, `builders/landmarks.py`): the
hand lies palm down with the fingers pointing up, and the image is hung as
those radiographs are, with the thumb (radial side) on the image RIGHT and
the little finger (ulnar side) on the image LEFT. Never flip these images
horizontally: a flip turns the left hand into a right one.

Anatomy (an adult-sized hand): the soft-tissue silhouette of the hand and the
distal forearm, which runs off the bottom of the image; the distal radius and
ulna; the eight carpal bones as ovals placed roughly where they lie (the
pisiform projects over the triquetrum, as it does on a PA view); five
metacarpals; proximal, middle and distal phalanges of fingers 2-5 and the
proximal and distal phalanges of the thumb, with joint gaps between
neighbouring bones. A bone is a tapered shape (base, shaft, head) whose
cortical shell projects brighter than its trabecular inside; the inside
carries a fine texture. X-ray polarity: bone bright, soft tissue mid-grey and
brighter where it is thicker (palm, forearm), background dark; a mild blur
and quantum noise on top. Images are 12-bit values (0..4095) in uint16.

Landmarks (`LANDMARK_NAMES`, NUM_LANDMARKS = 37), in this fixed order:

* 0-4, the wrist row from the ulnar to the radial side: 0 ulnar styloid tip,
  1 distal ulna (radial side of its head), 2 ulnar corner of the distal
  radius' articular surface, 3 middle of that surface, 4 radial styloid tip.
  |p0 - p4| is the wrist width, the distance the hand protocol takes as
  50 mm to turn pixel errors into millimetres. This order is the phantom's
  own: the hand_landmarks builder measures that width between its landmarks
  1 and 5 (Payer et al.'s files), so compare millimetre errors under one
  convention only.
* 5-8, the thumb: carpometacarpal (CMC), metacarpophalangeal (MCP) and
  interphalangeal (IP) joints, tip.
* 9-28, fingers 2, 3, 4, 5 in that order, 5 points each: CMC, MCP, PIP and
  DIP joints, tip (`RAYS` lists each ray's indices from proximal to distal).
* 29-36, carpal bone centres: scaphoid, lunate, triquetrum, pisiform,
  trapezium, trapezoid, capitate, hamate (`CARPALS`).

A joint landmark is the centre of the gap between its two bones, on the
distal bone's axis; a tip is the distal end of the distal phalanx (the bone,
not the skin); the wrist points lie on the bone outlines. meta["landmarks"]
holds them as [x, y] = (column, row) pixels of the returned image, the centre
of the top-left pixel at (0, 0), rounded to 4 decimals: the convention of
`ManifestRow` and of the ingested landmark data sets.

Per patient (all from default_rng([seed, index, 0x4A4D])): hand size (bone
lengths x 0.88-1.12, so wrist widths of about 44-57 mm and middle fingers,
tip to MCP, of about 79-100 mm), individual bone lengths and widths, joint
gaps, carpal placement, the spread of the fingers and the thumb, soft-tissue
thickness, an in-plane rotation of up to 10 degrees and a shift; exposure
(levels, contrast, gamma, a heel-effect gradient) and noise level.

Geometry is built in millimetres (`sample_hand`) over a FIELD_OF_VIEW_MM
square and converted to pixels only when drawing, so `size` sets the pixel
spacing (meta "spacing" = [row_mm, col_mm] = FIELD_OF_VIEW_MM / size; 1.125 mm
at 256 px) and the same (index, seed) draws the same hand at every size:
landmarks at two sizes agree through x_big = (x_small + 0.5) * ratio - 0.5.
meta["wrist_width_mm"] is the true |p0 - p4| in millimetres. Records carry no
"patient": every record is its own hand, so phantom splits go by record.

Joint gaps are 1.2-2.9 mm wide, 1.1-2.6 px at 256 px: resolved there (a
joint landmark is darker than the bone ends on either side of it), merged at
64 px, where the hand still reads as a hand. Rendering is numpy + OpenCV
polygon filling on one size x size grid, measured on one core with
cv2.setNumThreads(1): 6-8 ms per 256 px image, about 5 ms per 128 px and
16-22 ms per 512 px, 3-4.5 ms of each building the geometry.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
# Across the image width (and height): 1.125 mm pixels at 256 px. A 166-212 mm
# hand (radius to middle fingertip) takes 58-74 % of the height, the fingertips
# 14-34 mm below the top edge, and the distal forearm most of the rest.
FIELD_OF_VIEW_MM = 288.0
MIN_SIZE = 64  # below this the joint gaps and small carpals are sub-pixel mush

CARPALS = (
    "scaphoid",
    "lunate",
    "triquetrum",
    "pisiform",
    "trapezium",
    "trapezoid",
    "capitate",
    "hamate",
)
FINGER_NAMES = {2: "index", 3: "middle", 4: "ring", 5: "little"}
WRIST_NAMES = (
    "ulnar styloid tip",
    "distal ulna, radial side of the head",
    "distal radius, ulnar corner of the articular surface",
    "distal radius, middle of the articular surface",
    "radial styloid tip",
)
LANDMARK_NAMES: tuple[str, ...] = (
    *WRIST_NAMES,
    "thumb CMC joint",
    "thumb MCP joint",
    "thumb IP joint",
    "thumb tip",
    *(
        f"{FINGER_NAMES[f]} finger {joint}"
        for f in (2, 3, 4, 5)
        for joint in ("CMC joint", "MCP joint", "PIP joint", "DIP joint", "tip")
    ),
    *(f"{name} centre" for name in CARPALS),
)
NUM_LANDMARKS = 37
WRIST = (0, 1, 2, 3, 4)
WRIST_WIDTH_PAIR = (0, 4)
# Landmark indices of each ray, proximal (CMC joint) to distal (tip): the thumb,
# then fingers 2-5.
RAYS = ((5, 6, 7, 8), *(tuple(range(9 + 5 * k, 14 + 5 * k)) for k in range(4)))
CARPAL_CENTRES = tuple(range(29, 37))
assert len(LANDMARK_NAMES) == NUM_LANDMARKS and CARPAL_CENTRES[-1] == NUM_LANDMARKS - 1


# --------------------------------------------------------------------------
# Nominal anatomy, millimetres in the hand's frame: x toward the thumb (the
# image right for this left hand), y toward the forearm (image down), origin
# near the capitate. Direction angles are degrees from "distal" (image up),
# positive toward the thumb. Everything is scaled per patient.
# --------------------------------------------------------------------------

# Carpals: (centre x, centre y, semi-axis along, semi-axis across, angle).
# The pisiform lies palmar to the triquetrum and projects over it.
_CARPALS = {
    "scaphoid": (14.6, 7.2, 10.6, 6.0, 40.0),
    "lunate": (1.5, 13.2, 6.4, 7.4, 0.0),
    "triquetrum": (-11.8, 10.8, 6.4, 5.6, -45.0),
    "pisiform": (-14.2, 8.6, 4.6, 4.0, -20.0),
    "trapezium": (24.3, -7.0, 6.4, 6.4, 30.0),
    "trapezoid": (11.6, -6.4, 6.4, 4.9, 8.0),
    "capitate": (0.4, -4.2, 10.6, 6.4, 2.0),
    "hamate": (-12.6, -3.6, 8.9, 6.6, -25.0),
}

# Rays: the carpal the metacarpal base sits on, where its axis crosses that
# carpal (offset from the carpal's centre), the metacarpal angle, joint-to-joint
# lengths (metacarpal, then the phalanges; the last runs from the last joint to
# the bone tip), and bends: of the proximal phalanx from the metacarpal, then
# of each phalanx from the one before (fingers converge slightly toward the
# middle finger).
_RAYS = {
    1: dict(carpal="trapezium", offset=(0.0, 0.0), angle=40.0,
            lengths=(44.0, 31.0, 24.0), bend=(-6.0, -4.0)),
    2: dict(carpal="trapezoid", offset=(0.0, 0.0), angle=7.0,
            lengths=(67.0, 40.0, 23.0, 17.0), bend=(3.0, -1.5, -1.0)),
    3: dict(carpal="capitate", offset=(0.0, 0.0), angle=1.0,
            lengths=(64.0, 44.0, 27.0, 18.0), bend=(0.0, 0.0, 0.0)),
    4: dict(carpal="hamate", offset=(2.6, -0.4), angle=-6.0,
            lengths=(57.0, 41.0, 26.0, 18.0), bend=(-3.0, 1.5, 1.0)),
    5: dict(carpal="hamate", offset=(-3.4, -0.4), angle=-15.0,
            lengths=(53.0, 33.0, 19.0, 16.0), bend=(-4.0, 2.0, 2.0)),
}

# Bone half-widths (base, shaft, head) in mm, per ray: metacarpal, then phalanges.
_WIDTHS = {
    1: ((6.8, 4.3, 6.6), (7.2, 4.6, 5.8), (6.0, 3.4, 4.2)),
    2: ((5.0, 4.0, 6.4), (7.0, 4.4, 5.4), (5.6, 3.8, 4.4), (4.6, 2.4, 3.0)),
    3: ((5.6, 4.1, 6.8), (7.6, 4.6, 5.6), (5.9, 3.9, 4.6), (4.8, 2.5, 3.2)),
    4: ((4.3, 3.5, 6.0), (6.9, 4.2, 5.2), (5.4, 3.6, 4.2), (4.5, 2.3, 3.0)),
    5: ((4.1, 3.3, 5.6), (6.2, 3.8, 4.7), (4.8, 3.2, 3.8), (4.0, 2.1, 2.7)),
}

# Distal radius and ulna outlines (x, y). Their shafts run far below the
# image, whatever the rotation. The landmark
# vertices: ulna[0] = p1, ulna[_ULNAR_STYLOID] = p0; the radius' articular
# surface is generated between p2 and p4 (`_radius`).
_ULNA = np.array(
    [
        (-7.5, 27.0),  # p1: radial side of the head, facing the radius
        (-8.1, 33.5),
        (-9.2, 42.0),
        (-10.2, 60.0),
        (-10.5, 80.0),
        (-10.5, 270.0),
        (-19.5, 270.0),
        (-20.0, 80.0),
        (-20.5, 60.0),
        (-22.2, 42.0),
        (-24.0, 33.0),
        (-24.6, 27.0),
        (-24.6, 22.0),
        (-24.2, 18.8),
        (-23.0, 16.5),  # p0: ulnar styloid tip
        (-21.3, 18.0),
        (-19.8, 20.8),
        (-17.5, 21.6),
        (-14.5, 21.4),
        (-11.2, 22.0),
        (-8.8, 23.8),
    ]
)
_ULNAR_STYLOID = 14
_RADIUS_P2 = (-4.0, 22.0)
_RADIUS_P4 = (27.0, 11.0)
_RADIUS_ULNAR_SIDE = np.array(  # below p2, going down
    [(-4.8, 25.5), (-4.3, 29.0), (-2.6, 36.0), (0.0, 48.0), (1.5, 60.0), (2.0, 80.0), (2.5, 270.0)]
)
_RADIUS_RADIAL_SIDE = np.array(  # from the bottom up to p4
    [(19.5, 270.0), (20.0, 80.0), (21.0, 58.0), (24.5, 44.0), (28.5, 32.0), (29.8, 24.0),
     (29.2, 17.0)]
)


# --------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------


def _direction(angle_deg: float) -> np.ndarray:
    """Unit vector `angle_deg` from distal (image up), positive toward the thumb."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a), -math.cos(a)])


def _ellipse(centre, along: float, across: float, angle: float, n: int = 28) -> np.ndarray:
    """(n, 2) polygon of an ellipse whose `along` semi-axis points `angle`."""
    u = _direction(angle)
    v = np.array([-u[1], u[0]])
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)[:, None]
    return np.asarray(centre) + along * np.cos(t) * u + across * np.sin(t) * v


def _ellipse_exit(ellipse, start, direction) -> float:
    """How far from `start` (inside the ellipse) along `direction` its outline lies."""
    (cx, cy), along, across, angle = ellipse[:2], ellipse[2], ellipse[3], ellipse[4]
    u = _direction(angle)
    v = np.array([-u[1], u[0]])
    q = np.asarray(start) - (cx, cy)
    qa, qb = q @ u / along, q @ v / across
    da, db = direction @ u / along, direction @ v / across
    a, b, c = da * da + db * db, 2 * (qa * da + qb * db), qa * qa + qb * qb - 1.0
    # max(): a start on the outline itself (c = 0) must not fail on rounding.
    return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)


# Sample positions along a bone's sides (fractions) and round its caps (angles);
# module constants because `_bone` runs ~40 times per hand.
_SIDE = np.linspace(0.0, 1.0, 7)
_CAP = np.linspace(-0.5 * math.pi, 0.5 * math.pi, 9)[1:-1]
_CAP_COS, _CAP_SIN = 1.0 - np.cos(_CAP), np.sin(_CAP)
_PROFILE = np.array([0.0, 0.14, 0.4, 0.72, 0.9, 1.0])  # where the half-widths change


def _bone(start, end, widths, caps) -> np.ndarray:
    """Outline of a tubular bone from `start` (proximal) to `end` (distal).

    widths: half-widths (base, shaft, head): a base that narrows into the
    shaft and flares into the head. caps: depths (proximal, distal) of the
    elliptical ends; negative = concave (a phalanx base cupping the head in
    front of it). The axis crosses the outline exactly at `start` and `end`,
    so joint gaps between consecutive bones are exact.
    """
    delta = end - start
    length = math.hypot(delta[0], delta[1])
    d = delta / length
    n = np.array([-d[1], d[0]])
    base, shaft, head = widths
    c0, c1 = caps
    # The sides run between the caps' corners (beyond the ends for a concave cap).
    s = c0 + (length - c1 - c0) * _SIDE
    w = np.interp(s, _PROFILE * length,
                  (base, 0.4 * base + 0.6 * shaft, shaft, 1.04 * shaft, head, head))
    along = np.concatenate([s, length - c1 * _CAP_COS, s[::-1], c0 * _CAP_COS])
    across = np.concatenate([-w, w[-1] * _CAP_SIN, w[::-1], -w[0] * _CAP_SIN])
    return start + along[:, None] * d + across[:, None] * n


def _miters(points: np.ndarray, counts) -> tuple[np.ndarray, np.ndarray]:
    """Inward vertex miters and mean half-widths of polygons stored one after the
    other in `points`, `counts` vertices each.

    Moving every vertex by d x its miter moves every edge of its polygon d
    inward (sharp corners move at most 2 d). The mean half-width, per vertex,
    is its polygon's area / perimeter (half the width of a long thin shape).
    """
    counts = np.asarray(counts)
    ends = np.cumsum(counts)
    starts = ends - counts
    index = np.arange(len(points))
    prev, nxt = index - 1, index + 1
    prev[starts] = ends - 1
    nxt[ends - 1] = starts
    edge = points[nxt] - points  # edge i runs from vertex i to the next
    length = np.hypot(edge[:, 0], edge[:, 1])
    cross = points[:, 0] * points[nxt, 1] - points[nxt, 0] * points[:, 1]
    area = 0.5 * np.add.reduceat(cross, starts)
    half_width = np.repeat(np.abs(area) / np.add.reduceat(length, starts), counts)
    # The interior lies left of the edges of a positively oriented polygon.
    left = np.stack([-edge[:, 1], edge[:, 0]], axis=1) / np.maximum(length, 1e-9)[:, None]
    left *= np.repeat(np.sign(area), counts)[:, None]
    miter = left + left[prev]
    miter /= np.maximum(np.hypot(miter[:, 0], miter[:, 1]), 1e-9)[:, None]
    miter /= np.maximum(np.sum(miter * left, axis=1), 0.5)[:, None]
    return miter, half_width


def _inset(poly: np.ndarray, dist) -> np.ndarray:
    """`poly` moved `dist` (scalar or per vertex) inward: the inner surface of a
    cortical shell (the medulla of a styloid process comes out blunted)."""
    miter, _ = _miters(poly, [len(poly)])
    return poly + miter * np.asarray(dist, float)[..., None]


def _stroke(points: np.ndarray, half_widths, tip_depth: float, n_cap: int = 11) -> np.ndarray:
    """Outline of a band of `half_widths` along a polyline (a finger's soft
    tissue), with a round root and a tip cap reaching `tip_depth` past the end."""
    seg = np.diff(points, axis=0)
    seg /= np.hypot(seg[:, 0], seg[:, 1])[:, None]
    tangents = np.concatenate([seg[:1], seg[:-1] + seg[1:], seg[-1:]])
    tangents /= np.hypot(tangents[:, 0], tangents[:, 1])[:, None]
    normals = np.stack([-tangents[:, 1], tangents[:, 0]], axis=1)
    w = np.asarray(half_widths, float)[:, None]
    phi = np.linspace(0.0, math.pi, n_cap)[1:-1, None]
    tip = points[-1] + w[-1] * np.cos(phi) * normals[-1] + tip_depth * np.sin(phi) * tangents[-1]
    root = points[0] - w[0] * (np.cos(phi) * normals[0] + np.sin(phi) * tangents[0])
    return np.concatenate([points + w * normals, tip, (points - w * normals)[::-1], root])


# --------------------------------------------------------------------------
# One hand: geometry in millimetres, no pixels.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hand:
    """Geometry of one hand in millimetres from the image centre (x right, y
    down), after the patient's scale, rotation and shift."""

    index: int
    seed: int
    landmarks: np.ndarray  # (NUM_LANDMARKS, 2)
    bones: tuple[tuple[np.ndarray, np.ndarray], ...]  # (outline, medulla outline)
    overlays: tuple[tuple[np.ndarray, np.ndarray], ...]  # bones projected over others
    soft: tuple[np.ndarray, ...]  # soft-tissue outlines (they overlap)
    scale: float

    @property
    def wrist_width_mm(self) -> float:
        a, b = (self.landmarks[i] for i in WRIST_WIDTH_PAIR)
        return float(np.hypot(*(a - b)))


def _streams(index: int, seed: int):
    """Independent geometry and look (exposure, texture, noise) streams."""
    if index < 0 or not 0 <= seed < 2**32:
        raise ValueError(f"need index >= 0 and 0 <= seed < 2**32, got {index}, {seed}")
    return np.random.default_rng([int(seed), int(index), 0x4A4D]).spawn(2)


def _radius(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Radius outline and its landmarks (p2, p3, p4): the articular surface is a
    shallow concave arc (the scaphoid and lunate fossae) from the ulnar corner p2
    to the styloid tip p4, inclined about 20 degrees toward the ulna."""
    p2 = np.array(_RADIUS_P2) + rng.normal(0.0, 0.4, 2)
    p4 = np.array(_RADIUS_P4) + rng.normal(0.0, 0.6, 2)
    chord = p4 - p2
    down = np.array([-chord[1], chord[0]]) / np.hypot(*chord)  # toward the forearm
    depth = rng.uniform(0.8, 1.6)
    u = np.linspace(1.0, 0.0, 9)[1:-1, None]  # from p4 back toward p2
    surface = p2 + u * chord + depth * 4 * u * (1 - u) * down
    outline = np.concatenate([[p2], _RADIUS_ULNAR_SIDE, _RADIUS_RADIAL_SIDE, [p4], surface])
    p3 = p2 + 0.5 * chord + depth * down
    return outline, np.stack([p2, p3, p4])


def sample_hand(index: int, seed: int) -> Hand:
    """Geometry and landmarks of hand `index` (cheap: no pixels)."""
    rng, _ = _streams(index, seed)
    scale = rng.uniform(0.88, 1.12)
    robust = rng.uniform(0.92, 1.08)  # bone widths: slender to robust
    bones: list[tuple[np.ndarray, np.ndarray]] = []
    overlays: list[tuple[np.ndarray, np.ndarray]] = []
    landmarks = np.zeros((NUM_LANDMARKS, 2))

    # Forearm bones: cortex thick in the shafts, thin at the ends.
    radius, landmarks[2:5] = _radius(rng)
    ulna = _ULNA + rng.normal(0.0, 0.3, 2)
    landmarks[0], landmarks[1] = ulna[_ULNAR_STYLOID], ulna[0]
    for outline in (radius, ulna):
        cortex = np.interp(outline[:, 1], [25.0, 50.0], [1.0, 3.4])
        bones.append((outline, _inset(outline, cortex)))

    # Carpals: jittered ovals; their centres are landmarks 29-36.
    carpals = {}
    for k, name in enumerate(CARPALS):
        cx, cy, along, across, angle = _CARPALS[name]
        jitter = rng.normal(0.0, 0.5, 2)
        size = rng.uniform(0.94, 1.06)
        e = (cx + jitter[0], cy + jitter[1], along * size, across * size,
             angle + rng.normal(0.0, 4.0))
        carpals[name] = e
        landmarks[CARPAL_CENTRES[k]] = e[:2]
        outline = _ellipse(e[:2], e[2], e[3], e[4])
        pair = (outline, _ellipse(e[:2], e[2] - 1.0, e[3] - 1.0, e[4]))
        (overlays if name == "pisiform" else bones).append(pair)
    # The hook of the hamate: a palmar process seen end-on, a ring over the hamate.
    hx, hy, _, _, _ = carpals["hamate"]
    hook = _ellipse((hx - 1.8, hy + 2.0), 2.6, 2.2, 0.0, 16)
    overlays.append((hook, _ellipse((hx - 1.8, hy + 2.0), 1.9, 1.5, 0.0, 16)))

    # Rays: metacarpal on its carpal, then the phalanges, with a gap at every joint.
    spread = {
        1: rng.uniform(-8.0, 10.0),  # thumb abduction
        2: rng.uniform(-3.0, 6.0),
        3: rng.uniform(-3.0, 3.0),
        4: rng.uniform(-5.0, 3.0),
        5: rng.uniform(-8.0, 3.0),
    }
    skin = rng.uniform(0.85, 1.2)  # soft-tissue thickness
    soft: list[np.ndarray] = []
    joints_of: dict[int, np.ndarray] = {}
    for ray, spec in _RAYS.items():
        e = carpals[spec["carpal"]]
        angle = spec["angle"] + rng.normal(0.0, 1.5)
        d = _direction(angle)
        through = np.add(e[:2], spec["offset"])
        surface = through + _ellipse_exit(e, through, d) * d
        gaps = [rng.uniform(1.4, 1.9)]  # CMC
        gaps += [rng.uniform(1.8, 2.6)]  # MCP
        gaps += [rng.uniform(1.4, 2.0) for _ in spec["lengths"][2:]]  # PIP, DIP (IP)
        # Bone k runs along headings[k]: the metacarpal, the proximal phalanx
        # spread (abducted) from it, then small bends at the PIP/DIP (IP) joints.
        headings = [angle, angle + spread[ray] + spec["bend"][0]]
        for bend in spec["bend"][1:]:
            headings.append(headings[-1] + bend + rng.normal(0.0, 1.5))
        directions = [_direction(h) for h in headings]
        joints = [surface + 0.5 * gaps[0] * d]
        for k, length in enumerate(spec["lengths"]):
            joints.append(joints[-1] + length * rng.uniform(0.96, 1.04) * directions[k])
        joints = np.array(joints)
        joints_of[ray] = joints
        last = len(spec["lengths"]) - 1
        for k in range(last + 1):
            # The bone fills its joint-to-joint span less half a gap at each
            # joint; the tip is the bone's end.
            a = joints[k] + 0.5 * gaps[k] * directions[k]
            b = joints[k + 1] - (0.0 if k == last else 0.5 * gaps[k + 1] * directions[k])
            base, shaft, head = (robust * w for w in _WIDTHS[ray][k])
            if k == 0:  # metacarpal: flat-ish base on the carpus, round head
                caps = (0.25 * base, 0.8 * head)
            elif k == last:  # distal phalanx: cupped base, rounded tuft
                caps = (-0.12 * base, 0.6 * head)
            else:  # proximal / middle phalanx: cupped base, trochlear head
                caps = (-0.12 * base, 0.45 * head)
            outline = _bone(a, b, (base, shaft, head), caps)
            # Thin cortex at the ends, ~35 % of the half-width in the shaft.
            end = 0.8 * directions[k]
            medulla = _bone(a + end, b - end, (base - 0.8, 0.62 * shaft, head - 0.8),
                            (0.8 * caps[0], 0.8 * caps[1]))
            bones.append((outline, medulla))
        # Soft tissue along the ray, from inside the palm (the thumb: from the
        # thenar eminence) to a pad 4-5.5 mm past the bone tip.
        if ray == 1:
            path = np.concatenate([joints[:1] + 4.0 * d, joints[1:]])
            half = np.array([14.0, 10.5, 9.5, 8.0]) * skin
        else:
            root = joints[1] - 0.4 * spec["lengths"][0] * d
            path = np.concatenate([[root], joints[1:]])
            half = np.array([11.0, 10.0, 9.0, 8.0, 7.0]) * skin
            half *= {2: 1.0, 3: 1.03, 4: 0.98, 5: 0.88}[ray]
        soft.append(_stroke(path, half, tip_depth=rng.uniform(4.0, 5.5)))

    # Landmarks of the rays (thumb: CMC, MCP, IP, tip; fingers: + PIP/DIP).
    for ray, indices in zip(_RAYS, RAYS):
        landmarks[list(indices)] = joints_of[ray]

    soft.append(_palm(joints_of, landmarks, skin))

    # Place the hand: scale, rotate about the carpus, then put the highest
    # fingertip 14-34 mm below the top edge (the skin clears the edge) and the
    # hand's width in the middle, give or take a few mm.
    rotation = math.radians(rng.uniform(-10.0, 10.0))
    c, s = math.cos(rotation), math.sin(rotation)
    matrix = scale * np.array([[c, -s], [s, c]])
    placed = landmarks @ matrix.T
    top = -0.5 * FIELD_OF_VIEW_MM + rng.uniform(14.0, 34.0)
    shift = np.array(
        [-0.5 * (placed[:, 0].min() + placed[:, 0].max()) + rng.uniform(-8.0, 8.0),
         top - placed[:, 1].min()]
    )
    # Every landmark stays 12 mm inside the edges (2 px at 64 px is 8 mm).
    half_fov = 0.5 * FIELD_OF_VIEW_MM - 12.0
    shift[0] = np.clip(shift[0], -half_fov - placed[:, 0].min(), half_fov - placed[:, 0].max())

    def place(points: np.ndarray) -> np.ndarray:
        return points @ matrix.T + shift

    return Hand(
        index=int(index),
        seed=int(seed),
        landmarks=place(landmarks),
        bones=tuple((place(o), place(i)) for o, i in bones),
        overlays=tuple((place(o), place(i)) for o, i in overlays),
        soft=tuple(place(p) for p in soft),
        scale=float(scale),
    )


def _palm(joints: dict[int, np.ndarray], landmarks: np.ndarray, skin: float) -> np.ndarray:
    """Palm, wrist and forearm outline, from the ulnar forearm round the
    hypothenar border, the finger webs, the first web space between the index
    metacarpal and the thumb, and the thenar border to the radial forearm."""

    def at(ray: int, k: int, out: float, up: float) -> np.ndarray:
        """`out` mm toward the thumb of joint k of `ray` and `up` mm along bone k."""
        d = joints[ray][k + 1] - joints[ray][k]
        d /= np.hypot(*d)
        return joints[ray][k] + out * np.array([-d[1], d[0]]) + up * d

    def web(ray: int, up: float) -> np.ndarray:
        """Between the MCP joints of `ray` and `ray` - 1, `up` mm distal."""
        return 0.5 * (at(ray, 1, 0.0, up) + at(ray - 1, 1, 0.0, up))

    ulnar_styloid, radial_styloid = landmarks[0], landmarks[4]
    points = [
        (ulnar_styloid[0] - 9.0 * skin - 4.0, 270.0),
        ulnar_styloid + (-9.0 * skin, 8.0),
        at(5, 0, -11.0 * skin, 24.0),  # hypothenar eminence
        at(5, 1, -8.5 * skin, -4.0),
        web(5, 13.0),
        web(4, 15.0),
        web(3, 14.0),
        at(2, 1, 9.0 * skin, -2.0),
        at(2, 0, 10.0 * skin, 36.0),  # first web space
        at(1, 0, 11.0 * skin, 10.0),  # thenar eminence
        radial_styloid + (8.0 * skin, 10.0),
        (radial_styloid[0] + 8.0 * skin + 5.0, 270.0),
    ]
    return np.array(points)


# --------------------------------------------------------------------------
# Pixels.
# --------------------------------------------------------------------------

_SHIFT = 4  # fractional bits of cv2 drawing coordinates


def _pixels(points_mm: np.ndarray, size: int) -> np.ndarray:
    """mm from the image centre -> pixel coordinates, pixel centres at integers."""
    return (points_mm / FIELD_OF_VIEW_MM + 0.5) * size - 0.5


# OpenCV's antialiased polygon filling covers about this many pixels more than
# the polygon on every side, whatever the edge's angle and sub-pixel offset
# (measured on squares and circles: 0.6-0.8). Left alone it would close the
# 1.5-2.5 px joint gaps at 256 px; `_fill` insets every polygon by it instead.
_AA_DILATION_PX = 0.65


def _fill(polygons, size: int) -> np.ndarray:
    """Antialiased union of `polygons` (mm), float32 coverage in [0, 1].

    Each polygon is first moved inward by `_AA_DILATION_PX` along its vertex
    miters (all polygons at once), but by at most 60 % of its mean half-width
    (area / perimeter), so thin bones at small sizes do not turn inside out:
    they stay a little fat instead. One fillPoly call per polygon: a call with
    several contours fills their overlaps even-odd.
    """
    points = np.concatenate(polygons)
    counts = [len(p) for p in polygons]
    miter, half_width = _miters(points, counts)
    spacing = FIELD_OF_VIEW_MM / size
    inset = np.minimum(_AA_DILATION_PX, 0.6 * half_width / spacing)[:, None]
    pixels = _pixels(points, size) + inset * miter
    fixed = np.round(pixels * (1 << _SHIFT)).astype(np.int32)
    canvas = np.zeros((size, size), np.uint8)
    for poly in np.split(fixed, np.cumsum(counts)[:-1]):
        cv2.fillPoly(canvas, [poly], 255, cv2.LINE_AA, shift=_SHIFT)
    return canvas.astype(np.float32) * np.float32(1.0 / 255.0)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.1:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma_px), borderType=cv2.BORDER_REFLECT)


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed (2 size, 2 size) unit Gaussian field; each image takes a random
    window of it (fresh Gaussian noise per image costs more than the drawing)."""
    bank = np.random.default_rng(0x5EED).standard_normal((2 * size, 2 * size), np.float32)
    bank.flags.writeable = False
    return bank


@functools.lru_cache(maxsize=4)
def _texture_bank(size: int) -> np.ndarray:
    """Trabecular texture: band-pass noise with ~1 mm grains and a ~3 mm
    mesh, unit contrast at pixels up to 1 mm and less at coarser ones (grains average
    out within a pixel), as a (2 size, 2 size) bank read through random windows."""
    spacing = FIELD_OF_VIEW_MM / size
    white = np.random.default_rng(0x7EB).standard_normal((2 * size, 2 * size), np.float32)
    fine = _blur(white, 1.0 / spacing)
    band = fine - _blur(white, 3.0 / spacing)
    band *= min(1.0, 1.0 / spacing) / max(float(band.std()), 1e-6)
    band.flags.writeable = False
    return band


@functools.lru_cache(maxsize=512)
def _gamma_table(gamma: float) -> np.ndarray:
    table = np.round(MAX_VALUE * (np.arange(MAX_VALUE + 1) / MAX_VALUE) ** gamma)
    return table.astype(np.uint16)


def render_hand(index: int, seed: int, size: int = 256) -> tuple[np.ndarray, dict]:
    """(uint16 image (size, size) with 12 bits stored, metadata) of hand `index`."""
    if size < MIN_SIZE:
        raise ValueError(f"hand phantom size must be >= {MIN_SIZE} px, got {size}")
    hand = sample_hand(index, seed)
    _, rng = _streams(index, seed)
    look = {
        "air": rng.uniform(0.03, 0.08),
        "soft": rng.uniform(0.22, 0.30),
        "bone": rng.uniform(0.36, 0.46),
        "medulla": rng.uniform(0.42, 0.58),  # trabecular bone density / cortical shell
        "texture": rng.uniform(0.05, 0.09),
        "noise": rng.uniform(0.006, 0.016),
        "heel": rng.uniform(-0.06, 0.06, 2),  # exposure gradient across the field
        "contrast": rng.uniform(0.9, 1.1),
        "brightness": rng.uniform(-0.03, 0.03),
        "gamma": rng.uniform(0.8, 1.2),
        # Bank windows as fractions, so the draws do not depend on the size.
        "windows": rng.random(4),
    }
    spacing = FIELD_OF_VIEW_MM / size

    # Soft tissue: brighter where it is thicker; a wide blur of the silhouette
    # stands in for the thickness (palm and forearm thick, fingers thin).
    soft = _fill(hand.soft, size)
    thickness = _blur(soft, 7.0 / spacing)
    image = look["air"] + look["soft"] * soft * (0.45 + 0.75 * thickness)

    # Bones: a shell projects as the whole outline minus the lighter inside.
    # Overlays (pisiform, the hamate's hook) add to the bones they cross, less
    # than a bone seen alone: they are small, and thin in the beam's direction.
    hollow = np.float32(1.0 - look["medulla"])
    medulla = np.zeros((size, size), np.float32)
    for layer, density in ((hand.bones, 1.0), (hand.overlays, 0.5)):
        outline = _fill([o for o, _ in layer], size)
        inside = _fill([i for _, i in layer], size)
        image += (density * look["bone"]) * (outline - hollow * inside)
        medulla += inside
    oy, ox, ty, tx = (int(v) for v in look["windows"] * size)
    texture = _texture_bank(size)[ty : ty + size, tx : tx + size]
    image += (look["bone"] * look["texture"]) * medulla * texture

    # Detector: slight unsharpness, heel effect, quantum noise, then exposure.
    image = _blur(image, 0.35 / spacing)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gx, gy = (float(v) for v in look["heel"])
    image *= 1.0 + gx * ramp[None, :] + gy * ramp[:, None]
    image += _noise_bank(size)[oy : oy + size, ox : ox + size] * (
        look["noise"] * np.sqrt(np.maximum(image, 0.0) + 0.1)
    )
    image = look["brightness"] + look["contrast"] * image
    levels = np.clip(image * MAX_VALUE + 0.5, 0, MAX_VALUE).astype(np.uint16)
    image = _gamma_table(round(look["gamma"], 3))[levels]

    points = _pixels(hand.landmarks, size)
    meta = {
        "bits_stored": BITS_STORED,
        "spacing": [spacing, spacing],
        "landmarks": [[round(float(x), 4), round(float(y), 4)] for x, y in points],
        "wrist_width_mm": round(hand.wrist_width_mm, 2),
        "phantom_index": int(index),
        "phantom_seed": int(seed),
    }
    return image, meta
