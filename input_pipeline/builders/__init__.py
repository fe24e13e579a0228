"""Seed-dataset builders: official download layout -> `ManifestRow`s.

Each builder module has `build_rows(root: str) -> list[ManifestRow]`, which
checks the layout first and raises `LayoutError` naming every missing file or
folder, and a module docstring with the layout it expects and where to get the
data. The rows go through the same ingestion engine as a user's manifest
(`tools/prepare_data.py --builder NAME --input ROOT --output DIR`).
"""

from __future__ import annotations

import importlib

# name -> module in this package; imported on demand so a builder's optional
# parsing never slows down the others.
BUILDERS = {
    "cbis_ddsm": "cbis_ddsm",
    "cbis_ddsm_full": "cbis_ddsm",
    "mimic_cxr": "mimic_cxr",
    "acdc": "acdc",
    "brats2021": "brats",
    "isbi2015_ceph": "landmarks",
    "chest_landmarks": "landmarks",
    "hand_landmarks": "landmarks",
    "medmnist_pathmnist": "medmnist",
    "medmnist_chestmnist": "medmnist",
    "medmnist_dermamnist": "medmnist",
    "medmnist_octmnist": "medmnist",
    "medmnist_pneumoniamnist": "medmnist",
    "medmnist_retinamnist": "medmnist",
    "medmnist_breastmnist": "medmnist",
    "medmnist_bloodmnist": "medmnist",
    "medmnist_tissuemnist": "medmnist",
    "medmnist_organamnist": "medmnist",
    "medmnist_organcmnist": "medmnist",
    "medmnist_organsmnist": "medmnist",
}


class LayoutError(FileNotFoundError):
    """A dataset folder does not have the layout its builder expects."""


def build_rows(name: str, root: str):
    """Rows of dataset `name` found under `root` (see BUILDERS)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset builder {name!r}; choose one of {sorted(BUILDERS)}")
    module = importlib.import_module(f"input_pipeline.builders.{BUILDERS[name]}")
    return (
        module.build_rows(root)
        if not hasattr(module, "ROWS_BY_NAME")
        else (module.ROWS_BY_NAME[name](root))
    )
