"""TFDS datasets as record sources (`data.source = "tfds"`), read without TensorFlow.

A dataset prepared by TFDS in the ArrayRecord file format is opened with
`tfds.data_source(name, split=..., download=False,
deserialize_method=RAW_BYTES)`: a random-access sequence of serialized
tf.train.Example bytes, which is what grain reads (and pickles to its
workers). `TfdsDecoder` turns one example into mimjax's (image, meta[, masks])
in the pipelines' map step:

- the example is parsed by TFDS's numpy example parser (no TensorFlow), with
  every image feature left encoded (tfds.decode.SkipDecoding): TFDS's own
  numpy image decoding goes through PIL, which does not keep 16-bit PNGs
  exact, so images and masks are decoded here by OpenCV with
  IMREAD_UNCHANGED: a 16-bit PNG comes back uint16, value for value;
- images become single-channel, as mimjax records are: colour is converted
  to ITU-R BT.601 luma (the weights tools/prepare_data.py uses,
  ingest.readers.LUMA_WEIGHTS), alpha dropped; uint8 and uint16 are kept as
  they are, other dtypes are refused;
- mapped features become meta entries as plain Python values (ClassLabel ->
  int, Text -> str, arrays -> lists), like the JSON meta of mimjax records.

Settings (`data.tfds`, see default_tfds_config): the dataset name with its
config and version, the data dir, the TFDS split of each mimjax split, and
the feature -> record mapping (image, labels, report, masks). Nothing is ever
downloaded or prepared from here: a dataset that is not prepared is an error
that lists what the data dir holds and says how to prepare it.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import cv2
import ml_collections
import numpy as np

from input_pipeline.record_source import DataNotFoundError, DataSourceError, RecordSource

_SPLITS = ("train", "val", "test")
_IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


def default_tfds_config() -> ml_collections.ConfigDict:
    """`data.tfds`: which TFDS dataset, which of its splits, which features."""
    c = ml_collections.ConfigDict()
    # "name[/config][:version]", e.g. "curated_breast_imaging_ddsm/patches" or
    # "my_dataset:1.0.0"; the dataset must be prepared in ArrayRecord format.
    c.name = ml_collections.FieldReference(None, field_type=str)
    # Where it was prepared; None = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    # The TFDS split (slicing syntax allowed) each mimjax split reads, e.g.
    # train "train[:90%]", val "train[90%:]" for a dataset without a validation split.
    c.splits = ml_collections.ConfigDict({"train": "train", "val": "validation", "test": "test"})
    c.image = "image"  # the image feature (Image, or an integer Tensor)
    # meta key <- feature, e.g. {"pathology": "label"}: labels and any other value a
    # config reads from meta (label_keys, balanced_label, label_key). "a/b" reaches
    # into a nested FeaturesDict. ClassLabel features give integers.
    c.labels = ml_collections.ConfigDict()
    # Feature of the report text; stored as meta "report" (pairs' default report_key).
    c.report = ml_collections.FieldReference(None, field_type=str)
    # extra array name <- image feature, e.g. {"mask": "segmentation"}: masks, kept
    # beside the image as mimjax records keep theirs (decode_with_extras).
    c.masks = ml_collections.ConfigDict()
    return c


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default) if cfg is not None else default


def _mapping(value: Any) -> dict[str, str]:
    if not value:
        return {}
    items = value.items() if hasattr(value, "items") else dict(value).items()
    return {str(k): str(v) for k, v in items}


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:  # a declared dependency, so only a broken install gets here
        raise DataSourceError(
            f"data.source='tfds' needs tensorflow-datasets ({e}); pip install -e . installs it"
        ) from e
    return tfds


# ------------------------------------------------------------ opening


def _data_dir(tfds_cfg: Any) -> str:
    """The data dir the settings name, TFDS's default when unset."""
    explicit = _get(tfds_cfg, "data_dir", None)
    if explicit:
        return os.fspath(explicit)
    default = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    return os.environ.get("TFDS_DATA_DIR", default)  # TFDS's own default


def _name(tfds_cfg: Any) -> str:
    name = _get(tfds_cfg, "name", None)
    if not name:
        raise DataSourceError(
            "data.source='tfds' needs the dataset: set --config.data.tfds.name=NAME[/CONFIG]"
            "[:VERSION] (e.g. curated_breast_imaging_ddsm/patches); docs/data_sources.md"
        )
    return str(name)


def prepared_datasets(data_dir: str) -> list[str]:
    """"name[/config]:version (file format)" of every dataset prepared in data_dir."""
    found = []
    for depth in ("*/*", "*/*/*"):
        pattern = os.path.join(data_dir, depth, "dataset_info.json")
        for info in sorted(glob.glob(pattern)):
            version_dir = os.path.dirname(info)
            rel = os.path.relpath(version_dir, data_dir).split(os.sep)
            if any(part.startswith("incomplete") for part in rel):
                continue
            try:
                with open(info) as f:
                    file_format = json.load(f).get("fileFormat", "tfrecord")
            except (OSError, ValueError):
                file_format = "unreadable dataset_info.json"
            found.append(f"{'/'.join(rel[:-1])}:{rel[-1]} ({file_format})")
    return found


def _prepare_hint(name: str, data_dir: str, builder=None) -> str:
    command = f"tfds build {name.split(':')[0]} --data_dir={data_dir} --file_format=array_record"
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) if builder else None
    if manual:
        return (
            f"prepare it once with `{command} --manual_dir=DIR` after placing its manually "
            f"downloaded files in DIR as its instructions say: {' '.join(manual.split())}"
        )
    return (
        f"prepare it once with `{command}`; for a builder of your own, construct it with "
        "file_format='array_record' and call download_and_prepare() (writing images as PNG "
        "bytes needs no TensorFlow; reading never does)"
    )


def _not_prepared(name: str, data_dir: str, builder=None, cause: str = "") -> DataNotFoundError:
    if not os.path.isdir(data_dir):
        listing = "that folder does not exist"
    elif present := prepared_datasets(data_dir):
        listing = f"it holds {present}"
    else:
        listing = "it holds no prepared dataset"
    where = f"{data_dir} (data.tfds.data_dir; None = TFDS's default)"
    return DataNotFoundError(
        f"TFDS dataset {name!r} (data.tfds.name) is not prepared in {where}{cause}: {listing}. "
        f"Set data.tfds.name / data.tfds.data_dir to one of those, or "
        f"{_prepare_hint(name, data_dir, builder)}"
    )


def _builder(tfds_cfg: Any):
    """The prepared builder of the configured dataset (never downloads)."""
    tfds = _import_tfds()
    name, data_dir = _name(tfds_cfg), _data_dir(tfds_cfg)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise _not_prepared(name, data_dir) from None
    except (ValueError, AssertionError) as e:  # e.g. an unknown config or version
        raise _not_prepared(name, data_dir, cause=f" ({str(e).splitlines()[0]})") from None
    if not builder.is_prepared():
        raise _not_prepared(name, data_dir, builder)
    formats = {f.value for f in builder.info.available_file_formats()} or {
        builder.info.file_format.value if builder.info.file_format else "unknown"
    }
    if "array_record" not in formats:
        raise DataSourceError(
            f"TFDS dataset {name!r} in {builder.data_dir} is prepared as {sorted(formats)}; "
            "mimjax reads ArrayRecord (random access without TensorFlow): convert it with "
            f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
            f"--out_file_format=array_record`, or prepare it again with "
            "--file_format=array_record"
        )
    return builder


def dataset_dir(tfds_cfg: Any) -> str:
    """The prepared dataset's version folder (data_dir/name/[config/]version)."""
    return os.fspath(_builder(tfds_cfg).data_dir)


def open_split(tfds_cfg: Any, split: str) -> RecordSource:
    """The records of mimjax split `split`: the TFDS split data.tfds.splits[split]."""
    if split not in _SPLITS:
        raise DataSourceError(f"split must be one of {_SPLITS}, got {split!r}")
    tfds = _import_tfds()
    builder = _builder(tfds_cfg)
    name = _name(tfds_cfg)
    decoder = TfdsDecoder.from_config(builder.info.features, tfds_cfg, dataset=name)
    tfds_split = _mapping(_get(tfds_cfg, "splits", None)).get(split)
    if not tfds_split:
        raise DataSourceError(
            f"data.tfds.splits has no entry for mimjax split {split!r}: set "
            f"--config.data.tfds.splits.{split}=TFDS_SPLIT (e.g. 'train[90%:]'); the dataset's "
            f"splits are {sorted(builder.info.splits)}"
        )
    try:
        records = tfds.data_source(
            name,
            split=tfds_split,
            data_dir=_data_dir(tfds_cfg),
            download=False,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        )
    except (ValueError, KeyError, AssertionError) as e:
        sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
        raise DataSourceError(
            f"data.tfds.splits.{split}={tfds_split!r} is not a split of TFDS dataset {name!r} "
            f"({str(e).splitlines()[0]}); its splits (examples) are {sizes}; TFDS slicing "
            "works, e.g. 'train[:90%]' and 'train[90%:]'"
        ) from None
    root = os.fspath(builder.data_dir)
    return RecordSource(
        records, decoder, where=f"TFDS {name} split {tfds_split!r} ({root})", root=root
    )


# ------------------------------------------------------------ decoding


def _feature_at(features, path: str):
    node = features
    for part in path.split("/"):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return None
    return node


def _describe_features(features, prefix: str = "") -> list[str]:
    """"path: Kind (details)" of every leaf feature, for messages."""
    tfds = _import_tfds()
    out = []
    for key, feature in features.items():
        path = f"{prefix}{key}"
        if isinstance(feature, tfds.features.FeaturesDict):
            out += _describe_features(feature, path + "/")
            continue
        kind = type(feature).__name__
        if isinstance(feature, tfds.features.ClassLabel):
            names = feature.names
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            kind += f" ({feature.num_classes} classes: {shown})"
        elif isinstance(feature, tfds.features.Text):
            pass
        elif hasattr(feature, "np_dtype"):
            kind += f" {np.dtype(feature.np_dtype).name} {tuple(feature.shape)}"
        out.append(f"{path}: {kind}")
    return out


def _skip_image_decoding(features):
    """TFDS decoders that leave every image feature encoded (see module docstring)."""
    tfds = _import_tfds()
    out = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):
            out[key] = tfds.decode.SkipDecoding()
        elif isinstance(feature, tfds.features.FeaturesDict):
            nested = _skip_image_decoding(feature)
            if nested:
                out[key] = nested
    return out


def decode_image(value: Any, what: str, *, encoded_channel_order: str = "bgr") -> np.ndarray:
    """One image feature's value -> a 2-D uint8/uint16 array.

    Encoded bytes (PNG, JPEG, ...) are decoded by OpenCV unchanged (16-bit stays
    16-bit); arrays (Tensor features, RGB order) are taken as they are. Colour
    becomes BT.601 luma, alpha is dropped, a trailing channel of 1 squeezed.
    """
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        array = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ValueError(f"{what}: {len(value)} bytes OpenCV cannot decode as an image")
        order = encoded_channel_order
    else:
        array, order = np.asarray(value), "rgb"
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] in (2, 3, 4):
        if array.dtype not in _IMAGE_DTYPES:
            raise ValueError(f"{what}: {array.dtype} colour images are not supported")
        if array.shape[-1] == 2:  # gray + alpha
            array = array[..., 0]
        else:
            codes = {
                ("bgr", 3): cv2.COLOR_BGR2GRAY,
                ("bgr", 4): cv2.COLOR_BGRA2GRAY,
                ("rgb", 3): cv2.COLOR_RGB2GRAY,
                ("rgb", 4): cv2.COLOR_RGBA2GRAY,
            }
            array = cv2.cvtColor(np.ascontiguousarray(array), codes[order, array.shape[-1]])
    if array.ndim != 2:
        raise ValueError(
            f"{what}: shape {array.shape}; mimjax reads 2-D images (H, W), (H, W, 1) or colour "
            "(H, W, 3|4), which becomes luma"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype not in _IMAGE_DTYPES:
        if array.dtype.kind in "iu" and array.size and 0 <= array.min() and array.max() < 2**16:
            array = array.astype(np.uint8 if array.max() < 256 else np.uint16)
        else:
            raise ValueError(
                f"{what}: dtype {array.dtype}; mimjax records hold uint8 or uint16 pixels"
            )
    return array


def plain(value: Any) -> Any:
    """A decoded feature value as JSON-like Python (what mimjax record meta holds)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [plain(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _value_at(example: Mapping, path: str) -> Any:
    node = example
    for part in path.split("/"):
        node = node[part]
    return node


class TfdsDecoder:
    """Serialized TFDS example -> (image, meta[, extras]), as record_source.RecordDecoder.

    Picklable: it carries the dataset's FeaturesDict (a few kB) and rebuilds
    its TFDS decoders lazily in each process.
    """

    def __init__(
        self,
        features,
        *,
        image: str,
        labels: Mapping[str, str],
        report: str | None,
        masks: Mapping[str, str],
        dataset: str,
    ):
        self.features = features
        self.image = image
        self.labels = dict(labels)
        if report:
            if "report" in self.labels:
                raise DataSourceError(
                    "data.tfds.report and data.tfds.labels both set meta 'report'; keep one"
                )
            self.labels["report"] = report
        self.masks = dict(masks)
        self.dataset = dataset
        self._decoders = None
        self._check()

    @classmethod
    def from_config(cls, features, tfds_cfg: Any, *, dataset: str) -> TfdsDecoder:
        return cls(
            features,
            image=str(_get(tfds_cfg, "image", "image") or "image"),
            labels=_mapping(_get(tfds_cfg, "labels", None)),
            report=_get(tfds_cfg, "report", None),
            masks=_mapping(_get(tfds_cfg, "masks", None)),
            dataset=dataset,
        )

    def _check(self) -> None:
        """Every mapped feature exists; images and masks are image-like."""
        tfds = _import_tfds()
        wanted = [("data.tfds.image", self.image)]
        wanted += [(f"data.tfds.labels.{k}", v) for k, v in self.labels.items()]
        wanted += [(f"data.tfds.masks.{k}", v) for k, v in self.masks.items()]
        missing = [(s, f) for s, f in wanted if _feature_at(self.features, f) is None]
        if missing:
            settings = ", ".join(f"{s}={f!r}" for s, f in missing)
            raise DataSourceError(
                f"TFDS dataset {self.dataset!r} has no feature for {settings}; its features: "
                f"{'; '.join(_describe_features(self.features))}. Map them with "
                "--config.data.tfds.image=FEATURE and "
                "--config.data.tfds.labels=\"{'META_KEY': 'FEATURE'}\" (docs/data_sources.md)"
            )
        for setting, path in [("data.tfds.image", self.image)] + [
            (f"data.tfds.masks.{k}", v) for k, v in self.masks.items()
        ]:
            feature = _feature_at(self.features, path)
            if not isinstance(feature, (tfds.features.Image, tfds.features.Tensor)) or isinstance(
                feature, (tfds.features.ClassLabel, tfds.features.Text)
            ):
                raise DataSourceError(
                    f"{setting}={path!r} is a {type(feature).__name__} feature of "
                    f"{self.dataset!r}, not an image (Image or Tensor); its features: "
                    f"{'; '.join(_describe_features(self.features))}"
                )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_decoders"] = None  # rebuilt where it is used
        return state

    def _example(self, data: bytes) -> dict:
        if self._decoders is None:
            self._decoders = _skip_image_decoding(self.features)
        return self.features.deserialize_example_np(data, decoders=self._decoders)

    def _meta(self, example: dict) -> dict:
        return {key: plain(_value_at(example, path)) for key, path in self.labels.items()}

    def _image(self, example: dict, path: str) -> np.ndarray:
        return decode_image(_value_at(example, path), f"{self.dataset} feature {path!r}")

    def decode_meta(self, data: bytes) -> dict:
        return self._meta(self._example(data))

    def decode(self, data: bytes) -> tuple[np.ndarray, dict]:
        example = self._example(data)
        return self._image(example, self.image), self._meta(example)

    def decode_with_extras(self, data: bytes) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
        example = self._example(data)
        extras = {name: self._image(example, path) for name, path in self.masks.items()}
        return self._image(example, self.image), self._meta(example), extras

    def __repr__(self) -> str:
        return f"TfdsDecoder({self.dataset}: image={self.image!r}, labels={self.labels})"
