"""De-identification: the only DICOM attributes that leave a file, and salted patient ids.

Ingestion never copies a DICOM header. `technical_attributes` reads a fixed
whitelist of technical attributes (what kind of image it is and how it was
stored) and returns them under short JSON keys; every other element -- names,
ids, dates, UIDs, institution, descriptions, free text, private tags -- stays
behind. Patient ids, which the manifest needs for patient-level splits, are
replaced by a keyed hash (`hash_patient_id`) whose salt stays with the person
who runs the conversion.

The Burned In Annotation flag is kept so that images whose pixels may carry
text (names, dates) can be filtered or reviewed; pixels themselves are not
scrubbed here.
"""

from __future__ import annotations

import hashlib
import hmac
import re

# DICOM keywords read by `technical_attributes` (and the pixel spacing read
# by the DICOM reader for `Frame.spacing`); nothing else leaves a header.
WHITELIST = (
    "Modality",
    "ViewPosition",
    "ViewCodeSequence",  # only its first item's CodeMeaning
    "ImageLaterality",
    "Laterality",
    "FrameLaterality",  # enhanced multi-frame: in the shared Frame Anatomy group
    "PixelSpacing",
    "ImagerPixelSpacing",
    "PhotometricInterpretation",
    "BitsStored",
    "ManufacturerModelName",
    "BurnedInAnnotation",
)

MAX_STRING_LENGTH = 64
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# What pydicom raises for a malformed or oddly typed value: dropped, never fatal.
_BAD_VALUE = (AttributeError, IndexError, KeyError, TypeError, ValueError)


def sanitize_string(value) -> str | None:
    """A header value as a short printable string (stripped, <= 64 chars), None if empty."""
    if value is None:
        return None
    text = _CONTROL_CHARS.sub("", str(value)).strip()[:MAX_STRING_LENGTH].strip()
    return text or None


def _first(value):
    # Multi-valued elements (VM > 1): the first value is the one that applies.
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _string(ds, keyword: str) -> str | None:
    try:
        return sanitize_string(_first(ds.get(keyword)))
    except _BAD_VALUE:
        return None


def _view(ds) -> str | None:
    view = _string(ds, "ViewPosition")
    if view:
        return view
    try:
        codes = ds.get("ViewCodeSequence")
        return sanitize_string(codes[0].get("CodeMeaning")) if codes else None
    except _BAD_VALUE:
        return None


def _laterality(ds) -> str | None:
    laterality = (
        _string(ds, "ImageLaterality")
        or _string(ds, "Laterality")
        or _string(ds, "FrameLaterality")
    )
    if laterality:
        return laterality
    try:  # enhanced multi-frame objects keep it in the shared functional groups
        anatomy = ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
        return _string(anatomy, "FrameLaterality")
    except _BAD_VALUE:
        return None


def _bits_stored(ds) -> int | None:
    try:
        bits = int(_first(ds.get("BitsStored")))
    except _BAD_VALUE:
        return None
    return bits if 0 < bits <= 64 else None


def technical_attributes(ds) -> dict:
    """The whitelisted technical attributes of a pydicom Dataset, under short JSON keys.

    Keys (absent when the file lacks the element or its value is malformed):
      "modality"              Modality, e.g. "CT", "MG"
      "view"                  ViewPosition, else ViewCodeSequence[0].CodeMeaning
      "laterality"            ImageLaterality, else Laterality (else FrameLaterality)
      "photometric"           PhotometricInterpretation of the source pixels
      "bits_stored_source"    BitsStored (int)
      "manufacturer_model"    ManufacturerModelName
      "burned_in_annotation"  "YES" / "NO" from BurnedInAnnotation
    Strings are stripped of control characters and cut to 64 characters.
    """
    attrs = {
        "modality": _string(ds, "Modality"),
        "view": _view(ds),
        "laterality": _laterality(ds),
        "photometric": _string(ds, "PhotometricInterpretation"),
        "bits_stored_source": _bits_stored(ds),
        "manufacturer_model": _string(ds, "ManufacturerModelName"),
    }
    burned_in = (_string(ds, "BurnedInAnnotation") or "").upper()
    if burned_in in ("YES", "NO"):
        attrs["burned_in_annotation"] = burned_in
    return {key: value for key, value in attrs.items() if value is not None}


def hash_patient_id(patient_id: str, salt: str) -> str:
    """A stable pseudonym "p_" + 16 hex chars of HMAC-SHA256(key=salt, message=id).

    The same id and salt always give the same pseudonym (so patient-level
    splits survive re-runs); without the salt it cannot be reversed by
    hashing candidate ids. Surrounding whitespace of the id is ignored (DICOM
    pads values with spaces).
    """
    if not salt:
        raise ValueError(
            "hash_patient_id needs a non-empty salt: pass a secret string and keep it "
            "private (without one, hashed ids could be re-identified by hashing guesses)"
        )
    digest = hmac.new(
        salt.encode("utf-8"), str(patient_id).strip().encode("utf-8"), hashlib.sha256
    ).hexdigest()
    return "p_" + digest[:16]
