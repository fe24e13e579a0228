"""MIMIC-CXR-JPG (chest X-rays) with MIMIC-CXR free-text reports -> `ManifestRow`s.

Where to get it: PhysioNet, credentialed access (complete the CITI "Data or
Specimens Only Research" training and sign the PhysioNet Credentialed Health
Data Use Agreement; do not share the data or send it to online services):

* images and CSVs: MIMIC-CXR-JPG, https://physionet.org/content/mimic-cxr-jpg/
  (Johnson et al.; version 2.0.0 or 2.1.0);
* reports: ``mimic-cxr-reports.zip`` from MIMIC-CXR (the DICOM project),
  https://physionet.org/content/mimic-cxr/ , extracted into ``ROOT/reports``
  (or anywhere, passed as ``reports_dir``).

Expected layout (``ROOT`` is what ``--input`` names)::

    ROOT/
      mimic-cxr-2.0.0-metadata.csv.gz   (.csv or .csv.gz: dicom_id, subject_id,
                                         study_id, ViewPosition, Rows, ...)
      mimic-cxr-2.0.0-split.csv.gz      (dicom_id, study_id, subject_id, split)
      mimic-cxr-2.0.0-chexpert.csv.gz   (subject_id, study_id, 14 CheXpert labels)
      files/
        p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
        ...
      reports/                          (mimic-cxr-reports.zip, extracted)
        files/p10/p10000032/s50414267.txt
        ...

Rows: one per JPG listed in the split CSV (``build_rows(root)``), with

* ``patient_id`` = ``subject_id``; ``split`` from the split CSV ("train",
  "validate" -> "val", "test").
* ``report``: the FINDINGS and IMPRESSION sections joined as
  ``"FINDINGS: ... IMPRESSION: ..."`` (whichever exist), whitespace collapsed.
  Sections start at an all-capitals heading that opens a line and ends in a
  colon ("FINDINGS:", "IMPRESSION:", "COMPARISON:" ...); a section runs to the
  next heading. "CONCLUSION" counts as impression and "FINDINGS AND
  IMPRESSION" (or "FINDINGS/IMPRESSION") as findings; repeated sections (an
  addendum) are concatenated. When a report has neither section, the report
  is its text without the "FINAL REPORT" banner and without the
  administrative sections (examination, indication, history, technique,
  comparison, wet read, notification ...; each is one paragraph, so
  unheaded paragraphs after one are kept). Labels ``findings`` and
  ``impression`` hold the two sections ("" when absent). Without reports
  (``with_reports=False``) rows carry no report.
* ``chexpert``: the 14 CheXpert labels of the study in `CHEXPERT_LABELS` order
  (alphabetical, as in the CSV), 1 positive, 0 negative, -1 uncertain, and
  0 for a blank cell (not mentioned) -- the usual reading; apply your own
  U-Ones/U-Zeros policy to -1 downstream. Studies without a CheXpert row get no
  ``chexpert`` label.
* ``view_group``: "frontal" (PA, AP, AP AXIAL, PA/AP LLD/RLD decubitus),
  "lateral" (LATERAL, LL, XTABLE LATERAL) or "other" (oblique LAO/RAO/LPO,
  SWIMMERS, unknown). A blank ViewPosition falls back to
  ViewCodeSequence_CodeMeaning ("postero-anterior"/"antero-posterior" ->
  frontal, "... lateral" -> lateral). Options: ``{"view": ViewPosition}``.

Every JPG in the split CSV (and its study's report) must be present, else a
`LayoutError` names the missing files. ``allow_partial=True`` keeps the present
JPGs only (and rows without a report where it is missing) and logs the counts.
"""

from __future__ import annotations

import logging
import os
import re

from input_pipeline.builders import LayoutError
from input_pipeline.builders._layout import (
    csv_variants,
    layout_error,
    read_csv,
    require,
    require_columns,
)
from input_pipeline.ingest.manifest import ManifestRow

log = logging.getLogger(__name__)

DATASET = "MIMIC-CXR-JPG"
HINT = (
    "MIMIC-CXR-JPG is credentialed PhysioNet data: download it from "
    "https://physionet.org/content/mimic-cxr-jpg/ (images and CSVs) and the reports zip "
    "(mimic-cxr-reports.zip) from https://physionet.org/content/mimic-cxr/ , extracted into "
    "ROOT/reports. Pass allow_partial=True to use a subset download."
)
METADATA = "mimic-cxr-2.0.0-metadata.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP AXIAL", "PA LLD", "PA RLD", "AP LLD", "AP RLD"})
LATERAL_VIEWS = frozenset({"LATERAL", "LL", "XTABLE LATERAL"})

# A section heading: capitals (and spaces, /, &, -, parentheses) opening a line, then ":".
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ,&/()\-]{0,60}[A-Z)])[ \t]*:", re.MULTILINE)
_FINDINGS = {"FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION"}
_IMPRESSION = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"}
_ADMINISTRATIVE = {
    "EXAMINATION",
    "EXAM",
    "TYPE OF EXAMINATION",
    "INDICATION",
    "INDICATIONS",
    "HISTORY",
    "CLINICAL HISTORY",
    "CLINICAL INFORMATION",
    "REASON FOR EXAM",
    "REASON FOR EXAMINATION",
    "TECHNIQUE",
    "COMPARISON",
    "COMPARISONS",
    "WET READ",
    "NOTIFICATION",
}
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_BANNER = re.compile(r"^[ \t]*(FINAL REPORT|FINAL ADDENDUM|ADDENDUM)[ \t]*$", re.MULTILINE)


def _squash(text: str) -> str:
    return " ".join(text.split())


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first heading, [(HEADING, section text), ...])."""
    matches = list(_HEADING.finditer(text))
    preamble = text[: matches[0].start()] if matches else text
    sections = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections.append((_squash(match.group(1)), text[match.end() : end]))
    return preamble, sections


def _after_first_paragraph(text: str) -> str:
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    return " ".join(paragraphs[1:])


def parse_report(text: str) -> tuple[str, str, str]:
    """(report, findings, impression) of one MIMIC-CXR report (module docstring)."""
    preamble, sections = split_sections(text)
    findings = _squash(" ".join(body for name, body in sections if name in _FINDINGS))
    impression = _squash(" ".join(body for name, body in sections if name in _IMPRESSION))
    parts = []
    if findings:
        parts.append(f"FINDINGS: {findings}")
    if impression:
        parts.append(f"IMPRESSION: {impression}")
    if parts:
        return " ".join(parts), findings, impression
    kept = [_BANNER.sub(" ", preamble)]
    for name, body in sections:
        # An administrative section is one paragraph; unheaded text after it is report body.
        kept.append(_after_first_paragraph(body) if name in _ADMINISTRATIVE else body)
    fallback = _squash(" ".join(kept)) or _squash(_BANNER.sub(" ", text))
    return fallback, "", ""


def view_group(view_position: str, view_code_meaning: str = "") -> str:
    """ "frontal" | "lateral" | "other" of a ViewPosition (module docstring)."""
    view = _squash(view_position.upper())
    if view in FRONTAL_VIEWS:
        return "frontal"
    if view in LATERAL_VIEWS:
        return "lateral"
    if not view:
        meaning = view_code_meaning.lower()
        if "postero-anterior" in meaning or "antero-posterior" in meaning:
            return "frontal"
        if "lateral" in meaning:
            return "lateral"
    return "other"


def chexpert_vector(row: dict[str, str], where: str) -> list[int]:
    """The 14 CheXpert labels of a CSV row: 1 / 0 / -1, blank -> 0."""
    values = []
    for name in CHEXPERT_LABELS:
        cell = row[name].strip()
        try:
            value = int(float(cell)) if cell else 0
        except ValueError:
            value = None
        if value not in (1, 0, -1):
            raise ValueError(f"{where}: CheXpert {name!r} must be 1, 0, -1 or blank, got {cell!r}")
        values.append(value)
    return values


def jpg_relpath(subject_id: str, study_id: str, dicom_id: str) -> str:
    """``files/p10/p10000032/s50414267/<dicom_id>.jpg``."""
    return os.path.join(
        "files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}", f"{dicom_id}.jpg"
    )


def _report_dir(root: str, reports_dir: str | None) -> str:
    """Folder holding ``pNN/`` report folders (``files/`` inside it when present)."""
    base = reports_dir if reports_dir is not None else os.path.join(root, "reports")
    base = os.path.abspath(base)
    files = os.path.join(base, "files")
    return files if os.path.isdir(files) else base


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def build_rows(
    root: str,
    reports_dir: str | None = None,
    allow_partial: bool = False,
    with_reports: bool = True,
) -> list[ManifestRow]:
    """MIMIC-CXR-JPG rows under `root`, reports from `reports_dir` (default
    ``ROOT/reports``); see the module docstring."""
    root = os.path.abspath(root)
    meta_path, split_path, chexpert_path = require(
        root, [csv_variants(METADATA), csv_variants(SPLIT), csv_variants(CHEXPERT)], DATASET, HINT
    )
    report_root = _report_dir(root, reports_dir) if with_reports else None
    if report_root is not None and not os.path.isdir(report_root):
        raise LayoutError(
            f"{DATASET}: report folder {report_root!r} does not exist.\n{HINT} "
            "Pass reports_dir=<folder> if the reports are elsewhere, or with_reports=False."
        )

    split_rows = read_csv(split_path)
    require_columns(split_rows, ("dicom_id", "study_id", "subject_id", "split"), split_path)
    meta_rows = read_csv(meta_path)
    require_columns(meta_rows, ("dicom_id", "ViewPosition"), meta_path)
    metadata = {r["dicom_id"]: r for r in meta_rows}
    chexpert_rows = read_csv(chexpert_path)
    require_columns(chexpert_rows, ("subject_id", "study_id", *CHEXPERT_LABELS), chexpert_path)
    chexpert_name = os.path.basename(chexpert_path)
    chexpert = {
        r["study_id"]: chexpert_vector(r, f"{chexpert_name}:{line}")
        for line, r in enumerate(chexpert_rows, start=2)
    }

    # Layout check first, so a partial download fails once with everything missing.
    entries, missing_jpgs = [], []
    for line, r in enumerate(split_rows, start=2):
        rel = jpg_relpath(r["subject_id"], r["study_id"], r["dicom_id"])
        if os.path.isfile(os.path.join(root, rel)):
            entries.append((line, r, rel))
        else:
            missing_jpgs.append(rel)
    missing_reports = []
    if report_root is not None:
        studies = {(r["subject_id"], r["study_id"]) for _, r, _ in entries}
        for subject, study in sorted(studies):
            path = os.path.join(report_root, f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
            if not os.path.isfile(path):
                missing_reports.append(os.path.relpath(path, root))
    if not allow_partial and (missing_jpgs or missing_reports):
        raise layout_error(root, missing_jpgs + missing_reports, DATASET, HINT, "JPG(s)/report(s)")
    if not entries:
        raise layout_error(root, missing_jpgs, DATASET, HINT, "JPG(s) (none is present)")
    if missing_jpgs or missing_reports:
        log.warning(
            "%s: partial download: kept %d of %d JPGs; %d studies have no report",
            DATASET,
            len(entries),
            len(split_rows),
            len(missing_reports),
        )

    split_name = os.path.basename(split_path)
    reports: dict[str, tuple[str, str, str] | None] = {}
    rows = []
    for line, r, rel in entries:
        split = _SPLITS.get(r["split"].strip().lower())
        if split is None:
            raise ValueError(
                f"{split_name}:{line}: split {r['split']!r} is not one of {sorted(_SPLITS)}"
            )
        subject, study = r["subject_id"], r["study_id"]
        if report_root is not None and study not in reports:
            path = os.path.join(report_root, f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
            reports[study] = parse_report(_read(path)) if os.path.isfile(path) else None
        parsed = reports.get(study)
        meta = metadata.get(r["dicom_id"], {})
        view = meta.get("ViewPosition", "").strip()
        labels = {"view_group": view_group(view, meta.get("ViewCodeSequence_CodeMeaning", ""))}
        if study in chexpert:
            labels["chexpert"] = list(chexpert[study])
        if parsed is not None:
            labels["findings"], labels["impression"] = parsed[1], parsed[2]
        rows.append(
            ManifestRow(
                path=os.path.join(root, rel),
                patient_id=subject,
                labels=labels,
                report=parsed[0] if parsed is not None else None,
                split=split,
                options={"view": view} if view else {},
                source=f"{split_name}:{line}",
            )
        )
    return rows
