"""The one data-source resolver: (data config, split) -> RecordSource.

Every input pipeline (pretraining, fine-tuning, image-report pairs) and every
helper that reads data (eval batches, the fixed figure batch, intensity
statistics) gets its records from `resolve`, so `data.source` means the same
thing everywhere. One name per layout (docs/data_sources.md):

  prepared     tools/prepare_data.py's output root: `data.dir/{train,val,test}/`
               shard folders.
  shards       a bare folder of `*.array_record` shards, or a glob (`data.dir`);
               it has no splits of its own.
  phantom      the mammography phantom (phantom.py), rendered once under
               `data.dir` (PHANTOMS below).
  cxr_phantom  the chest X-ray phantom with reports (cxr_phantom.py), likewise.
  tfds         a TFDS dataset prepared in the ArrayRecord format, read without
               TensorFlow (tfds_source.py; settings in `data.tfds`).

Splits ("train", "val", "test", or None = every record of the layout):
  prepared     the split's folder; None is refused (a prepared root is never
               read whole: its test split must stay unseen).
  shards       None and "train" are every record; "val" / "test" are refused.
  phantoms     the records `phantom_split_indices` gives the split with
               `data.phantom_split`; None = every record. Phantoms whose
               records name their patient (meta "patient": the cardiac and
               brain phantoms, one record per slice) are split by patient
               instead, so no patient's slices are in two splits.
  tfds         `data.tfds.splits[split]`, in TFDS slicing syntax; None refused.

Pretraining reads `pretrain_split(data_cfg)`: `data.split` when set, else the
layout's default: every record of a phantom or of a shards folder (what the
demo has always pretrained on), the "train" split of a prepared root or of a
TFDS dataset.

The old name "arrayrecord" meant two layouts ("prepared" in fine-tuning and
image-report configs, "shards" in pretraining); it is refused with a message
that says which of the two `data.dir` looks like.

Adding a phantom: a module with its `render(index, seed, size) -> (image,
meta)`, then one declaration line in PHANTOMS (rendered.py), which gives it its
cached rendering and its folder.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from input_pipeline import records, rendered, tfds_source
from input_pipeline.record_source import (
    DataNotFoundError,
    DataSourceError,
    MimjaxRecordDecoder,
    RecordSource,
)

# The phantoms are declared in rendered.py, which their render workers import;
# the resolver, tools and tests name them (and their caches) here.
from input_pipeline.rendered import (  # noqa: F401  (re-exported)
    PHANTOMS,
    PYDICOM_CR_FILES,
    Phantom,
    ensure_phantom_dataset,
    ensure_pydicom_cr_dataset,
    ensure_rendered_dataset,
    phantom_shards_dir,
    pydicom_data_dir,
)
from input_pipeline.scanner import ScannedDecoder, Scanner

__all__ = [
    "SPLITS",
    "LAYOUTS",
    "PHANTOMS",
    "ArrayRecordImageSource",
    "DataNotFoundError",
    "DataSourceError",
    "RecordSource",
    "data_root",
    "layout_name",
    "source_names",
    "phantom_split_indices",
    "pretrain_split",
    "resolve",
]

SPLITS = ("train", "val", "test")
# Changing the salt reassigns every phantom record to a new split.
_PHANTOM_SPLIT_SALT = "mimjax-phantom-split-v1"


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    # ConfigDict, FrozenConfigDict, dataclasses, SimpleNamespace alike.
    return getattr(cfg, key, default)


# --------------------------------------------------------------- phantoms


def _phantom_args(cfg: Any) -> dict[str, int]:
    return {
        "num_images": int(cfg.phantom_num_images),
        "seed": int(cfg.phantom_seed),
        "size": int(cfg.phantom_size),
    }


def phantom_split_indices(num_records: int, fractions: Sequence[float], split: str) -> np.ndarray:
    """Sorted record indices of `split` ("train", "val" or "test").

    Records are ranked by a salted hash of their index (a fixed pseudo-random
    permutation) and the ranking is cut at the cumulative fractions, rounded:
    the three splits are disjoint, cover every record, and are the same on
    every run and machine.
    """
    if split not in SPLITS:
        raise ValueError(f"phantom split must be one of {SPLITS}, got {split!r}")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"phantom_split must be 3 non-negative fractions (train, val, test) summing "
            f"to 1, got {fractions}"
        )
    keys = [
        int.from_bytes(
            hashlib.blake2b(f"{_PHANTOM_SPLIT_SALT}:{i}".encode(), digest_size=8).digest(), "big"
        )
        for i in range(num_records)
    ]
    order = np.argsort(np.asarray(keys, dtype=np.uint64), kind="stable")
    bounds = [0, *(round(num_records * c) for c in np.cumsum(fractions)[:2]), num_records]
    k = SPLITS.index(split)
    return np.sort(order[bounds[k] : bounds[k + 1]])


def _shard_source(paths: Sequence[str], *, where: str, root: str) -> RecordSource:
    paths = list(paths)
    return RecordSource(
        grain.sources.ArrayRecordDataSource(paths),
        MimjaxRecordDecoder(),
        where=where,
        root=root,
        paths=paths,
    )


def _open_phantom(name: str, cfg: Any, split: str | None) -> RecordSource:
    phantom = PHANTOMS[name]
    args = _phantom_args(cfg)
    paths = phantom.ensure(cfg.dir, **args)
    if _get(cfg, "pydicom_cr", False):  # the demo's two real CR radiographs beside it
        paths = paths + rendered.ensure_pydicom_cr_dataset(cfg.dir, size=args["size"])
    root = phantom.shards_dir(cfg.dir, **args)
    full = _shard_source(paths, where=f"the {phantom.what} in {root}", root=root)
    if split is None:
        return full
    fractions = tuple(_get(cfg, "phantom_split", (0.8, 0.1, 0.1)))
    patients = _record_patients(full)
    if patients is None:
        indices = phantom_split_indices(len(full), fractions, split)
        what = f"{len(full)} records"
    else:
        names, of_record = np.unique(patients, return_inverse=True)
        chosen = phantom_split_indices(len(names), fractions, split)
        indices = np.flatnonzero(np.isin(of_record, chosen))
        what = f"{len(full)} records of {len(names)} patients, split by patient"
    return full.subset(indices, where=f"the {phantom.what} ({what}, phantom_split={fractions})")


_PATIENTS_CACHE: dict[tuple, np.ndarray | None] = {}


def _record_patients(src: RecordSource) -> np.ndarray | None:
    """meta "patient" of every record, or None when the records carry none (the
    first record decides). Read once per set of shards: a phantom's shards never
    change under the same paths (its folder name holds its settings)."""
    key = tuple(src.paths or ())
    if key not in _PATIENTS_CACHE:
        patients = None
        if "patient" in src.meta(0):
            patients = np.asarray([str(src.meta(i)["patient"]) for i in range(len(src))])
        _PATIENTS_CACHE[key] = patients
    return _PATIENTS_CACHE[key]


def _phantom_root(name: str, cfg: Any) -> str:
    return PHANTOMS[name].shards_dir(cfg.dir, **_phantom_args(cfg))


# -------------------------------------------------------- shard layouts


def _subfolders(path: str) -> list[str] | None:
    if not os.path.isdir(path):
        return None
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def _open_prepared(cfg: Any, split: str | None) -> RecordSource:
    root = os.fspath(cfg.dir)
    if split is None:
        raise DataSourceError(
            f"data.source='prepared' ({root}) is read one split at a time; name one "
            f"(data.split, one of {SPLITS}): pretraining reads 'train' when data.split is None"
        )
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        present = _subfolders(root)
        found = f"it has {present}" if present is not None else "it does not exist"
        raise DataNotFoundError(
            f"no {split!r} split folder {folder!r} ({found}): with data.source='prepared', "
            "data.dir must be the output root of tools/prepare_data.py, which writes train/, "
            "val/ and test/ sub-folders; give rows of that split in the manifest (or --split "
            "fractions) and ingest again (a bare folder of shards is data.source='shards')"
        )
    return _shard_source(records.list_shards(folder), where=folder, root=root)


def _looks_prepared(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "train"))


def _open_shards(cfg: Any, split: str | None) -> RecordSource:
    where = os.fspath(cfg.dir)
    if split not in (None, "train"):
        raise DataSourceError(
            f"data.source='shards' (data.dir={where!r}) is one set of shards with no splits, "
            f"so it has no {split!r} split; for fine-tuning and evaluation point "
            "--config.data.source=prepared --config.data.dir at a tools/prepare_data.py output "
            "root (train/, val/, test/), or use a TFDS dataset (data.source='tfds')"
        )
    try:
        paths = records.list_shards(where)
    except FileNotFoundError as e:
        hint = ""
        if _looks_prepared(where):
            hint = (
                f"; {where!r} holds a train/ folder, i.e. it is a tools/prepare_data.py root: "
                "set --config.data.source=prepared (pretraining then reads its train split)"
            )
        elif os.path.isdir(where):
            hint = f"; it holds the folders {_subfolders(where)}"
        raise DataNotFoundError(
            f"data.source='shards': {e} (data.dir must be a folder of *.array_record shards or "
            f"a glob of them){hint}"
        ) from None
    return _shard_source(paths, where=where, root=_shards_root(cfg))


def _shards_root(cfg: Any) -> str:
    """The folder itself, or for a glob or a file the deepest folder above it
    with no pattern in its name."""
    path = os.fspath(cfg.dir)
    if glob.has_magic(path) or os.path.isfile(path):
        path = os.path.dirname(path)
        while glob.has_magic(path):
            path = os.path.dirname(path)
    return path or "."


# -------------------------------------------------------------- TFDS


def _open_tfds(cfg: Any, split: str | None) -> RecordSource:
    if split is None:
        raise DataSourceError(
            "data.source='tfds' is read one split at a time; name one (data.split, one of "
            f"{SPLITS}, mapped through data.tfds.splits): pretraining reads 'train' when "
            "data.split is None"
        )
    return tfds_source.open_split(_get(cfg, "tfds"), split)


def _tfds_root(cfg: Any) -> str:
    return tfds_source.dataset_dir(_get(cfg, "tfds"))


# ------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one `data.source` name reads its data."""

    open: Callable[[Any, str | None], RecordSource]  # (data_cfg, split) -> source
    root: Callable[[Any], str]  # the folder the data belongs to (tokenizer, caches)
    pretrain_split: str | None  # what pretraining reads when data.split is None


LAYOUTS: dict[str, Layout] = {
    "prepared": Layout(_open_prepared, lambda cfg: os.fspath(cfg.dir), "train"),
    "shards": Layout(_open_shards, _shards_root, None),
    "tfds": Layout(_open_tfds, _tfds_root, "train"),
}


def _layout(kind: str) -> Layout:
    """The layout of a checked source name: LAYOUTS, or a phantom of PHANTOMS
    (looked up at call time, so a registered phantom needs nothing else)."""
    if kind in PHANTOMS:
        return Layout(
            lambda cfg, split: _open_phantom(kind, cfg, split),
            lambda cfg: _phantom_root(kind, cfg),
            None,  # pretraining reads every record of a phantom
        )
    return LAYOUTS[kind]


def source_names() -> list[str]:
    """Every name data.source accepts."""
    return sorted([*LAYOUTS, *PHANTOMS])


def _renamed(kind: str, cfg: Any) -> DataSourceError:
    where = os.fspath(_get(cfg, "dir", "") or "")
    guess = "prepared" if where and _looks_prepared(where) else "shards"
    return DataSourceError(
        f"data.source={kind!r} was split into two names: 'prepared' for a "
        "tools/prepare_data.py output root with train/, val/ and test/ folders (what "
        "fine-tuning and image-report configs meant by it) and 'shards' for a bare folder or "
        "glob of *.array_record shards (what pretraining meant). data.dir="
        f"{where!r} looks like {guess!r}: set --config.data.source={guess} (in an old "
        "workdir's config.json too)"
    )


def layout_name(data_cfg: Any) -> str:
    """`data_cfg.source`, checked against LAYOUTS (and the retired names)."""
    kind = _get(data_cfg, "source")
    if kind == "arrayrecord":
        raise _renamed(kind, data_cfg)
    if kind not in LAYOUTS and kind not in PHANTOMS:
        raise DataSourceError(
            f"unknown data.source {kind!r}: one of {source_names()} (phantoms: "
            f"{sorted(PHANTOMS)}; docs/data_sources.md)"
        )
    return kind


def pretrain_split(data_cfg: Any) -> str | None:
    """The split pretraining reads: data.split, or (None) the layout's default:
    None = every record for phantoms and shards, "train" for prepared and tfds."""
    split = _get(data_cfg, "split", None)
    if split is None:
        return _layout(layout_name(data_cfg)).pretrain_split
    if split not in SPLITS:
        raise DataSourceError(
            f"data.split must be one of {SPLITS} or None (the layout's default), got {split!r}"
        )
    return split


def resolve(data_cfg: Any, split: str | None) -> RecordSource:
    """The records of `split` ("train", "val", "test"; None = every record, where
    the layout allows it) of the data `data_cfg` names. Renders a phantom the
    first time. An empty result is an error: nothing can train or evaluate on it.
    With `data.scanner` set, its images decode through that scanner (scanner.py)."""
    if split is not None and split not in SPLITS:
        raise DataSourceError(f"split must be one of {SPLITS} (or None), got {split!r}")
    kind = layout_name(data_cfg)
    site = Scanner.from_config(_get(data_cfg, "scanner"))  # checked before any rendering
    src = _layout(kind).open(data_cfg, split)
    if len(src) == 0:
        what = f"the {split!r} split of" if split else "data.source=" + repr(kind) + ","
        raise DataSourceError(
            f"{what} {src.where} has no records: ingest records into it, or for a phantom "
            "raise phantom_num_images or that split's phantom_split fraction"
        )
    return src if site is None else _scanned(src, site)


def _scanned(src: RecordSource, site: Scanner) -> RecordSource:
    """`src` decoded through `site` (scanner.py): the same raw records, split,
    paths and class, with a ScannedDecoder, so every pipeline sees the same
    scanned pixels."""
    scanned = copy.copy(src)  # a shallow copy: shares the raw records
    scanned.decoder = ScannedDecoder(src.decoder, site)
    scanned.where = f"{src.where} through {site.describe()}"
    return scanned


def data_root(data_cfg: Any) -> str:
    """The folder the configured data belongs to (a phantom's shard folder, the
    prepared root, the shards' folder, the TFDS dataset's version folder)."""
    return _layout(layout_name(data_cfg)).root(data_cfg)


# ------------------------------------------------------- direct shard reads


class ArrayRecordImageSource(RecordSource):
    """mimjax ArrayRecord shards (a folder, a glob, or a list of paths) as a
    RecordSource: source[i] -> {"image", "meta", "index"}. For reading shards
    directly (tests, tools); configs go through `resolve`."""

    def __init__(self, paths: str | os.PathLike | Sequence[str]):
        if isinstance(paths, (str, os.PathLike)):
            paths = records.list_shards(paths)
        paths = list(paths)
        folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
        root = os.path.commonpath(folders) if folders else "."
        source = _shard_source(paths, where=f"{len(paths)} shards in {root}", root=root)
        super().__init__(
            source.records, source.decoder, where=source.where, root=root, paths=paths
        )

    def __repr__(self) -> str:
        return f"ArrayRecordImageSource({len(self.paths)} shards, {len(self)} records)"
