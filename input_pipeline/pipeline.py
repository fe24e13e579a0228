"""Pretraining and figure input pipelines built on grain's Dataset API.

make_pretrain_dataset graph (per process):

  MapDataset.source(raw records)       sources.resolve(data, pretrain_split(data))
    .map_with_index(decode)             {"image", "meta", "index"}
    .shuffle(s0)                        global permutation of the records
    .repeat()                           infinite; epoch e reshuffled with s0 + e
    .random_map(augment, seed=s1)       rng seeded by GLOBAL stream position
  -- ResumableBatches, from global stream position n (0, or a checkpoint) --
    this host's block of every batch    + "example_id" (the stream position)
    .batch(global // process_count)     dict of stacked arrays
    .to_iter_dataset(ReadOptions)       background threads, bounded buffer
    .mp_prefetch(num_workers)           spawned worker processes (if > 0)

Shuffle before repeat, as grain's docs recommend: ShuffleMapDataset folds the
epoch number into its seed for indices past one epoch, so every epoch is a
fresh permutation and epochs never mix. (Shuffling after an infinite repeat
would have to permute an unbounded index range across epoch boundaries.)

The augmentation is applied before the per-process slice, so its rng depends
on the global stream position: a record is augmented identically whatever the
process count, and hosts never share augmentation draws (after the slice every
host's k-th element would get the same rng).

Global batch g is stream positions [g*B, (g+1)*B); process p gets the
contiguous block [g*B + p*b, g*B + (p+1)*b) of it (b = B / P), so per-process
batches are disjoint, cover every record once per epoch (when B divides the
record count), and, stacked in process order as the batch-sharded global array
stacks them, are exactly the one-process batch, row for row. Every element
carries "example_id", its global stream position (uint32, wrapping after 2**32
examples): the device-side randomness of an example (its mask, its drop path)
is keyed by it, so it too is the same whatever the process count.

Images leave the workers as uint16 [B, S, S, 1] unit-quantised values
(transforms.quantize_unit) and are normalised in the jitted train step
(input_pipeline.dequantize). mp_prefetch hands every batch to the trainer in a
fresh shared-memory segment that the worker faults in page by page (~3 us per
4 KiB page on a 2-core VM): at 224 px ~120 us per record for float32, ~55 us
for uint16, against ~700 us for reading, decoding and augmenting the record.
(Measured there, 448 px records to 224, two workers: ~1,180 records/s per
worker instead of ~1,030.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from input_pipeline import sources, tfds_source, transforms
from input_pipeline.record_source import RecordSource


def default_data_config() -> ml_collections.ConfigDict:
    """Data settings every pretraining config starts from (phantom, 448 px)."""
    c = ml_collections.ConfigDict()
    # Where the records come from (input_pipeline/sources.py, docs/data_sources.md):
    # "phantom" | "cxr_phantom" (rendered once under dir), "prepared" (a
    # tools/prepare_data.py root: dir/train, dir/val, dir/test), "shards" (dir is
    # a folder or glob of *.array_record shards, no splits), "tfds" (data.tfds).
    c.source = "phantom"
    c.dir = "data"
    # The split pretraining reads; None = the layout's default: every record of a
    # phantom or shards folder, "train" of a prepared root or TFDS dataset.
    c.split = ml_collections.FieldReference(None, field_type=str)
    # Phantoms ("phantom", "cxr_phantom"): rendered once under dir, in a folder
    # named by these three.
    c.phantom_num_images = 2048
    c.phantom_size = 448
    c.phantom_seed = 0
    # Phantoms' train, val, test fractions when a split is asked for
    # (sources.phantom_split_indices).
    c.phantom_split = (0.8, 0.1, 0.1)
    # Phantoms: also ingest pydicom-data's two real CR radiographs (through
    # tools/prepare_data.py's engine) and train on them beside the phantom.
    c.pydicom_cr = False
    c.tfds = tfds_source.default_tfds_config()  # source "tfds": dataset, splits, features
    # A per-site "scanner" applied to every image as it is decoded (scanner.py,
    # through sources.resolve, so every pipeline sees it): in [0, 1] units,
    # offset + contrast * x**gamma, then resolution (< 1: down- and up-sampled by
    # that factor, same size), a Gaussian blur of blur_sigma px and Gaussian noise
    # of std `noise`, seeded per record. These defaults are the identity (off).
    c.scanner = ml_collections.ConfigDict(
        dict(gamma=1.0, noise=0.0, blur_sigma=0.0, resolution=1.0, contrast=1.0, offset=0.0)
    )
    c.crop_scale = (0.2, 1.0)  # area fraction of the random resized crop
    c.crop_ratio = (3 / 4, 4 / 3)  # aspect ratio range, sampled log-uniformly
    c.hflip = True
    # Applied after scaling pixels to [0, 1] (see transforms.intensity_max).
    # Phantom values, from measure_intensity_stats over 256 images (448 px,
    # seed 0): 0.193 / 0.219. Measure them again for a real dataset.
    c.norm_mean = 0.19
    c.norm_std = 0.22
    c.channels = 1  # 1, or 3 to replicate gray for RGB-pretrained encoders
    # > 0: train on lesion-centred crops (records with meta "lesion_center" and
    # "lesion_radius_px", e.g. the phantom) of side max(2 x roi_context x radius,
    # roi_min_px) px, instead of whole images (transforms.roi_crop).
    c.roi_context = 0.0
    c.roi_min_px = 32
    c.label_keys = ()  # meta keys to carry as batch["label_{key}"]
    c.num_workers = 2  # prefetch processes; 0 = everything in this process
    c.num_threads = 2  # batch-building threads per process
    c.prefetch_buffer_size = 2  # batches buffered per process
    return c


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    # ConfigDict, FrozenConfigDict, dataclasses, SimpleNamespace alike.
    return getattr(cfg, key, default)


def make_source(data_cfg: Any) -> RecordSource:
    """The records pretraining reads: sources.resolve at sources.pretrain_split
    (rendering a phantom the first time)."""
    return sources.resolve(data_cfg, sources.pretrain_split(data_cfg))


def _check_scales_fit(data_cfg: Any, src: RecordSource, scales: tuple[int, ...]) -> None:
    if _get(data_cfg, "source") in sources.PHANTOMS:
        side, what = int(data_cfg.phantom_size), "phantom_size"
    else:
        # Records may differ in size; the first one is a cheap sanity check.
        side, what = min(src[0]["image"].shape), "the first record's short side"
    roi_context, roi_min_px = transforms.roi_settings(data_cfg)
    if roi_context:  # lesion crops: at least roi_min_px, but may be that small
        side, what = roi_min_px, "data.roi_min_px (the smallest lesion crop)"
    if scales[-1] > side:
        raise ValueError(
            f"largest scale {scales[-1]} exceeds {what} ({side}): targets must "
            "come from real pixels, not upsampling"
        )


def _transform_kwargs(data_cfg: Any) -> dict:
    return dict(
        mean=float(data_cfg.norm_mean),
        std=float(data_cfg.norm_std),
        channels=int(_get(data_cfg, "channels", 1)),
        label_keys=tuple(_get(data_cfg, "label_keys", ()) or ()),
    )


def make_pretrain_dataset(
    data_cfg: Any,
    *,
    scales: Sequence[int],
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches for this process.

    Each element: {"image_{s}": uint16 [B, s, s, 1] per scale s, unit-quantised
    (transforms.quantize_unit: [0, 1] intensities times 65535), "index": int32 [B]
    (record index in the source), "label_{k}": [B, ...] per label key}, with
    B = global_batch_size // process_count. The trainer's step turns the images
    into normalised float32 [B, s, s, data_cfg.channels] on the device
    (input_pipeline.dequantize.dequantize_images). Its iterator supports
    get_state/set_state (orbax: grain.checkpoint.CheckpointSave/Restore).
    """
    scales = transforms.check_scales(scales)
    check_batching(data_cfg, global_batch_size, seed, process_index, process_count)

    src = make_source(data_cfg)
    _check_scales_fit(data_cfg, src, scales)
    if len(src) < global_batch_size:
        raise ValueError(f"{len(src)} records cannot fill a global batch of {global_batch_size}")
    records_ds = _record_stream(data_cfg, src, scales, seed)
    return batched(
        records_ds,
        data_cfg,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def check_batching(
    data_cfg: Any, global_batch_size: int, seed: int, process_index: int, process_count: int
) -> None:
    """Argument checks shared by every batched training pipeline."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}, {process_count}"
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
    _check_seed(seed)
    if int(_get(data_cfg, "num_workers", 0)) < 0:
        raise ValueError(f"num_workers must be >= 0, got {_get(data_cfg, 'num_workers')}")


def check_split_fills_batch(count: int, global_batch_size: int, split: str, unit: str) -> None:
    """A training split must hold at least one global batch of `unit`s."""
    if count < global_batch_size:
        raise ValueError(
            f"the {split!r} split has {count} {unit}, too few for a global batch of "
            f"{global_batch_size}"
        )


def stream_seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for a training stream's record order and its augmentation."""
    order_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    return order_seed, augment_seed


def batched(
    stream: grain.MapDataset,
    data_cfg: Any,
    *,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> ResumableBatches:
    """An infinite stream of augmented records (element n = global stream
    position n) -> this process's resumable batches, with the configured
    read threads, buffer and prefetch worker processes."""
    buffer = int(_get(data_cfg, "prefetch_buffer_size", 2))
    # ReadOptions defaults (16 threads, 500 elements) are sized for small
    # records; our elements are whole batches, so bound the buffer explicitly.
    read_options = grain.ReadOptions(
        num_threads=int(_get(data_cfg, "num_threads", 2)), prefetch_buffer_size=buffer
    )
    mp_options = None
    num_workers = int(_get(data_cfg, "num_workers", 0))
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        mp_options = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=buffer
        )
    return ResumableBatches(
        stream,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        read_options=read_options,
        multiprocessing_options=mp_options,
    )


def make_record_dataset(data_cfg: Any, *, scales: Sequence[int], seed: int) -> grain.MapDataset:
    """The infinite stream of augmented records that make_pretrain_dataset batches:
    element n is global stream position n (before the per-process slice), the
    same element whatever the batch size, process or worker count. For timing and
    inspecting the per-record work without batching or prefetch processes."""
    scales = transforms.check_scales(scales)
    _check_seed(seed)
    src = make_source(data_cfg)
    _check_scales_fit(data_cfg, src, scales)
    return _record_stream(data_cfg, src, scales, seed)


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")


def _record_stream(
    data_cfg: Any, src: RecordSource, scales: tuple[int, ...], seed: int
) -> grain.MapDataset:
    augment = transforms.MultiScaleRandomCrop(
        scales,
        crop_scale=tuple(data_cfg.crop_scale),
        crop_ratio=tuple(data_cfg.crop_ratio),
        hflip=bool(data_cfg.hflip),
        quantize=True,
        **_transform_kwargs(data_cfg),
    )
    shuffle_seed, augment_seed = stream_seeds(seed)
    return (
        _decoded_records(src, *transforms.roi_settings(data_cfg))
        .shuffle(seed=shuffle_seed)
        .repeat()
        .random_map(augment, seed=augment_seed)
    )


class _DecodeRecord:
    """(index, raw record) -> the element `src[index]` gives ({"image", "meta",
    "index"}), the image cut to its lesion when roi_context > 0 (transforms.roi_crop)."""

    def __init__(self, decoder, num_records: int, roi_context: float = 0.0, roi_min_px: int = 32):
        self.decoder = decoder
        self.num_records = num_records
        self.roi_context, self.roi_min_px = roi_context, roi_min_px

    def __call__(self, index: int, data) -> dict:
        image, meta = self.decoder.decode(data)
        if self.roi_context:
            image = transforms.roi_crop(
                image, meta, int(index) % self.num_records, self.roi_context, self.roi_min_px
            )
        # Indices past the first epoch reach here unreduced (repeat and shuffle
        # leave the modulo to the source).
        return {"image": image, "meta": meta, "index": int(index) % self.num_records}


def _decoded_records(
    src: RecordSource, roi_context: float = 0.0, roi_min_px: int = 32
) -> grain.MapDataset:
    """`src`'s elements, decoded in a map step rather than by the source.

    grain meters every read from a source by walking the element's tree; on raw
    bytes that is a len(), on a decoded element (image + a meta dict of a dozen
    or more leaves) it costs ~45 us per record, a twentieth of a worker's time.
    """
    raw = src.records
    return grain.MapDataset.source(raw).map_with_index(
        _DecodeRecord(src.decoder, len(raw), roi_context, roi_min_px)
    )


def num_records(data_cfg: Any) -> int:
    """Records in one epoch of the configured source (for epoch-based schedules)."""
    return len(make_source(data_cfg))


def _init_worker(worker_index: int, worker_count: int) -> None:
    # Each prefetch process is one unit of parallelism; OpenCV's own thread pool
    # in every worker would only oversubscribe the cores.
    del worker_index, worker_count
    import cv2  # pylint: disable=g-import-not-at-top

    cv2.setNumThreads(1)


class ResumableBatches(grain.IterDataset):
    """Per-process batches of an infinite record stream, resumable anywhere.

    The iterator state is one number, the count of global-stream records all
    processes have consumed together ({"global_position": n}). It is the same
    on every host and means the same thing whatever the number of prefetch
    workers, processes, or even the batch size, so a checkpoint restores
    exactly after any of those change (the trainer writes it once, from the
    first process). (grain's own state for an mp_prefetch pipeline records
    per-worker positions and cannot be restored into a different worker
    count.) On restore the grain graph below is rebuilt to start at n:

      _ProcessBlocks(records, n, ...)     this process's block of each batch
        .batch(global_batch_size // process_count, drop_remainder=True)
        .to_iter_dataset(read_options)
        .mp_prefetch(multiprocessing_options)     # if given
    """

    def __init__(
        self,
        records_ds: grain.MapDataset,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        read_options: grain.ReadOptions,
        multiprocessing_options: grain.MultiprocessingOptions | None,
    ):
        super().__init__()  # no parents: the graph is built per iterator, per start
        self.records_ds = records_ds
        self.global_batch_size = global_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.read_options = read_options
        self.multiprocessing_options = multiprocessing_options

    def build(self, start: int) -> grain.IterDataset:
        """This process's batches of the global stream from record `start` on."""
        ds = _ProcessBlocks(self.records_ds, start, self.global_batch_size,
                            self.process_index, self.process_count)
        ds = ds.batch(self.global_batch_size // self.process_count, drop_remainder=True)
        ds = ds.to_iter_dataset(self.read_options)
        if self.multiprocessing_options is not None:
            ds = ds.mp_prefetch(self.multiprocessing_options, worker_init_fn=_init_worker)
        return ds

    def __iter__(self) -> grain.DatasetIterator:
        return _ResumableBatchIterator(self)

    def __str__(self) -> str:
        return (
            f"ResumableBatches(global_batch_size={self.global_batch_size}, "
            f"process={self.process_index}/{self.process_count})"
        )


class _ProcessBlocks(grain.MapDataset):
    """One process's rows of every global batch of an infinite record stream,
    each tagged with its stream position as "example_id".

    Element j is stream position start + (j // b) * B + p * b + j % b (B the
    global batch, b = B / P its rows per process, p this process): batching b
    consecutive elements gives process p's contiguous block of each batch."""

    def __init__(self, stream: grain.MapDataset, start: int, global_batch_size: int,
                 process_index: int, process_count: int):
        super().__init__(stream)
        self._start, self._global = start, global_batch_size
        self._rows = global_batch_size // process_count
        self._offset = process_index * self._rows

    def __len__(self) -> int:
        return len(self._parent)  # the stream is infinite (repeat())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._rows)
        position = self._start + batch * self._global + self._offset + row
        return {**self._parent[position], "example_id": np.uint32(position % 2**32)}

    def __str__(self) -> str:
        return f"_ProcessBlocks(start={self._start}, rows={self._rows}, offset={self._offset})"


class _ResumableBatchIterator(grain.DatasetIterator):
    """Iterator of ResumableBatches; see there for the state format."""

    def __init__(self, ds: ResumableBatches):
        super().__init__()
        self._ds = ds
        self._position = 0
        self._inner: grain.DatasetIterator | None = None

    def _iterator(self) -> grain.DatasetIterator:
        if self._inner is None:
            self._inner = iter(self._ds.build(self._position))
        return self._inner

    def __next__(self):
        self._assert_not_closed()
        batch = next(self._iterator())
        self._position += self._ds.global_batch_size
        return batch

    def get_state(self) -> dict[str, int]:
        return {"global_position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        position = int(state["global_position"])
        if position < 0:
            raise ValueError(f"global_position must be >= 0, got {position}")
        if position != self._position:
            self._close_inner()  # rebuilt from `position` on the next call
            self._position = position

    def start_prefetch(self) -> None:
        # Start workers now (e.g. while the model restores), not at first next().
        self._iterator().start_prefetch()

    def _close_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __str__(self) -> str:
        return f"_ResumableBatchIterator(global_position={self._position})"


def _ensure_absl_flags_parsed() -> None:
    # grain's worker start-up reads absl flags (--grain_*); outside an absl app
    # (pytest, notebooks, plain scripts) they are unparsed and reading raises.
    # Defaults are what such callers want; app.run() still parses argv later.
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_fixed_batch(
    data_cfg: Any, *, scales: Sequence[int], num_images: int, seed: int
) -> dict[str, np.ndarray]:
    """The first `num_images` records (source order), full image resized to each
    scale, no augmentation: the same images in every run, for figures. Same format
    as make_pretrain_dataset's batches (uint16 unit-quantised images; normalise
    them with input_pipeline.dequantize.dequantize_images).

    `seed` is accepted for API symmetry with make_pretrain_dataset; the batch is
    deterministic and does not depend on it.
    """
    del seed
    scales = transforms.check_scales(scales)
    src = make_source(data_cfg)
    _check_scales_fit(data_cfg, src, scales)
    if not 1 <= num_images <= len(src):
        raise ValueError(f"num_images must be in [1, {len(src)}], got {num_images}")
    resize = transforms.MultiScaleResize(scales, quantize=True, **_transform_kwargs(data_cfg))
    roi_context, roi_min_px = transforms.roi_settings(data_cfg)
    elements = []
    for i in range(num_images):
        element = src[i]
        if roi_context:
            element["image"] = transforms.roi_crop(
                element["image"], element["meta"], i, roi_context, roi_min_px
            )
        elements.append(resize.map(element))
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def measure_intensity_stats(data_cfg: Any, num_images: int = 64) -> tuple[float, float]:
    """Mean and std of [0, 1]-scaled pixels over the first records: the values
    to put in norm_mean / norm_std for a new dataset."""
    src = make_source(data_cfg)
    total = total_sq = count = 0.0
    for i in range(min(num_images, len(src))):
        e = src[i]
        x = e["image"].astype(np.float64) / transforms.intensity_max(e["image"], e["meta"])
        total += x.sum()
        total_sq += np.square(x).sum()
        count += x.size
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
