"""The comparison picture: latency percentiles against offered load, one line per strategy,
and the requests that failed, which the latency panels cannot show.

Latency is that of OK requests only, so a point where requests failed (timed out, say)
can look *faster* than one where none did. Such points are drawn hollow on the latency
panels, and a fourth panel gives the failed requests as a percentage of those sent, with
each non-zero point annotated. Error bars are 95% confidence intervals over the sweep's
seeds, and the caption under the title says so; the legend sits below the panels, where
it cannot cover data. A sweep of one load is drawn as points on a short axis around it.

Given the sweep's scenario, where queueing theory has a mean response time for a strategy
(:func:`experiments.theory.mean_field_response_s`: the supermarket model), a first panel
shows the simulated mean against load with theory as a dashed line in the strategy's colour;
where a run's warm-up was too short for its load and theory knows the transient (random:
M/M/1 from empty, :func:`experiments.theory.from_empty_response_s`), a hollow diamond marks
what that run should measure.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Any, Sequence

from experiments.compare import failed_percent

if TYPE_CHECKING:
    from core.scenario import Scenario

__all__ = ["draw_sweep", "plot_sweep"]

_PANELS = ("p50", "p95", "p99")


def _caption(rows: Sequence[dict[str, Any]], live: Sequence[dict[str, Any]], theory: bool = False) -> str:
    reps = rows[0]["reps"] if rows else 0
    bars = (f"error bars: 95% CI over {reps} seeds (Student's t)" if reps > 1
            else "one seed per point, no error bars" if reps == 1 else "one live run per point")
    parts = [bars, "latency of OK requests only", "hollow markers: some requests failed (right panel)"]
    if live and rows:
        parts.insert(1, "crosses: live runs")
    if theory:
        parts.insert(1, "dashed: queueing theory")
    return "; ".join(parts)


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, *, title: str,
               live: Sequence[dict[str, Any]] = (), scenario: Scenario | None = None) -> pathlib.Path:
    """Write :func:`draw_sweep`'s figure to ``path`` as a PNG (parent directories created)."""
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_sweep(rows, title=title, live=live, scenario=scenario)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_sweep(rows: Sequence[dict[str, Any]], *, title: str, live: Sequence[dict[str, Any]] = (),
               scenario: Scenario | None = None) -> Any:
    """A matplotlib figure of p50, p95 and p99 (mean and 95% CI over repetitions, from
    :func:`experiments.compare.aggregate` rows) per strategy, and the failed requests in % of
    those sent; ``live`` runs (results dicts) are drawn as crosses in their strategy's colour.
    With the sweep's ``scenario``, the mean beside theory's where it has one (first panel)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    strategies = sorted({r["strategy"] for r in [*rows, *live]})
    colours = {strategy: f"C{i}" for i, strategy in enumerate(strategies)}
    theory, from_empty = _theory_curves(rows, scenario), _from_empty_points(rows, scenario)
    panels = ("mean", *_PANELS) if theory else _PANELS
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.5 * len(panels) + 4.5, 5.2),
                             gridspec_kw={"width_ratios": [1] * len(panels) + [0.8]})
    latency_axes, failed_ax = axes[:-1], axes[-1]
    for ax in latency_axes[1:]:
        ax.sharey(latency_axes[0])
    loads = sorted({r["load"] for r in [*rows, *live]})
    # Near saturation a logit axis spreads 0.9, 0.95 and 0.99 apart, where the curves bend.
    logit = bool(loads) and 0 < loads[0] and loads[-1] < 1 and loads[-1] >= 0.95
    fwd = (lambda x: math.log(x / (1 - x))) if logit else (lambda x: x)
    inv = (lambda y: 1 / (1 + math.exp(-y))) if logit else (lambda y: y)
    pad = max(0.25 if logit else 0.05, 0.08 * (fwd(loads[-1]) - fwd(loads[0]))) if loads else 0.05
    for i, strategy in enumerate(strategies):
        colour = colours[strategy]
        # Each strategy a little apart, so that equal values and error bars do not hide each other.
        dodge = (i - (len(strategies) - 1) / 2) * 0.15 * pad
        shift = lambda x: inv(fwd(x) + dodge)  # noqa: E731
        mine = [{**r, "load": shift(r["load"])}
                for r in sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["load"])]
        failed = [r["failed"]["percent"]["mean"] or 0.0 for r in mine]
        if strategy in theory:
            xs, ys = theory[strategy]
            # One load has no line to draw: a short dash marks theory's value there.
            latency_axes[0].plot(xs, ys, "--" if len(xs) > 1 else "_", color=colour, linewidth=1.5, markersize=24,
                                 mew=2, zorder=2)
        empty = [(shift(x), y) for x, y in from_empty.get(strategy, [])]
        if empty:
            latency_axes[0].plot([x for x, _ in empty], [y for _, y in empty], "D", color=colour, markersize=9,
                                 markerfacecolor="none", mew=1.5, zorder=4)
        for ax, key in zip(latency_axes, panels):
            points = [(r["load"], r["latency_ms"][key], f) for r, f in zip(mine, failed)
                      if r["latency_ms"][key]["mean"] is not None]
            # Beside theory's dashed line the simulated means are points, so the line shows where they sit on it.
            _curve(ax, [x for x, _, _ in points], [c for _, c, _ in points], [f > 0 for _, _, f in points], colour,
                   joined=not (key == "mean" and strategy in theory))
            mine_live = sorted((shift(r["load"]), r["latency_ms"][key], failed_percent(r) > 0) for r in live
                               if r["strategy"] == strategy and r["latency_ms"][key] is not None)
            _crosses(ax, mine_live, colour)
        _curve(failed_ax, [r["load"] for r in mine], [r["failed"]["percent"] for r in mine], [False] * len(mine),
               colour, log=False)
        for r, f in zip(mine, failed):
            if f > 0:
                failed_ax.annotate(f"{f:.1f}%", (r["load"], f), textcoords="offset points", xytext=(0, 9),
                                   ha="center", fontsize=8, color=colour)
        _crosses(failed_ax, sorted((shift(r["load"]), failed_percent(r), False) for r in live
                                   if r["strategy"] == strategy), colour)
    for ax, key in zip(latency_axes, panels):
        ax.set_title(f"{key} response time (OK requests)")
        ax.set_yscale("log")
    latency_axes[0].set_ylabel("milliseconds (log scale)")
    failed_ax.set_title("failed requests")
    failed_ax.set_ylabel("% of requests sent")
    top = max(1.0, 1.2 * failed_ax.get_ylim()[1])
    failed_ax.set_ylim(-0.04 * top, top)  # a little below 0, so that markers at 0 show whole
    for ax in axes:
        ax.set_xlabel("offered load (fraction of total capacity" + (", logit scale)" if logit else ")"))
        ax.grid(True, which="both", alpha=0.3)
        if logit:
            ax.set_xscale("logit")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        if loads:
            ax.set_xlim(inv(fwd(loads[0]) - pad), inv(fwd(loads[-1]) + pad))
            if len(loads) <= 8:
                ax.set_xticks(loads)
    handles = [plt.Line2D([], [], color=colours[s], marker="o", label=f"{s} (sim)" if live and rows else s)
               for s in strategies if any(r["strategy"] == s for r in rows)]
    handles += [plt.Line2D([], [], color=colours[s], marker="x", linestyle="none", markersize=9, mew=2,
                           label=f"{s} (live)") for s in strategies if any(r["strategy"] == s for r in live)]
    handles.append(plt.Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle="none",
                              label="some requests failed"))
    if theory:
        handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="mean-field (n \u2192 \u221e)"))
    if from_empty:
        handles.append(plt.Line2D([], [], color="grey", marker="D", markerfacecolor="none", linestyle="none",
                                  label="theory from empty, this run's window (warm-up too short)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(f"{title}\n{_caption(rows, live, bool(theory))}", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def _theory_curves(rows: Sequence[dict[str, Any]], scenario: Scenario | None) -> dict[str, tuple[list, list]]:
    """Strategy -> theory's mean response time (ms) on a fine grid across the loads of its rows
    that theory covers; empty without a scenario or where theory has nothing."""
    from experiments.theory import mean_field_response_s

    if scenario is None:
        return {}
    curves = {}
    for strategy in sorted({r["strategy"] for r in rows}):
        loads = sorted(r["load"] for r in rows
                       if r["strategy"] == strategy and mean_field_response_s(scenario, strategy, r["load"]))
        if loads:
            xs = [loads[0] + (loads[-1] - loads[0]) * k / 200 for k in range(201)] if len(loads) > 1 else loads
            curves[strategy] = (xs, [1000 * (mean_field_response_s(scenario, strategy, x) or 0.0) for x in xs])
    return curves


def _from_empty_points(rows: Sequence[dict[str, Any]], scenario: Scenario | None) -> dict[str, list]:
    """Strategy -> [(load, ms)] that runs too short for their load should measure, where theory knows."""
    from experiments.theory import from_empty_response_s

    points: dict[str, list] = {}
    if scenario is None:
        return points
    for r in rows:
        value = from_empty_response_s(scenario, r["strategy"], r["load"])
        if value is not None:
            points.setdefault(r["strategy"], []).append((r["load"], 1000 * value))
    return points


def _curve(ax: Any, xs: list[float], cells: list[dict[str, float | None]], hollow: list[bool], colour: str, *,
           log: bool = True, joined: bool = True) -> None:
    """Means joined by a line (unless not ``joined``) with 95% CI bars; a point where requests failed is hollow."""
    if not xs:
        return
    ys = [c["mean"] or 0.0 for c in cells]  # callers pass only cells with samples, so a mean
    errs = [c["ci95"] or 0.0 for c in cells]
    # On a log axis a lower bar must stay above zero.
    lower = [min(e, 0.9 * y) for e, y in zip(errs, ys)] if log else [min(e, y) for e, y in zip(errs, ys)]
    ax.errorbar(xs, ys, yerr=[lower, errs], capsize=3, color=colour, marker="none", linestyle="-" if joined else "none")
    for fill in (False, True):
        pts = [(x, y) for x, y, h in zip(xs, ys, hollow) if h != fill]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o", color=colour, markersize=7, mew=1.5,
                    markerfacecolor=colour if fill else "white", zorder=3)


def _crosses(ax: Any, points: list[tuple[float, float, bool]], colour: str) -> None:
    """Live runs as crosses; one where requests failed gets a hollow ring around its cross."""
    if not points:
        return
    ax.plot([x for x, _, _ in points], [y for _, y, _ in points], "x", markersize=10, mew=2, color=colour, zorder=4)
    ringed = [(x, y) for x, y, failed in points if failed]
    if ringed:
        ax.plot([x for x, _ in ringed], [y for _, y in ringed], "o", markersize=14, mew=1.5, color=colour,
                markerfacecolor="none", zorder=4)
