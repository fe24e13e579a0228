"""Image-report pairs for contrastive / masked image-text pretraining (MCR):
resumable training batches, and one-pass evaluation pairs for retrieval.

Sources (`data_cfg.source`, resolved by sources.resolve; docs/data_sources.md)
  cxr_phantom: the paired chest X-ray phantom (input_pipeline/cxr_phantom.py),
    rendered into shards once under `data_cfg.dir`; split into train / val /
    test by sources.phantom_split_indices with `phantom_split`.
  prepared: tools/prepare_data.py's output root (`dir/train`, `dir/val`,
    `dir/test`), e.g. MIMIC-CXR ingested with its reports.
  tfds: a TFDS dataset with a report feature (`data_cfg.tfds.report`).
  A record is a pair when meta[report_key] is a non-empty report and, if the
  record has a "view_group", it is one of `view_groups` (frontal by default).
  Which records qualify is found by reading every record's metadata once per
  split; for a whole shard folder (a prepared split) the result is cached in
  `<data root>/pairs_index_{split}.json`.

The pair index (batch["pair_index"]) is a pair's position within its split;
`pair_split(data_cfg, split).record_indices[pair_index]` is its record.

Text: meta[report_key] -> text.preprocess_report -> the tokenizer ->
[CLS] ... [SEP] [PAD]... of length max_text_length (text.encode_report). The
tokenizer is trained once per data directory on the train split's reports and
saved as `tokenizer_path(data_cfg)` (sources.data_root: the phantom's shard
folder, the prepared `dir`, or the TFDS dataset's folder, + "/tokenizer.json");
later runs load it, and a vocabulary size that does not
match `vocab_size` is an error (delete the file or change the setting). No
token masking happens here: the model masks text with its step rng.

make_pairs_train_dataset graph (per process), the pretraining pipeline's shape
(pipeline.py), so the trainer checkpoints it the same way:

  range(num_pairs).shuffle(s0).repeat()  epoch e reshuffled
  .map(read + decode + tokenize)         {"image", "meta", "index", "text_ids", "text_mask"}
  .random_map(augment, seed=s1)          rng seeded by GLOBAL stream position
  -- pipeline.ResumableBatches: per-process slice, batch, threads, mp_prefetch --

Augmentation: random resized crop (area crop_scale, default 0.6-1: the
findings must stay in view) resized to image_size, then the pretraining
normalisation ((x / max - mean) / std, gray replicated to `channels`). Never a
horizontal flip: it would swap every left and right finding.

Batch: {"image": float32 [B, S, S, C], "text_ids": int32 [B, L], "text_mask":
int32 [B, L] (1 = real token, CLS and SEP included), "pair_index": int32 [B]}.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from input_pipeline import (
    cxr_phantom,
    eval_batches,
    finetune,
    pipeline,
    sources,
    text,
    tfds_source,
    transforms,
)
from input_pipeline.record_source import RecordSource

SPLITS = finetune.SPLITS


def default_pairs_data_config() -> ml_collections.ConfigDict:
    """Data settings of image-report pretraining (phantom, 256 px pairs)."""
    c = ml_collections.ConfigDict()
    # Where the pairs come from (input_pipeline/sources.py, docs/data_sources.md):
    # "cxr_phantom" (rendered once under dir), "prepared" (tools/prepare_data.py's
    # output root: dir/train, dir/val, dir/test) or "tfds" (data.tfds, with
    # tfds.report naming the report feature).
    c.source = "cxr_phantom"
    c.dir = "data"
    c.phantom_num_images = 2048
    c.phantom_size = 256
    c.phantom_seed = 0
    c.phantom_split = (0.8, 0.1, 0.1)  # cxr_phantom: train, val, test fractions
    c.tfds = tfds_source.default_tfds_config()  # source "tfds": dataset, splits, features
    # Keep records whose meta "view_group" is one of these (records without the
    # key are kept); () keeps every view.
    c.view_groups = ("frontal",)
    c.report_key = "report"  # meta key of the report text
    # Meta key of the per-pair finding labels for evaluation ("same findings"
    # recall): None = "finding_labels" (phantom) or "chexpert" (MIMIC-CXR)
    # when the records have it, else no labels.
    c.label_key = ml_collections.FieldReference(None, field_type=str)
    # Tokenizer (BPE, deterministic): trained on the train split's reports once.
    c.vocab_size = 512  # exact vocabulary size (the text model's embedding rows)
    c.tokenizer_min_frequency = 2
    # None: <phantom shard folder or dir>/tokenizer.json (see tokenizer_path).
    c.tokenizer_path = ml_collections.FieldReference(None, field_type=str)
    c.max_text_length = 128  # tokens incl. [CLS] and [SEP]; longer reports are cut
    c.crop_scale = (0.6, 1.0)  # area fraction of the random resized crop
    c.crop_ratio = (3 / 4, 4 / 3)
    # Applied after scaling pixels to [0, 1]. Phantom values (512 pairs, 256 px,
    # seed 0: 0.445 / 0.250; 128 px: 0.453 / 0.240). Measure them again for
    # real data (measure_pair_intensity_stats).
    c.norm_mean = 0.445
    c.norm_std = 0.25
    c.channels = 1  # 1, or 3 to replicate gray for RGB-pretrained encoders
    c.num_workers = 2  # prefetch processes; 0 = everything in this process
    c.num_threads = 2
    c.prefetch_buffer_size = 2
    return c


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


# ------------------------------------------------------------------ splits


class PairSplit:
    """The pairs of one split: raw records by pair index (picklable, for grain
    workers), decoded with `decode` / `decode_meta`."""

    def __init__(self, source: RecordSource, *, name: str):
        self.source = source
        self.name = name
        self._raw = source.records
        self.decoder = source.decoder

    @property
    def record_indices(self) -> np.ndarray:
        """Each pair's record in the split's underlying records (sources.RecordSource)."""
        return self.source.record_indices

    @property
    def paths(self) -> list[str] | None:
        return self.source.paths

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, pair_index: int):
        return self._raw[int(pair_index)]

    def decode(self, data) -> tuple[np.ndarray, dict]:
        return self.decoder.decode(data)

    def decode_meta(self, data) -> dict:
        return self.decoder.decode_meta(data)

    def __repr__(self) -> str:
        return f"PairSplit({self.name}: {len(self)} pairs)"


def pairs_root(data_cfg: Any) -> str:
    """Folder the pair data (and by default the tokenizer) belongs to."""
    return sources.data_root(data_cfg)


def pair_split(data_cfg: Any, split: str) -> PairSplit:
    """The pairs of `split` ("train", "val" or "test"); see the module docstring.
    An empty split is an error."""
    if split not in SPLITS:
        raise sources.DataSourceError(f"split must be one of {SPLITS}, got {split!r}")
    src = sources.resolve(data_cfg, split)
    indices = _qualifying_records(data_cfg, split, src)
    if len(indices) == 0:
        raise sources.DataSourceError(
            f"the {split!r} split of {src.where} has no image-report pairs: ingest records with "
            f"reports (meta {_get(data_cfg, 'report_key', 'report')!r}; for TFDS map the "
            "report feature with data.tfds.report), check view_groups, or for the phantom "
            "raise phantom_num_images or that split's fraction (the paired phantom is "
            "data.source='cxr_phantom')"
        )
    return PairSplit(src.subset(indices), name=split)


def _exclusion(meta: dict, report_key: str, view_groups: tuple[str, ...]) -> str | None:
    """Why a record is not a pair (None: it is one)."""
    report = meta.get(report_key)
    if not isinstance(report, str) or not text.preprocess_report(report):
        return "no report"
    view = meta.get("view_group")
    if view_groups and view is not None and view not in view_groups:
        return f"view {view}"
    return None


def _qualifying_records(data_cfg: Any, split: str, src: RecordSource) -> np.ndarray:
    """Positions in `src` of the records that are pairs.

    For a whole shard folder the result is cached per split (see the module
    docstring); the cache names the shards (and their sizes) and the filter it
    was made with, and is rebuilt when either changes. Other sources (a phantom
    split, TFDS) are scanned each time: their metadata is cheap to read.
    """
    report_key = str(_get(data_cfg, "report_key", "report"))
    view_groups = tuple(_get(data_cfg, "view_groups", ()) or ())
    cache = None
    if src.paths is not None and src.is_whole:
        key = {
            "shards": [[os.path.basename(p), os.path.getsize(p)] for p in src.paths],
            "report_key": report_key,
            "view_groups": list(view_groups),
        }
        cache = os.path.join(src.root, f"pairs_index_{split}.json")
        if os.path.exists(cache):
            with open(cache) as f:
                stored = json.load(f)
            if {k: stored.get(k) for k in key} == key:
                return np.asarray(stored["kept"], dtype=np.int64)
    kept, dropped = [], Counter()
    for i in range(len(src)):
        reason = _exclusion(src.meta(i), report_key, view_groups)
        if reason is None:
            kept.append(i)
        else:
            dropped[reason] += 1
    if cache is not None:
        try:
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({**key, "kept": kept, "dropped": dict(dropped)}, f)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only data folder: scan again next time
    return np.asarray(kept, dtype=np.int64)


def split_reports(pairs: PairSplit, report_key: str = "report") -> list[str]:
    """The raw report of every pair of the split, in pair order."""
    return [pairs.decode_meta(pairs[i])[report_key] for i in range(len(pairs))]


# --------------------------------------------------------------- tokenizer


def tokenizer_path(data_cfg: Any) -> str:
    """Where the tokenizer of this data lives: data_cfg.tokenizer_path if set,
    else `pairs_root(data_cfg)/tokenizer.json`."""
    explicit = _get(data_cfg, "tokenizer_path", None)
    if explicit:
        return os.fspath(explicit)
    return os.path.join(pairs_root(data_cfg), "tokenizer.json")


def ensure_tokenizer(data_cfg: Any):
    """The data's tokenizer: loaded from `tokenizer_path(data_cfg)`, or trained
    on the train split's preprocessed reports and saved there first (the first
    process to save wins; every process then uses that file). Raises
    ValueError when a saved one has a vocabulary size other than vocab_size."""
    path = tokenizer_path(data_cfg)
    vocab_size = int(data_cfg.vocab_size)
    if not os.path.exists(path):
        pairs = pair_split(data_cfg, "train")
        report_key = str(_get(data_cfg, "report_key", "report"))
        texts = [text.preprocess_report(r) for r in split_reports(pairs, report_key)]
        text.train_tokenizer(
            texts,
            vocab_size,
            path,
            min_frequency=int(_get(data_cfg, "tokenizer_min_frequency", 2)),
            exclusive=True,
        )
    return text.load_tokenizer(path, vocab_size)


# --------------------------------------------------------------- per record


class _ReadPair(grain.transforms.Map):
    """Pair index -> {"image", "meta", "index", "text_ids", "text_mask"}."""

    def __init__(self, pairs: PairSplit, tokenizer_json: str, max_length: int, report_key: str):
        self.pairs = pairs
        self.tokenizer_json = tokenizer_json
        self.max_length = int(max_length)
        self.report_key = report_key
        self._tokenizer = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_tokenizer"] = None  # rebuilt from JSON in each worker
        return state

    def map(self, index: int) -> dict:
        if self._tokenizer is None:
            self._tokenizer = text.tokenizer_from_json(self.tokenizer_json)
        index = int(index) % len(self.pairs)
        image, meta = self.pairs.decode(self.pairs[index])
        if image.ndim != 2:
            raise ValueError(
                f"pair {index} of the {self.pairs.name!r} split has a {image.ndim}-D image "
                f"{image.shape}; image-report pairs need 2-D images"
            )
        ids, mask = text.encode_report(
            self._tokenizer, text.preprocess_report(meta[self.report_key]), self.max_length
        )
        return {"image": image, "meta": meta, "index": index, "text_ids": ids, "text_mask": mask}


class PairAugment(grain.transforms.RandomMap):
    """{"image", "meta", "index", "text_ids", "text_mask"} -> the batch element:
    random resized crop to image_size (no flip), normalisation, text passed on."""

    def __init__(
        self,
        image_size: int,
        *,
        crop_scale=(0.6, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        mean: float,
        std: float,
        channels: int = 1,
    ):
        self.image_size = int(image_size)
        self._crop = transforms.MultiScaleRandomCrop(
            (self.image_size,),
            crop_scale=crop_scale,
            crop_ratio=crop_ratio,
            hflip=False,  # a flip would swap left and right findings
            mean=mean,
            std=std,
            channels=channels,
        )

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        out = self._crop.random_map(element, rng)
        return {
            "image": out[f"image_{self.image_size}"],
            "text_ids": element["text_ids"],
            "text_mask": element["text_mask"],
            "pair_index": np.int32(element["index"]),
        }


# --------------------------------------------------------------- datasets


def make_pairs_train_dataset(
    data_cfg: Any,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
) -> grain.IterDataset:
    """Infinite, shuffled, augmented image-report batches for this process
    (module docstring: batch contents). B = global_batch_size // process_count.
    The iterator's state is {"global_position": n} (pipeline.ResumableBatches):
    the same batches after a restore whatever the worker or process count."""
    pipeline.check_batching(data_cfg, global_batch_size, seed, process_index, process_count)
    pairs = pair_split(data_cfg, split)
    pipeline.check_split_fills_batch(len(pairs), global_batch_size, split, "pairs")
    tokenizer = ensure_tokenizer(data_cfg)
    order_seed, augment_seed = pipeline.stream_seeds(seed)
    read = _ReadPair(
        pairs,
        tokenizer.to_str(),
        _max_text_length(data_cfg),
        str(_get(data_cfg, "report_key", "report")),
    )
    augment = PairAugment(
        image_size,
        crop_scale=tuple(_get(data_cfg, "crop_scale", (0.6, 1.0))),
        crop_ratio=tuple(_get(data_cfg, "crop_ratio", (3 / 4, 4 / 3))),
        mean=float(data_cfg.norm_mean),
        std=float(data_cfg.norm_std),
        channels=int(_get(data_cfg, "channels", 1)),
    )
    stream = (
        grain.MapDataset.range(len(pairs))
        .shuffle(seed=order_seed)
        .repeat()
        .map(read)
        .random_map(augment, seed=augment_seed)
    )
    return pipeline.batched(
        stream,
        data_cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def _max_text_length(data_cfg: Any) -> int:
    length = int(data_cfg.max_text_length)
    if length < 3:
        raise ValueError(f"max_text_length must be >= 3 ([CLS], a token, [SEP]), got {length}")
    return length


def num_pairs(data_cfg: Any, split: str = "train") -> int:
    """Pairs in one epoch of `split` (for epoch-based schedules)."""
    return len(pair_split(data_cfg, split))


# -------------------------------------------------------------- evaluation


def _label_layout(data_cfg: Any, metas: Sequence[dict]) -> tuple[str | None, tuple[str, ...]]:
    """(meta key, label names) of the finding labels, or (None, ())."""
    key = _get(data_cfg, "label_key", None)
    if key is None:
        for candidate in ("finding_labels", "chexpert"):
            if metas and all(candidate in m for m in metas):
                key = candidate
                break
        else:
            return None, ()
    if key == "finding_labels":
        names = cxr_phantom.LABEL_NAMES
    elif key == "chexpert":
        from input_pipeline.builders.mimic_cxr import CHEXPERT_LABELS  # pylint: disable=g-import-not-at-top

        names = CHEXPERT_LABELS
    else:
        names = tuple(f"{key}[{i}]" for i in range(len(np.atleast_1d(metas[0][key]))))
    return key, tuple(names)


def _positive(value: Any, key: str, pair: int, width: int) -> np.ndarray:
    """A label vector as 0/1 (positive = exactly 1: CheXpert's -1 "uncertain"
    and 0 both count as absent)."""
    vector = np.atleast_1d(np.asarray(value))
    if vector.shape != (width,):
        raise ValueError(
            f"pair {pair}: label {key!r} has shape {vector.shape}, expected ({width},)"
        )
    return (vector == 1).astype(np.int32)


class EvalPairs(Sequence):
    """Every pair of a split once, in pair order, as fixed-size batches.

    batches[i]: {"image": float32 [B, S, S, C] (the whole image resized, no
    randomness), "text_ids": int32 [B, L], "text_mask": int32 [B, L],
    "finding_labels": int32 [B, K], "pair_index": int32 [B] (-1 on padding),
    "report": object [B] (the raw report strings, for figures; "" on padding),
    "valid": bool [B]}; padding rows are zeros ([PAD] text, mask 0).

    Whole-split attributes (unpadded, pair order): `reports` (raw strings, for
    figures), `texts` (preprocessed), `text_ids`, `text_mask`,
    `finding_labels` [N, K] with `label_names`, `finding_groups` [N] (pairs
    with equal label vectors share a group: "same findings" retrieval counts a
    hit in the query's group), `record_indices`.
    """

    def __init__(self, batches: eval_batches.EvalBatches, **attributes):
        self._batches = batches
        self.reports: list[str] = attributes["reports"]
        self.texts: list[str] = attributes["texts"]
        self.text_ids: np.ndarray = attributes["text_ids"]
        self.text_mask: np.ndarray = attributes["text_mask"]
        self.finding_labels: np.ndarray = attributes["finding_labels"]
        self.label_names: tuple[str, ...] = attributes["label_names"]
        self.record_indices: np.ndarray = attributes["record_indices"]
        if self.label_names:
            _, groups = np.unique(self.finding_labels, axis=0, return_inverse=True)
            self.finding_groups = groups.reshape(-1).astype(np.int32)
        else:  # no labels: every pair is its own group
            self.finding_groups = np.arange(len(self.reports), dtype=np.int32)

    @property
    def num_pairs(self) -> int:
        return len(self.reports)

    @property
    def batch_size(self) -> int:
        return self._batches.batch_size

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        batch = self._batches[i]
        batch["pair_index"] = batch.pop("index")
        batch["report"] = np.asarray(
            [self.reports[j] if j >= 0 else "" for j in batch["pair_index"]], dtype=object
        )
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def images(self) -> np.ndarray:
        """float32 [N, S, S, C]: every pair's normalised image, unpadded."""
        return np.concatenate([b["image"][b["valid"]] for b in self])

    def recall_at_1_ceiling(self) -> float:
        """Best expected strict R@1 (either direction) on this pool for a model
        that sees every labelled finding: 1/k for a pair whose finding group
        has k members (cxr_phantom.recall_at_1_ceiling)."""
        return cxr_phantom.recall_at_1_ceiling(self.finding_groups)

    def __repr__(self) -> str:
        return f"EvalPairs({self.num_pairs} pairs, {len(self)} x {self.batch_size})"


def make_eval_pairs(
    data_cfg: Any, split: str = "val", *, image_size: int, batch_size: int = 64, tokenizer=None
) -> EvalPairs:
    """Every pair of `split` once (see EvalPairs). Decodes and resizes the split
    now and keeps it in memory as integer pixels; build it once per run.
    tokenizer: defaults to ensure_tokenizer(data_cfg)."""
    resize = eval_batches.eval_resize(data_cfg, image_size=image_size, batch_size=batch_size)
    if tokenizer is None:
        tokenizer = ensure_tokenizer(data_cfg)
    report_key = str(_get(data_cfg, "report_key", "report"))
    pairs = pair_split(data_cfg, split)
    pixels, max_values, metas = eval_batches.resize_split(
        (_decode_2d(pairs, i) for i in range(len(pairs))), resize
    )
    reports = [m[report_key] for m in metas]
    texts = [text.preprocess_report(r) for r in reports]
    ids, mask = text.encode_reports(tokenizer, texts, _max_text_length(data_cfg))
    key, names = _label_layout(data_cfg, metas)
    if key is None:
        labels = np.zeros((len(metas), 0), np.int32)
    else:
        missing = [i for i, m in enumerate(metas) if key not in m]
        if missing:
            raise KeyError(
                f"{len(missing)} pairs of {split!r} (e.g. pair {missing[0]}) have no label "
                f"{key!r}; set label_key to a key every record has, or None"
            )
        labels = np.stack([_positive(m[key], key, i, len(names)) for i, m in enumerate(metas)])
    batches = eval_batches.EvalBatches(
        pixels,
        max_values,
        {"text_ids": ids, "text_mask": mask, "finding_labels": labels},
        batch_size=batch_size,
        resize=resize,
    )
    return EvalPairs(
        batches,
        reports=reports,
        texts=texts,
        text_ids=ids,
        text_mask=mask,
        finding_labels=labels,
        label_names=names,
        record_indices=pairs.record_indices.copy(),
    )


def _decode_2d(pairs: PairSplit, i: int) -> tuple[np.ndarray, dict]:
    image, meta = pairs.decode(pairs[i])
    if image.ndim != 2:
        raise ValueError(f"pair {i} of {pairs.name!r} has a {image.ndim}-D image {image.shape}")
    return image, meta


def measure_pair_intensity_stats(
    data_cfg: Any, num_images: int = 256, split: str = "train"
) -> tuple[float, float]:
    """Mean and std of [0, 1]-scaled pixels over the first pairs of `split`: the
    values for norm_mean / norm_std."""
    pairs = pair_split(data_cfg, split)
    total = total_sq = count = 0.0
    for i in range(min(num_images, len(pairs))):
        image, meta = pairs.decode(pairs[i])
        x = image.astype(np.float64) / transforms.intensity_max(image, meta)
        total += x.sum()
        total_sq += np.square(x).sum()
        count += x.size
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
