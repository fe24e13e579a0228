"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per logged step) and
TensorBoard event files (tensorboardX, no TensorFlow). Only process 0 writes."""

from __future__ import annotations

import json
import math
import os

import jax


def _plain(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # JSON has no NaN/inf


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            # Append: a resumed run continues the same file.
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            # TensorBoard tag names allow no "@" (e.g. "retrieval/i2t_R@1").
            self._tb.add_scalar(key.replace("@", "_at_"), float(value), global_step=int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
