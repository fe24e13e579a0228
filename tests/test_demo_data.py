"""The demo's real-data path: pydicom-data's CR radiographs through the ingestion engine."""

import os

import numpy as np

from input_pipeline import sources


def test_pydicom_cr_radiographs_are_ingested_once(tmp_path):
    paths = sources.ensure_pydicom_cr_dataset(str(tmp_path), size=128)
    src = sources.ArrayRecordImageSource(paths)
    assert len(src) == len(sources.PYDICOM_CR_FILES) == 2
    for i in range(len(src)):
        element = src[i]
        image, meta = element["image"], element["meta"]
        assert image.shape == (128, 128) and image.dtype == np.uint16
        assert meta["modality"] == "CR" and meta["bits_stored"] == 16
        assert meta["photometric"] == "MONOCHROME1"  # inverted on ingestion
        assert meta["patient"].startswith("p_") and "pydicom" not in meta["patient"]
    # Displayed as a radiologist sees them (MONOCHROME1 inverted, bone bright):
    # chest PA, mediastinum brighter than both lungs; leg AP, the tibia brighter
    # than the direct-exposure air beside it. Both flip if the inversion is lost.
    by_shape = {tuple(src[i]["meta"]["geometry"]["source_shape"]): src[i]["image"] for i in (0, 1)}
    chest = by_shape[(1955, 1841)] / 65535.0
    band = chest[40:88]
    assert band[:, 61:67].mean() > band[:, 29:35].mean() + 0.1
    assert band[:, 61:67].mean() > band[:, 93:99].mean() + 0.1
    leg = by_shape[(1760, 1760)] / 65535.0
    assert leg[40:88, 60:72].mean() > 3 * leg[40:88, 44:52].mean()
    mtimes = [os.path.getmtime(p) for p in paths]
    assert sources.ensure_pydicom_cr_dataset(str(tmp_path), size=128) == paths
    assert [os.path.getmtime(p) for p in paths] == mtimes  # reused, not rewritten
