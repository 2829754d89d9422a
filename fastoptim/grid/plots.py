"""PNG plots of a grid (matplotlib, headless), one colour per optimizer in every plot:

- loss against data budget per size, with the baseline's fitted law and the seeds' spread;
- the equivalent baseline budget D_eff against D per size (the paper's speedup plot), bounded to the fitted range;
- the speedup heatmap;
- the loss against training tokens of each regime's best runs, a band over their seeds;
- per swept key, the final loss along that key around each optimizer's optimum (1-D sensitivity).
"""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from .presets import OPTIMIZER_NAMES  # noqa: E402

# One colour per optimizer, the same in every plot (tab10 plus one for the eleventh); names outside the study (a CSV
# may bring any) take the extra colours in a fixed order of their names.
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#000000"]
_EXTRA = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]
COLOURS = dict(zip(OPTIMIZER_NAMES, _PALETTE))


def colour(optimizer: str) -> str:
    if optimizer in COLOURS:
        return COLOURS[optimizer]
    return _EXTRA[sum(optimizer.encode()) % len(_EXTRA)]


def plot_loss_vs_budget(rows, speedups, sizes, path) -> None:
    """One panel per size: each optimizer's final loss (mean over seeds, bars: their range) against the Chinchilla
    ratio, and the baseline's fitted L(D) = α·D^(−B) + β dashed over the range it was fitted on."""
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.8 * len(sizes), 4), squeeze=False)
    optimizers = list(dict.fromkeys(row.optimizer for row in rows))
    for ax, size in zip(axes[0], sizes):
        for optimizer in optimizers:
            points = sorted((row.ratio, row) for row in rows
                            if row.optimizer == optimizer and row.size == size and math.isfinite(row.estimate))
            if not points:
                continue
            ratios = [ratio for ratio, _ in points]
            means = np.array([row.estimate for _, row in points])
            spread = np.array([(row.estimate - min(row.finite_seed_losses or [row.estimate]),
                                max(row.finite_seed_losses or [row.estimate]) - row.estimate) for _, row in points]).T
            ax.errorbar(ratios, means, yerr=spread, marker="o", ms=4, capsize=3, color=colour(optimizer),
                        label=optimizer)
        law = speedups.laws.get(size)
        ratios = sorted({row.ratio for row in rows if row.size == size})
        if law is not None and ratios:
            D = np.geomspace(min(ratios), max(ratios), 100)
            ax.plot(D, law(D), "k--", lw=1, label=f"{speedups.baseline} fit")
        ax.set(xscale="log", xlabel="data budget (× Chinchilla tokens)", ylabel="final validation loss (nats/token)",
               title=f"{size}: final loss against budget (bars: seeds' range)")
        _ratio_ticks(ax.xaxis, ratios)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_effective_budget(speedups, sizes, path) -> None:
    """The paper's speedup plot, one panel per size with a fitted law: D_eff (the baseline budget reaching the same
    loss) against D, log-log, with y = x for the baseline. Bars: the seeds' 95% interval. D_eff beyond the fitted
    range is drawn at the range's edge as a triangle pointing where the value lies (no extrapolation); the grey band
    is outside it. The optimizers are dodged sideways a little so that equal values stay visible."""
    sizes = [size for size in sizes if any(row.size == size and not row.diverged for row in speedups.rows)]
    if not sizes:
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = [row for row in speedups.rows if row.size == size and not row.diverged]
        low, high = rows[0].fitted_range
        ratios = sorted({row.ratio for row in rows})
        span = (min(ratios[0], low) / 1.6, max(ratios[-1], high) * 1.6)
        ax.plot(span, span, color="0.6", lw=1, ls=":", label="D_eff = D")
        ax.axhspan(span[0], low, color="0.92", zorder=0)
        ax.axhspan(high, span[1], color="0.92", zorder=0, label="beyond the fitted range")
        optimizers = list(dict.fromkeys(row.optimizer for row in rows))
        for index, optimizer in enumerate(optimizers):
            dodge = 1.04 ** (index - (len(optimizers) - 1) / 2)
            mine = sorted((row for row in rows if row.optimizer == optimizer), key=lambda row: row.ratio)
            x = [row.ratio * dodge for row in mine]
            y = [min(max(row.effective_ratio, low), high) for row in mine]
            ax.plot(x, y, color=colour(optimizer), lw=1.2, marker="o", ms=4, label=optimizer)
            for row, xx, yy in zip(mine, x, y):
                if row.beyond:
                    ax.plot(xx, yy, marker="^" if row.beyond == ">" else "v", ms=9, color=colour(optimizer))
                if row.effective_interval is not None:
                    ends = [min(max(end, low), high) for end in row.effective_interval]
                    ax.plot([xx] * 2, ends, color=colour(optimizer), lw=2.5, alpha=0.45)
        ax.set(xscale="log", yscale="log", xlim=span, ylim=span, title=f"{size}: equivalent {speedups.baseline} budget",
               xlabel="data budget D (× Chinchilla tokens)", ylabel=f"D_eff ({speedups.baseline} budget, × Chinchilla)")
        _ratio_ticks(ax.xaxis, ratios)
        _ratio_ticks(ax.yaxis, ratios)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_speedup_heatmap(speedups, size_order, path) -> None:
    """Rows: optimizers; columns: (size, ratio); colour: speedup over the baseline (bounded to the fitted range);
    label: the report's cell without its interval."""
    columns = sorted({(row.size, row.ratio) for row in speedups.rows}, key=lambda c: (size_order.index(c[0]), c[1]))
    optimizers = list(dict.fromkeys(row.optimizer for row in speedups.rows))
    values = np.full((len(optimizers), len(columns)), np.nan)
    labels = {}
    for row in speedups.rows:
        i, j = optimizers.index(row.optimizer), columns.index((row.size, row.ratio))
        if not row.diverged:
            low, high = row.fitted_range
            values[i, j] = min(max(row.effective_ratio, low), high) / row.ratio
        labels[(i, j)] = row.cell().split(" [")[0]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * max(1, len(columns)), 1.4 + 0.45 * max(1, len(optimizers))))
    image = ax.imshow(values, cmap="RdYlGn", vmin=min(0.5, np.nanmin(values, initial=1.0)),
                      vmax=max(1.5, np.nanmax(values, initial=1.0)), aspect="auto")
    for (i, j), label in labels.items():
        ax.text(j, i, label, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(columns)), [f"{s}\n{r:g}×" for s, r in columns], fontsize=8)
    ax.set_yticks(range(len(optimizers)), optimizers, fontsize=8)
    ax.set(title=f"Speedup over {speedups.baseline} (D_eff / D; ≈: within seed noise)",
           xlabel="model size and data budget (× Chinchilla)")
    fig.colorbar(image, ax=ax, label="speedup")
    _save(fig, path)


def plot_loss_vs_tokens(curves, path, ylabel: str, ncols: int = 4) -> None:
    """curves: regime label → optimizer → [(tokens, losses) per seed] of that regime's best config. A line through
    the seeds' mean and a band over their range, at the points every seed reached."""
    labels = list(curves)
    if not labels:
        return
    rows, cols = math.ceil(len(labels) / ncols), min(ncols, len(labels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.8 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for optimizer, seeds in curves[label].items():
            length = min(len(tokens) for tokens, _ in seeds)
            tokens = np.asarray(seeds[0][0][:length], dtype=float)
            losses = np.array([seed_losses[:length] for _, seed_losses in seeds], dtype=float)
            ax.plot(tokens, losses.mean(axis=0), lw=1.2, color=colour(optimizer),
                    label=f"{optimizer} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            if len(seeds) > 1:
                ax.fill_between(tokens, losses.min(axis=0), losses.max(axis=0), color=colour(optimizer), alpha=0.2)
        ax.set(title=f"{label}: best config of each optimizer", xlabel="training tokens", ylabel=ylabel)
        ax.xaxis.set_major_formatter(FuncFormatter(_si))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    _save(fig, path)


def plot_sensitivity(lines, key: str, path, ncols: int = 4) -> None:
    """lines: regime label → optimizer → (values, losses, best value): the final loss of each run that differs from
    the optimizer's optimum at that regime in `key` alone. Diverged runs are crosses on the panel's top edge."""
    labels = list(lines)
    if not labels:
        return
    rows, cols = math.ceil(len(labels) / ncols), min(ncols, len(labels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.8 * rows), squeeze=False)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  for regime in lines.values() for values, _, _ in regime.values() for v in values)
    positive = numeric and all(v > 0 for regime in lines.values() for values, _, _ in regime.values() for v in values)
    for ax, label in zip(axes.flat, labels):
        finite = [l for values, losses, _ in lines[label].values() for l in losses if math.isfinite(l)]
        top = max(finite) + 0.05 * (max(finite) - min(finite) or 1.0) if finite else 1.0
        categories = sorted({str(v) for values, _, _ in lines[label].values() for v in values})
        for optimizer, (values, losses, best) in lines[label].items():
            x = list(values) if numeric else [categories.index(str(v)) for v in values]
            order = np.argsort(x)
            xs, ys = np.asarray(x, dtype=float)[order], np.asarray(losses, dtype=float)[order]
            ok = np.isfinite(ys)
            ax.plot(xs[ok], ys[ok], marker="o", ms=4, lw=1.2, color=colour(optimizer), label=optimizer)
            ax.plot(xs[~ok], [top] * int((~ok).sum()), "x", ms=7, color=colour(optimizer))
            best_x = best if numeric else categories.index(str(best))
            best_y = next((l for v, l in zip(x, losses) if v == best_x), None)
            if best_y is not None and math.isfinite(best_y):
                ax.plot(best_x, best_y, marker="*", ms=13, color=colour(optimizer), mec="black", mew=0.6)
        if positive:
            ax.set_xscale("log")
            _ratio_ticks(ax.xaxis, [v for values, _, _ in lines[label].values() for v in values])
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set(title=f"{label}: loss along {key} (★ optimum, × diverged)", xlabel=key,
               ylabel="final validation loss (nats/token)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    _save(fig, path)


def _ratio_ticks(axis, ratios) -> None:
    """Ticks at the values run only, written plainly (a log axis would add unlabelled minor powers)."""
    if ratios:
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())
        axis.set_ticks(sorted(set(ratios)))


def _si(value, _position=None) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
