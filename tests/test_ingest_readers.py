"""Readers, de-identification and preprocessing of ingestion: real DICOM test files
(pydicom's and pydicom-data's), synthetic DICOM / NIfTI / PNG / JPEG / BMP written
here, windowing, MONOCHROME1, orientation, rejections and the resize Geometry."""

import glob
import json
import os
import pickle
import warnings

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_voi_lut
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from input_pipeline.ingest import deid
from input_pipeline.ingest.preprocess import Geometry, resize_and_pad, to_unit_interval
from input_pipeline.ingest.readers import RejectedInput, read_frames

U16 = 1 / 65535


# ----------------------------------------------------------------------------- helpers


def _all_test_dicoms() -> list[str]:
    """pydicom's own test files and pydicom-data's, found on disk (pydicom's
    get_testdata_files would first try, and time out, to download more)."""
    import data_store

    found = glob.glob(
        os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "**", "*.dcm"),
        recursive=True,
    )
    found += glob.glob(os.path.join(os.path.dirname(data_store.__file__), "data", "*.dcm"))
    unique = {os.path.realpath(p): p for p in found}
    return sorted(unique, key=os.path.basename)


ALL_DICOMS = _all_test_dicoms()


def _testfile(name: str) -> str:
    for path in ALL_DICOMS:
        if os.path.basename(path) == name:
            return path
    raise FileNotFoundError(name)


def _pydicom_decodes(path: str):
    """The dataset if pydicom alone (with force=True as a fallback) decodes its pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                ds = pydicom.dcmread(path)
            except pydicom.errors.InvalidDicomError:
                ds = pydicom.dcmread(path, force=True)
            ds.pixel_array  # noqa: B018 -- decoding is the check
            return ds
        except Exception:  # noqa: BLE001 -- any failure means "pydicom cannot"
            return None


def write_dicom(
    path, pixels, photometric="MONOCHROME2", sop_class=CTImageStorage, preamble=True, **elements
):
    """A minimal single-frame DICOM image with `pixels` (uint8/uint16/int16)."""
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if preamble:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:  # bare dataset: no preamble, no File Meta, implicit VR little endian
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return str(path)


def _reason(path, options=None) -> str:
    with pytest.raises(RejectedInput) as info:
        frames = read_frames(str(path), options)
        for frame in frames:
            to_unit_interval(frame)
    assert str(info.value).strip()
    return str(info.value)


# ----------------------------------------------------------------------------- real files

# Files that must be rejected, with a phrase the reason must contain.
EXPECTED_REJECTIONS = {
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "MR_truncated.dcm": "pixel data shorter",
    "JPEG-lossy.dcm": "JPEG Extended",
    "JPEG2000-embedded-sequence-delimiter.dcm": "could not decode",
    "liver.dcm": "Segmentation Storage",
    "liver_1frame.dcm": "Segmentation Storage",
    "liver_expb.dcm": "Segmentation Storage",
    "rtdose.dcm": "RT Dose Storage",
    "badVR.dcm": "RT Dose Storage",
    "reportsi.dcm": "Basic Text SR Storage",
    "test-SR.dcm": "Comprehensive SR Storage",
    "rtstruct.dcm": "RT Structure Set Storage",
    "rtplan.dcm": "RT Plan Storage",
    "waveform_ecg.dcm": "Waveform Storage",
    "no_meta.dcm": "unknown file type",
    "meta_missing_tsyntax.dcm": "image attributes",
}
# Decodable by pydicom, rejected on purpose: label maps and dose grids are not images.
NON_IMAGES = ("Segmentation Storage", "RT Dose Storage")


def test_every_test_dicom_is_read_or_rejected_with_a_reason():
    assert len(ALL_DICOMS) > 100
    accepted = set()
    for path in ALL_DICOMS:
        name = os.path.basename(path)
        decoded_by_pydicom = _pydicom_decodes(path)
        try:
            frames = read_frames(path)
        except RejectedInput as e:
            assert str(e).strip(), name
            if name in EXPECTED_REJECTIONS:
                assert EXPECTED_REJECTIONS[name] in str(e), (name, str(e))
            if decoded_by_pydicom is not None:  # only non-images may then be refused
                assert any(kind in str(e) for kind in NON_IMAGES), (name, str(e))
                assert any(kind in decoded_by_pydicom.SOPClassUID.name for kind in NON_IMAGES)
            continue
        accepted.add(name)
        assert name not in EXPECTED_REJECTIONS, name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        assert len(frames) == n_frames, name
        for frame in frames:
            assert frame.pixels.shape == (ds.Rows, ds.Columns), name
            assert frame.pixels.dtype == np.float32
            image = to_unit_interval(frame)
            assert image.shape == frame.pixels.shape and image.dtype == np.float32
            assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1, name
            assert image.max() > image.min(), name
    # A palette image without preamble or File Meta pydicom cannot decode is read.
    assert "OT-PAL-8-face.dcm" in accepted


@pytest.mark.parametrize(
    "uncompressed, compressed",
    [
        ("RG1_UNCR.dcm", "RG1_J2KR.dcm"),
        ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),
        ("MR2_UNCR.dcm", "MR2_J2KR.dcm"),
        ("693_UNCR.dcm", "693_J2KR.dcm"),
        ("US1_UNCR.dcm", "US1_J2KR.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
        ("emri_small.dcm", "emri_small_RLE.dcm"),
        ("emri_small.dcm", "emri_small_big_endian.dcm"),
    ],
)
def test_lossless_compression_gives_identical_frames(uncompressed, compressed):
    a = read_frames(_testfile(uncompressed))
    b = read_frames(_testfile(compressed))
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        np.testing.assert_array_equal(fa.pixels, fb.pixels)
        assert fa.index == fb.index and fa.window == fb.window


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm"])
def test_monochrome1_is_inverted_after_the_file_window(name):
    path = _testfile(name)
    (frame,) = read_frames(path)
    assert frame.attrs["photometric"] == "MONOCHROME1"
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)  # no rescale in these files
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window, written out independently.
    windowed = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(to_unit_interval(frame), 1 - windowed, atol=1e-6)


def test_color_and_palette_become_bt601_luma_and_keep_the_source_photometric():
    ds = pydicom.dcmread(_testfile("SC_rgb.dcm"))
    (frame,) = read_frames(_testfile("SC_rgb.dcm"))
    rgb = ds.pixel_array.astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(frame.pixels, expected, atol=1e-3)
    assert frame.attrs["photometric"] == "RGB"
    np.testing.assert_allclose(to_unit_interval(frame), expected / 255, atol=1e-6)

    ds = pydicom.dcmread(_testfile("OBXXXX1A.dcm"))
    (frame,) = read_frames(_testfile("OBXXXX1A.dcm"))
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(frame.pixels, expected, rtol=1e-6, atol=1e-2)
    assert frame.attrs["photometric"] == "PALETTE COLOR"

    # The same ultrasound image stored as RGB and as lossless YBR_RCT JPEG 2000.
    (rgb_frame,) = read_frames(_testfile("US1_UNCR.dcm"))
    (ybr_frame,) = read_frames(_testfile("US1_J2KR.dcm"))
    assert ybr_frame.attrs["photometric"] == "YBR_RCT"
    np.testing.assert_array_equal(rgb_frame.pixels, ybr_frame.pixels)


def test_voi_lut_modality_lut_and_enhanced_functional_groups():
    path = _testfile("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    (frame,) = read_frames(path)
    expected = apply_voi_lut(ds.pixel_array, ds) / (2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
    np.testing.assert_allclose(to_unit_interval(frame), expected, atol=1e-6)

    path = _testfile("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    (frame,) = read_frames(path)
    from pydicom.pixels import apply_modality_lut

    np.testing.assert_array_equal(frame.pixels, apply_modality_lut(ds.pixel_array, ds))

    # Enhanced CT: Rescale Intercept -1024 and the window live in the functional groups.
    path = _testfile("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    frames = read_frames(path)
    assert [f.index for f in frames] == [{"frame": 0}, {"frame": 1}]
    np.testing.assert_array_equal(frames[1].pixels, ds.pixel_array[1].astype(np.float32) - 1024)
    assert frames[0].window == (49.0, 102.0)
    assert frames[0].spacing == pytest.approx((0.388672, 0.388672))


def test_frame_selection_of_a_multiframe_file():
    path = _testfile("emri_small.dcm")
    frames = read_frames(path, {"frames": [7, 3]})
    stack = pydicom.dcmread(path).pixel_array
    assert [f.index for f in frames] == [{"frame": 7}, {"frame": 3}]
    np.testing.assert_array_equal(frames[0].pixels, stack[7])
    np.testing.assert_array_equal(frames[1].pixels, stack[3])
    assert "frame [10]" in _reason(path, {"frames": [10]})


# ----------------------------------------------------------------------------- synthetic DICOM


def test_synthetic_orientation_and_complementary_photometrics(tmp_path):
    pixels = np.full((8, 10), 100, dtype=np.uint16)
    pixels[0, 5] = 4000
    pixels[7, :] = 50
    mono2 = write_dicom(tmp_path / "m2.dcm", pixels, Modality="DX")
    mono1 = write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1", Modality="DX")
    (f2,) = read_frames(mono2)
    (f1,) = read_frames(mono1)
    assert np.unravel_index(np.argmax(f2.pixels), f2.pixels.shape) == (0, 5)
    out2, out1 = to_unit_interval(f2, "minmax"), to_unit_interval(f1, "minmax")
    assert np.unravel_index(np.argmax(out2), out2.shape) == (0, 5)
    assert np.unravel_index(np.argmin(out1), out1.shape) == (0, 5)  # dark in MONOCHROME1
    np.testing.assert_allclose(out1 + out2, 1.0, atol=1e-6)
    np.testing.assert_allclose(to_unit_interval(f1) + to_unit_interval(f2), 1.0, atol=1e-6)
    stored, _ = resize_and_pad(out2, None)
    assert np.unravel_index(np.argmax(stored), stored.shape) == (0, 5)


def test_ct_rescale_gives_hounsfield_units_and_windows_in_hu(tmp_path):
    stored = np.array([[532, 432, 632, 0], [1000, 512, 532, 2000]], dtype=np.int16)
    path = write_dicom(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        PixelSpacing=[0.5, 0.25],
    )
    (frame,) = read_frames(path)
    hu = stored.astype(np.float64) * 2 - 1024
    np.testing.assert_array_equal(frame.pixels, hu)
    assert frame.spacing == (0.5, 0.25) and frame.attrs["modality"] == "CT"
    image = to_unit_interval(frame, (40, 400))
    assert abs(image[0, 0] - 0.5) <= U16  # HU 40
    assert image[0, 1] == 0.0 and image[0, 2] == 1.0  # HU -160, 240
    assert image[0, 3] == 0.0 and image[1, 3] == 1.0  # clipped outside the window
    stored_u16, _ = resize_and_pad(image, None)
    assert abs(int(stored_u16[0, 0]) - 32767.5) <= 1
    # "auto" without a file window: the fixed CT window -1000..1000 HU.
    auto = to_unit_interval(frame)
    np.testing.assert_allclose(auto, np.clip((hu + 1000) / 2000, 0, 1), atol=1e-6)


def test_auto_uses_the_first_file_window(tmp_path):
    stored = np.array([[532, 432, 632, 600]], dtype=np.int16)
    path = write_dicom(
        tmp_path / "ct.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=[40, 300],
        WindowWidth=[400, 1500],
    )
    (frame,) = read_frames(path)
    assert frame.window == (40.0, 400.0)
    image = to_unit_interval(frame)
    assert image[0, 0] == pytest.approx(0.5, abs=2e-3)  # LINEAR: (40 - 39.5) / 399 + 0.5
    assert image[0, 1] == 0.0 and image[0, 2] == 1.0


def test_file_without_preamble_is_read(tmp_path):
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = write_dicom(tmp_path / "bare", pixels, preamble=False)
    with open(path, "rb") as f:
        assert f.read(132)[128:] != b"DICM"
    (frame,) = read_frames(path)
    np.testing.assert_array_equal(frame.pixels, pixels)


def _reason_for_bytes(tmp_path, name: str, data: bytes) -> str:
    """The rejection reason of a file `name` holding `data`."""
    (tmp_path / name).write_bytes(data)
    return _reason(tmp_path / name)


def test_rejections(tmp_path):
    assert "empty file" in _reason_for_bytes(tmp_path, "empty.dcm", b"")

    with open(_testfile("CT_small.dcm"), "rb") as f:
        real = f.read()
    assert "pixel data shorter" in _reason_for_bytes(tmp_path, "half.dcm", real[: len(real) // 2])
    assert "truncated" in _reason_for_bytes(tmp_path, "head.dcm", real[: len(real) // 10])
    with open(_testfile("MR2_J2KR.dcm"), "rb") as f:
        j2k = f.read()
    assert "truncated" in _reason_for_bytes(tmp_path, "cut_j2k.dcm", j2k[: len(j2k) // 2])

    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert "unknown file type" in _reason_for_bytes(tmp_path, "noise.dcm", noise)
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1))
    for ext, reason in ((".jpg", "truncated JPEG"), (".png", "could not decode .png")):
        cv2.imwrite(str(tmp_path / f"ok{ext}"), ramp)
        encoded = (tmp_path / f"ok{ext}").read_bytes()
        assert reason in _reason_for_bytes(tmp_path, f"cut{ext}", encoded[: len(encoded) // 2])
    assert "unknown file type" in _reason_for_bytes(tmp_path, "notes.txt", b"not an image\n" * 50)

    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    reason = _reason(tmp_path / "sr.dcm")
    assert "non-image" in reason and "Basic Text SR Storage" in reason

    no_pixels = write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4), np.uint16), PixelData=None)
    reason = _reason(no_pixels)
    assert "missing Pixel Data" in reason and "CT Image Storage" in reason

    flat = write_dicom(tmp_path / "flat.dcm", np.full((4, 4), 7, np.uint16), Modality="MR")
    assert "constant image" in _reason(flat)

    volume = np.ones((4, 4, 3), np.float32)
    volume[1, 2, 0] = np.nan
    volume[2, 2, 1] = np.inf
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "nan.nii.gz")
    assert "non-finite values: 2 NaN/Inf pixels" in _reason(
        tmp_path / "nan.nii.gz", {"nifti_mode": "volume"}
    )
    assert "non-finite values: 1 NaN/Inf pixels" in _reason(tmp_path / "nan.nii.gz")


# ----------------------------------------------------------------------------- NIfTI


def _marker_volume():
    """(6, 5, 4) canonical RAS volume, 2x3x4 mm, marker at voxel (1, 3, 2):
    patient-left (low x), anterior (high y)."""
    data = np.zeros((6, 5, 4), np.float32)
    data += np.arange(4, dtype=np.float32)  # slice number, so frames are distinguishable
    data[1, 3, 2] = 100
    return data, np.diag([2.0, 3.0, 4.0, 1.0])


def test_nifti_axial_slices_are_radiological(tmp_path):
    data, affine = _marker_volume()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii.gz")
    frames = read_frames(str(tmp_path / "ras.nii.gz"))
    assert [f.index for f in frames] == [{"slice": k} for k in range(4)]
    frame = frames[2]
    assert frame.pixels.shape == (5, 6) and frame.spacing == (3.0, 2.0)
    row, col = np.unravel_index(np.argmax(frame.pixels), frame.pixels.shape)
    # anterior at the top, patient-left on the image right
    assert row < 5 / 2 and col > 6 / 2
    assert (row, col) == (5 - 1 - 3, 6 - 1 - 1)
    assert frames[0].pixels.max() == 0 and frames[3].pixels.min() == 3


@pytest.mark.parametrize("variant", ["lps", "permuted", "flipped_z"])
def test_nifti_non_canonical_affines_give_the_same_slices(tmp_path, variant):
    data, affine = _marker_volume()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii")
    shape = np.array(data.shape)
    if variant == "lps":  # x and y reversed on disk, affine compensates
        stored = data[::-1, ::-1, :]
        other = affine @ np.array(
            [[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float
        )
    elif variant == "permuted":  # voxel axes stored as (z, x, y)
        stored = data.transpose(2, 0, 1)
        other = affine @ np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    else:
        stored = data[:, :, ::-1]
        other = affine @ np.array(
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, shape[2] - 1], [0, 0, 0, 1]], float
        )
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), other), tmp_path / "other.nii")
    for axis in (0, 1, 2):
        a = read_frames(str(tmp_path / "ras.nii"), {"slice_axis": axis})
        b = read_frames(str(tmp_path / "other.nii"), {"slice_axis": axis})
        assert len(a) == len(b) == data.shape[axis]
        for fa, fb in zip(a, b):
            assert fa.index == fb.index and fa.spacing == fb.spacing
            np.testing.assert_array_equal(fa.pixels, fb.pixels)


def test_nifti_coronal_sagittal_volume_mode_and_masks(tmp_path):
    data, affine = _marker_volume()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "img.nii.gz")
    labels = (data == 100).astype(np.uint8) * 3
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "mask.nii.gz")
    coronal = read_frames(str(tmp_path / "img.nii.gz"), {"slice_axis": 1})[3]
    # superior at the top, patient-left on the right: marker z=2 of 4, x=1 of 6
    assert coronal.spacing == (4.0, 2.0)
    assert np.unravel_index(np.argmax(coronal.pixels), coronal.pixels.shape) == (1, 4)
    sagittal = read_frames(str(tmp_path / "img.nii.gz"), {"slice_axis": 0})[1]
    # superior at the top, anterior on the left: y=3 of 5
    assert sagittal.spacing == (4.0, 3.0)
    assert np.unravel_index(np.argmax(sagittal.pixels), sagittal.pixels.shape) == (1, 1)

    (volume,) = read_frames(str(tmp_path / "img.nii.gz"), {"nifti_mode": "volume"})
    slices = read_frames(str(tmp_path / "img.nii.gz"))
    assert volume.pixels.shape == (4, 5, 6) and volume.index == {}
    np.testing.assert_array_equal(volume.pixels, np.stack([f.pixels for f in slices]))
    assert volume.slice_spacing == 4.0

    # A mask read with the same options pairs with the image frame by frame.
    masks = read_frames(str(tmp_path / "mask.nii.gz"))
    assert [m.index for m in masks] == [f.index for f in slices]
    np.testing.assert_array_equal(masks[2].pixels == 3, slices[2].pixels == 100)


def test_nifti_4d_time_points(tmp_path):
    data = np.zeros((3, 4, 2, 5), np.float32)
    for t in range(5):
        data[..., t] = t * 10 + np.arange(3)[:, None, None]
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 8.0, 1.0])), tmp_path / "cine.nii.gz")
    frames = read_frames(str(tmp_path / "cine.nii.gz"), {"frames": [4, 0]})
    assert [f.index for f in frames] == [
        {"slice": 0, "time": 4},
        {"slice": 1, "time": 4},
        {"slice": 0, "time": 0},
        {"slice": 1, "time": 0},
    ]
    assert frames[0].pixels.shape == (4, 3) and frames[0].spacing == (1.5, 1.5)
    assert frames[0].pixels.min() >= 40 and frames[2].pixels.max() < 10
    assert len(read_frames(str(tmp_path / "cine.nii.gz"))) == 10
    volumes = read_frames(str(tmp_path / "cine.nii.gz"), {"frames": [2], "nifti_mode": "volume"})
    assert [v.index for v in volumes] == [{"time": 2}] and volumes[0].pixels.shape == (2, 4, 3)
    assert "time point [5]" in _reason(tmp_path / "cine.nii.gz", {"frames": [5]})
    # The percentile window is the whole selection's, so slices stay comparable.
    assert frames[0].default_range == frames[3].default_range


# ----------------------------------------------------------------------------- rasters


def test_png_8_and_16_bit_round_trip(tmp_path):
    img16 = np.zeros((6, 7), np.uint16)
    img16[2, 3] = 40000
    img16[0, 0] = 1
    cv2.imwrite(str(tmp_path / "a16.png"), img16)
    (frame,) = read_frames(str(tmp_path / "a16.png"))
    assert frame.attrs == {"bits_stored_source": 16}
    image = to_unit_interval(frame)
    assert image[2, 3] == pytest.approx(40000 / 65535, abs=1e-7)
    stored, geometry = resize_and_pad(image, None)
    assert stored[2, 3] == 40000 and stored[0, 0] == 1 and geometry.scale == 1.0

    img8 = np.arange(42, dtype=np.uint8).reshape(6, 7) * 6
    cv2.imwrite(str(tmp_path / "a8.png"), img8)
    (frame,) = read_frames(str(tmp_path / "a8.png"), {"view": "PA", "laterality": "L"})
    assert frame.attrs == {"bits_stored_source": 8, "view": "PA", "laterality": "L"}
    np.testing.assert_allclose(to_unit_interval(frame), img8 / 255, atol=1e-7)


def test_color_png_jpeg_and_bmp(tmp_path):
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 2] = 255  # pure red
    bgr[0, 0] = (255, 0, 0)  # one pure blue pixel
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    (frame,) = read_frames(str(tmp_path / "red.png"))
    assert frame.pixels[1, 1] == pytest.approx(0.299 * 255, abs=1e-3)
    assert frame.pixels[0, 0] == pytest.approx(0.114 * 255, abs=1e-3)

    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    cv2.imwrite(str(tmp_path / "ramp.jpg"), gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    (frame,) = read_frames(str(tmp_path / "ramp.jpg"))
    assert frame.pixels.shape == (16, 32) and frame.attrs["bits_stored_source"] == 8
    np.testing.assert_allclose(to_unit_interval(frame), gray / 255, atol=0.05)

    cv2.imwrite(str(tmp_path / "ceph.bmp"), gray)
    (frame,) = read_frames(str(tmp_path / "ceph.bmp"))
    np.testing.assert_array_equal(frame.pixels, gray)
    cv2.imwrite(str(tmp_path / "ceph_color.bmp"), np.dstack([gray] * 3))
    (frame,) = read_frames(str(tmp_path / "ceph_color.bmp"))
    np.testing.assert_allclose(frame.pixels, gray, atol=1e-3)


# ----------------------------------------------------------------------------- geometry


def test_resize_and_pad_geometry_and_points():
    image = np.zeros((100, 50), np.float32)
    corners = [(0, 0), (49, 0), (0, 99), (49, 99)]  # (x, y)
    for x, y in corners:
        image[y, x] = 1.0
    out, geometry = resize_and_pad(image, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint16
    assert geometry.scale == pytest.approx(0.64) and geometry.resized_shape == (64, 32)
    assert geometry.pad == (0, 16)  # 16 columns on each side
    assert out[:, :16].max() == 0 and out[:, 48:].max() == 0
    mapped = geometry.map_points(corners)
    for (x, y), (mx, my) in zip(corners, mapped):
        single = np.zeros_like(image)
        single[y, x] = 1.0
        moved, _ = resize_and_pad(single, 64)
        weights = moved.astype(np.float64)
        ys, xs = np.indices(weights.shape)
        centroid = ((xs * weights).sum() / weights.sum(), (ys * weights).sum() / weights.sum())
        assert abs(centroid[0] - mx) <= 1 and abs(centroid[1] - my) <= 1, (x, y, centroid, mx, my)
    assert geometry.output_spacing((0.1, 0.2)) == pytest.approx([0.1 / 0.64, 0.2 / 0.64])
    assert Geometry.from_json(json.loads(json.dumps(geometry.to_json()))) == geometry

    # Enlarging: pixel centres map exactly, bright pixel lands where predicted.
    small = np.zeros((5, 10), np.float32)
    small[4, 9] = 1.0
    up, geometry = resize_and_pad(small, 40)
    assert geometry.pad == (10, 0) and geometry.resized_shape == (20, 40)
    ((mx, my),) = geometry.map_points([[9, 4]])
    assert np.unravel_index(np.argmax(up), up.shape) == (round(my), round(mx))


def test_map_mask_keeps_labels_and_volumes_resize_plane_by_plane():
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 1, 2, 300]), size=(100, 50))
    _, geometry = resize_and_pad(np.zeros((100, 50), np.float32), 64)
    out = geometry.map_mask(mask)
    assert out.shape == (64, 64) and out.dtype == np.uint16
    assert set(np.unique(out)) <= {0, 1, 2, 300}
    assert out[:, :16].max() == 0
    small = geometry.map_mask(mask.clip(0, 2))
    assert small.dtype == np.uint8 and set(np.unique(small)) <= {0, 1, 2}
    # nearest neighbour agrees with map_points: the mapped centre of a source pixel
    # lies in an output pixel that takes that pixel's label
    _, geometry = resize_and_pad(np.zeros((5, 10), np.float32), 40)
    labels = np.arange(50).reshape(5, 10)
    up = geometry.map_mask(labels)
    for x, y in [(0, 0), (9, 4), (3, 2)]:
        ((mx, my),) = geometry.map_points([[x, y]])
        assert up[round(my), round(mx)] == labels[y, x]
    with pytest.raises(ValueError, match="integer labels"):
        geometry.map_mask(np.full((5, 10), 0.5))
    with pytest.raises(ValueError, match="does not match"):
        geometry.map_mask(np.zeros((6, 10), np.uint8))

    volume = rng.random((3, 30, 20)).astype(np.float32)
    out, geometry = resize_and_pad(volume, 16)
    assert out.shape == (3, 16, 16)
    for d in range(3):
        np.testing.assert_array_equal(out[d], resize_and_pad(volume[d], 16)[0])
    assert geometry.map_mask(np.ones((3, 30, 20), np.uint8)).shape == (3, 16, 16)


# ----------------------------------------------------------------------------- de-identification

PHI = [
    "Doe^John",
    "PID-123456",
    "19700101",
    "Hospital of Secrets",
    "Dr^Who",
    "secret private value",
    "ACC-998877",
    "1.2.3.4.5.6.7.8.9",
]


def _phi_dataset(pixels):
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
    ds.StudyDate = ds.SeriesDate = PHI[2]
    ds.InstitutionName, ds.ReferringPhysicianName = PHI[3], PHI[4]
    ds.AccessionNumber = PHI[6]
    ds.StudyInstanceUID = PHI[7]
    ds.StudyDescription = "Chest of Doe^John"
    ds.add_new(0x00111010, "LO", PHI[5])  # private tag
    ds.Modality, ds.ViewPosition, ds.ImageLaterality = "MG", "CC", "L"
    ds.ManufacturerModelName = "  Model X\n "
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.07, 0.07]
    ds.PixelData = pixels.tobytes()
    return ds


def test_technical_attributes_keep_only_the_whitelist(tmp_path):
    pixels = (np.arange(64, dtype=np.uint16) * 50).reshape(8, 8)
    ds = _phi_dataset(pixels)
    attrs = deid.technical_attributes(ds)
    assert attrs == {
        "modality": "MG",
        "view": "CC",
        "laterality": "L",
        "photometric": "MONOCHROME2",
        "bits_stored_source": 12,
        "manufacturer_model": "Model X",
        "burned_in_annotation": "NO",
    }
    assert deid.sanitize_string(" a\x00b" + "c" * 100) == "ab" + "c" * 62
    # Through the reader: no PHI anywhere in what a Frame carries.
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography, For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "phi.dcm", enforce_file_format=True)
    frames = read_frames(str(tmp_path / "phi.dcm"))
    assert frames[0].spacing == (0.07, 0.07)
    blob = pickle.dumps(frames) + json.dumps(frames[0].attrs).encode()
    for secret in PHI:
        assert secret.encode() not in blob, secret

    coded = Dataset()
    coded.ViewCodeSequence = [Dataset()]
    coded.ViewCodeSequence[0].CodeMeaning = "medio-lateral oblique"
    coded.Laterality = "R"
    coded.BurnedInAnnotation = "UNKNOWN"
    assert deid.technical_attributes(coded) == {"view": "medio-lateral oblique", "laterality": "R"}


def test_hash_patient_id():
    a = deid.hash_patient_id("PID-123456", "salt-1")
    assert a == deid.hash_patient_id("PID-123456", "salt-1")
    assert a != deid.hash_patient_id("PID-123456", "salt-2")
    assert a != deid.hash_patient_id("PID-123457", "salt-1")
    assert a.startswith("p_") and len(a) == 18 and set(a[2:]) <= set("0123456789abcdef")
    assert "123456" not in a
    with pytest.raises(ValueError, match="salt"):
        deid.hash_patient_id("PID-123456", "")
