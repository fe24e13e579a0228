"""MedMNIST v2 / MedMNIST+ 2-D datasets (Yang et al., Scientific Data 10, 41, 2023)
-> `ManifestRow`s, one dataset (one ``.npz`` file) at a time.

Twelve small standardised classification datasets, each distributed as one NumPy
``.npz`` file per image size: 28 px (``pathmnist.npz``) and, since MedMNIST+,
64, 128 and 224 px (``pathmnist_64.npz``, ``pathmnist_128.npz``,
``pathmnist_224.npz``). The sizes hold the same images, splits and sample order.

Where to get it: Zenodo, https://doi.org/10.5281/zenodo.10519652, e.g.
``https://zenodo.org/records/10519652/files/pathmnist_224.npz?download=1``
(the MD5 of every file is listed in MedMNIST's ``INFO``). Licence CC BY 4.0,
DermaMNIST CC BY-NC 4.0; cite the paper above and each source dataset. Nothing is
downloaded here: put the files in one folder yourself (a ``?download=1`` that a
download tool left at the end of a name is accepted).

Expected layout (``ROOT`` is what ``--input`` names: the folder, or one file)::

    ROOT/pathmnist.npz          28 px       (the folder form reads the 28 px file;
    ROOT/pathmnist_64.npz       64 px        pass a file, or `size=` from Python,
    ROOT/pathmnist_128.npz      128 px       for another size)
    ROOT/pathmnist_224.npz      224 px
    ROOT/chestmnist.npz ...

Each file holds six arrays: ``{train,val,test}_images``, uint8, (N, S, S) for the
gray datasets or (N, S, S, 3) RGB, and ``{train,val,test}_labels``, integers,
(N, 1) (class index) or, for ChestMNIST, (N, 14) (0/1 per finding).

==============  =====  =======  ==========================================
dataset         class  colour   task (MedMNIST's name)
==============  =====  =======  ==========================================
pathmnist        9     RGB      multi-class (colorectal histology)
chestmnist      14     gray     multi-label, binary-class (NIH ChestX-ray14)
dermamnist       7     RGB      multi-class (HAM10000 dermatoscopy)
octmnist         4     gray     multi-class (retinal OCT)
pneumoniamnist   2     gray     binary-class (paediatric chest X-ray)
retinamnist      5     RGB      ordinal-regression (DeepDRiD fundus grading)
breastmnist      2     gray     binary-class (breast ultrasound)
bloodmnist       8     RGB      multi-class (blood cell microscopy)
tissuemnist      8     gray     multi-class (kidney cortex cells, BBBC051)
organamnist     11     gray     multi-class (abdominal CT, axial)
organcmnist     11     gray     multi-class (abdominal CT, coronal)
organsmnist     11     gray     multi-class (abdominal CT, sagittal)
==============  =====  =======  ==========================================

Builder names (``ROWS_BY_NAME``): ``medmnist_<dataset>``, e.g.
``medmnist_pathmnist``. From Python, ``build_rows(root, dataset=..., size=...)``
picks the file of any size from a folder; ``build_rows(file)`` alone names the
dataset by the file name.

Rows: one per image, in file order, split by split. The image is read straight
from the ``.npz`` (``path`` = the file, ``options = {"npz_key": "train_images",
"npz_index": i}``; see `readers.npz_item`); its record's ``source_index`` is
``{"npz_index": i}``, the image's position in its split's array (the same in
every size). Records are single-channel like every mimjax record: RGB images
become ITU-R BT.601 luma (meta ``photometric`` "RGB" says so), gray ones keep
their pixels (the default window maps 0..255 to 0..1, so a stored uint16 value
is the source value x 257).

Labels (record meta, top level):

* ``label``: int class index (multi-class, binary-class, ordinal-regression), or
  for ChestMNIST a list of 14 ints, 0/1 per finding (multi-hot).
* ``task``: MedMNIST's task name, one of `TASKS`; ``"multi-label,
  binary-class"`` (ChestMNIST) is the one with a multi-hot ``label``.
* ``classes``: the official class names, index = label value.
* ``dataset``: e.g. ``"pathmnist"``.

Splits: MedMNIST's official train / val / test, kept as distributed. MedMNIST
has no patient ids, so every image is its own ``patient_id``
(``"pathmnist-train-5"``, hashed like any other).

Commands (``--size native`` keeps the file's 28 / 64 / 128 / 224 px; the tool's
default, 512, would upsample; a few thousand rows per shard suit such small
records)::

    python tools/prepare_data.py --builder medmnist_pathmnist --input ~/medmnist \\
        --output /data/medmnist/pathmnist_28 --size native --rows-per-shard 4096
    python tools/prepare_data.py --builder medmnist_pathmnist \\
        --input ~/medmnist/pathmnist_224.npz --output /data/medmnist/pathmnist_224 \\
        --size native --rows-per-shard 1024
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import zipfile
import zlib

import numpy as np

from input_pipeline.builders import LayoutError
from input_pipeline.ingest.manifest import ManifestRow

SIZES = (28, 64, 128, 224)  # 28 = the original MedMNIST file, no suffix
SPLITS = ("train", "val", "test")
MULTI_CLASS = "multi-class"
BINARY_CLASS = "binary-class"
ORDINAL_REGRESSION = "ordinal-regression"
MULTI_LABEL = "multi-label, binary-class"
TASKS = (MULTI_CLASS, BINARY_CLASS, ORDINAL_REGRESSION, MULTI_LABEL)
DOWNLOAD_SUFFIX = "?download=1"  # what a download tool may leave on a Zenodo file name
HINT = (
    "Download the MedMNIST .npz files from Zenodo (https://doi.org/10.5281/zenodo.10519652, "
    "e.g. https://zenodo.org/records/10519652/files/pathmnist_224.npz) into one folder, "
    "keeping their names, and pass that folder or one file as --input."
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One MedMNIST 2-D dataset: its task, image channels and class names."""

    name: str
    task: str
    channels: int  # 1 gray (N, S, S), 3 RGB (N, S, S, 3)
    classes: tuple[str, ...]

    @property
    def builder(self) -> str:
        return f"medmnist_{self.name}"

    def file_name(self, size: int) -> str:
        return f"{self.name}.npz" if size == 28 else f"{self.name}_{size}.npz"


_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
# Class names as MedMNIST's INFO gives them (index = label value).
DATASETS = {
    d.name: d
    for d in (
        Dataset(
            "pathmnist",
            MULTI_CLASS,
            3,
            (
                "adipose",
                "background",
                "debris",
                "lymphocytes",
                "mucus",
                "smooth muscle",
                "normal colon mucosa",
                "cancer-associated stroma",
                "colorectal adenocarcinoma epithelium",
            ),
        ),
        Dataset(
            "chestmnist",
            MULTI_LABEL,
            1,
            (
                "atelectasis",
                "cardiomegaly",
                "effusion",
                "infiltration",
                "mass",
                "nodule",
                "pneumonia",
                "pneumothorax",
                "consolidation",
                "edema",
                "emphysema",
                "fibrosis",
                "pleural",
                "hernia",
            ),
        ),
        Dataset(
            "dermamnist",
            MULTI_CLASS,
            3,
            (
                "actinic keratoses and intraepithelial carcinoma",
                "basal cell carcinoma",
                "benign keratosis-like lesions",
                "dermatofibroma",
                "melanoma",
                "melanocytic nevi",
                "vascular lesions",
            ),
        ),
        Dataset(
            "octmnist",
            MULTI_CLASS,
            1,
            ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
        ),
        Dataset("pneumoniamnist", BINARY_CLASS, 1, ("normal", "pneumonia")),
        Dataset("retinamnist", ORDINAL_REGRESSION, 3, ("0", "1", "2", "3", "4")),
        Dataset("breastmnist", BINARY_CLASS, 1, ("malignant", "normal, benign")),
        Dataset(
            "bloodmnist",
            MULTI_CLASS,
            3,
            (
                "basophil",
                "eosinophil",
                "erythroblast",
                "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                "lymphocyte",
                "monocyte",
                "neutrophil",
                "platelet",
            ),
        ),
        Dataset(
            "tissuemnist",
            MULTI_CLASS,
            1,
            (
                "Collecting Duct, Connecting Tubule",
                "Distal Convoluted Tubule",
                "Glomerular endothelial cells",
                "Interstitial endothelial cells",
                "Leukocytes",
                "Podocytes",
                "Proximal Tubule Segments",
                "Thick Ascending Limb",
            ),
        ),
        Dataset("organamnist", MULTI_CLASS, 1, _ORGANS),
        Dataset("organcmnist", MULTI_CLASS, 1, _ORGANS),
        Dataset("organsmnist", MULTI_CLASS, 1, _ORGANS),
    )
}
_FILE_NAME = re.compile(r"^([a-z]+mnist)(?:_(\d+))?\.npz$")


def parse_file_name(name: str) -> tuple[str, int] | None:
    """("pathmnist", 224) for "pathmnist_224.npz" (also with "?download=1" after
    it); None for a name that is not a MedMNIST 2-D file of a known size."""
    match = _FILE_NAME.match(name.removesuffix(DOWNLOAD_SUFFIX))
    if not match or match.group(1) not in DATASETS:
        return None
    size = int(match.group(2) or 28)
    if size not in SIZES or match.group(2) == "28":
        return None
    return match.group(1), size


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown MedMNIST dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def _npz_files_text(folder: str) -> str:
    """The .npz files in `folder`, for an error message."""
    try:
        names = sorted(n for n in os.listdir(folder) if ".npz" in n and not n.startswith("."))
    except OSError:
        return "none (the folder cannot be read)"
    if not names:
        return "none"
    described = []
    for n in names:
        parsed = parse_file_name(n)
        described.append(f"{n} ({parsed[0]}, {parsed[1]} px)" if parsed else n)
    return ", ".join(described)


def locate(root: str, dataset: str | None = None, size: int | None = None) -> tuple[str, str, int]:
    """(file path, dataset, size) of the MedMNIST file that `root` names.

    root: a folder (then `dataset` is required, and `size` picks the file, default
    28) or one ``.npz`` file (its name gives dataset and size, which must agree
    with `dataset` and `size` when those are given). Raises LayoutError naming
    the file and listing the .npz files found when it is missing."""
    if dataset is not None:
        _dataset(dataset)
    if size is not None and size not in SIZES:
        raise ValueError(f"MedMNIST size must be one of {SIZES}, got {size!r}")
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isdir(root):
        if dataset is None:
            raise ValueError(
                f"{root} is a folder: name the dataset (one of {sorted(DATASETS)}), or pass "
                "one .npz file"
            )
        size = size or 28
        info = DATASETS[dataset]
        wanted = info.file_name(size)
        for name in (wanted, wanted + DOWNLOAD_SUFFIX):
            if os.path.isfile(os.path.join(root, name)):
                return os.path.join(root, name), dataset, size
        raise LayoutError(
            f"MedMNIST: {wanted} ({dataset}, {size} px) not found in {root!r}. MedMNIST "
            f"files there: {_npz_files_text(root)}. Put {wanted} there, or pass the file of "
            f"the size you have as --input (e.g. {os.path.join(root, info.file_name(64))}).\n"
            f"{HINT}"
        )
    name = os.path.basename(root)
    parsed = parse_file_name(name)
    if parsed is None:
        example = DATASETS[dataset or "pathmnist"]
        if not os.path.exists(root):
            raise LayoutError(
                f"MedMNIST: input {root!r} does not exist; pass the folder that holds the "
                f".npz files, or one file.\n{HINT}"
            )
        raise LayoutError(
            f"MedMNIST: {root!r} is not named like a MedMNIST 2-D file; datasets and sizes "
            f"are told apart by the published names, e.g. {example.file_name(28)} (28 px) or "
            f"{example.file_name(224)}. Rename it back, or pass the folder that holds it.\n{HINT}"
        )
    file_dataset, file_size = parsed
    if dataset is not None and file_dataset != dataset:
        raise LayoutError(
            f"MedMNIST: {root!r} is a {file_dataset} file, not {dataset}; use --builder "
            f"{DATASETS[file_dataset].builder}, or pass a {dataset} file "
            f"({DATASETS[dataset].file_name(28)}, {DATASETS[dataset].file_name(224)}, ...)"
        )
    if size is not None and file_size != size:
        raise LayoutError(f"MedMNIST: {root!r} holds {file_size} px images, not {size} px")
    if not os.path.isfile(root):
        folder = os.path.dirname(root)
        found = _npz_files_text(folder) if os.path.isdir(folder) else "none (no such folder)"
        raise LayoutError(
            f"MedMNIST: {root!r} ({file_dataset}, {file_size} px) does not exist. MedMNIST "
            f"files in {folder!r}: {found}.\n{HINT}"
        )
    return root, file_dataset, file_size


def read_labels(path: str, dataset: str, size: int) -> dict[str, np.ndarray]:
    """{split: labels} of a MedMNIST file after checking all six arrays: present,
    uint8 images of the dataset's shape and size, integer labels of the task's
    shape, as many labels as images, values within the dataset's classes. The
    images are checked by their headers only (never loaded). Raises LayoutError
    naming the file, the array and what to do."""
    from input_pipeline.ingest import readers  # pylint: disable=g-import-not-at-top

    info = DATASETS[dataset]
    where = f"MedMNIST {dataset}: {path}"
    again = "download it again (compare its MD5 with MedMNIST's INFO)"
    try:
        headers = readers.npz_headers(path)
    except readers.RejectedInput as e:
        raise LayoutError(f"{where}: {e}; {again}") from None
    wanted = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    missing = [k for k in wanted if k not in headers]
    if missing:
        raise LayoutError(
            f"{where}: missing array(s) {missing}; the file holds {sorted(headers)}. A "
            f"MedMNIST 2-D file has {wanted}: is this an official {info.file_name(size)}, "
            f"unmodified? If not, {again}"
        )
    image_shape = (size, size) if info.channels == 1 else (size, size, 3)
    kind = "gray" if info.channels == 1 else "RGB"
    out = {}
    with np.load(path, allow_pickle=False) as npz:
        for split in SPLITS:
            images = headers[f"{split}_images"]
            if images.dtype != np.uint8:
                raise LayoutError(
                    f"{where}: {split}_images has dtype {images.dtype}, expected uint8 "
                    f"(MedMNIST images are 8-bit); {again}"
                )
            if len(images.shape) < 1 or images.shape[1:] != image_shape:
                raise LayoutError(
                    f"{where}: {split}_images has shape {images.shape}, expected "
                    f"(N, {', '.join(map(str, image_shape))}): {dataset} is {kind} at {size} px "
                    f"in {info.file_name(size)}. Is the file of another dataset or size, "
                    f"renamed? If so, name it as it was published; else {again}"
                )
            if images.fortran_order:
                raise LayoutError(
                    f"{where}: {split}_images is stored in Fortran order (not as published); "
                    f"{again}"
                )
            count = images.shape[0]
            if count == 0:
                raise LayoutError(f"{where}: {split}_images holds no images; {again}")
            try:
                labels = npz[f"{split}_labels"]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise LayoutError(f"{where}: {split}_labels is unreadable ({e}); {again}") from None
            out[split] = _check_labels(labels, f"{split}_labels", count, info, where)
    return out


def _check_labels(labels: np.ndarray, key: str, count: int, info: Dataset, where: str):
    """`labels` as (N,) ints, or (N, 14) for the multi-label task, after checks."""
    n_classes = len(info.classes)
    multi = info.task == MULTI_LABEL
    if labels.dtype.kind not in "uib":
        raise LayoutError(
            f"{where}: {key} has dtype {labels.dtype}, expected integers (class indices"
            f"{', 0/1 per finding' if multi else ''})"
        )
    expected = f"(N, {n_classes})" if multi else "(N, 1)"
    shape_ok = (
        labels.ndim == 2 and labels.shape[1] == n_classes
        if multi
        else labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)
    )
    if not shape_ok:
        raise LayoutError(
            f"{where}: {key} has shape {labels.shape}, expected {expected} for "
            f"{info.name} ({info.task}, {n_classes} classes)"
        )
    if labels.shape[0] != count:
        raise LayoutError(
            f"{where}: {key} has {labels.shape[0]} labels for {count} images in "
            f"{key.replace('labels', 'images')}; the file is inconsistent, download it again"
        )
    values = labels.astype(np.int64).reshape(count, -1)
    high = 1 if multi else n_classes - 1
    bad = np.nonzero(((values < 0) | (values > high)).any(axis=1))[0]
    if bad.size:
        first = int(bad[0])
        raise LayoutError(
            f"{where}: {key} has {bad.size} label(s) outside 0..{high} "
            f"({'0/1 per finding' if multi else f'{n_classes} classes'} in {info.name}), "
            f"first at index {first}: {values[first].tolist()}. Is this the {info.name} file?"
        )
    return values if multi else values[:, 0]


def build_rows(root: str, dataset: str | None = None, size: int | None = None) -> list[ManifestRow]:
    """One row per image of a MedMNIST file, official splits; see the module docstring.

    root: the folder of the downloads (then name `dataset`; `size` picks
    ``{dataset}_{size}.npz``, default 28) or one file (dataset and size from its
    name)."""
    path, dataset, size = locate(root, dataset, size)
    info = DATASETS[dataset]
    labels = read_labels(path, dataset, size)
    classes = list(info.classes)
    name = os.path.basename(path)
    rows = []
    for split in SPLITS:
        key = f"{split}_images"
        for index, label in enumerate(labels[split].tolist()):
            rows.append(
                ManifestRow(
                    path=path,
                    patient_id=f"{dataset}-{split}-{index}",
                    labels={
                        "dataset": dataset,
                        "task": info.task,
                        "classes": classes,
                        "label": label,
                    },
                    split=split,
                    options={"npz_key": key, "npz_index": index},
                    source=f"{name}:{key}[{index}]",
                )
            )
    return rows


ROWS_BY_NAME = {d.builder: functools.partial(build_rows, dataset=d.name) for d in DATASETS.values()}
