"""Run configs: the one `--config FILE[:ARG] --config.key=value` parser, the checks
that turn a user's config mistake into one line they can act on, and a run's
config saved beside its checkpoints.

- `load("configs/NAME.py[:ARG]", overrides)`: the file's `get_config(ARG)`, then each
  `--config.a.b=VALUE` override. VALUE is read as a Python literal where the field is
  not a string (`1`, `0.5`, `[64, 128]`, `(0.5, 1.0)`, `None`, `true`), so list and
  tuple fields can be set from the command line; a string field takes VALUE as
  written. A field that does not exist is refused with the closest existing names.
- `check(config)`: every field of `RANGES` that the config has must hold a value in
  its range, else ConfigError names the field, the value and the allowed range (a
  negative learning rate or a mask ratio of 1 would otherwise train, or diverge,
  without a word). Tasks and models add their own checks on top.
- `save_run_config` / `load_run_config`: WORKDIR/config.json, the architecture and
  data settings that inference, export and evaluation tools rebuild a run from.

This module imports nothing from mimjax: every layer may use it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A config mistake a user can fix; its message is one line that says how."""


# --------------------------------------------------------------------------- loading
def _load_python_config(path: str, arg: str | None) -> ml_collections.ConfigDict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist (expected configs/NAME.py[:ARG]).")
    module_spec = importlib.util.spec_from_file_location("_mimjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config(arg=None) function.")
    try:
        config = module.get_config(arg)
    except ValueError as error:  # e.g. an argument the file does not take
        raise ConfigError(f"{path}:{arg}: {error}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict.")
    return config


def _split_spec(spec: str) -> tuple[str, str | None]:
    """'configs/x.py:ARG' -> ('configs/x.py', 'ARG'); a .json path has no argument."""
    if ".py:" in spec:
        path, _, arg = spec.partition(".py:")
        return path + ".py", arg
    return spec, None


def load_file(spec: str) -> ml_collections.ConfigDict:
    """'configs/NAME.py[:ARG]' (the file's get_config(ARG)) or a saved config.json."""
    path, arg = _split_spec(os.fspath(spec))
    if path.endswith(".py"):
        return _load_python_config(path, arg)
    if not os.path.isfile(path):
        raise ConfigError(f"config {path} does not exist (expected configs/NAME.py[:ARG] or a "
                          "run's config.json).")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load(spec: str, overrides: Iterable[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config file's config with `--config.key=value` overrides applied, locked
    (no field can be added by mistake later; `unlock()` where a driver must)."""
    config = load_file(spec)
    for key, text in overrides:
        set_value(config, key, text)
    config.lock()
    return config


def resolve_config(config) -> ml_collections.ConfigDict:
    """A ConfigDict from a ConfigDict, a dict, a config.json path or 'configs/NAME.py[:ARG]'."""
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if isinstance(config, dict):
        return ml_collections.ConfigDict(config)
    if isinstance(config, (str, os.PathLike)):
        return load_file(os.fspath(config))
    raise TypeError(f"config must be a ConfigDict, dict or path, got {type(config).__name__}.")


# --------------------------------------------------------------------------- overrides
OVERRIDE_PREFIX = "--config."


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(`--config.a.b=v` and `--config.a.b v` as [("a.b", "v")], the other arguments)."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIX):
            key, eq, text = arg[len(OVERRIDE_PREFIX):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value: {arg}=VALUE.")
                text, i = argv[i + 1], i + 1
            overrides.append((key, text))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def dotted_paths(config, prefix: str = "") -> list[str]:
    """Every field of `config` as "a.b.c" (sections and leaves)."""
    out = []
    for key in config.keys():
        path = f"{prefix}{key}"
        out.append(path)
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(dotted_paths(value, path + "."))
    return out


# Fields people look for under another name, with where the setting really lives.
_HINTS = {
    "patch_size": "the patch size is part of model.variant (e.g. --config.model.variant=B/16 "
                  "for patch 16, Ti/8 for patch 8)",
    "lr": "the learning rate is optimizer.base_lr (peak lr = base_lr x global_batch_size / 256)",
    "learning_rate": "the learning rate is optimizer.base_lr (peak lr = base_lr x "
                     "global_batch_size / 256)",
    "batch_size": "the batch is global_batch_size (all devices and processes together)",
    "steps": "training length is total_steps (or total_epochs)",
}


def _unknown_field(config, parts: list[str], depth: int) -> ConfigError:
    section = ".".join(parts[:depth])
    name = parts[depth]
    node = config
    for part in parts[:depth]:
        node = node[part]
    siblings = list(node.keys())
    wanted = ".".join(parts)
    suggestions = difflib.get_close_matches(name, siblings, n=3, cutoff=0.6)
    suggestions = [f"{section}.{s}" if section else s for s in suggestions]
    # The same name elsewhere in the config (e.g. `base_lr` for `optimizer.base_lr`).
    everywhere = dotted_paths(config)
    suggestions += [p for p in everywhere if p.split(".")[-1] == parts[-1] and p != wanted]
    suggestions += difflib.get_close_matches(wanted, everywhere, n=3, cutoff=0.75)
    suggestions = [s for s in dict.fromkeys(suggestions) if not wanted.startswith(s + ".")][:4]
    where = f"config.{section}" if section else "the config"
    message = f"{where} has no field {name!r}"
    hint = _HINTS.get(parts[-1])
    if suggestions:
        message += "; did you mean " + ", ".join(f"config.{s}" for s in suggestions) + "?"
    else:
        message += f"; its fields are {sorted(siblings)}."
    if hint:
        message += f" Note: {hint}."
    return ConfigError(message)


def _field_type(node, key: str):
    """The type a field accepts: its value's, or a placeholder's declared type."""
    if key in node._fields:  # a FieldReference keeps the type of a None placeholder
        field = node._fields[key]
        if isinstance(field, ml_collections.FieldReference):
            return field.get_type()
    value = node[key]
    return None if value is None else type(value)


def parse_value(text: str, field_type) -> Any:
    """The override text as the field's type: strings as written, else a literal."""
    if field_type is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string for a field of no declared type


def set_value(config, dotted: str, text: str) -> None:
    """Sets `config.<dotted>` from the command-line text `text` (see the module doc)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--config.{dotted}: empty field name.")
    node = config
    for depth, part in enumerate(parts[:-1]):
        if part not in node:
            raise _unknown_field(config, parts, depth)
        child = node[part]
        if child is None:
            raise ConfigError(
                f"config.{'.'.join(parts[:depth + 1])} is None in this config, so "
                f"--config.{dotted} has nothing to set; the config disables that part.")
        if not isinstance(child, ml_collections.ConfigDict):
            raise ConfigError(
                f"config.{'.'.join(parts[:depth + 1])} is a value ({child!r}), not a section; "
                f"--config.{dotted} cannot set a field inside it.")
        node = child
    key = parts[-1]
    if key not in node:
        raise _unknown_field(config, parts, len(parts) - 1)
    field_type = _field_type(node, key)
    value = parse_value(text, field_type)
    if field_type is int and isinstance(value, bool):
        raise ConfigError(f"--config.{dotted}={text}: config.{dotted} takes an integer.")
    if isinstance(node[key], ml_collections.ConfigDict) and not isinstance(value, dict):
        raise ConfigError(
            f"config.{dotted} is a section; set its fields (--config.{dotted}.NAME=VALUE).")
    try:
        setattr(node, key, value)
    except (TypeError, ValueError):
        kind = _TYPE_NAMES.get(field_type, getattr(field_type, "__name__", "other"))
        raise ConfigError(
            f"--config.{dotted}={text}: config.{dotted} takes {kind} (now {node[key]!r}), "
            f"not {type(value).__name__} {value!r}.") from None


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               tuple: "a tuple such as (1, 2)", list: "a list such as [1, 2]"}


# --------------------------------------------------------------------------- checks
# (field, check(value) -> bool, what the allowed range is). Fields a config does not
# have are skipped, so one table serves every task; None passes (unset).
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ge(low):
    return lambda v: _number(v) and v >= low


def _gt(low):
    return lambda v: _number(v) and v > low


def _in(low, high, *, closed_high=False):
    return lambda v: _number(v) and low <= v and (v <= high if closed_high else v < high)


def _int_ge(low):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _one_of(*values):
    return lambda v: v in values


def _interval(low, high):
    """A (lo, hi) pair with low < lo <= hi <= high."""
    return lambda v: (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_number, v))
                      and low < v[0] <= v[1] <= high)


# Rules shared by many fields, each with the fields it governs.
_COUNT = (_int_ge(1), "an integer >= 1")
_FRACTION = (_in(0, 1), "in [0, 1)")
_POSITIVE = (_gt(0), "> 0")
_MESH_AXIS = (lambda v: v == -1 or _int_ge(1)(v), "-1 (all remaining devices) or >= 1")
_SHARED_RULES = {
    _COUNT: ("global_batch_size", "grad_accum_steps", "total_steps", "max_consecutive_nonfinite",
             "log_every", "checkpoint_every", "keep_checkpoints", "figure_every",
             "eval_batch_size", "model.image_size", "data.num_threads",
             "data.prefetch_buffer_size", "data.phantom_num_images", "data.roi_min_px",
             "mesh.dcn_data"),
    _FRACTION: ("optimizer.b1", "optimizer.b2", "model.drop_path_rate",
                "objectives.masked_reconstruction.mask_ratio", "objectives.mcr.image_mask_ratio",
                "objectives.mcr.text_mask_ratio", "objectives.classification.label_smoothing"),
    _POSITIVE: ("total_epochs", "optimizer.eps", "optimizer.head_lr_mult",
                "model.layer_norm_eps", "data.norm_std"),
    _MESH_AXIS: ("mesh.data", "mesh.fsdp", "mesh.tensor"),
}

RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    *((field, ok, allowed) for (ok, allowed), fields in _SHARED_RULES.items()
      for field in fields),
    ("seed", lambda v: _int_ge(0)(v) and v < 2**32, "an integer in [0, 2**32)"),
    ("warmup_steps", _int_ge(0), "an integer >= 0"),
    ("warmup_epochs", _ge(0), ">= 0"),
    ("optimizer.base_lr", _gt(0), "> 0 (peak lr = base_lr x global_batch_size / 256)"),
    ("optimizer.min_lr", _ge(0), ">= 0"),
    ("optimizer.weight_decay", _ge(0), ">= 0"),
    ("optimizer.grad_clip_norm", _gt(0), "> 0, or None for no clipping"),
    ("optimizer.layer_decay", lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
    ("optimizer.proximal_mu", _ge(0), ">= 0 (0 = no proximal term)"),
    ("ema_decay", _in(0, 1), "in [0, 1) (0 = no EMA)"),
    ("eval_every", _int_ge(0), "an integer >= 0 (0 = at the last step only)"),
    ("peak_tflops_per_device", _gt(0), "> 0, or None to measure it"),
    ("model.channels", _int_ge(1), "an integer >= 1 (1 gray, 3 RGB, 4 for BraTS' sequences)"),
    ("model.dtype", _one_of("float32", "bfloat16", "float16"),
     "'float32', 'bfloat16' or 'float16'"),
    ("model.attention", _one_of("xla", "fused"), "'xla' or 'fused'"),
    ("model.posemb", _one_of("sincos2d", "learn"), "'sincos2d' or 'learn'"),
    ("data.num_workers", _int_ge(0), "an integer >= 0 (0 = load in this process)"),
    ("data.channels", _int_ge(1), "an integer >= 1"),
    ("data.crop_scale", _interval(0, 1), "two fractions (lo, hi) with 0 < lo <= hi <= 1"),
    ("data.crop_ratio", _interval(0, math.inf), "two aspect ratios (lo, hi), 0 < lo <= hi"),
    ("data.phantom_size", _int_ge(8), "an integer >= 8"),
    ("data.roi_context", _ge(0), ">= 0 (0 = whole images)"),
    ("data.rotate_degrees", _in(0, 180, closed_high=True), "in [0, 180]"),
]


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def require(value, ok: bool, field: str, allowed: str) -> None:
    """Raises ConfigError "config.FIELD = VALUE is out of range: must be ALLOWED." unless ok."""
    if not ok:
        raise ConfigError(f"config.{field} = {value!r} is out of range: must be {allowed}.")


def check(config, ranges: Sequence[tuple[str, Callable[[Any], bool], str]] = RANGES) -> None:
    """Refuses the first value out of its range (see RANGES); fields absent or None pass."""
    for field, ok, allowed in ranges:
        present, value = _lookup(config, field)
        if present and value is not None:
            require(value, bool(ok(value)), field, allowed)
    present, warmup = _lookup(config, "warmup_steps")
    _, total = _lookup(config, "total_steps")
    if present and warmup is not None and total is not None and warmup >= total:
        raise ConfigError(f"config.warmup_steps = {warmup} must be below config.total_steps = "
                          f"{total}; lower warmup_steps or train longer.")


# --------------------------------------------------------------------------- run config
def save_run_config(config, workdir: str, *, is_chief: bool = True) -> str:
    """Writes `config` to WORKDIR/config.json (atomically; only where `is_chief`);
    returns the path. It records the architecture (config.model), the objectives and
    the data settings, so inference, export and evaluation rebuild the run from the
    workdir alone."""
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if not is_chief:
        return path
    if isinstance(config, ml_collections.ConfigDict):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return path


def load_run_config(path: str) -> ml_collections.ConfigDict:
    """The config a workdir's run recorded (WORKDIR/config.json); `path` may also be
    the workdir's checkpoints/ directory."""
    path = os.path.abspath(os.fspath(path))
    candidates = [os.path.join(path, CONFIG_FILE)]
    if os.path.basename(path.rstrip(os.sep)) == "checkpoints":
        candidates.append(os.path.join(os.path.dirname(path), CONFIG_FILE))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return load_file(candidate)
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in {path}: the run's architecture is unknown. Pass the config "
        "the run used (config='configs/NAME.py[:ARG]', or --config for the tools), or "
        "record it with mimjax.run_config.save_run_config(config, workdir).")
