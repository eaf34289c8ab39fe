"""Result files that several processes fill together, and the paired interval their reports give.

A study runs many arms and seeds, often in several processes and over several sessions. Each finished run is
merged into one JSON file under a file lock, so no process loses another's run, and a rerun replaces its
own entry instead of adding a second one.

    >>> from hf_medmae.evaluation.results import paired_ci95, record
"""

from __future__ import annotations

import fcntl
import json
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scipy.stats import t as student_t


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON, atomically: a reader never sees half a file.

    Args:
        path: the JSON file; a `.tmp` file beside it holds the text until it replaces `path`.
        data: anything `json.dumps` accepts.
    """
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock on `<path>.lock` that `record` takes: a read-modify-write of `path` inside it
    (a report adding its summary) loses no run that another process records meanwhile."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def record(path: Path, results: dict, item: dict, key: Callable[[dict], tuple], field: str = "runs") -> dict:
    """Merge one finished run into the JSON file as it is on disk now, and return the merged results.

    The read-modify-write holds an exclusive lock on `<path>.lock`, so processes that finish at the same moment
    each keep the other's run. An item with the same `key` as `item` is replaced. A file written under another
    `protocol` than `results["protocol"]` is discarded and `results` starts the file afresh.

    Args:
        path: the study's JSON file (created when absent).
        results: this process's copy of the file's contents: the header (`protocol`, hardware, ...) to start from.
        item: the run to add.
        key: what identifies a run, e.g. `lambda r: (r["arm"], r["seed"])`.
        field: the list in the file that holds the runs.

    Returns:
        The file's contents after the merge.

    Example:
        >>> record(Path("study.json"), {"protocol": "v2"}, {"arm": "mae", "seed": 0, "f1": 0.9},
        ...        key=lambda r: (r["arm"], r["seed"]))  # doctest: +SKIP
    """
    with locked(path):
        current = json.loads(path.read_text()) if path.is_file() else results
        if current.get("protocol") != results.get("protocol"):
            current = results
        current[field] = [r for r in current.get(field, []) if key(r) != key(item)] + [item]
        write_json(path, current)
    return current


def paired_ci95(deltas: list[float]) -> list[float] | None:
    """The 95% interval of the mean paired difference (Student's t with len(deltas) - 1 degrees of freedom).

    It excludes 0 only when the difference stands out from the seed-to-seed noise.

    Args:
        deltas: one difference per seed (arm minus baseline, same seed).

    Returns:
        `[low, high]`, or None below 2 seeds.

    Example:
        >>> [round(x, 4) for x in paired_ci95([0.01, 0.02, 0.03])]
        [-0.0048, 0.0448]
    """
    if len(deltas) < 2:
        return None
    half = float(student_t.ppf(0.975, len(deltas) - 1)) * statistics.stdev(deltas) / len(deltas) ** 0.5
    return [statistics.mean(deltas) - half, statistics.mean(deltas) + half]
