"""The comparison picture: latency percentiles against offered load, one line per strategy."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

__all__ = ["plot_sweep"]


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, *, title: str,
               live: Sequence[dict[str, Any]] = ()) -> pathlib.Path:
    """Write a PNG with p50, p95 and p99 (mean and 95% CI over repetitions) per strategy;
    ``live`` runs (results dicts) are drawn as crosses in their strategy's colour."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strategies = sorted({r["strategy"] for r in [*rows, *live]})
    colours = {strategy: f"C{i}" for i, strategy in enumerate(strategies)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, key in zip(axes, ("p50", "p95", "p99")):
        for strategy in strategies:
            mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["load"])
            xs = [r["load"] for r in mine if r["latency_ms"][key]["mean"] is not None]
            ys = [r["latency_ms"][key]["mean"] for r in mine if r["latency_ms"][key]["mean"] is not None]
            errs = [r["latency_ms"][key]["ci95"] or 0.0 for r in mine if r["latency_ms"][key]["mean"] is not None]
            # On a log axis a lower bar must stay above zero.
            lower = [min(e, 0.9 * y) for e, y in zip(errs, ys)]
            if xs:
                ax.errorbar(xs, ys, yerr=[lower, errs], marker="o", capsize=3, color=colours[strategy],
                            label=f"{strategy} (sim)" if live else strategy)
            points = sorted((r["load"], r["latency_ms"][key]) for r in live
                            if r["strategy"] == strategy and r["latency_ms"][key] is not None)
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], "x", markersize=10, mew=2,
                        color=colours[strategy], label=f"{strategy} (live)")
        ax.set_title(f"{key} response time")
        ax.set_xlabel("offered load (fraction of total capacity)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("milliseconds (log scale)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
