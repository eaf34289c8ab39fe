"""The studies' JSON files: written atomically and merged with what is on disk, so that several processes (one
per seed, arm or recipe) can fill one file and a study can be completed over several sessions; and the paired
interval their reports give."""

from __future__ import annotations

import fcntl
import json
import statistics
from collections.abc import Callable
from pathlib import Path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a file


def record(path: Path, results: dict, item: dict, key: Callable[[dict], tuple], field: str = "runs") -> dict:
    """Add `item` to `field` of the JSON as it is on disk now, replacing an item with the same key, and return
    the merged results. A file written under another `protocol` is replaced by `results`."""
    # read-modify-write under a lock: processes that finish within the same second (many runs on one GPU) would
    # otherwise each write the file without the other's item
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(path.read_text()) if path.is_file() else results
        if current.get("protocol") != results.get("protocol"):
            current = results
        current[field] = [r for r in current.get(field, []) if key(r) != key(item)] + [item]
        write_json(path, current)
    return current


def paired_ci95(deltas: list[float]) -> list[float] | None:
    """The 95% interval of the mean paired difference (Student's t, seeds − 1 degrees of freedom): excludes 0 only if
    the difference stands out from the seed-to-seed noise. None below 2 seeds."""
    if len(deltas) < 2:
        return None
    from scipy.stats import t

    half = t.ppf(0.975, len(deltas) - 1) * statistics.stdev(deltas) / len(deltas) ** 0.5
    return [statistics.mean(deltas) - half, statistics.mean(deltas) + half]
