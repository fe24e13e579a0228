"""X-ray landmark datasets (cephalometric, hand, chest) -> `ManifestRow`s.

Three builders, registered as ``isbi2015_ceph``, ``hand_landmarks`` and
``chest_landmarks`` (`ROWS_BY_NAME`). Landmarks follow `ManifestRow`'s
convention: ``[[x, y], ...]`` = (column, row) in source-image pixels, the
centre of the top-left pixel at (0, 0); annotation pixel coordinates are taken
as they are distributed. The hand and chest layouts are those of the universal
landmark detection work of Zhu et al. (MICCAI 2021, "You only learn once",
github.com/MIRACLE-Center/YOLO_Universal_Anatomical_Landmark_Detection),
which the landmark-transfer literature reuses; its splits are reproduced here.
Check each layout against your download: the files are not all distributed by
their original authors in one form.

ISBI 2015 cephalometric challenge (``isbi2015_ceph``; Wang et al., MedIA 31,
2016): 400 lateral cephalograms, 1935 x 2400 pixels at 0.1 mm/pixel, 19
landmarks marked by a senior and a junior orthodontist. Download from the
challenge pages of Ching-Wei Wang (NTUST, ISBI 2015 Grand Challenge 1) or
their mirrors; check the terms there. Layout as the archive unpacks:

    ROOT/RawImage/TrainingData/001.bmp ... 150.bmp   -> challenge set "train"
    ROOT/RawImage/Test1Data/151.bmp ... 300.bmp      -> challenge set "test1"
    ROOT/RawImage/Test2Data/301.bmp ... 400.bmp      -> challenge set "test2"
    ROOT/AnnotationsByMD/400_senior/001.txt ... 400.txt
    ROOT/AnnotationsByMD/400_junior/001.txt ... 400.txt

(Zhu et al.'s flat copy, ``ROOT/raw/*.bmp`` with ``ROOT/400_senior`` and
``ROOT/400_junior``, is read too, with the same sets by image number.)
Splits are those of the reference protocol (Zhu et al.'s GU2Net code, which the
landmark-transfer literature follows): images 1-130 "train", 131-150 "val", and Test1
and Test2 pooled as "test" (250 images); ``labels["challenge_set"]`` keeps "train",
"test1" or "test2" for results reported per challenge test set.
An annotation file has 19 ``x,y`` lines, then classification lines that are
ignored. ``landmarks`` is the mean of the two doctors (the reference protocol's
ground truth; the challenge itself scored against the senior doctor alone, so
numbers differ from the challenge's tables);
``labels["landmarks_senior"]``/``["landmarks_junior"]`` keep each one. BMP has
no spacing, so the rows carry ``options["spacing"] = [0.1, 0.1]`` (mm, row then
column), which the reader must use as the source spacing.

Hand X-rays, 37 landmarks (``hand_landmarks``; Payer et al., MedIA 54, 2019,
on radiographs of the Digital Hand Atlas, Gertych et al. 2007,
https://ipilab.usc.edu/research/baaweb). Layout (Zhu et al.):

    ROOT/jpg/3128.jpg ...
    ROOT/all.csv  (or ROOT/labels/all.csv)

``all.csv`` has no header; a row is the image id then 37 ``x,y`` pairs in
pixels (Payer et al.'s annotation file). Images without a row are skipped
(the atlas has more images than were annotated). Split as Zhu et al.: the
annotated images in sorted file-name order, the first 550 "train", the next
59 "val", the rest "test" (`HAND_SPLIT`). The files carry no physical
spacing (``spacing`` stays unknown); following Payer et al., who assume a
wrist width of 50 mm between landmarks 1 and 5 (0-based, their evaluation
code), ``labels["mm_per_pixel"] = 50 / |p1 - p5|``. Zhu et al.'s evaluation
script measures the same 50 mm between landmarks 0 and 4; compare numbers
only under one convention.

Chest X-rays, 6 landmarks (``chest_landmarks``; Zhu et al. 2021, on the
Shenzhen chest X-ray set of the U.S. National Library of Medicine, e.g. via
the Kaggle "chest-xray-masks-and-labels" copy; labels from ``chest_labels.zip``
in Zhu et al.'s repository). Layout:

    ROOT/pngs/CHNCXR_0001_0.png ...
    ROOT/labels/CHNCXR_0001_0.txt ...

A label file has an optional first line with the count (6), then 6 lines
``x y`` normalised to [0, 1] by the image width and height; pixels are
``x * width, y * height``, with the size read from the PNG header (no
decoding). Images without a label file are skipped. Split as Zhu et al.: the
labelled images in sorted name order, minus the nine their configuration
excludes (`CHEST_EXCLUDED`, split "excluded"), the first 195 "train", the
next 34 "val", the rest "test" (`CHEST_SPLIT`). No physical spacing.
"""

from __future__ import annotations

import csv
import math
import os

import cv2

from input_pipeline.builders import LayoutError
from input_pipeline.builders._layout import first_existing, layout_error, require
from input_pipeline.ingest.manifest import ManifestRow

CEPH = "ISBI 2015 cephalometric"
CEPH_HINT = (
    "Download the ISBI 2015 cephalometric challenge data (RawImage/, AnnotationsByMD/) and pass "
    "the folder that contains them."
)
CEPH_NUM_LANDMARKS = 19
CEPH_SPACING_MM = 0.1
CEPH_SPLIT_DIRS = {"TrainingData": "train", "Test1Data": "test1", "Test2Data": "test2"}
# Upper image number of each challenge set, for the flat layout without set folders.
CEPH_SPLIT_BY_NUMBER = ((150, "train"), (300, "test1"), (400, "test2"))
CEPH_PROTOCOL_TRAIN = 130  # training images 1..130 train, 131..150 val (GU2Net's split)


def ceph_protocol_split(image_id: str, challenge_set: str) -> str:
    """The reference protocol's split of a cephalogram: train / val / test (both
    challenge test sets)."""
    if challenge_set != "train":
        return "test"
    number = int(image_id) if image_id.isdigit() else 0
    return "train" if number <= CEPH_PROTOCOL_TRAIN else "val"

HAND = "Hand X-ray landmarks"
HAND_HINT = (
    "Get the Digital Hand Atlas radiographs as jpg/ID.jpg and Payer et al.'s all.csv "
    "(layout of Zhu et al.'s universal landmark detection repository)."
)
HAND_NUM_LANDMARKS = 37
HAND_SPLIT = (550, 59)  # train, val counts; the rest is test
HAND_WRIST_WIDTH_MM = 50.0
HAND_WRIST_LANDMARKS = (1, 5)

CHEST = "Chest X-ray landmarks"
CHEST_HINT = (
    "Get the Shenzhen chest X-rays as pngs/CHNCXR_*.png and the landmark files as "
    "labels/CHNCXR_*.txt (chest_labels.zip of Zhu et al.'s universal landmark repository)."
)
CHEST_NUM_LANDMARKS = 6
CHEST_SPLIT = (195, 34)
CHEST_EXCLUDED = frozenset(
    {
        "CHNCXR_0059_0",
        "CHNCXR_0178_0",
        "CHNCXR_0228_0",
        "CHNCXR_0267_0",
        "CHNCXR_0295_0",
        "CHNCXR_0310_0",
        "CHNCXR_0285_0",
        "CHNCXR_0276_0",
        "CHNCXR_0303_0",
    }
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ordered_split(names: list[str], n_train: int, n_val: int) -> dict[str, str]:
    """name -> split: sorted names, the first `n_train` "train", next `n_val` "val", rest "test"."""
    ordered = sorted(names)
    return {
        name: "train" if i < n_train else "val" if i < n_train + n_val else "test"
        for i, name in enumerate(ordered)
    }


def _stem(filename: str) -> str:
    return os.path.splitext(filename)[0]


def _files(folder: str, suffix: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(suffix))


# --- ISBI 2015 cephalometric -------------------------------------------------


def read_ceph_annotation(path: str, num_landmarks: int = CEPH_NUM_LANDMARKS) -> list[list[float]]:
    """The first `num_landmarks` ``x,y`` lines of an ISBI 2015 annotation file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    points = []
    for i, line in enumerate(lines[:num_landmarks]):
        parts = line.replace(" ", "").split(",")
        try:
            x, y = (float(v) for v in parts)
        except ValueError:
            raise LayoutError(
                f"{path}:{i + 1}: expected 'x,y' pixel coordinates, got {line!r}"
            ) from None
        points.append([x, y])
    if len(points) < num_landmarks:
        raise LayoutError(f"{path}: {len(points)} landmark lines, expected {num_landmarks}")
    return points


def _ceph_layout(root: str) -> tuple[list[tuple[str, str]], str, str]:
    """(image path, split) pairs and the senior/junior annotation folders."""
    official = os.path.join(root, "RawImage")
    if os.path.isdir(official) or not os.path.isdir(os.path.join(root, "raw")):
        require(
            root,
            [f"RawImage/{d}" for d in CEPH_SPLIT_DIRS]
            + ["AnnotationsByMD/400_senior", "AnnotationsByMD/400_junior"],
            CEPH,
            CEPH_HINT,
        )
        images = [
            (os.path.join(official, d, f), split)
            for d, split in CEPH_SPLIT_DIRS.items()
            for f in _files(os.path.join(official, d), ".bmp")
        ]
        annotations = os.path.join(root, "AnnotationsByMD")
    else:
        require(root, ["raw", "400_senior", "400_junior"], CEPH, CEPH_HINT)
        images = []
        for f in _files(os.path.join(root, "raw"), ".bmp"):
            number = int(_stem(f)) if _stem(f).isdigit() else 0
            split = next((s for top, s in CEPH_SPLIT_BY_NUMBER if 1 <= number <= top), None)
            if split is None:
                raise LayoutError(f"{os.path.join(root, 'raw', f)}: expected 001.bmp ... 400.bmp")
            images.append((os.path.join(root, "raw", f), split))
        annotations = root
    return images, os.path.join(annotations, "400_senior"), os.path.join(annotations, "400_junior")


def ceph_rows(root: str) -> list[ManifestRow]:
    """One row per ISBI 2015 cephalogram; see the module docstring."""
    root = os.path.abspath(root)
    images, senior_dir, junior_dir = _ceph_layout(root)
    if not images:
        raise layout_error(root, ["RawImage/TrainingData/001.bmp ..."], CEPH, CEPH_HINT)
    missing = [
        os.path.relpath(os.path.join(d, _stem(os.path.basename(p)) + ".txt"), root)
        for p, _ in images
        for d in (senior_dir, junior_dir)
        if not os.path.isfile(os.path.join(d, _stem(os.path.basename(p)) + ".txt"))
    ]
    if missing:
        raise layout_error(root, missing, CEPH, CEPH_HINT)
    rows = []
    for path, challenge_set in images:
        image_id = _stem(os.path.basename(path))
        senior = read_ceph_annotation(os.path.join(senior_dir, image_id + ".txt"))
        junior = read_ceph_annotation(os.path.join(junior_dir, image_id + ".txt"))
        mean = [[(s[0] + j[0]) / 2, (s[1] + j[1]) / 2] for s, j in zip(senior, junior)]
        rows.append(
            ManifestRow(
                path=path,
                patient_id=image_id,
                labels={"landmarks_senior": senior, "landmarks_junior": junior,
                        "challenge_set": challenge_set},
                landmarks=mean,
                split=ceph_protocol_split(image_id, challenge_set),
                options={"spacing": [CEPH_SPACING_MM, CEPH_SPACING_MM]},
                source=os.path.relpath(path, root),
            )
        )
    return rows


# --- Hand X-rays (Payer et al. 2019) -------------------------------------------


def read_hand_csv(path: str, num_landmarks: int = HAND_NUM_LANDMARKS) -> dict[str, list]:
    """image id -> [[x, y], ...] from a header-less ``id, x1, y1, x2, y2, ...`` CSV."""
    table = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            row = [v.strip() for v in row if v.strip()]
            if not row:
                continue
            try:
                values = [float(v) for v in row[1:]]
            except ValueError:
                if line_no == 1:
                    continue  # a header line
                raise LayoutError(f"{path}:{line_no}: non-numeric coordinates") from None
            if len(values) != 2 * num_landmarks:
                raise LayoutError(
                    f"{path}:{line_no}: {len(values)} coordinates, expected {2 * num_landmarks} "
                    f"(id then {num_landmarks} x,y pairs)"
                )
            table[_stem(row[0])] = [values[i : i + 2] for i in range(0, len(values), 2)]
    return table


def hand_rows(root: str) -> list[ManifestRow]:
    """One row per annotated hand radiograph; see the module docstring."""
    root = os.path.abspath(root)
    require(root, ["jpg", ("all.csv", "labels/all.csv")], HAND, HAND_HINT)
    table = read_hand_csv(first_existing(root, ("all.csv", "labels/all.csv")))
    missing = [
        f"jpg/{i}.jpg"
        for i in sorted(table)
        if not os.path.isfile(os.path.join(root, "jpg", f"{i}.jpg"))
    ]
    if missing:
        raise layout_error(root, missing, HAND, HAND_HINT, what="annotated image(s)")
    splits = ordered_split(list(table), *HAND_SPLIT)
    rows = []
    for image_id in sorted(table):
        points = table[image_id]
        a, b = (points[i] for i in HAND_WRIST_LANDMARKS)
        wrist_px = math.dist(a, b)
        labels = {"mm_per_pixel": HAND_WRIST_WIDTH_MM / wrist_px} if wrist_px > 0 else {}
        rows.append(
            ManifestRow(
                path=os.path.join(root, "jpg", f"{image_id}.jpg"),
                patient_id=image_id,
                labels=labels,
                landmarks=points,
                split=splits[image_id],
                source=f"all.csv:{image_id}",
            )
        )
    return rows


# --- Chest X-rays (Zhu et al. 2021) --------------------------------------------


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of an image: from the PNG header when it is one, else decoded."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise LayoutError(f"{path}: not a readable image")
    return image.shape[1], image.shape[0]


def read_chest_label(path: str, num_landmarks: int = CHEST_NUM_LANDMARKS) -> list[list[float]]:
    """Normalised ``x y`` lines (after an optional count line) of a chest label file."""
    with open(path, encoding="utf-8") as f:
        lines = [line.split() for line in f if line.strip()]
    if lines and len(lines[0]) == 1:
        lines = lines[1:]  # the count line
    try:
        points = [[float(x), float(y)] for x, y in lines]
    except ValueError:
        raise LayoutError(f"{path}: expected lines 'x y' of normalised coordinates") from None
    if len(points) != num_landmarks:
        raise LayoutError(f"{path}: {len(points)} landmarks, expected {num_landmarks}")
    if not all(0.0 <= v <= 1.0 for p in points for v in p):
        raise LayoutError(f"{path}: coordinates must be normalised to [0, 1], got {points}")
    return points


def chest_rows(root: str) -> list[ManifestRow]:
    """One row per labelled chest X-ray; see the module docstring."""
    root = os.path.abspath(root)
    require(root, ["pngs", "labels"], CHEST, CHEST_HINT)
    names = [_stem(f) for f in _files(os.path.join(root, "labels"), ".txt")]
    if not names:
        raise layout_error(root, ["labels/CHNCXR_*.txt"], CHEST, CHEST_HINT)
    missing = [
        f"pngs/{n}.png" for n in names if not os.path.isfile(os.path.join(root, "pngs", f"{n}.png"))
    ]
    if missing:
        raise layout_error(root, missing, CHEST, CHEST_HINT, what="labelled image(s)")
    splits = ordered_split([n for n in names if n not in CHEST_EXCLUDED], *CHEST_SPLIT)
    rows = []
    for name in names:
        path = os.path.join(root, "pngs", f"{name}.png")
        width, height = image_size(path)
        normalised = read_chest_label(os.path.join(root, "labels", f"{name}.txt"))
        rows.append(
            ManifestRow(
                path=path,
                patient_id=name,
                landmarks=[[x * width, y * height] for x, y in normalised],
                split=splits.get(name, "excluded"),
                source=f"labels/{name}.txt",
            )
        )
    return rows


ROWS_BY_NAME = {
    "isbi2015_ceph": ceph_rows,
    "chest_landmarks": chest_rows,
    "hand_landmarks": hand_rows,
}


def build_rows(root: str) -> list[ManifestRow]:
    """Not one dataset: name the one you mean."""
    raise ValueError(
        f"the landmarks module holds {len(ROWS_BY_NAME)} datasets; call "
        f"input_pipeline.builders.build_rows(NAME, {root!r}) with NAME one of "
        f"{sorted(ROWS_BY_NAME)} (tools/prepare_data.py --builder NAME)"
    )
