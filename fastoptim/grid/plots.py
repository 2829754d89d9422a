"""PNG plots of a grid (matplotlib, headless): loss against data budget with the baseline's fit, speedup heatmap, and
the loss curves of each regime's best runs."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402


def plot_loss_vs_budget(loss_rows, speedups, sizes, path) -> None:
    """One panel per model size: each optimizer's best final loss against the Chinchilla ratio, and the baseline's
    fitted L(D) = α·D^(−B) + β as a dashed curve."""
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4), squeeze=False)
    optimizers = list(dict.fromkeys(row[0] for row in loss_rows))
    for ax, size in zip(axes[0], sizes):
        for optimizer in optimizers:
            points = sorted((ratio, loss) for opt, s, ratio, loss in loss_rows
                            if opt == optimizer and s == size and math.isfinite(loss))
            if points:
                ax.plot(*zip(*points), marker="o", label=optimizer)
        law = speedups.laws.get(size)
        ratios = [ratio for _, s, ratio, _ in loss_rows if s == size]
        if law is not None and ratios:
            D = np.geomspace(min(ratios), max(ratios), 100)
            ax.plot(D, law(D), "k--", lw=1, label=f"{speedups.baseline} fit")
        ax.set(xscale="log", xlabel="data budget (× Chinchilla)", ylabel="final validation loss", title=size)
        ax.set_xticks(sorted(set(ratios)), [f"{r:g}" for r in sorted(set(ratios))])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_speedup_heatmap(speedups, size_order, path) -> None:
    """Rows: optimizers; columns: (size, ratio); colour and label: speedup over the baseline."""
    columns = sorted({(row.size, row.ratio) for row in speedups.rows}, key=lambda c: (size_order.index(c[0]), c[1]))
    optimizers = list(dict.fromkeys(row.optimizer for row in speedups.rows))
    values = np.full((len(optimizers), len(columns)), np.nan)
    for row in speedups.rows:
        values[optimizers.index(row.optimizer), columns.index((row.size, row.ratio))] = row.speedup
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * max(1, len(columns)), 1.0 + 0.45 * max(1, len(optimizers))))
    shown = np.where(np.isfinite(values), values, np.nan)
    image = ax.imshow(shown, cmap="RdYlGn", vmin=min(0.5, np.nanmin(shown, initial=1.0)),
                      vmax=max(1.5, np.nanmax(shown, initial=1.0)), aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, "" if np.isnan(value) else "∞" if np.isinf(value) else f"{value:.2f}",
                ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), [f"{s}\n{r:g}×" for s, r in columns], fontsize=8)
    ax.set_yticks(range(len(optimizers)), optimizers, fontsize=8)
    ax.set_title(f"speedup over {speedups.baseline}")
    fig.colorbar(image, ax=ax)
    _save(fig, path)


def plot_loss_curves(curves, path, ncols: int = 4) -> None:
    """curves: regime label → optimizer → (steps, losses) of that regime's best run (runner.read_curve: validation
    losses where the run was evaluated more than once, else its training loss)."""
    labels = list(curves)
    if not labels:
        return
    rows = math.ceil(len(labels) / ncols)
    cols = min(ncols, len(labels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for optimizer, (steps, losses) in curves[label].items():
            ax.plot(steps, losses, label=optimizer, lw=1)
        ax.set(title=label, xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    _save(fig, path)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
