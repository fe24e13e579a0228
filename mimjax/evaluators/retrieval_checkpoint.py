"""Retrieval evaluation of any saved image-report checkpoint, without the trainer.

    python tools/evaluate_retrieval.py --workdir DIR [--step N] [--split val|test]

It scores a checkpoint exactly as the trainer's eval hook does
(`retrieval.RetrievalHooks`: unmasked encoders, the same metrics and figure), so
the figures of an earlier step, the test split, or the run's data at another path
can be had after training. The report tokenizer is the checkpoint's own
(WORKDIR/tokenizer.json, copied there by the trainer), never a fresh one trained
on the data: token ids only mean something to the text tower that learned them.

Writes OUT/retrieval_{split}_step{N}.json (metrics, step, split, checkpoint) and
OUT/figures/retrieval_{split}_step{N}.png; OUT defaults to the workdir, whose
training outputs (retrieval_metrics.json, figures/retrieval_STEP.png) it leaves alone.

`finding_probe=True` (`--finding-probe`) adds, for data with finding labels, the
per-finding AUC of linear probes fitted on the train pairs' image and report
embeddings ("image_auc/NAME", "text_auc/NAME"; `finding_probe.py`): which findings
each tower encodes, hence what limits R@1.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from mimjax import inference, run_config, sharding
from mimjax.evaluators import finding_probe as finding_probe_lib
from mimjax.evaluators import retrieval
from mimjax.models.spec import ModelSpec

log = logging.getLogger(__name__)

def _run_config(workdir: str, config) -> ml_collections.ConfigDict:
    config = (run_config.resolve_config(config) if config is not None
              else run_config.load_run_config(workdir))
    name = config.get("model", {}).get("name", None)
    if name != "mcr":
        raise ValueError(
            f"{workdir} holds a model.name={name!r} run; retrieval needs an image-report "
            "checkpoint (model.name 'mcr', e.g. configs/mcr_demo.py). For an image-only "
            "checkpoint use mimjax.inference.Encoder."
        )
    return config


def evaluate_checkpoint(
    workdir: str,
    *,
    step: int | None = None,
    split: str = "val",
    data_dir: str | None = None,
    tokenizer_path: str | None = None,
    out_dir: str | None = None,
    use_ema: bool = False,
    batch_size: int | None = None,
    config=None,
    finding_probe: bool = False,
) -> dict:
    """Retrieval metrics of step `step` (None = latest) on `split`; see the module
    docstring for what is written. data_dir overrides the run's config.data.dir;
    config is only needed for a workdir without config.json."""
    from input_pipeline import pairs, text  # pylint: disable=g-import-not-at-top

    if split not in pairs.SPLITS:  # before the checkpoint is read
        raise ValueError(f"split must be one of {pairs.SPLITS}, got {split!r}")
    config = _run_config(workdir, config)
    tokenizer_path = tokenizer_path or os.path.join(workdir, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(
            f"no tokenizer at {tokenizer_path}: the trainer keeps the run's tokenizer in "
            "WORKDIR/tokenizer.json. Pass the tokenizer the run trained with "
            "(--tokenizer DATA_DIR/tokenizer.json) if it was moved."
        )
    tokenizer = text.load_tokenizer(tokenizer_path, int(config.model.text.vocab_size))
    checkpoint = inference.load_checkpoint(workdir, step, config=config, use_ema=use_ema)

    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    if data_dir is not None:
        data_cfg.dir = data_dir
    out_dir = out_dir or workdir
    mesh = sharding.make_mesh({"data": -1})
    spec = ModelSpec.from_config(config.model)
    hooks = retrieval.RetrievalHooks.for_split(
        config, spec, mesh, out_dir, None, split=split,
        data_cfg=data_cfg, tokenizer=tokenizer, batch_size=batch_size)
    if finding_probe and not hooks.label_names:  # before any embedding is computed
        raise ValueError(
            "the finding probe needs finding labels, and these pairs have none; "
            "drop --finding-probe."
        )
    log.info("Scoring step %d of %s", checkpoint.step, workdir)
    params = jax.device_put(checkpoint.params, sharding.replicated(mesh))
    metrics, data = hooks.evaluate(params)
    if finding_probe:
        if split == "train":
            train_data = data
        else:
            train_data = retrieval.RetrievalHooks.for_split(
                config, spec, mesh, out_dir, None, split="train",
                data_cfg=data_cfg, tokenizer=tokenizer, batch_size=batch_size).embed(params)
        metrics.update(finding_probe_lib.finding_probe_auc(train_data, data, hooks.label_names))
    name = f"retrieval_{split}_step{checkpoint.step}"
    hooks.figure(data, os.path.join(out_dir, "figures", f"{name}.png"),
                 f"retrieval, {split} split, step {checkpoint.step}")
    metrics = dict(metrics, step=checkpoint.step, split=split, use_ema=use_ema,
                   match_identical_reports=hooks.match_identical,
                   checkpoint=os.path.abspath(workdir))
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics
