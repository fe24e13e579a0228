"""Datasets rendered or ingested once per data directory and reused: the procedural
phantoms' shard caches and the demo's two real CR radiographs.

Kept apart from the source resolver (sources.py) so that the spawned processes
that render a phantom import only this module, records.py and the phantom's
renderer: no grain, no JAX, no TFDS.
"""

from __future__ import annotations

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
    # Module-level so a spawned pool can pickle it.
    render_fn, index, seed, size = args
    image, labels = render_fn(index, seed, size)
    return image, labels


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
) -> list[str]:
    """Renders `render_fn(index, seed, size) -> (image, meta)` for every index into
    shards `out_dir/{prefix}-*.array_record`, once.

    A marker file is written last; if it exists the shards are reused untouched,
    otherwise (first call, or a generation that was killed) everything is
    regenerated. Concurrent generators (several hosts on a shared file system) are
    safe: rendering is deterministic and every file appears by atomic rename.
    `render_fn` must be module-level (spawned workers pickle it). num_procs:
    rendering processes; None = one per core (at most 8) from `parallel_from`
    images on, else 1. The result does not depend on it: images are rendered by
    index and written in index order.
    """
    if num_images < 1 or size < 1 or num_shards < 1:
        raise ValueError(
            f"need num_images, size, num_shards >= 1, got {num_images}, {size}, {num_shards}"
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
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, marker)
    return paths


def ensure_phantom_dataset(
    data_dir: str,
    *,
    num_images: int,
    seed: int,
    size: int,
    num_shards: int = 4,
    num_procs: int | None = None,
) -> list[str]:
    """Renders the mammography phantom into shards once per data directory, in
    `data_dir/phantom_{size}_{seed}_{num_images}/` (see ensure_rendered_dataset)."""
    # Lazy: the phantom module is only needed when rendering.
    from input_pipeline.phantom import render_phantom  # pylint: disable=g-import-not-at-top

    return ensure_rendered_dataset(
        phantom_shards_dir(data_dir, num_images=num_images, seed=seed, size=size),
        render_phantom,
        num_images=num_images,
        seed=seed,
        size=size,
        prefix="phantom",
        num_shards=num_shards,
        num_procs=num_procs,
    )


def phantom_shards_dir(data_dir: str, *, num_images: int, seed: int, size: int) -> str:
    return os.path.join(os.fspath(data_dir), f"phantom_{size}_{seed}_{num_images}")


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
