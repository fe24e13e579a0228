"""Paired chest X-ray phantom: determinism, findings visible in the pixels at
64 px, report wording (both sections, paraphrases, negations, no statement
that contradicts the image's findings), and the shard cache."""

import dataclasses
import itertools
import os
import re

import cv2
import numpy as np
import pytest

from input_pipeline import cxr_phantom as cp
from input_pipeline import records

SMALL = 64  # the demo's training resolution


def _small(image: np.ndarray) -> np.ndarray:
    """[0, 1] image area-resized to 64 px, as the training pipeline does."""
    x = image.astype(np.float32) / cp.MAX_VALUE
    return cv2.resize(x, (SMALL, SMALL), interpolation=cv2.INTER_AREA)


def _with(case: cp.Case, **changes) -> cp.Case:
    return dataclasses.replace(case, findings=dataclasses.replace(case.findings, **changes))


def _cases(seed: int, count: int, keep) -> list[cp.Case]:
    cases = (cp.sample_case(i, seed) for i in range(10 * count))
    return list(itertools.islice((c for c in cases if keep(c.findings)), count))


# ------------------------------------------------------------------ pixels


def test_render_is_deterministic_per_index_and_seed():
    image, meta = cp.render_cxr(3, 7, 64)
    assert image.dtype == np.uint16 and image.shape == (64, 64)
    assert int(image.max()) <= cp.MAX_VALUE and meta["bits_stored"] == cp.BITS_STORED
    again, meta_again = cp.render_cxr(3, 7, 64)
    np.testing.assert_array_equal(image, again)
    assert meta == meta_again
    assert not np.array_equal(image, cp.render_cxr(4, 7, 64)[0])
    assert not np.array_equal(image, cp.render_cxr(3, 8, 64)[0])
    # Findings and report do not depend on the size and need no pixels (the landmarks
    # are pixels of the rendered size: tests/test_cxr_landmarks.py).
    drop = lambda m: {k: v for k, v in m.items() if k != "landmarks"}
    assert drop(cp.render_cxr(3, 7, 96)[1]) == drop(meta) == cp.sample_meta(3, 7)
    records.encode_record(image, meta)  # JSON-serialisable metadata


def _zone_mean(x, case, side, heights, widths, reduce=np.mean):
    points = [
        cp.lung_point(case, side, h, w)
        for h in np.linspace(*heights, 5)
        for w in np.linspace(*widths, 5)
    ]
    return float(
        reduce(
            [x[min(SMALL - 1, int(y * SMALL)), min(SMALL - 1, int(px * SMALL))] for px, y in points]
        )
    )


def test_radiograph_polarity_lungs_dark_mediastinum_bright():
    for i in range(8):
        case = cp.sample_case(i, 0)
        x = _small(cp.render_case(case, 128))
        lungs = [_zone_mean(x, case, side, (0.3, 0.55), (0.3, 0.7), np.median) for side in cp.SIDES]
        mediastinum = x[int(0.35 * SMALL), int(case.center_x * SMALL)]
        air = x[2, 1]
        assert max(lungs) + 0.2 < mediastinum, i
        assert air < min(lungs), i


def test_effusion_side_measurable_from_pixel_statistics():
    """The lateral lung base is dark lung without effusion and soft-tissue
    bright with it, on the effusion's side only (patient right = image left)."""
    base = {side: ([], []) for side in cp.SIDES}  # (absent, present)
    for i in range(64):
        case = cp.sample_case(i, 2)
        x = _small(cp.render_case(case, 128))
        for side in cp.SIDES:
            present = side in case.findings.effusion_sides()
            base[side][present].append(_zone_mean(x, case, side, (0.92, 1.05), (0.8, 0.95)))
    for side, (absent, present) in base.items():
        assert len(absent) >= 10 and len(present) >= 10, side
        assert max(absent) < min(present), (side, max(absent), min(present))
        assert np.mean(present) - np.mean(absent) > 0.25, side


def test_effusion_and_pneumothorax_change_only_their_side():
    for case in _cases(4, 6, lambda f: f.pneumothorax != "none" or f.effusion != "none"):
        f = case.findings
        for changes, sign, side in (
            ({"pneumothorax": "none"}, -1, f.pneumothorax),  # the gap is darker
            ({"effusion": "none"}, +1, f.effusion),  # the fluid is brighter
        ):
            if side == "none":
                continue
            diff = _small(cp.render_case(case, 128)) - _small(
                cp.render_case(_with(case, **changes), 128)
            )
            assert (sign * diff > 0.04).sum() >= 40, (case.index, changes)  # large at 64 px
            cols = np.nonzero(np.abs(diff) > 0.02)[1]  # everything that changed
            if side == "right":  # patient right = image left
                assert (cols < SMALL // 2).all(), case.index
            elif side == "left":
                assert (cols >= SMALL // 2).all(), case.index


def test_lesion_visible_with_size_category_and_place():
    areas = {"nodule": [], "mass": []}
    for case in _cases(5, 16, lambda f: f.lesion is not None):
        f = case.findings
        diff = _small(cp.render_case(case, 128)) - _small(
            cp.render_case(_with(case, lesion=None, lesion_side=None, lesion_lobe=None), 128)
        )
        spot = diff > 0.08
        rows, cols = np.nonzero(spot)
        areas[f.lesion].append(int(spot.sum()))
        x, y = cp.lesion_center(case)
        # Within about 3 px of where it was placed (the patient is rotated <= 3 deg).
        assert abs(cols.mean() - x * SMALL) < 3.5 and abs(rows.mean() - y * SMALL) < 3.5
        assert (cols.mean() < SMALL / 2) == (f.lesion_side == "right")
    assert len(areas["nodule"]) >= 4 and len(areas["mass"]) >= 4
    assert min(areas["nodule"]) >= 5  # a few pixels even at 64 px
    assert max(areas["nodule"]) * 1.5 < min(areas["mass"]), areas  # size category visible


def test_lobes_sit_in_their_lung_zones():
    for case in _cases(6, 40, lambda f: f.lesion is not None):
        f = case.findings
        _, y = cp.lesion_center(case)
        top = case.apex_y
        dome = case.dome_y[cp.SIDES.index(f.lesion_side)]
        height = (y - top) / (dome - top)
        if f.pneumothorax == f.lesion_side:
            continue  # moved with the collapsed lung
        if f.lesion_lobe == "upper":
            assert height < 0.4
        else:
            assert height > 0.45


def test_cardiomegaly_is_a_wider_heart():
    case = cp.sample_case(0, 0)
    normal = _small(cp.render_case(dataclasses.replace(case, ctr=0.42), 128))
    enlarged = _small(cp.render_case(dataclasses.replace(case, ctr=0.62), 128))
    brighter = np.nonzero(enlarged - normal > 0.1)
    assert len(brighter[0]) >= 30
    assert (brighter[1] > case.center_x * SMALL).mean() > 0.6  # mostly toward the patient's left
    for i in range(200):
        c = cp.sample_case(i, 0)
        assert (c.ctr > 0.5) == c.findings.cardiomegaly


# ------------------------------------------------------------------ labels


def test_combinations_labels_and_ids_are_one_to_one():
    lesions = [(None, None, None)] + [
        (size, side, lobe)
        for size in cp.LESION_SIZES
        for side in cp.SIDES
        for lobe in cp.LOBES[side]
    ]
    seen_ids, seen_labels = set(), set()
    for lesion, effusion, cardio, ptx in itertools.product(
        lesions, cp.EFFUSIONS, (False, True), cp.PNEUMOTHORACES
    ):
        f = cp.Findings(*lesion, effusion=effusion, cardiomegaly=cardio, pneumothorax=ptx)
        seen_ids.add(f.combination_id())
        labels = f.multi_hot()
        assert len(labels) == len(cp.LABEL_NAMES)
        seen_labels.add(tuple(labels))
        assert labels[cp.LABEL_NAMES.index("normal")] == int(f.normal)
    assert len(seen_ids) == len(seen_labels) == cp.NUM_COMBINATIONS == 264
    assert seen_ids == set(range(cp.NUM_COMBINATIONS))


def test_recall_at_1_ceiling():
    assert cp.recall_at_1_ceiling([0, 1, 2]) == 1.0
    assert cp.recall_at_1_ceiling([5, 5, 7]) == pytest.approx((0.5 + 0.5 + 1) / 3)
    with pytest.raises(ValueError):
        cp.recall_at_1_ceiling([])


# ----------------------------------------------------------------- reports

_SIDES = re.compile(r"\b(right|left)\b")
_BOTH = re.compile(r"\b(both|bilateral|bilaterally)\b")
_NEGATIVE = re.compile(r"\bno\b|\bnot\b|normal|sharp|fully expanded|are clear|is clear")


# A sentence's topic: the first of these patterns it matches, in this order.
_TOPICS = (
    ("clear", r"lungs are (well expanded and )?clear|lungs are clear"),
    ("normal", r"no acute cardiopulmonary|normal chest radiograph"),
    ("effusion", r"effusion|costophrenic|pleural fluid|pleural space"),
    ("pneumothorax", r"pneumothorax|visceral pleural line|fully expanded"),
    ("heart", r"heart|cardiac|cardiomegaly"),
    ("lesion", r"nodul|\bmass\b|opacity"),
)


def _topic(sentence: str) -> str | None:
    s = sentence.lower()
    return next((topic for topic, pattern in _TOPICS if re.search(pattern, s)), None)


def _check_sentence(sentence: str, f: cp.Findings) -> str | None:
    """The topic a sentence states, after checking it against the findings."""
    s = sentence.lower()
    topic = _topic(s)
    negative = bool(_NEGATIVE.search(s))
    sides = set(cp.SIDES) if _BOTH.search(s) else set(_SIDES.findall(s))
    if topic == "clear":
        assert f.lesion is None and f.effusion == "none" and f.pneumothorax == "none", s
    elif topic == "normal":
        assert f.normal, s
    elif topic == "effusion":
        truth = set(f.effusion_sides())
        if negative:
            assert not (sides or set(cp.SIDES)) & truth, s
        else:
            assert sides and sides <= truth, s
    elif topic == "pneumothorax":
        truth = set() if f.pneumothorax == "none" else {f.pneumothorax}
        if negative:
            assert not (sides or set(cp.SIDES)) & truth, s
        else:
            assert sides == truth, s
    elif topic == "heart":
        assert negative != f.cardiomegaly, s
    elif topic == "lesion":
        if negative:
            assert f.lesion is None, s
        else:
            assert f.lesion is not None and sides == {f.lesion_side}, s
            assert f.lesion_lobe in s, s
            assert ("mass" in s) == (f.lesion == "mass"), s
    return None if topic is None else f"{topic}{'-' if negative else '+'}"


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", text) if s]


def test_reports_have_both_sections_and_never_contradict_the_findings():
    for i in range(300):
        case = cp.sample_case(i, 1)
        f, report = case.findings, case.report
        assert (
            report["report"] == f"FINDINGS: {report['findings']} IMPRESSION: {report['impression']}"
        )
        assert report["findings"] and report["impression"]
        for section in ("findings", "impression"):
            stated = {_check_sentence(s, f) for s in _sentences(report[section])}
            # Every present finding is stated in both sections.
            if f.lesion:
                assert "lesion+" in stated, (i, section, report)
            if f.effusion != "none":
                assert "effusion+" in stated, (i, section, report)
            if f.pneumothorax != "none":
                assert "pneumothorax+" in stated, (i, section, report)
            if f.cardiomegaly:
                assert "heart+" in stated, (i, section, report)


def test_report_wording_varies_and_negates_absent_findings():
    cases = [cp.sample_case(i, 0) for i in range(200)]
    reports = [c.report["report"] for c in cases]
    assert len(set(reports)) >= 0.95 * len(reports)  # short normal reports may repeat
    # Same findings, different words.
    by_combination = {}
    for c in cases:
        by_combination.setdefault(c.findings.combination_id(), []).append(c.report["report"])
    pairs = [(a, b) for r in by_combination.values() for a, b in itertools.combinations(r, 2)]
    assert len(pairs) >= 20
    assert sum(a != b for a, b in pairs) >= 0.9 * len(pairs)
    lower = [r.lower() for r in reports]
    assert sum("no pleural effusion" in r for r in lower) >= 10
    assert sum("no pneumothorax" in r for r in lower) >= 10
    assert sum("heart size is normal" in r or "normal heart size" in r for r in lower) >= 5
    # Finding words occur with and without the finding: counting them is not reading.
    for word, has in (
        ("effusion", lambda f: f.effusion != "none"),
        ("pneumothorax", lambda f: f.pneumothorax != "none"),
        ("nodule", lambda f: f.lesion is not None),
    ):
        with_word = [has(c.findings) for c, r in zip(cases, lower) if word in r]
        assert any(with_word) and not all(with_word), word
    # Many paraphrases of the same statement.
    effusion_sentences = {
        re.sub(r"\b(right|left)\b", "SIDE", s)
        for c in cases
        for s in _sentences(c.report["findings"])
        if _topic(s) == "effusion" and not _NEGATIVE.search(s.lower())
    }
    assert len(effusion_sentences) >= 6


# ------------------------------------------------------------------ shards


def test_dataset_is_written_once_and_reused(tmp_path):
    paths = cp.ensure_cxr_phantom_dataset(
        str(tmp_path), num_images=10, seed=3, size=64, num_shards=3
    )
    assert len(paths) == 3
    stamps = [os.path.getmtime(p) for p in paths]
    again = cp.ensure_cxr_phantom_dataset(
        str(tmp_path), num_images=10, seed=3, size=64, num_shards=3
    )
    assert again == paths and [os.path.getmtime(p) for p in paths] == stamps
    from input_pipeline import sources

    src = sources.ArrayRecordImageSource(paths)
    assert len(src) == 10
    seen = set()
    for i in range(len(src)):
        element = src[i]
        index = element["meta"]["phantom_index"]
        seen.add(index)
        image, meta = cp.render_cxr(index, 3, 64)
        np.testing.assert_array_equal(element["image"], image)
        assert element["meta"] == meta
    assert seen == set(range(10))
