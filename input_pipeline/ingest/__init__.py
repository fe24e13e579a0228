"""Medical image files -> de-identified mimjax record shards.

  readers.py     DICOM (pydicom + pylibjpeg plugins), NIfTI (nibabel), PNG/JPEG
                 (OpenCV) -> `Frame`s: 2-D float pixels in modality units plus a
                 whitelist of technical attributes; `RejectedInput` for anything
                 that must be skipped, with the reason.
  deid.py        the attribute whitelist, salted patient hashes, burned-in flags.
  preprocess.py  windowing to [0, 1], MONOCHROME1 inversion, aspect-preserving
                 resize + pad to uint16, and the `Geometry` that maps masks and
                 landmarks with their image.
  manifest.py    `ManifestRow` (one input image with its labels, report,
                 landmarks, masks, patient, split), CSV/JSONL/directory
                 manifests, and patient-level splits.
  engine.py      the resumable, parallel conversion of rows into shards, with
                 `rejected.jsonl` and a summary.

`tools/prepare_data.py` is the command line; `input_pipeline/builders/` turn the
seed datasets' download layouts into `ManifestRow`s for the same engine.
"""
