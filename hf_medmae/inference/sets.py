"""The `--predict_only` sets, for every task: each set beside its own truth (labels, masks or label volumes, or
none), and one row of scores per set in `external_metrics.csv`."""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import ConfigError


def sets_with_truths(
    sources: list[str] | None, truths: list | None, model: str | None, data_flag: str, truth_flag: str, script: str
) -> list:
    """One truth per set (`""` / None where a set has none), or a ConfigError that names the flags to fix.

    Example:
        >>> sets_with_truths(["site1", "site2"], None, "outputs/run", "predict_images", "predict_mask_dirs",
        ...                  "run_segmentation.py")
        ['', '']
    """
    if not sources or not model:
        raise ConfigError(
            f"predict_only needs {data_flag} and a model_name_or_path written by {script}.",
            f"pass --model_name_or_path OUTPUT_DIR_OF_A_RUN --{data_flag} FOLDER [FOLDER ...].",
        )
    truths = truths or [""] * len(sources)
    if len(truths) != len(sources):
        raise ConfigError(
            f"{len(truths)} {truth_flag} for {len(sources)} {data_flag} sets.",
            "give one per set, in the same order ('' for a set without).",
        )
    return truths


def write_external_metrics(rows: list[dict], output_dir: str | Path) -> None:
    """`external_metrics.csv` in `output_dir`: one row per set, the union of the rows' columns (none: no file)."""
    if not rows:
        return
    with Path(output_dir, "external_metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


__all__ = ["sets_with_truths", "write_external_metrics"]
