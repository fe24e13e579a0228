"""What the multi-run drivers share: checking every run config before the first run
starts, and writing result tables as CSV and Markdown."""

from __future__ import annotations

import csv
import math

from mimjax import run_config, tasks


def check_sections(sections) -> None:
    """Checks (name, run config) pairs as main.py would check each run; an error names
    the section (`config.arms.few: ...`)."""
    for name, section in sections:
        try:
            run_config.check(section)
            tasks.for_config(section)
        except run_config.ConfigError as error:
            raise run_config.ConfigError(f"config.{name}: {error}") from None


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def to_markdown(rows: list[dict]) -> str:
    """A Markdown table with the rows' keys as columns; floats to 3 decimals."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
