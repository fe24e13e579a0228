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
        # Stored MONOCHROME1: inverted on ingestion, so the padded border (0) is
        # darker than the body of the radiograph.
        assert meta["photometric"] == "MONOCHROME1"
        assert image.mean() > 4 * 256
        assert meta["patient"].startswith("p_") and "pydicom" not in meta["patient"]
    mtimes = [os.path.getmtime(p) for p in paths]
    assert sources.ensure_pydicom_cr_dataset(str(tmp_path), size=128) == paths
    assert [os.path.getmtime(p) for p in paths] == mtimes  # reused, not rewritten
