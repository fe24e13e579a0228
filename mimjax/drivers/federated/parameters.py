"""Parameters as they travel between a federated server and its sites.

On the wire a model part is a flat dict of named float32 numpy arrays,
{"encoder/transformer/blocks/0/attn/query/kernel": array, ...} (the names of
`mimjax.models.param_tree.flatten`). float32 because Flower's array serialisation
(numpy's .npy format) has no bfloat16; the site's own parameters are f32 anyway
(bf16 is a compute dtype), and a bf16 array given here is widened exactly.

Only the parts named in `shared` travel (the encoder by default): task heads,
optimizer state and the data position stay at the site between rounds.

`check_update` is the server's gate: a site's reply with missing or unknown names,
wrong shapes, another dtype or non-finite values is refused for the round with
every reason listed, and the round goes on with the other sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from mimjax.models import param_tree

DEFAULT_SHARED = ("encoder",)
WIRE_DTYPE = np.float32
MAX_REASONS = 8  # per refused update, so a wholly wrong reply stays one readable line


class UpdateRejected(ValueError):
    """A site's parameters that cannot enter the aggregate; the message says why."""


def to_wire(params: Mapping, shared: Iterable[str] = DEFAULT_SHARED) -> dict[str, np.ndarray]:
    """Nested parameters -> {name: float32 array} for the parts in `shared` (top-level
    names such as "encoder"; empty = everything)."""
    shared = tuple(shared)
    flat = param_tree.flatten(params)
    named = {name: _as_wire(name, value) for name, value in flat.items()
             if not shared or name.split("/", 1)[0] in shared}
    if not named:
        raise ValueError(f"no parameters under {list(shared)}; the model has "
                         f"{sorted({n.split('/', 1)[0] for n in flat})}.")
    return named


def from_wire(named: Mapping[str, np.ndarray]) -> dict:
    """{name: array} -> nested parameters (the layout `Run.set_params` takes)."""
    return param_tree.unflatten(dict(named))


def _as_wire(name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise ValueError(f"parameter {name} has dtype {array.dtype}; only floating-point "
                         "parameters travel.")
    return np.ascontiguousarray(array.astype(WIRE_DTYPE))


def spec_of(named: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """{name: shape}: what a reply must match (all float32)."""
    return {name: tuple(np.shape(value)) for name, value in named.items()}


def check_update(named: Mapping, expected: Mapping[str, tuple[int, ...]], site: str) -> None:
    """Raises UpdateRejected, naming `site` and every reason (up to MAX_REASONS),
    unless `named` has exactly the expected names and shapes, float32 and finite."""
    reasons = []
    names = set(named)
    missing, unknown = sorted(set(expected) - names), sorted(names - set(expected))
    if missing:
        reasons.append(f"missing {len(missing)} parameter(s), e.g. {missing[:3]}")
    if unknown:
        reasons.append(f"{len(unknown)} parameter(s) the model does not have, e.g. "
                       f"{unknown[:3]}")
    for name in sorted(names & set(expected)):
        value = named[name]
        if not isinstance(value, np.ndarray):
            reasons.append(f"{name} is a {type(value).__name__}, not an array")
            continue
        if tuple(value.shape) != tuple(expected[name]):
            reasons.append(f"{name} has shape {tuple(value.shape)}, expected "
                           f"{tuple(expected[name])}")
        elif value.dtype != WIRE_DTYPE:
            reasons.append(f"{name} has dtype {value.dtype}, expected float32")
        elif not np.all(np.isfinite(value)):
            reasons.append(f"{name} has {int(np.size(value) - np.isfinite(value).sum())} "
                           "non-finite value(s)")
    if reasons:
        more = f" (and {len(reasons) - MAX_REASONS} more)" if len(reasons) > MAX_REASONS else ""
        raise UpdateRejected(f"update from {site} refused for this round: "
                             f"{'; '.join(reasons[:MAX_REASONS])}{more}.")


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]
                  ) -> dict[str, np.ndarray]:
    """FedAvg's aggregate: the mean of the updates weighted by their example counts,
    accumulated in float64 and returned as float32."""
    updates = list(updates)
    if not updates:
        raise ValueError("no updates to average.")
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise ValueError(f"the updates' weights sum to {total}; they must be positive.")
    names = list(updates[0][0])
    return {name: (sum(np.asarray(u[name], np.float64) * w for u, w in updates) / total
                   ).astype(WIRE_DTYPE) for name in names}
