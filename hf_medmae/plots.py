"""Figures for evaluation reports: confusion matrix, confidence, reliability, label efficiency,
segmentation overlays and MAE reconstructions, for volumes as orthogonal slices. Matplotlib ``Agg`` backend;
every function writes a PNG and returns its path.

    >>> plot_confusion_matrix(np.array([[5, 1], [0, 4]]), ["a", "b"], "cm.png")
    'cm.png'
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .errors import DataError  # noqa: E402
from .metrics import calibration_bins, expected_calibration_error  # noqa: E402

__all__ = [
    "resolve_channels",
    "robust_range",
    "to_display",
    "plot_confusion_matrix",
    "plot_confidence",
    "plot_reliability",
    "plot_label_efficiency",
    "plot_segmentation_overlays",
    "save_reconstruction_grid",
    "plot_attention_masks",
    "orthogonal_slices",
]


def _save(fig: plt.Figure, path: str | Path) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def resolve_channels(channels: int | Sequence[int] | None, num_channels: int) -> list[int]:
    """Channels to display: one index (grey) or three (RGB). Raises DataError when out of range.

    Args:
        channels: None (grey for 1 channel, RGB for 3, else channel 0), an int, or a list of 1 or 3 ints.
        num_channels: C, the number of channels of the image.

    Example:
        >>> resolve_channels(None, 3)
        [0, 1, 2]
    """
    if channels is None:
        return [0, 1, 2] if num_channels == 3 else [0]
    chosen = list(channels) if isinstance(channels, (list, tuple, np.ndarray)) else [channels]
    ok = len(chosen) in (1, 3) and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in chosen)
    if not ok or not all(0 <= c < num_channels for c in chosen):
        raise DataError(
            f"channels={channels!r} does not fit an image with {num_channels} channels.",
            f"Pass None, one channel index in [0, {num_channels}), or a list of 3 such indices for an RGB composite.",
        )
    return [int(c) for c in chosen]


def robust_range(img: np.ndarray, channels: int | Sequence[int] | None = None) -> np.ndarray:
    """Per chosen channel 1st and 99th percentiles of a [C, H, W] image: [n_chosen, 2]."""
    chosen = resolve_channels(channels, img.shape[0])
    return np.stack([np.percentile(img[c], [1, 99]) for c in chosen])


def to_display(
    img: np.ndarray, channels: int | Sequence[int] | None = None, lo_hi: np.ndarray | None = None
) -> np.ndarray:
    """Map a [C, H, W] image (any units) to a displayable [H, W] grey or [H, W, 3] RGB array in [0, 1].

    Args:
        img: [C, H, W] image, e.g. in normalised units.
        channels: see :func:`resolve_channels`.
        lo_hi: [n_chosen, 2] stretch limits (default: this image's 1-99 percentiles), so several
            panels can share the stretch of the original.

    Example:
        >>> to_display(np.random.rand(16, 8, 8), channels=[3, 7, 11]).shape
        (8, 8, 3)
    """
    img = np.asarray(img, dtype=float)
    if img.ndim != 3:
        raise DataError(
            f"Expected one image as [C, H, W], got shape {img.shape}.",
            "Index a single image out of the batch, channels first.",
        )
    chosen = resolve_channels(channels, img.shape[0])
    lo_hi = robust_range(img, chosen) if lo_hi is None else np.asarray(lo_hi, dtype=float)
    lo, hi = lo_hi[:, 0, None, None], lo_hi[:, 1, None, None]
    out = np.clip((img[chosen] - lo) / np.maximum(hi - lo, 1e-8), 0.0, 1.0)  # [n_chosen, H, W]
    return out[0] if len(chosen) == 1 else out.transpose(1, 2, 0)  # RGB: [3, H, W] -> [H, W, 3]


def _show(ax: plt.Axes, disp: np.ndarray, title: str) -> None:
    ax.imshow(disp, cmap="gray" if disp.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_confusion_matrix(
    cm: np.ndarray, class_names: list[str], path: str | Path, normalize: bool = True, title: str = "Confusion matrix"
) -> str:
    """Confusion matrix heat map (rows = true class), each cell annotated with its count.

    Args:
        cm: [K, K] counts, rows = true, columns = predicted.
        class_names: K names.
        path: PNG path.
        normalize: colour by row fraction (recall per class) and print it under the count.
        title: figure title.

    Example:
        >>> plot_confusion_matrix(metrics["confusion_matrix"], names, "out/cm.png")
    """
    cm = np.asarray(cm, dtype=float)
    k = len(class_names)
    if cm.shape != (k, k):
        raise DataError(
            f"cm has shape {cm.shape}, expected ({k}, {k}) for {k} class names.",
            "Pass the confusion matrix computed with labels=range(len(class_names)).",
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        shown = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True)) if normalize else cm
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 0.8 + 0.8 * k))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046)
    for i in range(k):
        for j in range(k):
            text = f"{int(cm[i, j])}\n{shown[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            dark = shown[i, j] > 0.5 * (shown.max() or 1)
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    return _save(fig, path)


def plot_confidence(probs: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path) -> str:
    """Box plots of confidence (probability of the predicted class) per true class, correct vs wrong.

    Args:
        probs: [N, K] class probabilities.
        labels: [N] true class indices.
        class_names: K names.
        path: PNG path.

    Example:
        >>> plot_confidence(probs, labels, names, "out/confidence.png")
    """
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(class_names), 4))
    for offset, (name, ok, colour) in zip((-0.2, 0.2), (("correct", True, "tab:green"), ("wrong", False, "tab:red"))):
        groups = [conf[(labels == k) & ((pred == k) == ok)] for k in range(len(class_names))]
        pos = [k + offset for k, g in enumerate(groups) if g.size]  # an empty group draws no box
        bp = ax.boxplot([g for g in groups if g.size], positions=pos, widths=0.35, patch_artist=True)
        for box in bp["boxes"]:
            box.set(facecolor=colour, alpha=0.5)
        ax.plot([], [], color=colour, lw=8, alpha=0.5, label=f"{name} (n={sum(g.size for g in groups)})")
    ax.set_xticks(range(len(class_names)))
    ax.set_xticklabels(class_names, rotation=30, ha="right")
    ax.set(
        ylabel="confidence (p of predicted class)",
        ylim=(0, 1.02),
        xlim=(-0.6, len(class_names) - 0.4),
        title="Confidence by true class",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: str | Path, n_bins: int = 15) -> str:
    """Reliability diagram: accuracy vs confidence per max-probability bin, ECE in the title.

    Args:
        probs: [N, K] class probabilities.
        labels: [N] true class indices.
        path: PNG path.
        n_bins: equal-width confidence bins.

    Example:
        >>> plot_reliability(probs, labels, "out/reliability.png")
    """
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels).astype(int)
    b = calibration_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    centres, width = (b["edges"][:-1] + b["edges"][1:]) / 2, 1.0 / n_bins
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centres, np.nan_to_num(b["accuracy"]), width=width, edgecolor="k", label="accuracy")
    ax.bar(
        centres,
        np.nan_to_num(b["confidence"] - b["accuracy"]),
        bottom=np.nan_to_num(b["accuracy"]),
        width=width,
        color="tab:red",
        alpha=0.3,
        label="gap",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence",
        ylabel="accuracy",
        title=f"Reliability (ECE = {ece:.3f}, n = {len(labels)})",
    )
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _aggregate(results: list[dict], metric: str) -> dict[str, list[tuple[float, float, float]]]:
    """Rows -> {init: sorted [(fraction, mean, std)]}; rows with raw ``metric`` are averaged per cell."""
    raw, out = defaultdict(list), defaultdict(list)
    for r in results:
        if "fraction" not in r or "init" not in r or not ({f"{metric}_mean", metric} & r.keys()):
            raise DataError(
                f"Result row {r} lacks 'fraction', 'init' or '{metric}_mean' / '{metric}'.",
                f"Give every row fraction, init and {metric}_mean (+ {metric}_std), or one raw {metric} per seed.",
            )
        if f"{metric}_mean" in r:
            out[r["init"]].append(
                (float(r["fraction"]), float(r[f"{metric}_mean"]), float(r.get(f"{metric}_std") or 0.0))
            )
        else:
            raw[(r["init"], float(r["fraction"]))].append(float(r[metric]))
    for (init, frac), vals in raw.items():
        out[init].append((frac, float(np.mean(vals)), float(np.std(vals))))
    return {init: sorted(rows) for init, rows in out.items()}


def plot_label_efficiency(results: list[dict], path: str | Path, metric: str = "macro_f1") -> str:
    """Metric vs fraction of labels (log x axis), one line with error bars per initialisation.

    Args:
        results: rows with ``fraction``, ``init`` and ``<metric>_mean`` (optional ``<metric>_std``),
            or one row per seed with a raw ``<metric>`` (mean ± std computed here).
        path: PNG path.
        metric: metric name used in the keys and the y label.

    Example:
        >>> plot_label_efficiency([{"fraction": 0.1, "init": "mae", "macro_f1_mean": 0.6,
        ...                         "macro_f1_std": 0.02}], "out/eff.png")
    """
    if not results:
        raise DataError("No results to plot.", "Pass at least one result row.")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    fractions = set()
    for init, rows in _aggregate(results, metric).items():
        frac, mean, std = map(np.array, zip(*rows))
        fractions |= set(frac.tolist())
        ax.errorbar(frac, mean, yerr=std, marker="o", capsize=3, label=str(init))
    ax.set_xscale("log")
    ax.set_xticks(sorted(fractions), [f"{f:.0%}" for f in sorted(fractions)])  # the fractions measured, as percentages
    ax.minorticks_off()
    name = {"macro_f1": "macro-F1", "accuracy": "accuracy"}.get(metric, metric)
    ax.set(
        xlabel="labelled training images (% of the training split)",
        ylabel=f"{name} (mean ± std over seeds)",
        title=f"Label efficiency: {name}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _overlay(mask: np.ndarray, k: int, ignore_index: int) -> np.ma.MaskedArray:
    """Class map with unlabeled pixels masked, so imshow leaves them transparent."""
    return np.ma.masked_where((mask == ignore_index) | (mask < 0) | (mask >= k), mask)


def plot_segmentation_overlays(
    images: np.ndarray | Sequence[np.ndarray],
    truth: np.ndarray | Sequence[np.ndarray],
    pred: np.ndarray | Sequence[np.ndarray],
    path: str | Path,
    class_names: list[str],
    ignore_index: int = 255,
    channels: int | Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> str:
    """Rows = images; columns = image, truth overlay, prediction overlay (unlabeled pixels transparent). A volume
    gives three rows: its axial, coronal and sagittal slices through the labelled foreground's centre.

    Args:
        images: [N, C, H, W] images (any units; stretched per image to 1-99 percentiles), or [C, D, H, W] volumes.
        truth: [N, H, W] class indices, ``ignore_index`` for unlabeled pixels (or one [D, H, W] per volume).
        pred: [N, H, W] predicted class indices (or one [D, H, W] per volume).
        path: PNG path.
        class_names: K names (legend and colours).
        ignore_index: label value drawn transparent.
        channels: see :func:`resolve_channels`.
        names: one title per image or volume.

    Example:
        >>> plot_segmentation_overlays(x[:4], y[:4], p[:4], "out/seg.png", ["bg", "cytoplasm", "nucleus"])
    """
    if (
        len(truth) != len(images)
        or len(pred) != len(images)
        or any(np.shape(t) != np.shape(p) or np.shape(t) != np.shape(im)[1:] for im, t, p in zip(images, truth, pred))
    ):
        raise DataError(
            f"{len(images)} images, {len(truth)} truth and {len(pred)} pred maps do not match in number or size.",
            "Pass images [N, C, H, W] (or volumes [C, D, H, W]) with truth/pred [N, H, W] (or [D, H, W]) of the same "
            "sizes.",
        )
    names = list(names) if names else [""] * len(images)
    if len(truth) and np.ndim(truth[0]) == 3:
        images, truth, pred, names = _view_rows(images, truth, pred, ignore_index, names)
    k = len(class_names)
    cmap = ListedColormap(plt.get_cmap("tab20" if k > 10 else "tab10").colors[:k])
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
    for i, row in enumerate(axes):
        disp = to_display(images[i], channels)
        titles = (f"{names[i]}: image" if names[i] else "image", "truth", "prediction")
        for ax, mask, title in zip(row, (None, truth[i], pred[i]), titles):
            _show(ax, disp, title)
            if mask is not None:
                ax.imshow(
                    _overlay(np.asarray(mask), k, ignore_index),
                    cmap=cmap,
                    vmin=-0.5,
                    vmax=k - 0.5,
                    alpha=0.5,
                    interpolation="nearest",
                )
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(c)) for c in range(k)]
    fig.legend(handles, class_names, loc="lower center", ncol=min(k, 6), fontsize=8)
    return _save(fig, path)


def _view_rows(volumes, truth, pred, ignore_index: int, names: list[str]) -> tuple[list, list, list, list[str]]:
    """Each volume's three orthogonal slices through its labelled foreground's centre, as overlay rows."""
    rows = [], [], [], []
    for volume, t, p, name in zip(volumes, truth, pred, names):
        centre = _foreground_centre(np.asarray(t), ignore_index)
        views = zip(*(orthogonal_slices(np.asarray(a), centre) for a in (volume, t, p)), VIEWS)
        for image, t_view, p_view, view in views:
            for column, value in zip(rows, (image, t_view, p_view, f"{name}, {view}" if name else view)):
                column.append(value)
    return rows


def _patch_mask_to_pixels(mask: np.ndarray, shape: tuple[int, ...], patch: tuple[int, ...]) -> np.ndarray:
    """[L] patch mask or codes (row-major / depth-major patches, as both MAEs) -> boolean pixel (voxel) mask of
    `shape`, True where the patch was hidden."""
    grid = tuple(s // p for s, p in zip(shape, patch))
    if mask.size != int(np.prod(grid)):
        raise DataError(
            f"Mask has {mask.size} patches but a {'x'.join(map(str, shape))} image with patch "
            f"{'x'.join(map(str, patch))} has {int(np.prod(grid))}.",
            "Pass the patch mask returned with these images.",
        )
    hidden = mask.reshape(grid) != 0
    for axis, p in enumerate(patch):  # each patch value repeated over its pixels, axis by axis
        hidden = np.repeat(hidden, p, axis=axis)
    return hidden


def _reconstruction_rows(original: np.ndarray, hidden: np.ndarray, recons: dict, chosen: list[int]) -> list[tuple]:
    """The rows of one image (one row) or one volume (a row per orthogonal view through its centre): (title suffix,
    [C, h, w] original, [h, w] hidden, {name: [C, h, w]}), all stretched with the whole original's 1-99 percentiles."""
    lo_hi = robust_range(original, chosen)
    if original.ndim == 3:
        return [("", original, hidden, recons, lo_hi)]
    centre = tuple(s // 2 for s in original.shape[1:])
    views = zip(VIEWS, orthogonal_slices(original, centre), orthogonal_slices(hidden, centre))
    return [
        (f", {view}", image, mask, {k: orthogonal_slices(r, centre)[i] for k, r in recons.items()}, lo_hi)
        for i, (view, image, mask) in enumerate(views)
    ]


def save_reconstruction_grid(
    original: np.ndarray,
    masked_pixels: np.ndarray,
    reconstruction: np.ndarray | dict[str, np.ndarray],
    patch_size: int | Sequence[int],
    path: str | Path,
    channels: int | Sequence[int] | None = None,
    max_images: int = 4,
) -> str:
    """An MAE's reconstructions, images or volumes: columns original, masked input (masked patches grey),
    reconstruction (yellow: edges of the patches it was shown); one row per image, or one per orthogonal view of
    each volume.

    The 1-99 percentile stretch is computed on the original and applied to all panels, so
    brightness differences in the reconstruction are real.

    Args:
        original: [N, C, H, W] images or [N, C, D, H, W] volumes, in normalised units.
        masked_pixels: [N, L] patch mask, 1 = masked (ViTMAE's ``mask`` output), or the 3D MAE's codes (non-zero
            = hidden), patches in row-major (depth-major) order.
        reconstruction: unpatchified prediction of `original`'s shape (the caller pastes visible patches back
            if wanted), or {model name: that} to compare several models on the same masks, one column each.
        patch_size: patch side in pixels, or (t, p, p) voxels for volumes.
        path: PNG path.
        channels: see :func:`resolve_channels`.
        max_images: at most this many images (volumes).

    Example:
        >>> save_reconstruction_grid(x, out.mask, model.unpatchify(out.logits), 4, "out/recon.png")  # doctest: +SKIP
    """
    original = np.asarray(original, dtype=float)
    named = (
        reconstruction
        if isinstance(reconstruction, dict)
        else {"reconstruction (yellow: patches it was shown)": reconstruction}
    )
    recons = {name: np.asarray(r, dtype=float) for name, r in named.items()}
    masked_pixels = np.asarray(masked_pixels)
    for name, recon in recons.items():
        if original.ndim not in (4, 5) or recon.shape != original.shape or len(masked_pixels) != len(original):
            raise DataError(
                f"original {original.shape}, reconstruction {name!r} {recon.shape}, mask {masked_pixels.shape} "
                "do not fit.",
                "Pass original and reconstruction as [N, C, H, W] (volumes: [N, C, D, H, W]) and the mask as [N, L].",
            )
    spatial = original.shape[2:]
    patch = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (int(patch_size),) * len(spatial)
    chosen = resolve_channels(channels, original.shape[1])
    rows = [
        row
        for i in range(min(len(original), max_images))
        for row in _reconstruction_rows(
            original[i],
            _patch_mask_to_pixels(masked_pixels[i], spatial, patch),
            {k: r[i] for k, r in recons.items()},
            chosen,
        )
    ]
    cols = 2 + len(recons)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.5 * cols, 2.5 * len(rows)), squeeze=False)
    for axs, (suffix, image, hidden, recon, lo_hi) in zip(axes, rows):
        disp = to_display(image, chosen, lo_hi)
        masked = disp.copy()
        masked[hidden] = 0.5  # grey, in both [H, W] and [H, W, 3] layouts
        _show(axs[0], disp, f"original{suffix}")
        _show(axs[1], masked, f"masked ({hidden.mean():.0%})")
        for ax, (name, rec) in zip(axs[2:], recon.items()):
            _show(ax, to_display(rec, chosen, lo_hi), name)
            # The hidden region's edge: outside the yellow islands every pixel is the model's prediction.
            ax.contour(hidden.astype(float), levels=[0.5], colors="#ffd400", linewidths=0.7)
    if isinstance(reconstruction, dict):
        fig.suptitle(
            "each model predicts every patch grey in 'masked' (yellow: the edges of what it was shown)", fontsize=9
        )
        fig.tight_layout()
    return _save(fig, path)


def plot_attention_masks(
    images: np.ndarray,
    titles: Sequence[str],
    maps: dict[str, np.ndarray],
    codes: dict[str, np.ndarray],
    path: str | Path,
) -> str:
    """One row per image: the image, then per model its CLS attention map and the mask drawn from it (MSMAE).

    Args:
        images: [N, C, H, W] images (any scale: each is stretched to its own 1-99 percentiles).
        titles: N row titles (e.g. the class).
        maps: {model name: [N, gh, gw] attention}; shown bilinearly upsampled over the image.
        codes: {model name: [N, gh, gw] patch codes} (0 visible, 1 masked and reconstructed, 2 thrown).
        path: PNG path.
    """
    images = np.asarray(images, dtype=float)
    n, (h, w) = len(images), images.shape[2:]
    cols = 1 + 2 * len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(2.1 * cols, 2.2 * n), squeeze=False)
    shade = np.array([[0, 0, 0, 0], [0.5, 0.5, 0.5, 0.85], [0, 0, 0, 0.95]])  # visible, masked (grey), thrown (black)
    for i, row in enumerate(axes):
        disp = to_display(images[i], None, robust_range(images[i]))
        _show(row[0], disp, titles[i])
        for j, name in enumerate(maps):
            attention = np.asarray(maps[name][i], dtype=float)
            row[1 + 2 * j].imshow(disp)
            attention = (attention - attention.min()) / max(
                attention.max() - attention.min(), 1e-12
            )  # its own range: the ranking is what masks
            row[1 + 2 * j].imshow(attention, cmap="magma", alpha=0.6, extent=(0, w, h, 0), interpolation="bilinear")
            row[1 + 2 * j].set_title(f"{name}\nattention (bright = high)", fontsize=8)
            row[1 + 2 * j].axis("off")
            row[2 + 2 * j].imshow(disp)
            row[2 + 2 * j].imshow(
                shade[np.asarray(codes[name][i], dtype=int)], extent=(0, w, h, 0), interpolation="nearest"
            )
            row[2 + 2 * j].set_title(f"{name}\nmasked grey, thrown black", fontsize=8)
            row[2 + 2 * j].axis("off")
    fig.tight_layout()
    return _save(fig, path)


VIEWS = ("axial", "coronal", "sagittal")  # H x W, D x W, D x H


def orthogonal_slices(volume: np.ndarray, centre: tuple[int, int, int] | None = None) -> list[np.ndarray]:
    """The axial (H x W), coronal (D x W) and sagittal (D x H) slices of a [..., D, H, W] array through `centre`
    (d, h, w; default the middle).

    Example:
        >>> [s.shape for s in orthogonal_slices(np.zeros((4, 5, 6)))]
        [(5, 6), (4, 6), (4, 5)]
    """
    d, h, w = centre if centre is not None else (n // 2 for n in volume.shape[-3:])
    return [volume[..., d, :, :], volume[..., :, h, :], volume[..., :, :, w]]


def _foreground_centre(labels: np.ndarray, ignore_index: int) -> tuple[int, int, int]:
    """Slices through the labelled foreground's centre of mass (the middle when there is none): where one looks."""
    fg = np.argwhere((labels > 0) & (labels != ignore_index))
    return tuple(int(v) for v in (fg.mean(axis=0) if len(fg) else np.array(labels.shape) / 2))
