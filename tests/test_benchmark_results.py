"""The studies' result files (hf_medmae.evaluation.results): several processes fill one file without losing runs;
the paired interval."""

import json
import multiprocessing
from pathlib import Path

import pytest

from hf_medmae.evaluation.results import paired_ci95, record

KEY = lambda r: (r["arm"], r["seed"])  # noqa: E731


def test_processes_with_stale_copies_keep_each_others_runs(tmp_path):
    path = tmp_path / "study.json"
    header = {"protocol": "v2", "runs": []}
    first, second = json.loads(json.dumps(header)), json.loads(json.dumps(header))  # two processes, each its own copy
    first = record(path, first, {"arm": "a", "seed": 0, "f1": 0.5}, KEY)
    second = record(path, second, {"arm": "b", "seed": 0, "f1": 0.6}, KEY)  # never saw arm a in memory
    on_disk = json.loads(path.read_text())
    assert sorted(KEY(r) for r in on_disk["runs"]) == [("a", 0), ("b", 0)]
    assert on_disk == second
    record(path, first, {"arm": "a", "seed": 0, "f1": 0.7}, KEY)  # a rerun replaces, never duplicates
    runs = json.loads(path.read_text())["runs"]
    assert len(runs) == 2 and [r["f1"] for r in runs if r["arm"] == "a"] == [0.7]
    assert not path.with_suffix(".tmp").exists()


def test_a_file_of_another_protocol_is_replaced(tmp_path):
    path = tmp_path / "study.json"
    record(path, {"protocol": "v1", "runs": []}, {"arm": "a", "seed": 0}, KEY)
    merged = record(path, {"protocol": "v2", "runs": []}, {"arm": "b", "seed": 1}, KEY, field="runs")
    assert merged["protocol"] == "v2" and [KEY(r) for r in merged["runs"]] == [("b", 1)]


def test_paired_interval_is_students_t_and_needs_two_seeds():
    low, high = paired_ci95([0.01, 0.02, 0.03])  # mean 0.02, sd 0.01, t(0.975, 2 df) = 4.303
    assert (low + high) / 2 == pytest.approx(0.02)
    assert (high - low) / 2 == pytest.approx(4.3027 * 0.01 / 3**0.5, rel=1e-4)
    assert paired_ci95([0.05]) is None


def _record_many(path: str, arm: str) -> None:
    for seed in range(25):
        record(Path(path), {"protocol": "v2", "runs": []}, {"arm": arm, "seed": seed}, KEY)


def test_processes_writing_at_the_same_moment_lose_no_run(tmp_path):
    path = tmp_path / "study.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_record_many, args=(str(path), arm)) for arm in "abcdef"]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    runs = json.loads(path.read_text())["runs"]
    assert sorted(KEY(r) for r in runs) == [(arm, seed) for arm in "abcdef" for seed in range(25)]
