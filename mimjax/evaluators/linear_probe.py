"""Linear probe on frozen encoder features: closed-form ridge regression, as an eval hook.

The probe answers "how linearly separable are the encoder's features for task T?"
during pretraining, without training anything in the model: features of a train
split and an eval split are computed with the current (frozen) parameters, a ridge
regression maps the train features to the labels, and the eval split is scored.

Method (the few-shot linear evaluation of big_vision's `evaluators/fewshot.py` was
the inspiration: ridge regression to one-hot targets, closed form, no optimiser):

- features are standardised with the train features' mean and std (constant
  features get std 1), so one l2 grid suits every encoder width and scale;
- targets are class indicators in {0, 1}: one-hot for a single-label task, the
  multi-hot label for a multi-label one. The bias is not penalised (the features
  are centred, so it is the mean target), hence {-1, 1} targets would give the
  same scores up to an affine map: same ranking, same argmax. {0, 1} keeps the
  scores on the probability scale, so multi-label accuracy can threshold at 0.5;
- the weights minimise ||X W - Y||^2 + l2 * N * ||W||^2 (N train examples: l2 is
  a per-example penalty, so a value chosen on a fold carries over to the full set),
  solved in float64 through the eigendecomposition of the smaller Gram matrix:
  X^T X (D x D, "primal") when N >= D, X X^T (N x N, "dual") otherwise. One
  decomposition serves the whole l2 grid;
- l2 is chosen by deterministic k-fold cross-validation on the train features
  (folds from a seeded permutation): the best mean held-out macro-AUC, where l2
  values within `auc_tolerance` (1e-3) of it are decided by the held-out squared
  error (AUC is blind to the per-class offsets that argmax and thresholds use; the
  squared error is not). The probe is then refit on all train features with it.

Scores are the regressed indicators (one column per class). Metrics come from
`mimjax.evaluators.classification.classification_metrics` on those scores as given
(one-vs-rest AUC of column c ranks examples by the regressed indicator of c).

Multi-process: every process must iterate the same batches (the encode function
sees them as replicated host data); outputs that span processes are gathered.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mimjax import sharding
from mimjax.evaluators import classification

POOL_KINDS = ("cls", "gap", "cls+gap")


class NonFiniteFeaturesError(ValueError):
    """The encoder gave NaN or inf features (e.g. a diverging run)."""

DEFAULT_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)


# ----------------------------------------------------------------------------- features


def pool_tokens(tokens: jax.Array, kind: str, has_class_token: bool) -> jax.Array:
    """(B, [1 +] N, D) encoder tokens -> (B, D) float32 ((B, 2D) for "cls+gap").

    "cls": the class token (token 0); "gap": the mean of the patch tokens (class
    token excluded); "cls+gap": both, concatenated.
    """
    if kind not in POOL_KINDS:
        raise ValueError(f"pool must be one of {POOL_KINDS}, got {kind!r}.")
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (B, tokens, D), got {tuple(tokens.shape)}.")
    if "cls" in kind and not has_class_token:
        raise ValueError(
            f"pool {kind!r} needs an encoder with a class token; set model.class_token=True "
            "or pool with 'gap'."
        )
    tokens = tokens.astype(jnp.float32)
    patches = tokens[:, 1:] if has_class_token else tokens
    if patches.shape[1] == 0:
        raise ValueError("the encoder returned no patch tokens to average.")
    gap = patches.mean(axis=1)
    if kind == "gap":
        return gap
    if kind == "cls":
        return tokens[:, 0]
    return jnp.concatenate([tokens[:, 0], gap], axis=-1)


def _find_encoder(module) -> Any:
    """The ViT encoder inside a bound model: `module.encoder` (MAE, classifier) or itself."""
    from mimjax.models import vit

    encoder = getattr(module, "encoder", module)
    if not isinstance(encoder, vit.ViTEncoder):
        raise TypeError(
            f"expected a model with a ViTEncoder at `.encoder` (MaskedAutoencoder, "
            f"ViTClassifier) or a ViTEncoder itself, got {type(module).__name__}."
        )
    return encoder


def encoder_features_fn(spec_bind, pool: str = "cls") -> Callable[[Any, Any], jax.Array]:
    """A jitted `encode(params, images) -> (B, D) float32` pooled-feature function.

    `spec_bind` is `ModelSpec.bind` (or anything with a `.bind`, or any callable)
    mapping params to a module that is a ViTEncoder or holds one at `.encoder`. The
    encoder runs without an rng (deterministic, no drop path) over every patch.
    """
    if pool not in POOL_KINDS:
        raise ValueError(f"pool must be one of {POOL_KINDS}, got {pool!r}.")
    bind = spec_bind.bind if hasattr(spec_bind, "bind") else spec_bind
    if not callable(bind):
        raise TypeError("spec_bind must be a ModelSpec (or its .bind): params -> module.")

    def encode(params, images):
        encoder = _find_encoder(bind(params))
        return pool_tokens(encoder(images), pool, encoder.cfg.class_token)

    return jax.jit(encode)


def _image_of(batch: Mapping, image_key: str | None):
    if image_key is not None:
        if image_key not in batch:
            raise KeyError(f"batch has no {image_key!r}; its keys are {sorted(batch)}.")
        return batch[image_key]
    keys = sorted(k for k in batch if k.startswith("image"))
    if len(keys) != 1:
        raise ValueError(
            f"batch has image keys {keys}; pass image_key naming the one the encoder takes "
            "(e.g. 'image_112' for a multi-scale pretraining batch)."
        )
    return batch[keys[0]]


def extract_features(
    encoder_apply: Callable[[Any], Any],
    batches: Iterable[Mapping],
    *,
    image_key: str | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Runs `encoder_apply(images) -> (B, D)` over `batches`; returns host arrays.

    Each batch is a dict with the images (key `image_key`, or its only key starting
    with "image"), labels "label_{k}" and optionally a bool "valid" (B,) marking
    real examples (padding is dropped). Returns (features (N, D) float32,
    {"label_{k}": (N, ...)} for every label key of the batches).
    """
    features, labels = [], {}
    label_keys = None
    for batch in batches:
        pooled = sharding.to_host(encoder_apply(_image_of(batch, image_key)))
        if pooled.ndim != 2:
            raise ValueError(f"encoder_apply must return (B, D) features, got {pooled.shape}.")
        keep = np.ones(len(pooled), bool)
        if batch.get("valid") is not None:
            keep = np.asarray(batch["valid"])
            if keep.shape != (len(pooled),) or keep.dtype != bool:
                raise ValueError(
                    f"batch['valid'] must be a bool mask of shape ({len(pooled)},), got "
                    f"{keep.dtype} {keep.shape}."
                )
        keys = sorted(k for k in batch if k.startswith("label_"))
        if label_keys is None:
            label_keys = keys
            labels = {k: [] for k in keys}
        elif keys != label_keys:
            raise ValueError(f"batches disagree on label keys: {label_keys} then {keys}.")
        features.append(pooled[keep].astype(np.float32))
        for k in keys:
            labels[k].append(np.asarray(batch[k])[keep])
    if not features:
        raise ValueError("no batches to extract features from (the batch iterable was empty).")
    return np.concatenate(features), {k: np.concatenate(v) for k, v in labels.items()}


# ----------------------------------------------------------------------------- ridge


def _ridge_path(x: np.ndarray, y: np.ndarray, penalties: Sequence[float], form: str = "auto"):
    """Weights minimising ||x W - y||^2 + p ||W||^2 for each penalty p (no bias).

    One eigendecomposition of the smaller Gram matrix serves every penalty:
    primal W = V diag(1/(s+p)) V^T x^T y with x^T x = V diag(s) V^T;
    dual   W = x^T V diag(1/(s+p)) V^T y with x x^T = V diag(s) V^T.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if form == "auto":
        form = "dual" if x.shape[0] < x.shape[1] else "primal"
    if form not in ("primal", "dual"):
        raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}.")
    if any(not p > 0 for p in penalties):
        raise ValueError(f"ridge penalties must be > 0, got {list(penalties)}.")
    gram = x.T @ x if form == "primal" else x @ x.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # rounding can leave tiny negatives
    projected = eigenvectors.T @ (x.T @ y if form == "primal" else y)
    weights = []
    for penalty in penalties:
        solved = eigenvectors @ (projected / (eigenvalues + penalty)[:, None])
        weights.append(solved if form == "primal" else x.T @ solved)
    return weights


def ridge_regression(x, y, penalty: float, *, form: str = "auto") -> np.ndarray:
    """argmin_W ||x W - y||^2 + penalty ||W||^2 in float64 (x (N, D), y (N, C) -> (D, C)).

    `form` "primal" solves in D x D, "dual" in N x N; "auto" takes the smaller.
    """
    return _ridge_path(x, y, [penalty], form)[0]


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted linear probe: scores = ((x - mean) / scale) @ weights + bias."""

    mean: np.ndarray  # (D,) train feature mean
    scale: np.ndarray  # (D,) train feature std (1 where constant)
    weights: np.ndarray  # (D, C) on standardised features
    bias: np.ndarray  # (C,)
    l2: float  # chosen per-example penalty
    heldout_auc: dict  # {l2: mean held-out macro-AUC over folds (NaN if undefined)}

    def scores(self, x) -> np.ndarray:
        """(N, D) features -> (N, C) float64 scores (regressed class indicators)."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features must be (N, {self.mean.shape[0]}) like the train features, got "
                f"{x.shape}."
            )
        return ((x - self.mean) / self.scale) @ self.weights + self.bias


def _targets(labels, num_classes: int, multilabel: bool) -> np.ndarray:
    labels = np.asarray(labels)
    if multilabel:
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise ValueError(
                f"multi-label labels must be (N, {num_classes}) multi-hot, got {labels.shape}."
            )
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("multi-label labels must hold only 0 and 1.")
        return labels.astype(np.float64)
    if labels.ndim != 1:
        raise ValueError(
            f"single-label labels must be (N,) integer class ids, got {labels.shape}; "
            "for multi-hot labels pass multilabel=True."
        )
    if labels.size and (
        not np.all(np.equal(np.mod(labels, 1), 0))
        or labels.min() < 0
        or labels.max() >= num_classes
    ):
        raise ValueError(f"single-label labels must be integer class ids in [0, {num_classes}).")
    return np.eye(num_classes)[labels.astype(np.int64)]


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    # Constant features carry nothing; std 1 leaves them at 0 instead of dividing by 0.
    scale = np.where(scale > 1e-8 * max(1.0, float(np.abs(mean).max(initial=0.0))), scale, 1.0)
    return mean, scale


def _fit_path(x: np.ndarray, targets: np.ndarray, l2s: Sequence[float]):
    """(mean, scale, bias, [weights per l2]) of the ridge probes on x."""
    mean, scale = _standardise(x)
    z = (x - mean) / scale
    bias = targets.mean(axis=0)
    weights = _ridge_path(z, targets - bias, [l2 * len(x) for l2 in l2s])
    return mean, scale, bias, weights


def _select_l2(l2s, heldout_auc: dict, heldout_mse: dict, auc_tolerance: float) -> float:
    """Among the l2 within `auc_tolerance` of the best held-out macro-AUC, the one with
    the lowest held-out squared error (then the larger l2); the largest l2 if no AUC
    is defined. AUC ignores each column's offset and scale, which the argmax of a
    single-label probe and the 0.5 threshold of a multi-label one depend on: a very
    large l2 shrinks the scores to the class priors, often at no cost in AUC."""
    defined = [l2 for l2 in l2s if not math.isnan(heldout_auc[l2])]
    if not defined:
        return l2s[-1]
    best = max(heldout_auc[l2] for l2 in defined)
    candidates = [l2 for l2 in defined if heldout_auc[l2] >= best - auc_tolerance]
    return min(candidates, key=lambda l2: (heldout_mse[l2], -l2))


def fit_ridge_probe(
    train_x,
    train_y,
    *,
    num_classes: int,
    multilabel: bool,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    num_folds: int = 5,
    seed: int = 0,
    auc_tolerance: float = 1e-3,
) -> Probe:
    """Fits the ridge probe, choosing l2 from `l2_grid` by k-fold held-out macro-AUC.

    train_x (N, D) features; train_y (N,) class ids or (N, C) multi-hot. Folds come
    from a permutation seeded with `seed` (deterministic). A grid of one value skips
    the cross-validation. If no l2 gets a defined held-out AUC (e.g. a class never
    present), the largest l2 is used. See `_select_l2` for `auc_tolerance`.
    """
    x = np.asarray(train_x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"train features must be a non-empty (N, D) array, got {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise NonFiniteFeaturesError(
            "train features contain NaN or inf; check the encoder outputs."
        )
    if len(train_y) != len(x):
        raise ValueError(f"{len(x)} train features but {len(train_y)} labels.")
    l2s = sorted(float(v) for v in l2_grid)
    if not l2s or any(not v > 0 for v in l2s):
        raise ValueError(f"l2_grid must be non-empty and positive, got {list(l2_grid)}.")
    targets = _targets(train_y, num_classes, multilabel)
    heldout = {l2s[0]: math.nan} if len(l2s) == 1 else {}
    heldout_mse = {l2s[0]: math.nan} if len(l2s) == 1 else {}
    if len(l2s) > 1:
        if num_folds < 2 or len(x) < 2 * num_folds:
            raise ValueError(
                f"choosing l2 needs num_folds >= 2 and at least 2 examples per fold; got "
                f"num_folds={num_folds} and {len(x)} examples. Use more train examples, fewer "
                "folds, or a one-value l2_grid."
            )
        folds = np.array_split(np.random.default_rng(seed).permutation(len(x)), num_folds)
        fold_aucs = np.full((num_folds, len(l2s)), np.nan)
        squared_errors = np.zeros(len(l2s))
        for f, held in enumerate(folds):
            fit = np.ones(len(x), bool)
            fit[held] = False
            mean, scale, bias, weights = _fit_path(x[fit], targets[fit], l2s)
            z = (x[held] - mean) / scale
            for i, w in enumerate(weights):
                scores = z @ w + bias
                fold_aucs[f, i] = classification.macro_average(
                    classification.roc_auc, targets[held], scores)
                squared_errors[i] += np.sum((scores - targets[held]) ** 2)
        heldout_mse = dict(zip(l2s, squared_errors / targets.size, strict=True))
        for i, l2 in enumerate(l2s):
            column = fold_aucs[:, i][~np.isnan(fold_aucs[:, i])]
            heldout[l2] = float(column.mean()) if column.size else math.nan
    chosen = _select_l2(l2s, heldout, heldout_mse, auc_tolerance)
    mean, scale, bias, (weights,) = _fit_path(x, targets, [chosen])
    return Probe(mean=mean, scale=scale, weights=weights, bias=bias, l2=chosen, heldout_auc=heldout)


# ----------------------------------------------------------------------------- evaluator


class ProbeScores(NamedTuple):
    """A probe fitted on the train features and its scores on the eval split."""

    labels: np.ndarray  # eval labels: class ids (N,) or multi-hot (N, C)
    scores: np.ndarray  # (N, C)
    probe: Probe
    num_train: int


class LinearProbeEvaluator:
    """Eval hook: features of a train and an eval split, ridge probe, metrics.

    `encode(params, images) -> (B, D)` computes pooled features (e.g.
    `encoder_features_fn(spec, pool)`, which works for the MAE and the classifier);
    `train_batches()` and `eval_batches()` return fresh iterables of batch dicts
    (see `extract_features`). `run(params, step)` returns the scalar metrics of
    `classification_metrics` on the eval split, prefixed "probe/{task}/", plus
    "probe/{task}/l2" (the chosen penalty), ".../heldout_auc_macro" (its
    cross-validated train AUC) and ".../num_train". Parameters are only read.
    """

    def __init__(
        self,
        encode: Callable[[Any, Any], Any],
        *,
        train_batches: Callable[[], Iterable[Mapping]],
        eval_batches: Callable[[], Iterable[Mapping]],
        label_key: str,
        multilabel: bool,
        class_names: Sequence[str],
        task: str | None = None,
        image_key: str | None = None,
        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        num_folds: int = 5,
        seed: int = 0,
    ):
        if not callable(train_batches) or not callable(eval_batches):
            raise TypeError(
                "train_batches and eval_batches must be callables returning a fresh iterable "
                "of batches (e.g. lambda: iter(dataset)), so every run sees the same data."
            )
        if not class_names:
            raise ValueError("class_names must name every class (or label) of the task.")
        self.encode = encode
        self.train_batches, self.eval_batches = train_batches, eval_batches
        self.label_key = label_key if label_key.startswith("label_") else f"label_{label_key}"
        self.task = task or self.label_key.removeprefix("label_")
        self.multilabel = bool(multilabel)
        self.class_names = tuple(class_names)
        self.image_key = image_key
        self.l2_grid = tuple(l2_grid)
        self.num_folds, self.seed = int(num_folds), int(seed)

    @classmethod
    def from_config(cls, config_like, *, encode, train_batches, eval_batches):
        """From a config section (ConfigDict or mapping) with `label_key`, `multilabel`,
        `class_names` and optionally `task`, `image_key`, `l2_grid`, `num_folds`, `seed`."""

        def get(key, default=None):
            if isinstance(config_like, Mapping) or hasattr(config_like, "get"):
                return config_like.get(key, default)
            return getattr(config_like, key, default)

        missing = [k for k in ("label_key", "multilabel", "class_names") if get(k) is None]
        if missing:
            raise ValueError(f"linear probe config is missing {missing}.")
        return cls(
            encode,
            train_batches=train_batches,
            eval_batches=eval_batches,
            label_key=get("label_key"),
            multilabel=get("multilabel"),
            class_names=tuple(get("class_names")),
            task=get("task"),
            image_key=get("image_key"),
            l2_grid=tuple(get("l2_grid") or DEFAULT_L2_GRID),
            num_folds=get("num_folds", 5),
            seed=get("seed", 0),
        )

    def _features(self, params, batches_fn, split: str):
        features, labels = extract_features(
            lambda images: self.encode(params, images), batches_fn(), image_key=self.image_key
        )
        if self.label_key not in labels:
            raise KeyError(
                f"{split} batches have no {self.label_key!r} (their label keys: "
                f"{sorted(labels)}); add it to the data config's label_keys."
            )
        return features, labels[self.label_key]

    def fit_and_score(self, params) -> ProbeScores:
        """Fits the probe on `params`' train features and scores the eval split."""
        train_x, train_y = self._features(params, self.train_batches, "train")
        eval_x, eval_y = self._features(params, self.eval_batches, "eval")
        probe = fit_ridge_probe(
            train_x,
            train_y,
            num_classes=len(self.class_names),
            multilabel=self.multilabel,
            l2_grid=self.l2_grid,
            num_folds=self.num_folds,
            seed=self.seed,
        )
        return ProbeScores(eval_y, probe.scores(eval_x), probe, len(train_x))

    def metrics(self, scored: ProbeScores) -> dict[str, float]:
        """The "probe/{task}/..." scalars of `fit_and_score`'s result."""
        metrics = classification.classification_metrics(
            scored.labels, scored.scores, multilabel=self.multilabel,
            class_names=self.class_names
        )
        metrics = classification.scalar_metrics(metrics)
        probe = scored.probe
        metrics.update(
            l2=probe.l2, heldout_auc_macro=probe.heldout_auc[probe.l2],
            num_train=scored.num_train
        )
        return {f"probe/{self.task}/{k}": float(v) for k, v in metrics.items()}

    def run(self, params, step: int | None = None) -> dict[str, float]:
        """Probe metrics for `params` (anything `encode` takes); `step` is for logging."""
        del step  # the caller logs the metrics at its step
        return self.metrics(self.fit_and_score(params))
