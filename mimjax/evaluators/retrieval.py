"""Cross-modal retrieval evaluation of image-report models (model "mcr").

Metrics (`retrieval_metrics`), both directions over a held-out split, each query
against the whole split: image->text ("i2t") and text->image ("t2i") Recall@K
(K = 1, 5, 10: the fraction of queries with a correct item among the top K) and
the median rank of the first correct item (1 = best).

- Correct items: the query's own pair; with `groups`, every item of the query's
  group (the hooks group pairs whose reports are identical, so retrieving another
  copy of the same report text counts as correct: such reports cannot be told apart).
- Ties are counted against the query (pessimistic): rank = 1 + the number of wrong
  items scoring at least as high as the best correct one. Identical embeddings
  always give identical scores (scores are computed once per distinct embedding).
- With multi-hot `findings`, "i2t_findings_P@K" is the mean fraction of the top-K
  retrieved reports whose findings equal the query image's (ties by index).

`RetrievalHooks` is the trainer's eval hook (same interface as
`classifier_eval.ClassificationHooks`): every `config.eval_every` steps and at the
end it embeds the eval split with the unmasked encoders, logs "retrieval/NAME" to
metrics.jsonl, and draws figures/retrieval_STEP.png (query images with the true
report and the top-3 retrieved reports, green = correct); `finish` writes
WORKDIR/retrieval_metrics.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

from mimjax import sharding
from mimjax.evaluators.classification import (
    check_png_path,
    figure_font,
    save_figure,
    text_size,
)
from mimjax.evaluators.hooks import EvalHook, uses_ema

log = logging.getLogger(__name__)

KS = (1, 5, 10)
_QUERY_CHUNK = 1024  # query rows scored at once (bounds host memory for large splits)


# --------------------------------------------------------------------------- metrics
def _score_chunks(queries: np.ndarray, gallery: np.ndarray):
    """Yields (rows, f64 scores of queries[rows] against the gallery) in query chunks.
    Identical gallery rows get bitwise identical scores (each distinct row is scored
    once), so ties between identical embeddings are exact."""
    unique, inverse = np.unique(gallery, axis=0, return_inverse=True)
    unique, inverse = unique.astype(np.float64), inverse.reshape(-1)
    for start in range(0, len(queries), _QUERY_CHUNK):
        rows = slice(start, start + _QUERY_CHUNK)
        yield rows, (queries[rows].astype(np.float64) @ unique.T)[:, inverse]


def retrieval_ranks(
    queries: np.ndarray, gallery: np.ndarray, query_groups: np.ndarray, gallery_groups: np.ndarray
) -> np.ndarray:
    """Rank (1-based, ties pessimistic) of the best correct gallery item per query.
    Item j is correct for query i when gallery_groups[j] == query_groups[i]."""
    if not np.isin(query_groups, gallery_groups).all():
        raise ValueError("every query needs at least one correct item in the gallery.")
    ranks = np.empty(len(queries), np.int64)
    for rows, scores in _score_chunks(queries, gallery):
        correct = query_groups[rows, None] == gallery_groups[None, :]
        best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
        ranks[rows] = 1 + np.sum(~correct & (scores >= best), axis=1)
    return ranks


def _top_k(queries, gallery, k: int) -> np.ndarray:
    """Indices of the top-k gallery items per query (score descending, then index)."""
    out = []
    for _, scores in _score_chunks(queries, gallery):
        out.append(np.argsort(-scores, axis=1, kind="stable")[:, :k])
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def retrieval_metrics(
    image_emb, text_emb, *, groups=None, findings=None, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@K and median rank both ways for N pairs (row i of both is pair i).
    `groups` (N,): pairs with equal values count as matches of one another (default:
    only the own pair). `findings` (N, F) multi-hot: adds i2t_findings_P@K."""
    image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape or not len(image_emb):
        raise ValueError(
            f"embeddings must be two non-empty (N, D) arrays of one shape; got "
            f"{image_emb.shape} and {text_emb.shape}."
        )
    n = len(image_emb)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}.")
    metrics: dict[str, float] = {"num_pairs": float(n)}
    for name, queries, gallery in (("i2t", image_emb, text_emb), ("t2i", text_emb, image_emb)):
        ranks = retrieval_ranks(queries, gallery, groups, groups)
        for k in ks:
            metrics[f"{name}_R@{k}"] = float(np.mean(ranks <= k))
        metrics[f"{name}_median_rank"] = float(np.median(ranks))
        metrics[f"{name}_mean_rank"] = float(np.mean(ranks))
    if findings is not None:
        findings = np.asarray(findings)
        if len(findings) != n:
            raise ValueError(f"findings has {len(findings)} rows for {n} pairs.")
        top = _top_k(image_emb, text_emb, max(ks))
        same = np.all(findings[top] == findings[:, None], axis=-1)  # (N, K)
        for k in ks:
            metrics[f"i2t_findings_P@{k}"] = float(np.mean(same[:, :k]))
    return metrics


def report_groups(reports: Sequence[str] | None, text_ids: np.ndarray) -> np.ndarray:
    """Group id per pair: equal for identical reports (by text, else by token ids)."""
    if reports is not None:
        keys = np.asarray([str(r).strip() for r in reports], dtype=object)
        return np.unique(keys, return_inverse=True)[1].reshape(-1)
    return np.unique(np.asarray(text_ids), axis=0, return_inverse=True)[1].reshape(-1)


# --------------------------------------------------------------------------- embeddings
class EmbeddingExtractor:
    """Embeds eval batches with the unmasked encoders (deterministic, jitted).

    A batch is sharded over the mesh's batch axes when its size divides them,
    otherwise replicated. Every process holds the whole eval batch."""

    def __init__(self, spec, mesh):
        self.mesh = mesh
        self._shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._replicated = sharding.replicated(mesh)

        def embed(params, images, ids, mask):
            model = spec.bind(params)
            if not hasattr(model, "embed_text"):
                raise ValueError(
                    f"retrieval needs an image-report model (model.name 'mcr'); "
                    f"got {type(model).__name__}."
                )
            return model.embed_image(images), model.embed_text(ids, mask)

        self._embed = jax.jit(embed, out_shardings=self._replicated)

    def _global(self, array: np.ndarray) -> jax.Array:
        target = self._batch_sharding if len(array) % self._shards == 0 else self._replicated
        return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

    def __call__(self, params, batches: Iterable[dict], keep_images: int = 0) -> dict:
        """Valid rows of all batches: image_emb, text_emb (N, P) f32, text_ids, and
        reports / findings when the batches carry them; `images`: the first
        `keep_images` valid images (for figures)."""
        out = {
            "image_emb": [],
            "text_emb": [],
            "text_ids": [],
            "reports": [],
            "findings": [],
            "images": [],
        }
        kept, has_reports, has_findings = 0, True, True
        with jax.set_mesh(self.mesh):
            for batch in batches:
                valid = np.asarray(batch.get("valid", np.ones(len(batch["image"]), bool)), bool)
                args = [
                    self._global(np.asarray(batch[k])) for k in ("image", "text_ids", "text_mask")
                ]
                image_emb, text_emb = sharding.to_host(self._embed(params, *args))
                out["image_emb"].append(np.asarray(image_emb)[valid])
                out["text_emb"].append(np.asarray(text_emb)[valid])
                out["text_ids"].append(np.asarray(batch["text_ids"])[valid])
                has_reports &= "report" in batch
                has_findings &= "finding_labels" in batch
                if has_reports:
                    out["reports"].extend(np.asarray(batch["report"], dtype=object)[valid])
                if has_findings:
                    out["findings"].append(np.asarray(batch["finding_labels"])[valid])
                if kept < keep_images:
                    images = np.asarray(batch["image"])[valid][: keep_images - kept]
                    out["images"].append(images)
                    kept += len(images)
        if not out["image_emb"]:
            raise ValueError("the retrieval eval split gave no batches.")
        result = {k: np.concatenate(out[k]) for k in ("image_emb", "text_emb", "text_ids")}
        result["reports"] = list(out["reports"]) if has_reports else None
        result["findings"] = np.concatenate(out["findings"]) if has_findings else None
        result["images"] = np.concatenate(out["images"]) if out["images"] else None
        return result


# --------------------------------------------------------------------------- figure
def _display(image: np.ndarray, size: int, mean: float | None, std: float | None) -> Image.Image:
    pixels = np.asarray(image, np.float64)[..., 0]
    if mean is not None and std is not None:
        pixels = np.clip(pixels * std + mean, 0.0, 1.0)
    else:  # unknown normalisation: stretch this image's range
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    tile = Image.fromarray((pixels * 255 + 0.5).astype(np.uint8))
    return tile.resize((size, size), Image.NEAREST)


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `max_lines` (last one with '…')."""
    lines, current = [], ""
    for word in str(text).split():
        candidate = f"{current} {word}".strip()
        if text_size(font, candidate)[0] <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and text_size(font, last + " …")[0] > width:
            last = last[:-1]
        lines[-1] = last + " …"
    return lines


def retrieval_figure(
    images: np.ndarray,
    true_reports: Sequence[str],
    retrieved: Sequence[Sequence[tuple[str, float, bool]]],
    path: str,
    title: str = "",
    *,
    norm_mean: float | None = None,
    norm_std: float | None = None,
) -> str:
    """PNG with one row per query image: the image, its own report, and the retrieved
    reports (text, score, correct) best first, correct ones green, wrong ones red."""
    check_png_path(path)
    if not (len(images) == len(true_reports) == len(retrieved)) or not len(images):
        raise ValueError(
            "images, true_reports and retrieved must be non-empty and of one "
            "length (one entry per query)."
        )
    small, regular, large = figure_font(13), figure_font(15), figure_font(17)
    thumb, margin, gap, text_width = 160, 12, 14, 760
    line_height = text_size(regular, "Ag")[1] + 7
    rows = []
    for report, hits in zip(true_reports, retrieved):
        lines = [("query's report: ", report, (90, 90, 90))]
        for rank, (text, score, correct) in enumerate(hits, 1):
            mark = "correct" if correct else "wrong"
            colour = (0, 120, 40) if correct else (190, 30, 30)
            lines.append((f"{rank}. [{score:.3f}, {mark}] ", text, colour))
        wrapped = []
        for prefix, text, colour in lines:
            body = _wrap(prefix + str(text), regular, text_width, 3)
            wrapped.append((body, colour))
        height = max(thumb, sum(len(b) * line_height + 4 for b, _ in wrapped))
        rows.append((wrapped, height))
    header = 40
    width = margin + thumb + gap + text_width + margin
    height = header + sum(h + gap for _, h in rows) + 24
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 10), title, font=large, fill=(0, 0, 0))
    y = header
    for image, (wrapped, row_height) in zip(images, rows):
        canvas.paste(_display(image, thumb, norm_mean, norm_std).convert("RGB"), (margin, y))
        ty = y
        for body, colour in wrapped:
            for line in body:
                draw.text((margin + thumb + gap, ty), line, font=regular, fill=colour)
                ty += line_height
            ty += 4
        y += row_height + gap
    legend = "top-3 reports retrieved for each query image by cosine similarity"
    return save_figure(canvas, path, legend, small, (margin, height - 20))


# --------------------------------------------------------------------------- hooks
def _named(config_section, key, default):
    return config_section.get(key, default) if config_section is not None else default


class RetrievalHooks(EvalHook):
    """The trainer's eval hook for image-report pretraining (see the module docstring).

    `eval_batches`: the held-out split as dict batches ("image", "text_ids",
    "text_mask", "valid", optionally "report" strings and "finding_labels" multi-hot, as
    input_pipeline.pairs.make_eval_pairs gives them):
    an iterable that can be walked repeatedly, a callable returning a fresh one
    per eval, or a one-shot iterator (then kept in memory after the first pass).
    Config read: eval_every, eval_use_ema (+ ema_decay), data.norm_mean/norm_std
    (figure display; per-image range when unset), and `retrieval` (optional):
    match_identical_reports (default True), figure_queries (default 4), top_k (3).
    """

    def __init__(
        self,
        config,
        spec,
        mesh,
        workdir: str,
        writer,
        eval_batches: Iterable[dict] | Callable[[], Iterable[dict]],
    ):
        super().__init__(config.get("eval_every", 0), use_ema=uses_ema(config))
        self.workdir, self.writer = workdir, writer
        self.figures = os.path.join(workdir, "figures")
        section = config.get("retrieval", None)
        self.match_identical = bool(_named(section, "match_identical_reports", True))
        self.figure_queries = int(_named(section, "figure_queries", 4))
        self.top_k = int(_named(section, "top_k", 3))
        data = config.get("data", None)
        self.norm = (_named(data, "norm_mean", None), _named(data, "norm_std", None))
        self.extract = EmbeddingExtractor(spec, mesh)
        self._source = eval_batches
        self._cached = None
        self.last: tuple[int, dict] | None = None

    @classmethod
    def for_split(cls, config, spec, mesh, workdir: str, writer, *, split: str = "val",
                  data_cfg=None, tokenizer=None, batch_size: int | None = None):
        """Hooks on every pair of `split` of `data_cfg` (default config.data), batched by
        `batch_size` (default config.eval_batch_size, else the global batch);
        tokenizer: default the data's (pairs.ensure_tokenizer)."""
        from input_pipeline import pairs  # pylint: disable=g-import-not-at-top

        batch_size = batch_size or config.get("eval_batch_size", None) or config.global_batch_size
        eval_pairs = pairs.make_eval_pairs(
            config.data if data_cfg is None else data_cfg, split,
            image_size=config.model.image_size, batch_size=int(batch_size), tokenizer=tokenizer)
        log.info("Retrieval evals on %d %s pairs (strict R@1 ceiling from repeated findings: "
                 "%.3f)", eval_pairs.num_pairs, split, eval_pairs.recall_at_1_ceiling())
        return cls(config, spec, mesh, workdir, writer, eval_pairs)

    def _batches(self) -> Iterable[dict]:
        if callable(self._source):
            return self._source()
        if self._cached is None and iter(self._source) is self._source:
            self._cached = list(self._source)  # a one-shot iterator: keep it for later evals
        return self._cached if self._cached is not None else self._source

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the pairs' finding labels (empty when the data has none)."""
        return tuple(getattr(self._source, "label_names", ()) or ())

    def embed(self, params, keep_images: int = 0) -> dict:
        """Embeddings and batch fields of every pair (`EmbeddingExtractor`)."""
        return self.extract(params, self._batches(), keep_images=keep_images)

    def evaluate(self, params) -> tuple[dict, dict]:
        """(metrics, extracted embeddings and batch fields)."""
        data = self.embed(params, keep_images=self.figure_queries)
        groups = report_groups(data["reports"], data["text_ids"]) if self.match_identical else None
        metrics = retrieval_metrics(
            data["image_emb"], data["text_emb"], groups=groups, findings=data["findings"]
        )
        data["groups"] = groups if groups is not None else np.arange(len(data["image_emb"]))
        return metrics, data

    def figure(self, data: dict, path: str, title: str) -> str | None:
        if jax.process_index() != 0 or data["images"] is None or self.figure_queries <= 0:
            return None
        count = len(data["images"])
        reports = data["reports"] or [f"report of pair #{i}" for i in range(len(data["groups"]))]
        top = _top_k(data["image_emb"][:count], data["text_emb"], self.top_k)
        scores = data["image_emb"][:count].astype(np.float64) @ data["text_emb"].T.astype(
            np.float64
        )
        retrieved = [
            [
                (reports[j], float(scores[q, j]), data["groups"][j] == data["groups"][q])
                for j in top[q]
            ]
            for q in range(count)
        ]
        return retrieval_figure(
            data["images"],
            reports[:count],
            retrieved,
            path,
            title,
            norm_mean=self.norm[0],
            norm_std=self.norm[1],
        )

    def after_step(self, step: int, state) -> dict[str, float]:
        """Evaluates; writes and returns the scalars as "retrieval/NAME"."""
        metrics, data = self.evaluate(self.eval_params(state))
        logged = {f"retrieval/{k}": v for k, v in metrics.items() if math.isfinite(v)}
        self.writer.write(step, logged)
        log.info(
            "step %d | retrieval (%d pairs): i2t R@1 %.4f R@5 %.4f R@10 %.4f | "
            "t2i R@1 %.4f R@5 %.4f R@10 %.4f",
            step,
            metrics["num_pairs"],
            metrics["i2t_R@1"],
            metrics["i2t_R@5"],
            metrics["i2t_R@10"],
            metrics["t2i_R@1"],
            metrics["t2i_R@5"],
            metrics["t2i_R@10"],
        )
        self.figure(
            data, os.path.join(self.figures, f"retrieval_{step}.png"), f"retrieval, step {step}"
        )
        self.last = (step, metrics)
        return logged

    def finish(self, state, *, trained: bool = True) -> dict | None:
        """Writes WORKDIR/retrieval_metrics.json for the final parameters (evaluating
        them unless `after_step` just did); skipped when a finished run is re-run."""
        path = os.path.join(self.workdir, "retrieval_metrics.json")
        if not trained and os.path.exists(path):
            return None
        step = int(sharding.to_host(state.step))
        if self.last is not None and self.last[0] == step:
            metrics = self.last[1]
        else:
            metrics, data = self.evaluate(self.eval_params(state))
            self.figure(
                data, os.path.join(self.figures, f"retrieval_{step}.png"), f"retrieval, step {step}"
            )
        metrics = dict(metrics, step=step, match_identical_reports=self.match_identical)
        if jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(metrics, f, indent=1)
        return metrics
