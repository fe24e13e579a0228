"""Datasets rendered or ingested once per data directory and reused: the procedural
phantoms' shard caches (one `Phantom` declaration each, in PHANTOMS) and the
demo's two real CR radiographs.

Kept apart from the source resolver (sources.py) so that the spawned processes
that render a phantom import only this module, records.py and the phantom's
renderer: no grain, no JAX, no TFDS. For the same reason a declaration names
its render function as "module:function", imported only when rendering.

Adding a phantom: a module with a module-level `render(index, seed, size) ->
(image, meta)` or `(image, meta, {name: mask})` (spawned workers pickle it by
name), then one line in PHANTOMS.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import multiprocessing
import os

from input_pipeline import records

_MARKER = "_COMPLETE.json"


def _init_render_worker() -> None:
    # One process per core already; OpenCV's thread pool on top oversubscribes.
    import cv2  # pylint: disable=g-import-not-at-top

    cv2.setNumThreads(1)


def _render(args):
    # Module-level so a spawned pool can pickle it. (image, meta) or, for
    # phantoms with masks, (image, meta, {name: mask}): records.write_shards takes both.
    render_fn, index, seed, size = args
    return render_fn(index, seed, size)


def ensure_rendered_dataset(
    out_dir: str,
    render_fn,
    *,
    num_images: int,
    seed: int,
    size: int,
    prefix: str,
    num_shards: int = 4,
    num_procs: int | None = None,
    parallel_from: int = 64,
    min_size: int = 1,
) -> list[str]:
    """Renders `render_fn(index, seed, size) -> (image, meta)` for every index into
    shards `out_dir/{prefix}-*.array_record`, once. Records are distributed
    round-robin over the shards (records.write_shards).

    A marker file is written last; if it exists the shards are reused untouched,
    otherwise (first call, or a generation that was killed) everything is
    regenerated. Concurrent generators (several hosts on a shared file system) are
    safe: rendering is deterministic and every file appears by atomic rename.
    `render_fn` must be module-level (spawned workers pickle it). num_procs:
    rendering processes; None = one per core (at most 8) from `parallel_from`
    images on, else 1. The result does not depend on it: images are rendered by
    index and written in index order. min_size: the smallest side `render_fn`
    draws, checked before anything is started.
    """
    if num_images < 1 or size < min_size or num_shards < 1:
        raise ValueError(
            f"need num_images >= 1, size >= {min_size}, num_shards >= 1, got {num_images}, "
            f"{size}, {num_shards}"
        )
    marker = os.path.join(out_dir, _MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        paths = [os.path.join(out_dir, p) for p in done["shards"]]
        if all(os.path.exists(p) for p in paths):
            return paths
        # Someone deleted shards after completion: fall through and regenerate.

    if num_procs is None:
        num_procs = min(os.cpu_count() or 1, 8) if num_images >= parallel_from else 1
    jobs = ((render_fn, i, seed, size) for i in range(num_images))
    if num_procs > 1:
        with multiprocessing.get_context("spawn").Pool(num_procs, _init_render_worker) as pool:
            rendered = pool.imap(_render, jobs, chunksize=4)
            paths = records.write_shards(rendered, out_dir, prefix, num_shards, overwrite=True)
    else:
        paths = records.write_shards(
            map(_render, jobs), out_dir, prefix, num_shards, overwrite=True
        )

    info = {
        "num_images": num_images,
        "seed": seed,
        "size": size,
        "num_shards": num_shards,
        "shards": [os.path.basename(p) for p in paths],
    }
    records.write_completion_marker(marker, info)
    return paths


@dataclasses.dataclass(frozen=True)
class Phantom:
    """A procedural dataset, rendered into shards once per data directory.

    Its cache is `data_dir/{name}_{size}_{seed}_{num_images}/` holding
    `{shard_prefix}-*.array_record` shards: existing data directories hold these
    names, so changing either re-renders every cache. `ensure` and `shards_dir`
    take (data_dir, *, num_images, seed, size), from the data config's `dir`,
    `phantom_num_images`, `phantom_seed` and `phantom_size`.
    """

    name: str  # the data.source name, and the cache folder's prefix
    render: str  # "module:function", (index, seed, size) -> (image, meta)
    what: str  # for messages
    shard_prefix: str = ""  # "" = name
    min_size: int = 1  # the smallest image side `render` draws
    parallel_from: int = 64  # images from which rendering uses a process pool by default

    def shards_dir(self, data_dir: str, *, num_images: int, seed: int, size: int) -> str:
        """The folder `ensure` writes to."""
        return os.path.join(os.fspath(data_dir), f"{self.name}_{size}_{seed}_{num_images}")

    def ensure(
        self,
        data_dir: str,
        *,
        num_images: int,
        seed: int,
        size: int,
        num_shards: int = 4,
        num_procs: int | None = None,
    ) -> list[str]:
        """Renders the phantom into `shards_dir(...)` once and returns the shard
        paths (generation, reuse and concurrency: ensure_rendered_dataset)."""
        module, function = self.render.split(":")
        # Looked up at every call, not cached: tests stand in for a renderer.
        render_fn = getattr(importlib.import_module(module), function)
        return ensure_rendered_dataset(
            self.shards_dir(data_dir, num_images=num_images, seed=seed, size=size),
            render_fn,
            num_images=num_images,
            seed=seed,
            size=size,
            prefix=self.shard_prefix or self.name,
            num_shards=num_shards,
            num_procs=num_procs,
            parallel_from=self.parallel_from,
            min_size=self.min_size,
        )


# The procedural datasets `data.source` can name (docs/data_sources.md).
PHANTOMS: dict[str, Phantom] = {
    p.name: p
    for p in (
        Phantom("phantom", "input_pipeline.phantom:render_phantom", "mammography phantom"),
        Phantom(
            "cxr_phantom",
            "input_pipeline.cxr_phantom:render_cxr",
            "chest X-ray phantom",
            shard_prefix="cxr",
            min_size=32,
            parallel_from=256,
        ),
        Phantom(
            "cardiac_phantom",
            "input_pipeline.cardiac_phantom:render_cardiac",
            "cardiac cine-MRI phantom",
            min_size=64,
            parallel_from=2048,
        ),
        Phantom(
            "brain_phantom",
            "input_pipeline.brain_phantom:render_brain",
            "brain tumour MRI phantom",
            min_size=64,
            parallel_from=1024,
        ),
        Phantom(
            "hand_phantom",
            "input_pipeline.hand_phantom:render_hand",
            "hand radiograph phantom (37 landmarks)",
            min_size=64,
            parallel_from=256,
        ),
        Phantom(
            "natural_photos",
            "input_pipeline.natural_photos:render_photo",
            "natural-photograph crops (scikit-image's sample photographs)",
            min_size=16,
            parallel_from=1024,
        ),
    )
}

# The mammography phantom's cache by the names tools and tests call it.
ensure_phantom_dataset = PHANTOMS["phantom"].ensure
phantom_shards_dir = PHANTOMS["phantom"].shards_dir


# Two real computed-radiography images shipped by the pydicom-data package
# (MIT licence), stored lossless JPEG 2000: the demo ingests them with the same
# engine as users' DICOM folders, so the main job exercises the real-data path.
PYDICOM_CR_FILES = ("RG1_J2KR.dcm", "RG3_J2KR.dcm")
# The data are public, so a fixed salt is fine (and keeps the demo quiet).
_PUBLIC_SALT = "pydicom-data-public-examples"


def pydicom_data_dir() -> str:
    import data_store  # pylint: disable=g-import-not-at-top  (the pydicom-data package)

    return os.path.join(os.path.dirname(data_store.__file__), "data")


def ensure_pydicom_cr_dataset(data_dir: str, *, size: int) -> list[str]:
    """Ingests pydicom-data's two CR radiographs into `data_dir/pydicom_cr_{size}/`
    once (resized with aspect kept and padded to `size`), returns their shards.

    Rerunning is cheap: the engine finds its completed shards and skips them.
    """
    from input_pipeline.ingest import engine  # pylint: disable=g-import-not-at-top
    from input_pipeline.ingest.manifest import ManifestRow  # pylint: disable=g-import-not-at-top

    rows = [
        ManifestRow(
            path=os.path.join(pydicom_data_dir(), name),
            patient_id=f"pydicom-data/{name}",
            split="train",
            source=f"pydicom-data:{name}",
        )
        for name in PYDICOM_CR_FILES
    ]
    out_dir = os.path.join(os.fspath(data_dir), f"pydicom_cr_{size}")
    summary = engine.ingest(
        rows, out_dir, size=size, workers=1, salt=_PUBLIC_SALT, progress=False, log=lambda _: None
    )
    paths = records.list_shards(os.path.join(out_dir, "train"))
    if summary.to_json().get("rejected"):
        raise RuntimeError(
            f"pydicom-data CR images were rejected on ingestion (see {out_dir}/rejected.jsonl): "
            "reinstall pydicom-data and the pylibjpeg plugins (pip install -e .)"
        )
    return paths
