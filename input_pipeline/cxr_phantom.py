"""Procedural, deterministic paired chest X-ray phantom: frontal radiographs with
findings, and free-text reports that describe them (the embedded default for
image-report pretraining).

Every pair is a pure function of ``(index, seed)``; pixels also depend on the
requested size, the findings and the report do not. Images are 12-bit values
(0..4095) in uint16, "for presentation" polarity: air and lungs dark, soft
tissue, mediastinum, heart, diaphragm and bone bright.

Orientation: the usual frontal (PA) hanging, the patient faces the viewer, so
the patient's RIGHT is on the image's LEFT (low column numbers). Every side word
(labels, reports) names the patient's side. Never flip these images
horizontally: a flip turns every left finding into a right one.

Findings (each drawn large and contrasted enough to survive a 64 px resize):

* lesion: none, or a nodule (2-2.6 cm) or a mass (4-5.2 cm), a bright disc in
  one lobe: right upper / middle / lower, left upper / lower. Upper lobes sit in
  the upper lung zone, the right middle lobe medially at mid height beside the
  heart border, the lower lobes laterally in the lower zone.
* pleural effusion: none, right, left or both. Fluid fills the lung base up to a
  meniscus that climbs the lateral chest wall: the costophrenic angle is blunted
  and the base becomes as opaque as soft tissue.
* cardiomegaly: cardiothoracic width ratio 0.56-0.66 (normal 0.38-0.47).
* pneumothorax: none, right or left. The lung is collapsed away from the apex and
  the lateral chest wall; the gap is darker than lung and has no vessel markings,
  bounded by a thin bright visceral pleural line.

That is 11 lesion states x 4 x 2 x 3 = 264 finding combinations (`LABEL_NAMES`
multi-hot vectors are equal exactly when the combinations are). The report (a
FINDINGS and an IMPRESSION section) is drawn from paraphrased templates, with
negations of absent findings ("no pleural effusion", "heart size is normal"),
so the same words occur in positive and negative statements: matching a report
needs the image, not word counts. Pairs with the same combination differ in
wording (and nodule size in mm), so strict pair retrieval is bounded above by
the number of same-combination pairs in the pool (see `recall_at_1_ceiling`).

`sample_case` draws the findings, geometry and report without pixels;
`render_cxr` draws the pixels. `ensure_cxr_phantom_dataset` materialises the
pairs into ArrayRecord shards once per data directory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import cv2
import numpy as np

from input_pipeline import rendered

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
# Field of view across the image width: a 27-32 cm thorax fills 68-80 % of it.
FIELD_OF_VIEW_MM = 400.0

SIDES = ("right", "left")
LOBES = {"right": ("upper", "middle", "lower"), "left": ("upper", "lower")}
LESION_SIZES = ("nodule", "mass")  # nodule <= 3 cm < mass
EFFUSIONS = ("none", "right", "left", "both")
PNEUMOTHORACES = ("none", "right", "left")

# Multi-hot finding labels; equal vectors <=> equal finding combinations.
LABEL_NAMES = (
    "normal",
    "nodule",
    "mass",
    "lesion_right",
    "lesion_left",
    "lesion_upper",
    "lesion_middle",
    "lesion_lower",
    "effusion_right",
    "effusion_left",
    "cardiomegaly",
    "pneumothorax_right",
    "pneumothorax_left",
)

# Six landmarks (meta "landmarks", in this order), from each lung's outline: the
# apex is the top of the outline, the costophrenic angle its lateral basal
# corner, the cardiophrenic angle its medial basal corner, where the straight
# medial (mediastinal) border meets the domed base. Side words name the
# patient's side: the right lung is on the image left.
CHEST_LANDMARK_NAMES = (
    "right lung apex",
    "right costophrenic angle",
    "right cardiophrenic angle",
    "left lung apex",
    "left costophrenic angle",
    "left cardiophrenic angle",
)

# Finding priors: flat enough that the 264 combinations are spread widely
# (strict retrieval is bounded by how often pairs share one); "normal" ~4 %.
P_LESION = 0.6
P_LOBE = {"right": (0.35, 0.3, 0.35), "left": (0.5, 0.5)}
P_EFFUSION = (0.34, 0.22, 0.22, 0.22)  # EFFUSIONS order
P_CARDIOMEGALY = 0.45
P_PNEUMOTHORAX = (0.5, 0.25, 0.25)  # PNEUMOTHORACES order

# Lesion radius as a fraction of the image width.
_LESION_RADIUS = {"nodule": (0.025, 0.0325), "mass": (0.05, 0.065)}
# Lesion centre in lung coordinates: (height fraction apex 0 .. base 1,
# width fraction medial 0 .. lateral 1), ranges per lobe.
_LOBE_SITES = {
    "upper": ((0.16, 0.36), (0.30, 0.72)),
    "middle": ((0.50, 0.60), (0.22, 0.42)),
    "lower": ((0.60, 0.68), (0.52, 0.78)),
}


# --------------------------------------------------------------------------
# Findings, geometry and report: cheap scalars and strings, no pixels.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Findings:
    """The finding combination of one image (side words = the patient's side)."""

    lesion: str | None  # None | "nodule" | "mass"
    lesion_side: str | None
    lesion_lobe: str | None
    effusion: str  # EFFUSIONS
    cardiomegaly: bool
    pneumothorax: str  # PNEUMOTHORACES

    @property
    def normal(self) -> bool:
        return (
            self.lesion is None
            and self.effusion == "none"
            and not self.cardiomegaly
            and self.pneumothorax == "none"
        )

    def effusion_sides(self) -> tuple[str, ...]:
        if self.effusion == "both":
            return SIDES
        return () if self.effusion == "none" else (self.effusion,)

    def multi_hot(self) -> list[int]:
        """0/1 per `LABEL_NAMES` entry."""
        on = set()
        if self.normal:
            on.add("normal")
        if self.lesion is not None:
            on |= {self.lesion, f"lesion_{self.lesion_side}", f"lesion_{self.lesion_lobe}"}
        on |= {f"effusion_{s}" for s in self.effusion_sides()}
        if self.cardiomegaly:
            on.add("cardiomegaly")
        if self.pneumothorax != "none":
            on.add(f"pneumothorax_{self.pneumothorax}")
        return [int(name in on) for name in LABEL_NAMES]

    def combination_id(self) -> int:
        """An integer in [0, NUM_COMBINATIONS) naming this combination."""
        return combination_id(
            self.lesion,
            self.lesion_side,
            self.lesion_lobe,
            self.effusion,
            self.cardiomegaly,
            self.pneumothorax,
        )


def _lesion_states() -> list[tuple[str | None, str | None, str | None]]:
    states = [(None, None, None)]
    for size in LESION_SIZES:
        for side in SIDES:
            states += [(size, side, lobe) for lobe in LOBES[side]]
    return states


_LESION_STATES = _lesion_states()
NUM_COMBINATIONS = len(_LESION_STATES) * len(EFFUSIONS) * 2 * len(PNEUMOTHORACES)


def combination_id(lesion, lesion_side, lesion_lobe, effusion, cardiomegaly, pneumothorax) -> int:
    """Mixed-radix code of a combination (see Findings.combination_id)."""
    code = _LESION_STATES.index((lesion, lesion_side, lesion_lobe))
    code = code * len(EFFUSIONS) + EFFUSIONS.index(effusion)
    code = code * 2 + int(bool(cardiomegaly))
    return code * len(PNEUMOTHORACES) + PNEUMOTHORACES.index(pneumothorax)


@dataclasses.dataclass(frozen=True)
class Case:
    """Findings, anatomy and report of one pair. Lengths are fractions of the
    image width (so one case renders at any size), y grows downward."""

    index: int
    seed: int
    findings: Findings
    center_x: float  # thorax midline
    half_width: float  # half the thorax width (inner rib margin)
    apex_y: float  # lung apices
    dome_y: tuple[float, float]  # (right, left) hemidiaphragm dome tops
    costophrenic_drop: float  # costophrenic angles lie this far below the domes
    mediastinum: float  # half width of the upper mediastinum
    body_margin: float  # soft tissue outside the ribs
    ctr: float  # cardiothoracic width ratio
    heart_height: float
    lesion_radius: float  # 0 without a lesion
    lesion_site: tuple[float, float]  # (height, width) fractions in lung coordinates
    effusion_level: tuple[float, float]  # (right, left) fluid top below the dome (negative: above)
    meniscus: float  # how far the fluid climbs the lateral wall
    collapse: tuple[float, float]  # pneumothorax lung scale (x, y); 1 without
    report: dict  # {"findings": str, "impression": str, "report": str}

    @property
    def lesion_diameter_mm(self) -> float:
        return 2 * self.lesion_radius * FIELD_OF_VIEW_MM

    def meta(self) -> dict:
        """The record metadata: labels, report sections and bits stored."""
        f = self.findings
        return {
            "bits_stored": BITS_STORED,
            "report": self.report["report"],
            "findings": self.report["findings"],
            "impression": self.report["impression"],
            "finding_labels": f.multi_hot(),
            "finding_combination": f.combination_id(),
            "lesion": f.lesion,
            "lesion_side": f.lesion_side,
            "lesion_lobe": f.lesion_lobe,
            "lesion_diameter_mm": round(self.lesion_diameter_mm, 1) if f.lesion else None,
            "effusion": f.effusion,
            "cardiomegaly": f.cardiomegaly,
            "pneumothorax": f.pneumothorax,
            "ctr": round(self.ctr, 3),
            "phantom_index": self.index,
            "phantom_seed": self.seed,
            "view_group": "frontal",
        }


def _streams(index: int, seed: int):
    """Independent findings, anatomy, report and texture streams of (seed, index)."""
    if index < 0 or not 0 <= seed < 2**32:
        raise ValueError(f"need index >= 0 and 0 <= seed < 2**32, got {index}, {seed}")
    return np.random.default_rng([int(seed), int(index), 0xC58]).spawn(4)


def sample_findings(rng: np.random.Generator) -> Findings:
    lesion = side = lobe = None
    if rng.random() < P_LESION:
        lesion = LESION_SIZES[int(rng.integers(2))]
        side = SIDES[int(rng.integers(2))]
        lobe = LOBES[side][rng.choice(len(LOBES[side]), p=P_LOBE[side])]
    return Findings(
        lesion=lesion,
        lesion_side=side,
        lesion_lobe=lobe,
        effusion=EFFUSIONS[rng.choice(len(EFFUSIONS), p=P_EFFUSION)],
        cardiomegaly=bool(rng.random() < P_CARDIOMEGALY),
        pneumothorax=PNEUMOTHORACES[rng.choice(len(PNEUMOTHORACES), p=P_PNEUMOTHORAX)],
    )


def sample_case(index: int, seed: int) -> Case:
    """Findings, anatomy and report of pair `index` (cheap: no pixels)."""
    finding_rng, anatomy_rng, report_rng, _ = _streams(index, seed)
    f = sample_findings(finding_rng)
    r = anatomy_rng
    dome_right = r.uniform(0.64, 0.71)
    ctr = r.uniform(0.56, 0.66) if f.cardiomegaly else r.uniform(0.38, 0.47)
    radius = r.uniform(*_LESION_RADIUS[f.lesion]) if f.lesion else 0.0
    lobe_site = _LOBE_SITES[f.lesion_lobe or "upper"]
    site = (r.uniform(*lobe_site[0]), r.uniform(*lobe_site[1]))
    collapse = (1.0, 1.0)
    if f.pneumothorax != "none":
        collapse = (r.uniform(0.76, 0.84), r.uniform(0.78, 0.86))
    case = Case(
        index=int(index),
        seed=int(seed),
        findings=f,
        center_x=0.5 + r.normal(0.0, 0.012),
        half_width=r.uniform(0.34, 0.40),
        apex_y=r.uniform(0.10, 0.15),
        dome_y=(dome_right, dome_right + r.uniform(0.0, 0.03)),
        costophrenic_drop=r.uniform(0.06, 0.085),
        mediastinum=r.uniform(0.05, 0.065),
        body_margin=r.uniform(0.04, 0.08),
        ctr=ctr,
        heart_height=r.uniform(0.26, 0.32),
        lesion_radius=radius,
        lesion_site=site,
        effusion_level=(r.uniform(-0.07, -0.03), r.uniform(-0.07, -0.03)),
        meniscus=r.uniform(0.04, 0.06),
        collapse=collapse,
        report={},
    )
    report = write_report(f, case.lesion_diameter_mm, report_rng)
    return dataclasses.replace(case, report=report)


def sample_meta(index: int, seed: int) -> dict:
    """The metadata `render_cxr(index, seed, size)` stores, without rendering."""
    return sample_case(index, seed).meta()


# --------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------

# Sentences per statement; "{side}"/"{Side}" is the patient's side, "{lobe}" the
# lobe, "{size}" a size phrase ("2.3 cm", "23 mm"), "{other}" the opposite side.
_NODULE_POS = (
    "There is a {size} nodule in the {side} {lobe} lobe.",
    "A {size} rounded opacity in the {side} {lobe} lobe is consistent with a nodule.",
    "{Side} {lobe} lobe nodule measuring {size}.",
    "A well-circumscribed {size} nodule projects over the {side} {lobe} lobe.",
    "Nodular opacity in the {side} {lobe} lobe, measuring {size}.",
)
_NODULE_POS_NO_SIZE = (
    "There is a small nodule in the {side} {lobe} lobe.",
    "{Side} {lobe} lobe pulmonary nodule.",
    "A rounded nodular opacity is seen in the {side} {lobe} lobe.",
)
_MASS_POS = (
    "There is a {size} mass in the {side} {lobe} lobe.",
    "Large rounded opacity in the {side} {lobe} lobe, compatible with a mass measuring {size}.",
    "{Side} {lobe} lobe mass measuring {size}.",
    "A {size} mass projects over the {side} {lobe} lobe.",
)
_MASS_POS_NO_SIZE = (
    "There is a large mass in the {side} {lobe} lobe.",
    "{Side} {lobe} lobe mass.",
    "A large rounded opacity occupies the {side} {lobe} lobe, concerning for a mass.",
)
_LESION_NEG = (
    "No focal nodule or mass.",
    "No suspicious pulmonary nodules or masses are seen.",
    "There is no nodule or mass.",
    "No pulmonary nodule is identified.",
)
_EFFUSION_POS = (
    "There is a {side} pleural effusion.",
    "{Side} pleural effusion.",
    "Blunting of the {side} costophrenic angle is consistent with a pleural effusion.",
    "{Side}-sided pleural effusion with a meniscus along the lateral chest wall.",
    "Fluid is layering in the {side} pleural space.",
    "Opacity at the {side} lung base with a meniscus, consistent with effusion.",
)
_EFFUSION_BOTH = (
    "Bilateral pleural effusions.",
    "There are pleural effusions on both sides.",
    "Both costophrenic angles are blunted by pleural fluid.",
    "Bilateral pleural effusions, {side} slightly larger than {other}.",
    "Fluid is layering in both pleural spaces.",
)
_EFFUSION_NEG = (
    "No pleural effusion.",
    "There is no pleural effusion.",
    "The costophrenic angles are sharp, without effusion.",
    "No effusions.",
    "No pleural effusion is seen.",
)
_EFFUSION_NEG_OTHER = (
    "No {other} pleural effusion.",
    "The {other} costophrenic angle is sharp.",
    "No effusion on the {other}.",
)
_CARDIO_POS = (
    "The heart is enlarged.",
    "Cardiomegaly.",
    "The cardiac silhouette is enlarged.",
    "Moderate enlargement of the cardiac silhouette.",
    "The heart size is increased.",
)
_CARDIO_NEG = (
    "Heart size is normal.",
    "The cardiac silhouette is within normal limits.",
    "Normal heart size.",
    "No cardiomegaly.",
    "The heart is not enlarged.",
)
_PTX_POS = (
    "There is a {side} pneumothorax.",
    "{Side} apical pneumothorax.",
    (
        "A visceral pleural line is seen in the {side} hemithorax with absent lung markings "
        "beyond it, consistent with pneumothorax."
    ),
    "{Side}-sided pneumothorax is present.",
    "Pneumothorax at the {side} apex and along the {side} lateral chest wall.",
)
_PTX_NEG = (
    "No pneumothorax.",
    "There is no pneumothorax.",
    "No evidence of pneumothorax.",
    "No pneumothorax is seen.",
)
_PTX_NEG_OTHER = ("No {other} pneumothorax.", "The {other} lung is fully expanded.")
_LUNGS_CLEAR = (
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "The lungs are well expanded and clear.",
)
_FILLER = (
    "The mediastinal contours are unremarkable.",
    "No acute osseous abnormality.",
    "The hila are normal.",
    "Osseous structures are intact.",
    "The trachea is midline.",
)
_IMP_LESION = {
    "nodule": ("{Side} {lobe} lobe nodule.", "{Size} nodule in the {side} {lobe} lobe."),
    "mass": ("{Side} {lobe} lobe mass.", "{Size} mass in the {side} {lobe} lobe."),
}
_IMP_LESION_FOLLOW_UP = (
    " Recommend chest CT for further evaluation.",
    " Further evaluation with CT is advised.",
    "",
)
_IMP_EFFUSION = ("{Side} pleural effusion.", "{Side}-sided pleural effusion.")
_IMP_EFFUSION_BOTH = ("Bilateral pleural effusions.", "Small bilateral pleural effusions.")
_IMP_CARDIO = ("Cardiomegaly.", "Enlarged cardiac silhouette.")
_IMP_PTX = ("{Side} pneumothorax.", "{Side}-sided pneumothorax.")
_IMP_NORMAL = (
    "No acute cardiopulmonary process.",
    "Normal chest radiograph.",
    "No acute cardiopulmonary abnormality.",
)


def _fill(template: str, **words: str) -> str:
    caps = {k.capitalize(): v.capitalize() for k, v in words.items()}
    return template.format(**words, **caps)


def _size_phrase(diameter_mm: float, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return f"{diameter_mm / 10:.1f} cm"
    return f"{round(diameter_mm)} mm"


def write_report(
    f: Findings, lesion_diameter_mm: float, rng: np.random.Generator
) -> dict[str, str]:
    """{"findings", "impression", "report"} describing `f` in varied words.

    Positive findings are always stated; absent ones are negated with
    probability 0.75 each (a missing negation is still not a positive), so a
    finding's words appear in reports with and without it.
    """

    def pick(options):
        return options[int(rng.integers(len(options)))]

    groups: list[list[str]] = []
    # Lungs: lesion and pneumothorax.
    lungs = []
    if f.lesion:
        sized = rng.random() < 0.7
        table = {
            ("nodule", True): _NODULE_POS,
            ("nodule", False): _NODULE_POS_NO_SIZE,
            ("mass", True): _MASS_POS,
            ("mass", False): _MASS_POS_NO_SIZE,
        }[(f.lesion, sized)]
        lungs.append(
            _fill(
                pick(table),
                side=f.lesion_side,
                lobe=f.lesion_lobe,
                size=_size_phrase(lesion_diameter_mm, rng),
            )
        )
    lungs_clear = f.lesion is None and f.pneumothorax == "none" and f.effusion == "none"
    if lungs_clear and rng.random() < 0.5:
        lungs.append(pick(_LUNGS_CLEAR))
    elif f.lesion is None and rng.random() < 0.75:
        lungs.append(pick(_LESION_NEG))
    if f.pneumothorax != "none":
        side = f.pneumothorax
        lungs.append(_fill(pick(_PTX_POS), side=side))
        if rng.random() < 0.3:
            lungs.append(_fill(pick(_PTX_NEG_OTHER), other=_other(side)))
    elif rng.random() < 0.75:
        lungs.append(pick(_PTX_NEG))
    groups.append(lungs)

    pleura = []
    if f.effusion == "both":
        side = SIDES[int(rng.integers(2))]
        pleura.append(_fill(pick(_EFFUSION_BOTH), side=side, other=_other(side)))
    elif f.effusion != "none":
        pleura.append(_fill(pick(_EFFUSION_POS), side=f.effusion))
        if rng.random() < 0.4:
            pleura.append(_fill(pick(_EFFUSION_NEG_OTHER), other=_other(f.effusion)))
    elif rng.random() < 0.75:
        pleura.append(pick(_EFFUSION_NEG))
    groups.append(pleura)

    heart = []
    if f.cardiomegaly:
        heart.append(pick(_CARDIO_POS))
    elif rng.random() < 0.75:
        heart.append(pick(_CARDIO_NEG))
    groups.append(heart)

    fillers = [_FILLER[i] for i in rng.permutation(len(_FILLER))[: int(rng.integers(0, 3))]]
    groups.append(fillers)

    # Usually lungs, pleura, heart, bones; sometimes heart first.
    if rng.random() < 0.3:
        groups[0], groups[2] = groups[2], groups[0]
    findings = " ".join(s for g in groups for s in g)

    impression = []
    if f.lesion:
        size = _size_phrase(lesion_diameter_mm, rng)
        text = _fill(pick(_IMP_LESION[f.lesion]), side=f.lesion_side, lobe=f.lesion_lobe, size=size)
        impression.append(text + pick(_IMP_LESION_FOLLOW_UP))
    if f.pneumothorax != "none":
        impression.append(_fill(pick(_IMP_PTX), side=f.pneumothorax))
    if f.effusion == "both":
        impression.append(pick(_IMP_EFFUSION_BOTH))
    elif f.effusion != "none":
        impression.append(_fill(pick(_IMP_EFFUSION), side=f.effusion))
    if f.cardiomegaly:
        impression.append(pick(_IMP_CARDIO))
    if not impression:
        impression.append(pick(_IMP_NORMAL))
    if len(impression) > 1 and rng.random() < 0.4:
        impression = [f"{i + 1}. {s}" for i, s in enumerate(impression)]
    impression_text = " ".join(impression)
    return {
        "findings": findings,
        "impression": impression_text,
        "report": f"FINDINGS: {findings} IMPRESSION: {impression_text}",
    }


def _other(side: str) -> str:
    return "left" if side == "right" else "right"


# --------------------------------------------------------------------------
# Pixels.
# --------------------------------------------------------------------------

# Mean attenuation levels ([0, 1] before exposure jitter).
_AIR, _SOFT, _LUNG = 0.03, 0.56, 0.20


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable (y, x) pixel-centre coordinates in image-width units."""
    y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None]
    x = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None, :]
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


_SHIFT = 4  # fractional bits of cv2 drawing coordinates


def _pts(points: np.ndarray, size: int) -> np.ndarray:
    """Image-width units -> cv2 fixed-point pixel coordinates (pixel centres)."""
    return np.round((points * size - 0.5) * (1 << _SHIFT)).astype(np.int32)


def _fill_poly(points: np.ndarray, size: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [_pts(points, size)], 255, cv2.LINE_AA, shift=_SHIFT)
    return canvas.astype(np.float32) * (1.0 / 255.0)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0.05:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma_px), borderType=cv2.BORDER_REFLECT)


@dataclasses.dataclass(frozen=True)
class _Lung:
    """One lung's outline (image-width units) and its coordinate frame."""

    side: str
    outline: np.ndarray  # (n, 2) x, y polygon
    medial_x: float
    lateral_x: float
    apex_y: float
    dome_y: float
    costophrenic: tuple[float, float]  # (x, y) of the costophrenic angle

    @property
    def direction(self) -> float:  # +1: lateral is toward larger x (image right)
        return 1.0 if self.lateral_x > self.medial_x else -1.0

    def point(self, height: float, width: float) -> tuple[float, float]:
        """(x, y) of lung coordinates (height 0 apex .. 1 dome, width 0 medial .. 1 lateral)."""
        x = self.medial_x + width * (self.lateral_x - self.medial_x)
        return x, self.apex_y + height * (self.dome_y - self.apex_y)

    @property
    def top(self) -> tuple[float, float]:
        """(x, y) of the highest point of the outline (the apex): the middle of
        its top edge, which is flat (the cap's polygon is symmetric about it)."""
        ys = self.outline[:, 1]
        top = ys <= ys.min() + 1e-9
        return float(self.outline[top, 0].mean()), float(ys.min())

    @property
    def cardiophrenic(self) -> tuple[float, float]:
        """(x, y) of the medial end of the base, where the medial border meets it
        (the outline's last vertex; the closing edge is the medial border)."""
        x, y = self.outline[-1]
        return float(x), float(y)


def _lung(case: Case, side: str) -> _Lung:
    """Apex cap, convex lateral wall, sharp costophrenic angle, domed base,
    straight medial (mediastinal) border."""
    s = -1.0 if side == "right" else 1.0  # patient right = image left
    cx, hw, mw = case.center_x, case.half_width, case.mediastinum
    dome = case.dome_y[SIDES.index(side)]
    apex = case.apex_y
    cp_y = dome + case.costophrenic_drop
    medial = cx + s * mw
    t = np.linspace(0.0, 1.0, 24)
    # Lateral wall: from the apex out to the widest point, then nearly vertical.
    bulge = 1.0 - (1.0 - np.minimum(t / 0.55, 1.0)) ** 2
    wall_x = medial + s * (hw - mw) * (0.32 + 0.68 * bulge - 0.03 * t**3)
    wall_y = apex + t * (cp_y - apex)
    # Apex cap: from the medial border over the top to the wall's start.
    a = np.linspace(math.pi, 0.0, 10)[1:-1]
    cap_r = 0.5 * abs(wall_x[0] - medial)
    cap_cx = 0.5 * (wall_x[0] + medial)
    cap_x = cap_cx - s * cap_r * np.cos(a)
    cap_y = apex + cap_r * (1.0 - np.sin(a)) * 0.9
    # Base: a dome from the costophrenic angle, peaking 45 % of the way in.
    top_x = medial + s * 0.45 * (hw - mw)
    u = np.linspace(0.0, 1.0, 16)
    base_x = wall_x[-1] + u * (medial - wall_x[-1])
    rel = (base_x - top_x) / np.where(base_x * s > top_x * s, wall_x[-1] - top_x, medial - top_x)
    base_y = dome + np.where(base_x * s > top_x * s, cp_y - dome, 0.025) * rel**2
    xs = np.concatenate([[medial], cap_x, wall_x, base_x[1:]])
    ys = np.concatenate([[apex + cap_r * 0.9], cap_y, wall_y, base_y[1:]])
    return _Lung(
        side=side,
        outline=np.stack([xs, ys], axis=1),
        medial_x=medial,
        lateral_x=float(wall_x.max() if s > 0 else wall_x.min()),
        apex_y=apex,
        dome_y=dome,
        costophrenic=(float(wall_x[-1]), cp_y),
    )


def _collapsed(lung: _Lung, collapse: tuple[float, float]) -> np.ndarray:
    """Outline of the partly collapsed lung: shrunk toward the medial border
    horizontally and toward the base vertically (air gathers apically and
    laterally in an upright patient)."""
    kx, ky = collapse
    out = lung.outline.copy()
    out[:, 0] = lung.medial_x + kx * (out[:, 0] - lung.medial_x)
    out[:, 1] = lung.dome_y + ky * (out[:, 1] - lung.dome_y)
    return out


def _body(case: Case) -> np.ndarray:
    """Neck, shoulders and trunk outline."""
    cx, w = case.center_x, case.half_width + case.body_margin
    half = np.array(
        [
            [0.075, -0.01],
            [0.085, case.apex_y - 0.06],
            [w + 0.02, case.apex_y - 0.02],
            [w + 0.04, case.apex_y + 0.06],
            [w + 0.01, 0.55],
            [w - 0.02, 1.02],
        ]
    )
    right = half * [-1, 1] + [cx, 0]
    left = (half + [cx, 0])[::-1]
    return np.concatenate([right, left])


def _mediastinum(case: Case) -> np.ndarray:
    cx, mw, top = case.center_x, case.mediastinum, case.apex_y - 0.08
    bottom = max(case.dome_y) + 0.02
    knob_y = case.apex_y + 0.12  # aortic knob, on the patient's left
    return np.array(
        [
            [cx - 0.045, top],
            [cx + 0.045, top],
            [cx + mw + 0.005, knob_y - 0.05],
            [cx + mw + 0.03, knob_y],
            [cx + mw + 0.01, knob_y + 0.05],
            [cx + mw + 0.01, bottom],
            [cx - mw - 0.01, bottom],
            [cx - mw - 0.005, knob_y],
        ]
    )


def _ribs(case: Case, size: int, rng: np.random.Generator) -> np.ndarray:
    """Posterior ribs (arching out from the spine and down the flank) and clavicles."""
    canvas = np.zeros((size, size), np.uint8)
    cx, hw = case.center_x, case.half_width
    n = 9
    spacing = (min(case.dome_y) - case.apex_y + 0.04) / n
    t = np.linspace(0.0, 1.0, 14)
    k = np.arange(n)[:, None]
    y0 = case.apex_y - 0.03 + k * spacing + rng.normal(0, 0.003, (n, 1))
    y = y0 - 0.035 * np.sin(math.pi * np.minimum(t, 0.7) / 1.1) + (0.07 + 0.01 * k) * t**2.2
    ribs = []
    for side in (-1.0, 1.0):
        x = np.broadcast_to(cx + side * (0.03 + t * (hw + 0.03)), y.shape)
        ribs += list(_pts(np.stack([x, y], axis=-1), size))
    cv2.polylines(canvas, ribs, False, 255, max(1, round(0.016 * size)), cv2.LINE_AA, _SHIFT)
    clavicles = [
        _pts(
            np.array(
                [
                    [cx + side * 0.035, case.apex_y + 0.02],
                    [cx + side * (hw + 0.06), case.apex_y - 0.05],
                ]
            ),
            size,
        )
        for side in (-1.0, 1.0)
    ]
    cv2.polylines(canvas, clavicles, False, 255, max(1, round(0.022 * size)), cv2.LINE_AA, _SHIFT)
    return canvas


def _vessels(lung: _Lung, size: int, rng: np.random.Generator) -> np.ndarray:
    """Branching vessel markings radiating from the hilum (uint8 canvas)."""
    canvas = np.zeros((size, size), np.uint8)
    hx, hy = lung.point(0.45, 0.05)
    reach = abs(lung.lateral_x - lung.medial_x)
    count, steps = int(rng.integers(14, 20)), 7
    start = rng.uniform(-1.3, 1.3, (count, 1)) + (math.pi if lung.direction < 0 else 0.0)
    angle = start + np.cumsum(rng.normal(0.0, 0.15, (count, steps)), axis=1)
    step = rng.uniform(0.5, 1.0, (count, 1)) * reach / steps
    x = hx + np.concatenate([np.zeros((count, 1)), np.cumsum(np.cos(angle) * step, 1)], 1)
    y = hy + np.concatenate([np.zeros((count, 1)), np.cumsum(np.sin(angle) * step, 1)], 1)
    paths = list(_pts(np.stack([x, y], axis=-1), size))
    # Three brightness levels (one drawing call each) instead of one per vessel.
    for level, group in zip((130, 190, 250), (paths[0::3], paths[1::3], paths[2::3])):
        cv2.polylines(canvas, group, False, level, 1, cv2.LINE_AA, _SHIFT)
    return canvas


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed (2 size, 2 size) unit Gaussian field: each image takes a random
    window of it (drawing fresh noise per image costs more than the rest of
    the rendering's arithmetic)."""
    bank = np.random.default_rng(0x5EED).standard_normal((2 * size, 2 * size), np.float32)
    bank.flags.writeable = False
    return bank


def render_cxr(index: int, seed: int, size: int = 256) -> tuple[np.ndarray, dict]:
    """(uint16 image (size, size) with 12 bits stored, metadata) of pair `index`.

    The metadata is `case.meta()` plus "landmarks": the CHEST_LANDMARK_NAMES
    points as [x, y] = (column, row) pixels of the returned image, the centre
    of the top-left pixel at (0, 0), rounded to 4 decimals (they depend on the
    size, so `sample_meta` has none).
    """
    case = sample_case(index, seed)
    meta = case.meta()
    points = chest_landmarks(case, size)
    meta["landmarks"] = [[round(float(x), 4), round(float(y), 4)] for x, y in points]
    return render_case(case, size), meta


def _look(case: Case, size: int) -> tuple[dict, np.random.Generator]:
    """The pixel-level draws of `render_case` (exposure, final rotation and
    shift, ...) and the stream that goes on to draw vessels and ribs."""
    *_, rng = _streams(case.index, case.seed)
    look = {
        "soft": _SOFT + rng.uniform(-0.04, 0.04),
        "lung": _LUNG + rng.uniform(-0.03, 0.03),
        "gap": rng.uniform(0.09, 0.12),  # pneumothorax: darker than lung
        "heart_angle": rng.uniform(-10.0, 4.0),
        "bubble": int(rng.integers(60, 200)),
        "lesion": rng.uniform(0.26, 0.32),
        "coarse": rng.standard_normal((4, 4)).astype(np.float32),
        "noise_at": rng.integers(0, size, 2),
        "noise": rng.uniform(0.008, 0.016),
        "angle": rng.uniform(-3.0, 3.0),
        "shift": rng.uniform(-0.02, 0.02, 2) * size,
        "gamma": rng.uniform(0.85, 1.15),
    }
    return look, rng


def _warp(look: dict, size: int) -> np.ndarray:
    """The 2 x 3 pixel map of the final small rotation and shift of the patient."""
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), look["angle"], 1.0)
    matrix[:, 2] += look["shift"]
    return matrix


def chest_landmarks(case: Case, size: int) -> np.ndarray:
    """(6, 2) CHEST_LANDMARK_NAMES points, (x, y) pixels of `render_case(case,
    size)`: the lung outlines' points mapped as the outlines are drawn (`_pts`),
    then through the final rotation and shift. The drawn lungs' edges are
    antialiased and blurred by about a pixel around these points."""
    points = []
    for side in SIDES:
        lung = _lung(case, side)
        points += [lung.top, lung.costophrenic, lung.cardiophrenic]
    pixels = np.asarray(points) * size - 0.5
    matrix = _warp(_look(case, size)[0], size)
    return pixels @ matrix[:, :2].T + matrix[:, 2]


def render_case(case: Case, size: int = 256) -> np.ndarray:
    """The radiograph of `case`: uint16 (size, size), 12 bits stored.

    Pixel-level randomness (exposure, vessels, noise) comes from the case's
    (index, seed) and is drawn in a fixed order whatever the findings, so
    `dataclasses.replace(case, findings=...)` renders the same patient with
    other findings (what the visibility tests compare).
    """
    if size < 32:
        raise ValueError(f"phantom size must be >= 32 px, got {size}")
    look, rng = _look(case, size)
    f = case.findings
    ys, xs = _grid(size)
    px = 1.0 / size  # one pixel in image-width units
    lungs = {side: _lung(case, side) for side in SIDES}
    vessels = {side: _vessels(lung, size, rng) for side, lung in lungs.items()}
    ribs = _ribs(case, size, rng)

    # Trunk: soft tissue, thicker toward the abdomen below the domes.
    soft = look["soft"]
    body = _blur(_fill_poly(_body(case), size), 1.5)
    abdomen = np.clip((ys - (max(case.dome_y) + 0.01)) / 0.04, 0.0, 1.0)
    image = _AIR + body * (soft - _AIR + 0.12 * abdomen)

    # Lungs replace what lies behind them with aerated tissue; pleural fluid
    # (effusion) and the pneumothorax gap replace the lung in turn.
    aerated_all = np.zeros((size, size), np.float32)
    markings = np.zeros((size, size), np.float32)
    for side, lung in lungs.items():
        mask = _blur(_fill_poly(lung.outline, size), 0.6)
        if side in f.effusion_sides():
            width = np.clip((xs - lung.medial_x) / (lung.lateral_x - lung.medial_x), 0.0, 1.0)
            top = lung.dome_y + case.effusion_level[SIDES.index(side)] - case.meniscus * width**2
            fluid = mask * np.clip((ys - top) / (0.02 + 2 * px) + 0.5, 0.0, 1.0)
            mask = mask - fluid
            image += fluid * 0.10  # as dense as the abdomen below
        aerated = mask
        if f.pneumothorax == side:
            inner = _blur(_fill_poly(_collapsed(lung, case.collapse), size), 0.6)
            aerated = np.minimum(inner, mask)
        # Lung density rises toward the base (more tissue, vessels, less air).
        height = np.clip((ys - lung.apex_y) / (lung.dome_y - lung.apex_y), 0.0, 1.2)
        image += mask * (look["lung"] + 0.03 * height - image)
        if f.pneumothorax == side:
            image -= (mask - aerated) * look["gap"]
            line = np.zeros((size, size), np.uint8)
            thick = max(1, round(0.006 * size))
            outline = _pts(_collapsed(lung, case.collapse), size)
            cv2.polylines(line, [outline], True, 255, thick, cv2.LINE_AA, _SHIFT)
            image += line.astype(np.float32) * (0.12 / 255.0) * mask
        markings += aerated * vessels[side]
        aerated_all += aerated
    image += _blur(markings, max(0.5, 0.004 * size)) * (0.10 / 255.0)

    # Mediastinum and heart lie in front of the medial lungs.
    mediastinum = _blur(_fill_poly(_mediastinum(case), size), 1.0)
    image += mediastinum * (soft + 0.12 - image)
    image += 0.035 * np.exp(-(((xs - case.center_x) / 0.03) ** 2)) * body  # spine
    # Heart: sits on the diaphragm, its lower border lost in the abdomen.
    heart_w = case.ctr * 2 * case.half_width
    center = _pts(
        np.array([case.center_x + 0.16 * heart_w, case.dome_y[0] - 0.22 * case.heart_height]), size
    )
    axes = tuple(round(v * size * (1 << _SHIFT)) for v in (heart_w / 2, case.heart_height / 2))
    heart = np.zeros((size, size), np.uint8)
    cv2.ellipse(
        heart,
        tuple(int(v) for v in center),
        axes,
        look["heart_angle"],
        0,
        360,
        255,
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )
    heart = _blur(heart.astype(np.float32) * (1.0 / 255.0), 1.0)
    image += heart * (soft + 0.12 - image)

    # Gastric air bubble under the left hemidiaphragm.
    center = _pts(np.array([case.center_x + 0.55 * case.half_width, case.dome_y[1] + 0.05]), size)
    axes = (round(0.045 * size * (1 << _SHIFT)), round(0.025 * size * (1 << _SHIFT)))
    bubble = np.zeros((size, size), np.uint8)
    cv2.ellipse(
        bubble,
        tuple(int(v) for v in center),
        axes,
        0,
        0,
        360,
        look["bubble"],
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )
    image -= _blur(bubble.astype(np.float32) * (0.25 / 255.0), 1.5)

    # Nodule / mass: a bright disc with a soft edge (projected through anything).
    if f.lesion:
        lx, ly = lesion_center(case)
        edge = max(0.006, 1.5 * px)
        # Only the disc's bounding box: a full-frame distance map costs more.
        reach = case.lesion_radius + edge
        r0, r1 = (
            int(np.clip(math.floor(v * size), 0, size)) for v in (ly - reach, ly + reach + px)
        )
        c0, c1 = (
            int(np.clip(math.floor(v * size), 0, size)) for v in (lx - reach, lx + reach + px)
        )
        d = np.sqrt((xs[:, c0:c1] - lx) ** 2 + (ys[r0:r1] - ly) ** 2)
        disc = np.clip((case.lesion_radius - d) / edge + 0.5, 0.0, 1.0)
        image[r0:r1, c0:c1] += disc * look["lesion"]

    # Ribs show mostly against aerated lung.
    bones = _blur(ribs.astype(np.float32), max(0.5, 0.003 * size))
    image += bones * (body * (0.03 / 255.0) + np.minimum(aerated_all, 1.0) * (0.05 / 255.0))

    # Exposure: smooth non-uniformity, quantum noise, a small rotation and shift
    # of the whole patient, then gamma (as a lookup on the 12-bit values).
    image *= 1.0 + 0.04 * cv2.resize(look["coarse"], (size, size), interpolation=cv2.INTER_CUBIC)
    oy, ox = look["noise_at"]
    image += _noise_bank(size)[oy : oy + size, ox : ox + size] * look["noise"]
    image = cv2.warpAffine(
        image, _warp(look, size), (size, size), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    levels = np.clip(image * MAX_VALUE + 0.5, 0, MAX_VALUE).astype(np.uint16)
    return _gamma_table(round(look["gamma"], 3))[levels]


@functools.lru_cache(maxsize=512)  # 301 distinct values, 8 kB each
def _gamma_table(gamma: float) -> np.ndarray:
    table = np.round(MAX_VALUE * (np.arange(MAX_VALUE + 1) / MAX_VALUE) ** gamma)
    return table.astype(np.uint16)


def lung_point(case: Case, side: str, height: float, width: float) -> tuple[float, float]:
    """(x, y) in image-width units of a point in `side`'s lung coordinates:
    height 0 apex .. 1 dome top, width 0 medial .. 1 lateral (before the final
    small rotation and shift, i.e. within about 0.03 of where it is drawn)."""
    return _lung(case, side).point(height, width)


def lesion_center(case: Case) -> tuple[float, float]:
    """(x, y) of the lesion centre before the final small rotation and shift,
    in image-width units (it moves with a collapsed lung)."""
    f = case.findings
    if not f.lesion:
        raise ValueError(f"case {case.index} has no lesion")
    lung = _lung(case, f.lesion_side)
    x, y = lung.point(*case.lesion_site)
    if f.pneumothorax == f.lesion_side:
        x = lung.medial_x + case.collapse[0] * (x - lung.medial_x)
        y = lung.dome_y + case.collapse[1] * (y - lung.dome_y)
    return x, y


# --------------------------------------------------------------------------
# Statistics and materialisation.
# --------------------------------------------------------------------------


def recall_at_1_ceiling(combinations: Sequence[int]) -> float:
    """Best expected strict image-to-text R@1 over a pool of pairs with these
    finding combinations: a model that reads every finding still cannot tell
    apart the k pairs sharing a combination, so it is right 1/k of the time."""
    combinations = np.asarray(combinations)
    if combinations.size == 0:
        raise ValueError("recall_at_1_ceiling needs at least one pair")
    _, inverse, counts = np.unique(combinations, return_inverse=True, return_counts=True)
    return float(np.mean(1.0 / counts[inverse]))


# The cache's names (declared in rendered.PHANTOMS). A record's
# meta["phantom_index"] names the pair it holds: the shards interleave them.
ensure_cxr_phantom_dataset = rendered.PHANTOMS["cxr_phantom"].ensure
cxr_phantom_dir = rendered.PHANTOMS["cxr_phantom"].shards_dir
