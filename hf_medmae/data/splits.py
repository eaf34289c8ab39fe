"""Seeded splits of a data set: train / validation (/ test) by image, and label-budget subsets of train.

Every split in the package comes from here, each seeded, so a run and its rerun hold out the same images:
`split_counts` (whole items by count: images or volumes) under `split_indices` (pre-training), `split_three` +
`subsample` (segmentation, by image) and `split_named` (named or counted items, e.g. volumes), and
`stratified_split` + `label_subset` (classification, stratified by class with scikit-learn).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def split_counts(n: int, n_val: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split of n whole items (images or volumes) into sorted train / validation / test indices by counts.

    The one seeded shuffle behind `split_indices`, `split_three` and `split_named`: validation is the first
    `n_val` of a permutation, test the next `n_test`, train the rest.

    Example:
        >>> [s.tolist() for s in split_counts(5, 1, 1, seed=0)]
        [[0, 1, 3], [2], [4]]
    """
    if n_val < 0 or n_test < 0 or n - n_val - n_test < 1:
        raise ConfigError(
            f"{n} items cannot give {n_val} validation and {n_test} test items and still train on one.",
            "hold out fewer (validation_volumes / test_volumes, or the fractions), or add data.",
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val + n_test :]), np.sort(order[:n_val]), np.sort(order[n_val : n_val + n_test])


def split_named(
    names: list[str],
    n_val: int,
    n_test: int,
    seed: int,
    validation_names: list[str] | None = None,
    test_names: list[str] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Train / validation / test indices of named items: the named ones when any list is given (test only when
    `n_test` > 0), else `split_counts` of whole items.

    Example:
        >>> split_named(["a", "b", "c"], 1, 1, seed=0, validation_names=["c"])
        ([0, 1], [2], [])
    """
    if validation_names is None and test_names is None:
        return tuple(part.tolist() for part in split_counts(len(names), n_val, n_test, seed))
    val, test = list(validation_names or []), list(test_names or []) if n_test else []
    unknown = sorted(set(val + test) - set(names))
    if unknown or set(val) & set(test) or len(set(val + test)) >= len(names):
        raise ConfigError(
            f"validation_names {val} / test_names {test} must be distinct items of {names} and leave one to train.",
            "name existing items, each in one list.",
        )
    train = [i for i, n in enumerate(names) if n not in val + test]
    return train, [names.index(n) for n in val], [names.index(n) for n in test]


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle split: (train indices, validation indices); at least one of each when n >= 2."""
    if n == 0:
        raise DataError(
            "the dataset is empty: no images were found.", "check train_data points at a folder or file with images."
        )
    n_val = int(round(n * validation_fraction))
    n_val = min(max(n_val, 1 if validation_fraction > 0 and n >= 2 else 0), n - 1)
    return split_counts(n, n_val, 0, seed)[:2]


def split_three(
    n: int, validation_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded (train, validation, test) image indices; validation and test get at least one image each.

    Example:
        >>> [len(s) for s in split_three(10, 0.2, 0.2, seed=0)]
        [6, 2, 2]
    """
    if n < 3:
        raise DataError(
            f"{n} image/mask pairs cannot be split into train, validation and test.", "provide at least 3 pairs."
        )
    n_val = max(1, round(n * validation_fraction))
    n_test = max(1, round(n * test_fraction))
    if n_val + n_test >= n:
        raise ConfigError(
            f"validation_fraction {validation_fraction} + test_fraction {test_fraction} "
            f"leave no training images of {n}.",
            "lower the fractions.",
        )
    return split_counts(n, n_val, n_test, seed)


def subsample(
    indices: np.ndarray, fraction: float, seed: int, count: int | None = None, what: str = "images"
) -> np.ndarray:
    """A seeded `fraction` (at least one) of `indices`, or `count` of them, sorted: the `train_fraction` (or
    `train_images`) over images, `train_volumes` over volumes. One seed draws one order, so smaller sets lie inside
    larger ones (nested curves)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"train_fraction={fraction} is outside (0, 1].", "use e.g. 0.1 for 10% of the training images."
        )
    if count is not None and not 1 <= count <= len(indices):
        raise ConfigError(
            f"train_{what}={count}, but the training split holds {len(indices)} {what}.",
            f"use 1 to {len(indices)}, or leave train_{what} unset for all of them.",
        )
    count = count if count is not None else max(1, round(fraction * len(indices)))
    return np.sort(np.random.default_rng([seed, 1]).permutation(indices)[:count])


@dataclass
class Split:
    """Indices of train / validation / test, and the classes too rare to be evaluated (train only)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_only_classes: list[str] = field(default_factory=list)


def _carve(
    pool: np.ndarray, labels: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Split `pool` into (rest, held out) stratified by `labels`; classes with < 2 members in the pool stay in rest."""
    if fraction <= 0 or len(pool) < 2:
        return pool, pool[:0], []
    if labels is None:  # multi-label: plain seeded shuffle split
        rest, held = train_test_split(pool, test_size=fraction, random_state=seed)
        return np.sort(rest), np.sort(held), []
    counts = np.bincount(labels[pool])
    rare = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
    keep = pool[np.isin(labels[pool], rare)]
    rest_pool = pool[~np.isin(labels[pool], rare)]
    n_held = max(int(round(len(pool) * fraction)), len(np.unique(labels[rest_pool])))  # sklearn: >= 1 per class
    if n_held >= len(rest_pool):
        raise DataError(
            f"{len(pool)} images are too few to hold out {fraction:.0%} stratified by class.",
            "lower validation_fraction / test_fraction or add images.",
        )
    rest, held = train_test_split(rest_pool, test_size=n_held, stratify=labels[rest_pool], random_state=seed)
    return np.sort(np.concatenate([rest, keep])), np.sort(held), rare


def stratified_split(
    labels: np.ndarray, class_names: list[str], validation_fraction: float, test_fraction: float, seed: int
) -> Split:
    """Seeded stratified train / validation / test split (scikit-learn), test first, then validation from the rest.

    A class with fewer than 2 examples left in the pool being split stays in train (so WBC's single
    basophil is trained on but absent from validation and test; they report it with support 0).
    Multi-label ([N, K]) labels are split by a seeded shuffle, not stratified.

    Args:
        labels: [N] class indices or [N, K] 0/1.
        class_names: K names (used in `train_only_classes`).
        validation_fraction, test_fraction: shares of all N images.
        seed: split seed.

    Example:
        >>> s = stratified_split(np.array([0] * 8 + [1] * 8 + [2]), ["a", "b", "c"], 0.25, 0.25, 0)
        >>> len(s.train), len(s.val), len(s.test), s.train_only_classes
        (9, 4, 4, ['c'])
    """
    if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
        raise DataError(
            f"validation_fraction {validation_fraction} + test_fraction {test_fraction} must lie in [0, 1).",
            "use e.g. 0.15 and 0.2.",
        )
    strat = labels if labels.ndim == 1 else None
    pool = np.arange(len(labels))
    rest, test, rare_test = _carve(pool, strat, test_fraction, seed)
    # validation share of what is left, so the final shares are the requested shares of all images
    val_share = validation_fraction / (1 - test_fraction) if test_fraction < 1 else 0.0
    train, val, rare_val = _carve(rest, strat, val_share, seed)
    rare = sorted(set(rare_test) | set(rare_val))
    split = Split(train, val, test, [class_names[c] for c in rare])
    if split.train_only_classes:
        logger.warning(
            "classes %s have too few examples to be stratified into validation/test: kept in train only "
            "(validation/test report them with support 0)",
            split.train_only_classes,
        )
    return split


def class_counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    """{class name: number of examples} ([N] indices, or positives per column of [N, K] 0/1)."""
    counts = labels.sum(0) if labels.ndim == 2 else np.bincount(labels, minlength=len(class_names))
    return {name: int(n) for name, n in zip(class_names, counts)}


def label_subset(
    labels: np.ndarray, class_names: list[str], fraction: float, seed: int, strict: bool = False
) -> np.ndarray:
    """Seeded stratified subset (positions into `labels`) keeping `fraction` of each class, at least one per class.

    Per class `max(1, floor(n_c * fraction + 0.5))` examples; with `strict`, a class whose share rounds
    to zero raises a DataError naming it. Multi-label: a seeded random `fraction` of rows (at least one).

    Args:
        labels: labels of the TRAIN split: [N] class indices or [N, K] 0/1.
        class_names: K names, for messages and the logged counts.
        fraction: in (0, 1]; 1 returns everything.
        seed: subset seed.
        strict: refuse to top a class up to one example.

    Example:
        >>> label_subset(np.array([0] * 10 + [1] * 3), ["a", "b"], 0.2, seed=0).size  # 2 of a, 1 of b
        3
    """
    if not 0 < fraction <= 1:
        raise DataError(
            f"train_fraction={fraction} is outside (0, 1].", "use e.g. 0.1 for 10% of the training labels."
        )
    rng = np.random.default_rng(seed)
    if labels.ndim == 2:
        n = max(1, int(np.floor(len(labels) * fraction + 0.5)))
        return np.sort(rng.permutation(len(labels))[:n])
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(np.floor(len(members) * fraction + 0.5))
        if n == 0 and strict:
            raise DataError(
                f"train_fraction={fraction} leaves class {class_names[c]!r} "
                f"({len(members)} training examples) with none.",
                f"raise train_fraction to at least {0.5 / len(members):.3g}, "
                "or set strict_fraction: false to keep one example of it.",
            )
        chosen.append(rng.permutation(members)[: max(n, 1)])
    subset = np.sort(np.concatenate(chosen))
    logger.info(
        "train_fraction %.3g: %d of %d training examples, per class %s",
        fraction,
        subset.size,
        len(labels),
        class_counts(labels[subset], class_names),
    )
    return subset


__all__ = [
    "Split",
    "class_counts",
    "label_subset",
    "split_counts",
    "split_indices",
    "split_named",
    "split_three",
    "stratified_split",
    "subsample",
]
