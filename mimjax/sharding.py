"""Device mesh, parameter sharding rules and activation constraints.

Mesh axes are `data` (pure data parallel), `fsdp` (data parallel with parameters
and optimizer state sharded) and `tensor` (Megatron-style model parallel). The
batch is split over `data` x `fsdp`.

A parameter's sharding comes from regex rules over its path ("encoder/transformer/
blocks/0/attn/query/kernel"): the first rule that matches gives a PartitionSpec for
the trailing dimensions (leading dims, e.g. a scanned layer axis, stay unsharded).
Axes that do not divide a dimension are dropped. FSDP is then applied generically:
any large array not yet sharded over `fsdp` gets it on its largest divisible free
dimension. Because optimizer-state paths end with the parameter path (".../mu/
encoder/.../kernel"), the same rules shard the whole train state.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Tensor parallelism for the transformer blocks (attention heads and MLP hidden units
# split over `tensor`); FSDP placement preferred on the other matrix dimension.
DEFAULT_RULES: tuple[tuple[str, tuple], ...] = (
    (r".*attn/(query|key|value)/kernel$", ("fsdp", "tensor")),
    (r".*attn/(query|key|value)/bias$", ("tensor",)),
    (r".*attn/out/kernel$", ("tensor", "fsdp")),
    (r".*mlp/fc1/kernel$", ("fsdp", "tensor")),
    (r".*mlp/fc1/bias$", ("tensor",)),
    (r".*mlp/fc2/kernel$", ("tensor", "fsdp")),
    (r".*", ()),
)

# Arrays smaller than this stay replicated under FSDP: sharding them saves nothing
# and costs a collective each.
FSDP_MIN_SIZE = 2**12


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh from {'data': n, 'fsdp': n, 'tensor': n, 'dcn_data': g}; one of the three
    axes may be -1 (the rest).

    The device order comes from `jax.make_mesh` (topology-aware on TPU). With
    `dcn_data` = g > 1 the devices form g groups (TPU slices, or processes on GPU and
    CPU): the data axis is g x (data / g), its outer factor across groups, so only
    the gradient all-reduce crosses the slow links (`mesh_utils.create_hybrid_device_mesh`).
    A `tensor` axis that would span processes is refused: its collectives run in
    every layer and need the fast links within a host."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_sizes(mesh_cfg, len(devices))
    dcn = int(mesh_cfg.get("dcn_data", 1) or 1)
    if dcn == 1:
        mesh = jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                             devices=devices)
    else:
        if sizes[0] % dcn:
            raise ValueError(
                f"mesh.data = {sizes[0]} must be a multiple of mesh.dcn_data = {dcn} (the data "
                "axis spans dcn_data groups of devices).")
        from jax.experimental import mesh_utils

        granule_is_process = devices[0].platform != "tpu"
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                (sizes[0] // dcn, sizes[1], sizes[2]), (dcn, 1, 1), devices,
                process_is_granule=granule_is_process)
        except (ValueError, AssertionError) as error:
            unit = "processes" if granule_is_process else "TPU slices"
            raise ValueError(
                f"mesh.dcn_data = {dcn}: the devices do not form {dcn} equal groups of {unit} "
                f"({error}); set dcn_data to the number of {unit}, or 1.") from error
        mesh = Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    _check_tensor_within_processes(mesh)
    return mesh


def _check_tensor_within_processes(mesh: Mesh) -> None:
    tensor = mesh.shape["tensor"]
    if tensor == 1:
        return
    groups = np.asarray(mesh.devices).reshape(-1, tensor)  # tensor is the last axis
    for group in groups:
        processes = sorted({d.process_index for d in group})
        if len(processes) > 1:
            local = jax.local_device_count()
            raise ValueError(
                f"mesh.tensor = {tensor} would span processes {processes}: tensor parallelism "
                f"runs collectives in every layer and must stay within one host. Use "
                f"mesh.tensor <= {local} (this host's devices) and put the rest in mesh.data "
                "or mesh.fsdp.")


def mesh_sizes(mesh_cfg, num_devices: int) -> list[int]:
    """[data, fsdp, tensor] for `num_devices`, the one -1 axis resolved."""
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible "
                f"by the fixed axes' product {known}.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one axis to -1 to use all of them.")
    return sizes


def path_to_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, tuple]] = DEFAULT_RULES) -> P:
    """PartitionSpec for one array from the first matching rule, then FSDP."""
    if not shape:
        return P()
    spec: list[Any] = [None] * len(shape)
    for pattern, rule_spec in rules:
        if re.match(pattern, path):
            rule_spec = tuple(rule_spec)[-len(shape):] if rule_spec else ()
            spec[len(shape) - len(rule_spec):] = list(rule_spec)
            break
    spec = [axis if axis is not None and shape[i] % mesh.shape[axis] == 0 else None
            for i, axis in enumerate(spec)]
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1 and "fsdp" not in spec and math.prod(shape) >= FSDP_MIN_SIZE:
        free = [i for i, axis in enumerate(spec) if axis is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    # Axes of size 1 are no-ops; dropping them keeps specs readable and comparable.
    spec = [axis if axis is not None and mesh.shape[axis] > 1 else None for axis in spec]
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, tuple]] = DEFAULT_RULES):
    """NamedShardings for every leaf of an (abstract) pytree, by path rules."""
    def leaf_sharding(path, leaf):
        return NamedSharding(mesh, spec_for(path_to_str(path), tuple(np.shape(leaf)), mesh, rules))
    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keeps activations split over the batch axes inside a jitted step run under
    `jax.set_mesh(mesh)`; a no-op outside a mesh (eager tests, export)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    if x.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(tree):
    """Every leaf as a numpy array on every process, whatever its sharding: a local
    or fully replicated array is read from this process's copy; one sharded over
    other processes' devices is gathered from them (a collective: every process
    must call this at the same point)."""
    def leaf(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(leaf, tree)


def log_shardings(shardings, logger: logging.Logger = log) -> None:
    for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        logger.debug("%s -> %s", path_to_str(path), s.spec)
