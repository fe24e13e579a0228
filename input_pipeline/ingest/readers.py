"""Image files -> `Frame`s: 2-D (or 3-D) float pixels in modality units, spacing and a
de-identified whitelist of technical attributes.

Formats, recognised by content first (magic bytes), then by name:
  DICOM   pydicom with its pixel-data plugins (native, deflated, RLE, JPEG baseline /
          extended / lossless, JPEG-LS, JPEG 2000 through pylibjpeg). One Frame per
          frame of a multi-frame object, index {"frame": i}. Files without the
          128-byte preamble are read with force=True and then must carry Pixel Data
          and the image attributes, or they are "unknown file type".
  NIfTI   .nii / .nii.gz with nibabel, 3-D or 4-D, reoriented to canonical RAS+.
  raster  PNG, JPEG, BMP, TIFF with OpenCV (8 or 16 bits), colour -> one gray channel,
          alpha dropped, pixels as stored (a JPEG's EXIF orientation is not applied).
  .npz    one image of an array in a NumPy .npz archive, named by the options
          "npz_key" (the array) and "npz_index" (the item along its first axis), e.g.
          MedMNIST's train_images[5]; 8/16-bit unsigned (H, W), (H, W, 1), RGB
          (H, W, 3) or RGBA (H, W, 4), colour -> one gray channel as for rasters.
          Read without loading the array (see `npz_item`).

Pixels are in modality units: for DICOM after the Modality LUT or Rescale
Slope/Intercept (Hounsfield units for CT), raw stored values otherwise.
Windowing to [0, 1] and MONOCHROME1 inversion happen later, in
`preprocess.to_unit_interval`, which reads the VOI that a Frame carries.

Colour (RGB, YBR_*, PALETTE COLOR) becomes one gray channel: palette indices go
through the palette LUT (pydicom's `apply_color_lut`), YBR is converted to RGB by
the decoder (pydicom's `convert_color_space`), then ITU-R BT.601 luma
Y = 0.299 R + 0.587 G + 0.114 B. The source's photometric interpretation stays in
attrs["photometric"].

NIfTI orientation rule. The volume is reoriented with `nib.as_closest_canonical`,
so voxel axes 0, 1, 2 run towards patient Right, Anterior, Superior. Slice k of
`slice_axis` s is the plane of the two other axes (a, b), a < b, displayed as
`plane[::-1, ::-1].T`: image rows run along axis b from its high end (row 0 =
most anterior for axial, most superior for coronal and sagittal), image columns
along axis a from its high end (column 0 = patient right for axial and coronal,
most anterior for sagittal). An axial slice thus shows anterior at the top and
patient-left on the image right (radiological convention). Spacing is
(zoom[b], zoom[a]); slices come in ascending k. Masks read with the same
options are sliced identically.

Every problem with a file raises `RejectedInput(reason)`; a bad *option* (a
manifest mistake, not a bad file) raises ValueError.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import struct
import threading
import warnings
import zipfile
import zlib

import numpy as np

from input_pipeline.ingest import deid

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIFTI_MODES = ("slices", "volume")
# Percentiles that NIfTI volumes without a known display range are stretched to.
NIFTI_PERCENTILES = (0.5, 99.5)
# BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# DICOM objects that carry Pixel Data but are not acquired images.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation, not an image; convert it to a "
    "NIfTI or PNG label image to use it as a mask",
    "1.2.840.10008.5.1.4.1.1.481.2": "a radiotherapy dose grid, not an acquired image",
}
NON_IMAGE_MODALITIES = {
    "SEG": NON_IMAGE_SOP_CLASSES["1.2.840.10008.5.1.4.1.1.66.4"],
    "RTDOSE": NON_IMAGE_SOP_CLASSES["1.2.840.10008.5.1.4.1.1.481.2"],
}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED_IMAGE_ATTRIBUTES = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_RASTER_MAGICS = (_PNG_MAGIC, b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class RejectedInput(Exception):
    """A file that must be skipped; str(e) is the reason shown in rejected.jsonl."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class VoiLut:
    """A DICOM VOI LUT: (entries, first mapped value, bits per entry) and the entries."""

    descriptor: tuple[int, int, int]
    values: np.ndarray  # uint16, one per entry


@dataclasses.dataclass
class Frame:
    """One image (or one volume, NIfTI "volume" mode) read from a file.

    pixels   float32 (H, W) or (D, H, W) in modality units; row 0 = top as displayed.
    spacing  (row_mm, col_mm) of the source pixels, None if unknown.
    attrs    whitelisted technical attributes only (see deid.technical_attributes).
    index    where in the file: {}, {"frame": i}, {"slice": k}, {"slice": k, "time": t},
             {"time": t} for one 4-D time point in "volume" mode, or {"npz_index": i}
             for item i of an .npz array.
    window   (center, width) of the file's first VOI window, in modality units.
    The remaining fields are for `preprocess.to_unit_interval`:
    voi_function    the file's VOI LUT Function for `window` (LINEAR, LINEAR_EXACT, SIGMOID).
    voi_lut         the file's first VOI LUT, preferred over `window` (as pydicom does).
    default_range   (low, high) modality values that "auto" maps to 0 and 1 when the file
                    has no VOI: full scale of 8/16-bit rasters and colour DICOM,
                    the whole volume's 0.5/99.5 percentiles for NIfTI.
    slice_spacing   mm between slices along the slice axis (NIfTI), else None.
    presentation_inverse  a MONOCHROME2 image whose Presentation LUT Shape is INVERSE
                    (displayed inverted, like MONOCHROME1).
    """

    pixels: np.ndarray
    spacing: tuple[float, float] | None
    attrs: dict
    index: dict
    window: tuple[float, float] | None = None
    voi_function: str = "LINEAR"
    voi_lut: VoiLut | None = dataclasses.field(default=None, repr=False)
    default_range: tuple[float, float] | None = None
    slice_spacing: float | None = None
    presentation_inverse: bool = False  # MONOCHROME2 with Presentation LUT Shape INVERSE


def read_frames(path: str, options: dict | None = None) -> list[Frame]:
    """All frames of one image file (DICOM, NIfTI, PNG/JPEG/BMP/TIFF).

    options (all optional; unknown keys are ignored):
      "frames"      list[int]: DICOM frames / NIfTI 4-D time points to read (default all;
                    ignored for a 3-D NIfTI, which has one time point).
      "nifti_mode"  "slices" (default, one Frame per slice) | "volume" (one (D, H, W) Frame
                    per time point).
      "slice_axis"  0 | 1 | 2 in canonical RAS (default 2 = axial); see the module docstring.
      "view", "laterality"  strings written into attrs, overriding the file's.
      "npz_key", "npz_index"  str, int >= 0: `path` is a NumPy .npz archive and the
                    image is item npz_index of its array npz_key (one Frame, index
                    {"npz_index": i}).
    Raises RejectedInput (never another exception type) for a file that must be skipped.
    """
    options = dict(options or {})
    _check_options(options)
    if "npz_key" in options:
        frames = _read_npz(path, options)
    elif path.lower().endswith(".npz") and os.path.isfile(path):
        raise RejectedInput(
            "a NumPy .npz archive holds arrays, not one image: name the array and the "
            "item with the options npz_key and npz_index"
        )
    else:
        frames = _read_file(path, options)
    overrides = {
        key: deid.sanitize_string(options[key])
        for key in ("view", "laterality")
        if options.get(key) is not None
    }
    for frame in frames:
        frame.attrs.update({k: v for k, v in overrides.items() if v is not None})
    return frames


def _read_file(path: str, options: dict) -> list[Frame]:
    kind = _detect_kind(path)
    if kind == "raster":
        frames = _read_raster(path, options)
    elif kind == "nifti":
        frames = _read_nifti(path, options)
    else:
        frames = _read_dicom(path, options, forced=(kind == "dicom?"))
    return frames


# ----------------------------------------------------------------------------- dispatch


def _check_options(options: dict) -> None:
    frames = options.get("frames")
    if frames is not None and not _is_frame_list(frames):
        raise ValueError(f"option 'frames' must be a list of frame numbers >= 0, got {frames!r}")
    mode = options.get("nifti_mode", "slices")
    if mode not in NIFTI_MODES:
        raise ValueError(f"option 'nifti_mode' must be one of {NIFTI_MODES}, got {mode!r}")
    if options.get("slice_axis", 2) not in (0, 1, 2):
        raise ValueError(
            f"option 'slice_axis' must be 0, 1 or 2 (canonical RAS axis), got "
            f"{options['slice_axis']!r}"
        )
    if "npz_key" in options or "npz_index" in options:
        key, index = options.get("npz_key"), options.get("npz_index")
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"option 'npz_key' must name an array of the .npz archive (e.g. "
                f'"train_images"), got {key!r}'
            )
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
            raise ValueError(
                f"option 'npz_index' must be an item number >= 0 along the array's first "
                f"axis, got {index!r}"
            )


def _is_frame_list(frames) -> bool:
    if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
        return False
    return all(
        isinstance(f, (int, np.integer)) and not isinstance(f, bool) and f >= 0 for f in frames
    )


def _detect_kind(path: str) -> str:
    if not os.path.exists(path):
        raise RejectedInput(f"file not found: {path}")
    if os.path.isdir(path):
        raise RejectedInput(f"is a directory, not an image file: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise RejectedInput("empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(348)
    # DICM first: a DICOM preamble may itself hold a TIFF header (dual-format files).
    if head[128:132] == b"DICM":
        return "dicom"
    if any(head.startswith(magic) for magic in _RASTER_MAGICS):
        return "raster"
    if path.lower().endswith(NIFTI_SUFFIXES) or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    return "dicom?"  # no preamble: try DICOM with force=True, strict checks after


# ----------------------------------------------------------------------------- DICOM


def _read_dicom(path: str, options: dict, forced: bool) -> list[Frame]:
    ds = _dcmread(path, forced)
    sop_uid = _sop_class_uid(ds)
    _reject_non_image(ds, sop_uid)
    _ensure_transfer_syntax(ds)
    n_frames = _number_of_frames(ds)
    selected = _select(options.get("frames"), n_frames, "frame")
    attrs = deid.technical_attributes(ds)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    rows, columns = int(ds.Rows), int(ds.Columns)
    voi_lut = _voi_lut(ds) if photometric.startswith("MONOCHROME") else None
    inverse = (
        photometric == "MONOCHROME2"
        and str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    )

    frames = []
    for i, arr in zip(selected, _decode(ds, selected)):
        if arr.shape[:2] != (rows, columns):
            raise RejectedInput(
                f"decoded frame {i} has shape {arr.shape[:2]}, but Rows x "
                f"Columns say {(rows, columns)}"
            )
        pixels, default_range = _dicom_gray(arr, ds, i, photometric)
        window, voi_function = (
            _window(ds, i) if photometric.startswith("MONOCHROME") else (None, "LINEAR")
        )
        frames.append(
            Frame(
                pixels=pixels,
                spacing=_dicom_spacing(ds, i),
                attrs=dict(attrs),
                index={"frame": i} if n_frames > 1 else {},
                window=window,
                voi_function=voi_function,
                voi_lut=voi_lut,
                default_range=default_range,
                presentation_inverse=inverse,
            )
        )
    return frames


def _dcmread(path: str, forced: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:  # no preamble / File Meta: parse the dataset anyway
                ds = pydicom.dcmread(path, force=True)
                forced = True
        except Exception as e:  # pydicom raises many types for broken files
            if forced:
                raise RejectedInput(_UNKNOWN_TYPE) from e
            raise RejectedInput(f"truncated or corrupt DICOM file: {_short(e)}") from e
    eof = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if eof and not any(k in ds for k in _PIXEL_KEYWORDS):
        detail = eof[0].split(" found in file")[0]  # the path is known to the caller
        raise RejectedInput(f"truncated DICOM file: {_short(detail)}")
    # A forced parse accepts almost any bytes: only a recognised SOP class or Pixel
    # Data with image attributes makes it a DICOM file.
    sop_uid = str(ds.get("SOPClassUID", "") or "")
    if forced and not (
        sop_uid.startswith("1.2.840.10008.")
        or (any(k in ds for k in _PIXEL_KEYWORDS) and "Rows" in ds)
    ):
        raise RejectedInput(_UNKNOWN_TYPE)
    return ds


_UNKNOWN_TYPE = (
    "unknown file type: not DICOM, NIfTI (.nii/.nii.gz), PNG, JPEG, BMP or TIFF "
    "(or a DICOM file without Pixel Data and image attributes)"
)


def _short(error) -> str:
    """An error message on one line, at most 300 characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _sop_class_uid(ds) -> str | None:
    uid = ds.get("SOPClassUID")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = ds.file_meta.get("MediaStorageSOPClassUID")
    return str(uid) if uid else None


def _sop_name(uid: str | None) -> str:
    if not uid:
        return "no SOP Class UID"
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else f"SOP class {uid}"


def _reject_non_image(ds, sop_uid: str | None) -> None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    reason = NON_IMAGE_SOP_CLASSES.get(sop_uid or "") or NON_IMAGE_MODALITIES.get(modality)
    if reason:
        raise RejectedInput(f"non-image DICOM: {_sop_name(sop_uid)} is {reason}")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        name = _sop_name(sop_uid)
        if sop_uid and "Image Storage" not in name:
            raise RejectedInput(f"non-image DICOM: {name} has no Pixel Data")
        raise RejectedInput(
            f"missing Pixel Data in a DICOM file with {name} (truncated or incomplete file?)"
        )
    missing = [k for k in _REQUIRED_IMAGE_ATTRIBUTES if k not in ds or ds[k].value in (None, "")]
    if "PixelData" in ds and (
        "PixelRepresentation" not in ds or ds["PixelRepresentation"].value is None
    ):
        missing.append("PixelRepresentation")
    if missing:
        raise RejectedInput(
            f"DICOM Pixel Data without the image attributes {missing} ({_sop_name(sop_uid)})"
        )


def _ensure_transfer_syntax(ds) -> None:
    """Files without File Meta (no preamble) get the syntax their dataset was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ts = ds.file_meta.get("TransferSyntaxUID")
    if not ts:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is None or little is None:
            raise RejectedInput(
                "DICOM file without a Transfer Syntax UID whose encoding could not be determined"
            )
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise RejectedInput(
            f"unsupported transfer syntax {_ts_name(ts)}: no pixel data decoder exists for it"
        ) from e
    if not decoder.is_available:
        raise RejectedInput(
            f"unsupported transfer syntax {_ts_name(ts)}: no installed "
            "decoding plugin (install the matching pylibjpeg plugin)"
        )


def _ts_name(ts) -> str:
    from pydicom.uid import UID

    name = UID(str(ts)).name
    return f"{name} ({ts})" if name != str(ts) else str(ts)


def _number_of_frames(ds) -> int:
    try:
        value = ds.get("NumberOfFrames")
        n = int(value) if value not in (None, "") else 1
    except Exception as e:
        raw = ds["NumberOfFrames"].value if "NumberOfFrames" in ds else None
        raise RejectedInput(f"invalid Number of Frames {raw!r}") from e
    return max(n, 1)


def _select(requested, available: int, what: str) -> list[int]:
    if requested is None:
        return list(range(available))
    bad = [int(i) for i in requested if int(i) >= available]
    if bad:
        raise RejectedInput(
            f"{what} {bad} requested but the file has {available} {what}s (numbered from 0)"
        )
    return [int(i) for i in requested]


def _decode(ds, indices: list[int]):
    """Decoded frames in order; decoder errors become RejectedInput naming the syntax."""
    from pydicom.pixels import iter_pixels

    ts = ds.file_meta.TransferSyntaxUID
    iterator = iter_pixels(ds, indices=indices)
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # decoder chatter; failures raise
                arr = next(iterator)
        except StopIteration:
            return
        except Exception as e:  # each plugin raises its own types
            if "less than expected" in str(e) or "too short" in str(e).lower():
                raise RejectedInput(
                    "pixel data shorter than Rows x Columns x frames require (truncated "
                    f"file?): {_short(e)}"
                ) from e
            raise RejectedInput(
                f"could not decode the pixel data ({_ts_name(ts)}): {_short(e)}"
            ) from e
        yield arr


def _functional_group(ds, frame: int, sequence: str):
    """The item of an enhanced multi-frame functional group for one frame, or None."""
    for groups, position in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        try:
            item = ds[groups].value[position]
            if sequence in item and len(item[sequence].value):
                return item[sequence].value[0]
        except (KeyError, IndexError, AttributeError, TypeError):
            continue
    return None


def _frame_value(ds, frame: int, sequence: str, keyword: str):
    group = _functional_group(ds, frame, sequence)
    if group is not None and keyword in group:
        return group[keyword].value
    return ds[keyword].value if keyword in ds else None


def _first_float(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if not len(value):
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _dicom_gray(arr: np.ndarray, ds, frame: int, photometric: str):
    """(float32 gray pixels in modality units, default display range or None)."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_rescale

    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as e:
            raise RejectedInput(f"invalid palette colour lookup table: {_short(e)}") from e
        # Some writers put 8-bit values in 16-bit LUT entries: judge by the values.
        high = 255.0 if rgb.max() <= 255 else float(np.iinfo(rgb.dtype).max)
        return _luma(rgb), (0.0, high)
    if arr.ndim == 3:  # RGB, or YBR_* that the decoder already converted to RGB
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
        return _luma(arr), (0.0, float(2**bits - 1))

    stored_dtype = arr.dtype
    slope = _first_float(
        _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    )
    intercept = _first_float(
        _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    )
    identity = True
    if slope is not None or intercept is not None:
        rescale = Dataset()
        rescale.RescaleSlope = 1.0 if slope is None else slope
        rescale.RescaleIntercept = 0.0 if intercept is None else intercept
        identity = rescale.RescaleSlope == 1.0 and rescale.RescaleIntercept == 0.0
        arr = apply_rescale(arr, rescale)
    elif ds.get("ModalityLUTSequence"):
        try:
            arr = apply_modality_lut(arr, ds)
        except Exception as e:
            raise RejectedInput(f"invalid Modality LUT Sequence: {_short(e)}") from e
        identity = False
    default_range = None
    if identity and stored_dtype == np.uint8:  # 8-bit grayscale is shown as stored
        default_range = (0.0, 255.0)
    return arr.astype(np.float32), default_range


def _luma(rgb: np.ndarray) -> np.ndarray:
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
    return (rgb[..., :3].astype(np.float64) @ weights).astype(np.float32)


def _window(ds, frame: int) -> tuple[tuple[float, float] | None, str]:
    center = _first_float(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_float(_frame_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    function = _frame_value(ds, frame, "FrameVOILUTSequence", "VOILUTFunction")
    function = str(function or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        function = "LINEAR"
    if center is None or width is None or width <= 0:
        return None, function
    if function == "LINEAR" and width < 1:  # LINEAR needs width >= 1 (PS3.3 C.11.2.1.2)
        function = "LINEAR_EXACT"
    return (center, width), function


def _voi_lut(ds) -> VoiLut | None:
    """The first VOI LUT, its entries read by pydicom (which knows the byte order)."""
    from pydicom.pixels import apply_voi

    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    try:
        item = sequence[0]
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        n = n or 2**16
        values = apply_voi(np.arange(first, first + n, dtype=np.int64), ds)
    except Exception:  # noqa: BLE001 -- an unusable VOI LUT falls back to the window
        return None
    return VoiLut(descriptor=(n, first, bits), values=np.asarray(values, dtype=np.uint16))


def _dicom_spacing(ds, frame: int) -> tuple[float, float] | None:
    for value in (
        _frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing"),
        ds.get("ImagerPixelSpacing"),
    ):
        spacing = _positive_pair(value)
        if spacing:
            return spacing
    return None


def _positive_pair(value) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
        return (row, col)
    return None


# ----------------------------------------------------------------------------- NIfTI


def _read_nifti(path: str, options: dict) -> list[Frame]:
    import nibabel as nib

    try:
        image = nib.load(path)
        if len(image.shape) == 2:  # a single 2-D slice: give it a slice axis
            image = nib.Nifti1Image(np.asanyarray(image.dataobj)[..., None], image.affine)
        while len(image.shape) > 4 and image.shape[-1] == 1:
            image = image.slicer[..., 0]
        if len(image.shape) > 4:
            raise RejectedInput(
                f"NIfTI with {len(image.shape)} dimensions {image.shape}; "
                "only 3-D volumes and 4-D time series are supported"
            )
        canonical = nib.as_closest_canonical(image)
        data = np.asanyarray(canonical.dataobj)
        zooms = [float(z) for z in canonical.header.get_zooms()[:3]]
    except RejectedInput:
        raise
    except Exception as e:  # nibabel raises many types for truncated / corrupt files
        raise RejectedInput(f"unreadable NIfTI file (truncated or corrupt?): {_short(e)}") from e

    if data.dtype.fields is not None or np.iscomplexobj(data):
        raise RejectedInput(
            f"unsupported NIfTI data type {data.dtype} (RGB or complex voxels); convert it "
            "to one real-valued channel"
        )
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        times = _select(options.get("frames"), data.shape[3], "time point")
        volumes = [(t, data[..., t]) for t in times]
    else:  # "frames" selects time points; a 3-D volume has exactly one
        volumes = [(None, data)]
    axis = int(options.get("slice_axis", 2))
    in_plane = [a for a in range(3) if a != axis]
    spacing = _positive_pair((zooms[in_plane[1]], zooms[in_plane[0]]))
    slice_spacing = zooms[axis] if zooms[axis] > 0 else None
    oriented = [(t, _orient_volume(np.asarray(v, dtype=np.float32), axis)) for t, v in volumes]
    default_range = _percentile_range([v for _, v in oriented])

    frames = []
    for t, volume in oriented:
        time_index = {} if t is None else {"time": t}
        if options.get("nifti_mode", "slices") == "volume":
            frames.append(
                Frame(
                    pixels=volume,
                    spacing=spacing,
                    attrs={},
                    index=time_index,
                    default_range=default_range,
                    slice_spacing=slice_spacing,
                )
            )
            continue
        for k in range(volume.shape[0]):
            frames.append(
                Frame(
                    pixels=volume[k],
                    spacing=spacing,
                    attrs={},
                    index={"slice": k, **time_index},
                    default_range=default_range,
                    slice_spacing=slice_spacing,
                )
            )
    return frames


def _orient_volume(volume: np.ndarray, slice_axis: int) -> np.ndarray:
    """Canonical-RAS volume -> (slices, rows, cols), each slice displayed per the module rule."""
    stacked = np.moveaxis(volume, slice_axis, 0)  # (k, a, b) with a < b
    return np.ascontiguousarray(stacked[:, ::-1, ::-1].transpose(0, 2, 1))


def _percentile_range(volumes: list[np.ndarray]) -> tuple[float, float] | None:
    values = np.concatenate([v.ravel() for v in volumes])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = (float(p) for p in np.percentile(values, NIFTI_PERCENTILES))
    return (low, high) if high > low else None


# ----------------------------------------------------------------------------- rasters


def _read_raster(path: str, options: dict) -> list[Frame]:
    import cv2

    if options.get("frames") not in (None, [0]):
        raise RejectedInput(
            f"frames {options['frames']} requested but a raster image has one frame (0)"
        )
    _check_jpeg_complete(path)
    pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise RejectedInput(
            f"could not decode {os.path.splitext(path)[1] or 'raster'} image "
            "(truncated or corrupt?)"
        )
    attrs = {}
    if pixels.ndim == 3 and pixels.shape[2] <= 2:  # gray, or gray + alpha
        pixels = pixels[..., 0]
    if pixels.ndim == 3:  # OpenCV gives BGR(A)
        attrs["photometric"] = "RGB"
        gray = _luma(pixels[..., 2::-1])
    else:
        gray = pixels.astype(np.float32)
    bits = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(pixels.dtype)
    if bits:
        attrs["bits_stored_source"] = bits
    return [
        Frame(
            pixels=gray,
            spacing=None,
            attrs=attrs,
            index={},
            default_range=(0.0, float(2**bits - 1)) if bits else None,
        )
    ]


def _check_jpeg_complete(path: str) -> None:
    """OpenCV decodes a cut-off JPEG without error (grey rest): require the end marker."""
    with open(path, "rb") as f:
        if f.read(3) != b"\xff\xd8\xff":
            return
        f.seek(max(0, os.path.getsize(path) - 1024))
        tail = f.read()
    if b"\xff\xd9" not in tail:
        raise RejectedInput("truncated JPEG file: no end-of-image marker")


# ----------------------------------------------------------------------------- NumPy .npz

# Arrays kept open per process. Rows of one array arrive together (a split's
# images), so a few cover the current array and the next.
_NPZ_OPEN_MAX = 4
_npz_open: collections.OrderedDict = collections.OrderedDict()
_npz_lock = threading.Lock()
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


@dataclasses.dataclass(frozen=True)
class NpyHeader:
    """What an .npy header says, and where its data starts (bytes into the .npy)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int


def npz_headers(path: str) -> dict[str, NpyHeader]:
    """{array name: header} of every array in the .npz archive at `path`, without
    reading any array data. Raises RejectedInput for a file that is not a readable
    .npz archive (or holds an unreadable or pickled array)."""
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    with archive.open(info) as stream:
                        headers[info.filename[:-4]] = _npy_header(stream, info.filename)
            return headers
    except _NPZ_ERRORS as e:
        raise RejectedInput(f"unreadable .npz archive (truncated or corrupt?): {_short(e)}") from e


def npz_item(path: str, key: str, index: int) -> np.ndarray:
    """Item `index` (along the first axis) of array `key` in the .npz archive at `path`.

    The array is never loaded whole (MedMNIST+ image arrays are gigabytes): a stored
    (uncompressed) member is read at its byte offset in the file; a deflated one is
    decompressed as a stream, kept open between calls, so reading items in increasing
    order decompresses the member once per process (going back restarts the stream).
    Raises RejectedInput for a missing array, an index out of range, or a broken file.
    """
    cache_key = (os.path.abspath(path), key)
    with _npz_lock:
        items = _npz_open.pop(cache_key, None)
        try:
            if items is not None and items.identity != _file_identity(path):
                items.close()  # the file was replaced since it was opened
                items = None
            if items is None:
                items = _NpzItems(path, key)
            item = items.read(int(index))
        except RejectedInput:
            if items is not None:
                _npz_open[cache_key] = items  # a bad index leaves the stream usable
            raise
        except _NPZ_ERRORS as e:
            if items is not None:
                items.close()
            raise RejectedInput(
                f"unreadable .npz archive (truncated or corrupt?): {_short(e)}"
            ) from e
        _npz_open[cache_key] = items
        while len(_npz_open) > _NPZ_OPEN_MAX:
            _npz_open.popitem(last=False)[1].close()
        return item


def _file_identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _npy_header(stream, name: str) -> NpyHeader:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise RejectedInput(f"{name}: unsupported .npy format version {version}")
    except ValueError as e:
        raise RejectedInput(f"{name}: not a NumPy array ({_short(e)})") from e
    if dtype.hasobject:
        raise RejectedInput(f"{name}: holds Python objects (pickled); only numeric arrays are read")
    return NpyHeader(tuple(int(n) for n in shape), dtype, bool(fortran_order), stream.tell())


class _NpzItems:
    """Random access to the items of one array of an .npz archive (see `npz_item`)."""

    def __init__(self, path: str, key: str):
        self.key = key
        self.identity = _file_identity(path)
        self.archive = zipfile.ZipFile(path)
        self.stream = self.raw = None
        try:
            names = self.archive.namelist()
            member = next((m for m in (f"{key}.npy", key) if m in names), None)
            if member is None:
                arrays = sorted(n[:-4] for n in names if n.endswith(".npy"))
                raise RejectedInput(f"no array {key!r} in the .npz archive (it holds {arrays})")
            info = self.archive.getinfo(member)
            stream = self.archive.open(info)
            header = _npy_header(stream, member)
            if not header.shape:
                stream.close()
                raise RejectedInput(f"array {key!r} is a single value, not a stack of images")
            if header.fortran_order and len(header.shape) > 1:
                stream.close()
                raise RejectedInput(
                    f"array {key!r} is stored in Fortran order, so one item is not contiguous; "
                    "save it C-ordered (np.ascontiguousarray)"
                )
            self.dtype, self.count = header.dtype, header.shape[0]
            self.item_shape = header.shape[1:]
            self.item_bytes = int(np.prod(self.item_shape, dtype=np.int64)) * self.dtype.itemsize
            if info.compress_type == zipfile.ZIP_STORED:
                stream.close()
                self.raw = open(path, "rb")
                self.start = self._stored_data_start(info) + header.data_offset
            else:
                self.stream, self.start = stream, header.data_offset
        except BaseException:
            self.close()
            raise

    def _stored_data_start(self, info: zipfile.ZipInfo) -> int:
        # A stored member's bytes follow its local header (whose name and extra
        # field lengths may differ from the central directory's).
        self.raw.seek(info.header_offset)
        head = self.raw.read(_ZIP_LOCAL_HEADER.size)
        if len(head) != _ZIP_LOCAL_HEADER.size:
            raise zipfile.BadZipFile("truncated local file header")
        signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(head)
        if signature != b"PK\x03\x04":
            raise zipfile.BadZipFile("bad local file header")
        return info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length

    def read(self, index: int) -> np.ndarray:
        if not 0 <= index < self.count:
            raise RejectedInput(
                f"item {index} requested but array {self.key!r} has {self.count} items "
                "(numbered from 0)"
            )
        source = self.raw if self.raw is not None else self.stream
        source.seek(self.start + index * self.item_bytes)
        data = source.read(self.item_bytes)
        if len(data) != self.item_bytes:
            raise EOFError(f"array {self.key!r} ends before item {index} (truncated file?)")
        return np.frombuffer(data, self.dtype).reshape(self.item_shape)

    def close(self) -> None:
        for handle in (self.stream, self.raw, self.archive):
            if handle is not None:
                handle.close()


def _read_npz(path: str, options: dict) -> list[Frame]:
    if options.get("frames") not in (None, [0]):
        raise RejectedInput(
            f"frames {options['frames']} requested but an .npz item is one image (frame 0)"
        )
    if not os.path.isfile(path):
        raise RejectedInput(f"file not found: {path}")
    index = int(options["npz_index"])
    item = npz_item(path, options["npz_key"], index)
    if item.dtype.kind != "u" or item.dtype.itemsize not in (1, 2):
        raise RejectedInput(
            f"unsupported image dtype {item.dtype} in array {options['npz_key']!r}: "
            "8- or 16-bit unsigned integers are read"
        )
    if item.ndim == 3 and item.shape[2] == 1:
        item = item[..., 0]
    bits = 8 * item.dtype.itemsize
    attrs = {"bits_stored_source": bits}
    if item.ndim == 3 and item.shape[2] in (3, 4):  # RGB(A), channels last
        attrs["photometric"] = "RGB"
        gray = _luma(item)
    elif item.ndim == 2:
        gray = item.astype(np.float32)
    else:
        raise RejectedInput(
            f"item of shape {item.shape} in array {options['npz_key']!r} is not an image: "
            "expected (H, W), (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4)"
        )
    if gray.size == 0:
        raise RejectedInput(f"empty image {item.shape} in array {options['npz_key']!r}")
    return [
        Frame(
            pixels=gray,
            spacing=None,
            attrs=attrs,
            index={"npz_index": index},
            default_range=(0.0, float(2**bits - 1)),
        )
    ]
