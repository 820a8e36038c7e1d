"""A run's timeline as a picture: what happened when, one panel per question, one time axis.

Theory of operation
-------------------
:func:`plot_timeline` draws the ``"timeline"`` of one or more results dicts
(:mod:`core.timeline` is the schema; a simulated and a live run have the same
one) as stacked panels sharing the time axis, in seconds since the run began:

1. response time of OK requests, p50 / p95 / p99 per interval (log scale when
   the values span more than ten times);
2. throughput: OK responses per second;
3. failed responses per second, by kind (rate-limited, backpressure, circuit
   open, errors);
4. each node's share of the requests (%), 5. its requests in flight and
   6. its utilization (% of its workers busy), when the run kept per-node
   series (a run over more nodes than the timeline keeps per node has
   ``"nodes_omitted"`` and only the overall panels, and the caption says so);
7. an event strip: one row per node and kind of state (fault, breaker,
   ejector, health, membership), a bar wherever that state was not the normal
   one (OPEN, HALF_OPEN, down, dead, a fault), coloured by what it was.

Values are drawn at the middle of their interval. Faults (as scheduled in a
simulated run, as played in a live one) are also
shaded across every panel, so a spike lines up with its cause; their names sit
inside their bars in the strip where they fit, and in the caption where they do
not. No label is drawn over a curve: series are named in legends beside the
panels, states by the strip's legend. Dotted grey lines mark the measurement
window (``warmup_s`` .. ``duration_s``) that the run's summary counts.

What a timeline could not show is said under the title, per run, when not 0
(:data:`COUNTS`): state changes missed (``events_missed``, a live run's),
responses after its last interval (``later``) and OK responses that came after
their interval's percentiles settled (``unsettled``).

Several runs (a sim and a live run of one seed) share the panels: colours say
which series, line styles which run (solid the first, dashed the second), and
the legend at the bottom names each run by its ``"mode"``.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping, Sequence

__all__ = ["COUNTS", "EVENT_ROWS", "NODES_DRAWN", "counts_of", "draw_timeline", "plot_timeline", "timeline_of"]

#: Per-node panels draw at most this many nodes (those with the most requests); the panel title says so.
NODES_DRAWN = 8
#: The event strip shows at most this many (node, kind) rows; the caption counts the rest.
EVENT_ROWS = 24

#: What a timeline counts but cannot show, shown when not 0: key, what it counts (with ``{n}``), why.
COUNTS = (
    ("events_missed", "{n:,} state change{s} missed",
     "pushed out of a process's record before the runner read it, or lost with a read that failed"),
    ("later", "{n:,} response{s} after the last interval", "counted in no interval"),
    ("unsettled", "{n:,} OK response{s} after their interval's percentiles settled",
     "counted in its requests, not in its p50/p95/p99"),
)

_STYLES = ("-", "--", ":", "-.")
_PERCENTILES = (("p50_ms", "p50", "C0"), ("p95_ms", "p95", "C1"), ("p99_ms", "p99", "C3"))
_FAILURES = (("rate_limited", "rate-limited", "C4"), ("backpressure", "backpressure", "C1"),
             ("circuit_open", "circuit open", "C3"), ("errors", "errors (5xx, refused, timeout)", "C7"))
_KIND_ORDER = ("fault", "health", "ejector", "breaker", "membership")
#: States that are "nothing to show" in the strip.
_NORMAL = {"CLOSED", "up", "ok", "alive", "joined", "rejoined", "revived", "absent"}
#: State -> (colour, legend entry); a fault's state is what it does, matched by its first word.
_STATE_STYLE = {
    "OPEN": ("#d62728", "breaker/ejector OPEN"),
    "HALF_OPEN": ("#ff9896", "breaker/ejector HALF_OPEN (probing)"),
    "down": ("#8c564b", "health check: down"),
    "died": ("#7f7f7f", "registry: dead"),
    "left": ("#c7c7c7", "registry: left / removed"),
    "removed": ("#c7c7c7", "registry: left / removed"),
}
_FAULT_STYLE = {
    "down": ("#000000", "fault: node down"),
    "error_rate": ("#ff7f0e", "fault: errors"),
    "extra_latency_ms": ("#9467bd", "fault: slow"),
}
_OTHER = ("#bcbd22", "other state")
#: How the strip names a kind of state: whose view it is.
_ROW_NAMES = {"fault": "fault", "health": "health check", "ejector": "ejector (balancer)",
              "breaker": "breaker (node)", "membership": "registry"}


def timeline_of(run: Mapping[str, Any], index: int = 0) -> Mapping[str, Any]:
    """The ``"timeline"`` of a results dict; a ValueError naming the run when it has none."""
    name = f"run {index + 1}" + (f" ({run.get('mode')})" if isinstance(run, Mapping) and run.get("mode") else "")
    if not isinstance(run, Mapping):
        raise ValueError(f"{name} is not a results dict (got {type(run).__name__})")
    timeline = run.get("timeline")
    if not isinstance(timeline, Mapping):
        raise ValueError(f"{name} has no \"timeline\" to draw: give the results of a run that kept one "
                         "(testbed sim run keeps one by default; --json writes it)")
    missing = [k for k in ("interval_s", "t", "overall") if k not in timeline]
    if missing:
        raise ValueError(f"{name}: its \"timeline\" lacks {', '.join(missing)}")
    return timeline


def plot_timeline(runs: Sequence[Mapping[str, Any]], path: str | pathlib.Path, *, title: str | None = None) -> None:
    """Write :func:`draw_timeline`'s figure of ``runs`` (results dicts with a ``"timeline"``) to ``path``
    as a PNG (parent folders created). ValueError when a run has no timeline."""
    import matplotlib.pyplot as plt

    fig = draw_timeline(runs, title=title)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)


def draw_timeline(runs: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Any:
    """The matplotlib figure of ``runs``' timelines (see the module docstring)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no runs to draw")
    timelines = [timeline_of(r, i) for i, r in enumerate(runs)]
    names = _run_names(runs)
    end = max(_end(t) for t in timelines)
    nodes, node_note = _nodes_drawn(timelines)
    rows, row_note = _event_rows(timelines, end)
    has_util = bool(nodes) and any(_values(t["nodes"].get(n, {}).get("utilization")) for t in timelines for n in nodes)
    panels = ["latency", "throughput", "failures"]
    if nodes:
        panels += ["share", "in_flight"] + (["utilization"] if has_util else [])
    strip = max(1, len(rows))
    heights = [3.0, 1.8, 1.8] + [1.8] * (len(panels) - 3) + [0.45 + 0.28 * strip]
    fig = plt.figure(figsize=(13, sum(heights) + 1.6), layout="constrained")
    axes = fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
    by_name = dict(zip(panels, axes))

    for k, (run, tl) in enumerate(zip(runs, timelines)):
        style = _STYLES[k % len(_STYLES)]
        x = [t + tl["interval_s"] / 2 for t in tl["t"]]
        overall = tl["overall"]
        for key, label, colour in _PERCENTILES:
            by_name["latency"].plot(x, _values(overall.get(key)), style, color=colour, lw=1.3,
                                    label=label if k == 0 else None)
        by_name["throughput"].plot(x, _values(overall.get("throughput_rps")), style, color="C2", lw=1.3,
                                   label="OK responses/s" if k == 0 else None)
        step = tl["interval_s"]
        for key, label, colour in _FAILURES:
            by_name["failures"].plot(x, [v / step for v in _values(overall.get(key), 0.0)], style, color=colour,
                                     lw=1.3, label=label if k == 0 else None)
        for i, node in enumerate(nodes):
            series = tl.get("nodes", {}).get(node)
            if not series:
                continue
            colour = f"C{i % 10}"
            node_label = _text(node) if k == 0 else None
            by_name["share"].plot(x, [v * 100 for v in _values(series.get("share"))], style, color=colour, lw=1.3,
                                  label=node_label)
            by_name["in_flight"].plot(x, _values(series.get("in_flight")), style, color=colour, lw=1.3)
            if has_util:
                by_name["utilization"].plot(x, [v * 100 for v in _values(series.get("utilization"))], style,
                                            color=colour, lw=1.3)
        for ax in axes[:-1]:
            for at in (run.get("warmup_s"), run.get("duration_s")):
                if isinstance(at, (int, float)) and 0 < at < end:
                    ax.axvline(at, color="0.5", ls=":", lw=1, zorder=1)

    _label_panels(by_name, nodes, node_note, timelines)
    fault_labels = _draw_strip(axes[-1], rows, timelines, end, [_text(str(r.get("mode") or f"run {i + 1}"), 20)
                                                                 for i, r in enumerate(runs)])
    for ax in axes[:-1]:
        for t0, t1, colour in _fault_spans(timelines, end):
            ax.axvspan(t0, t1, color=colour, alpha=0.08, lw=0, zorder=0)
    axes[-1].set_xlim(0, end)
    axes[-1].set_xlabel("time since the run began (s); values per interval, drawn at its middle")

    fig.legend(handles=_bottom_legend(runs, names, timelines, rows, end), loc="outside lower center",
               ncol=4, frameon=False, fontsize=9)
    fig.suptitle(_text(title, 200) if title else _default_title(runs, names), fontsize=13)
    fig.canvas.draw()  # lay out, so a fault's name is kept only where it fits inside its bar
    hidden = _fit_labels(fault_labels, fig)
    notes = [n for n in (*_counts_notes(timelines, names), node_note if not nodes else "", row_note,
                         _hidden_note(hidden)) if n]
    if notes:
        # Under the figure's title, on lines of their own above the first panel's (an empty last line: a long
        # note never runs into "response time of OK requests").
        axes[0].set_title("\n".join(notes) + "\n", fontsize=9, loc="right", color="0.3")
    return fig


def counts_of(tl: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """What ``tl`` counts but cannot show (:data:`COUNTS`), those not 0: (key, count said in words, why)."""
    out = []
    for key, words, why in COUNTS:
        n = tl.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            out.append((key, words.format(n=n, s="" if n == 1 else "s"), why))
    return out


def _counts_notes(timelines: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """One line per run with counts to say (named by its run when there are several)."""
    lines = []
    for tl, name in zip(timelines, names):
        counts = counts_of(tl)
        if counts:
            said = "; ".join(f"{words} ({key})" for key, words, _ in counts)
            lines.append(f"{name}: {said}" if len(timelines) > 1 else said)
    return lines


# -- data ---------------------------------------------------------------------------------------------

def _values(series: Sequence[Any] | None, missing: float = math.nan) -> list[float]:
    """A series with nulls as ``missing`` (NaN: a gap in the line); [] for no series."""
    return [missing if v is None else float(v) for v in (series or [])]


def _end(tl: Mapping[str, Any]) -> float:
    """The right edge of the time axis: the last interval's end. (A scenario may schedule faults past the
    run's end; they are not drawn, and the report's table still lists them.)"""
    return float(tl["t"][-1] + tl["interval_s"]) if tl["t"] else float(tl["interval_s"])


def _run_names(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    names = []
    for i, r in enumerate(runs):
        what = str(r.get("mode") or f"run {i + 1}")
        extra = ", ".join(p for p in (str(r.get("strategy") or ""), f"seed {r['seed']}" if "seed" in r else "") if p)
        names.append(_text(f"{what} ({extra})" if extra else what))
    return names


def _default_title(runs: Sequence[Mapping[str, Any]], names: list[str]) -> str:
    scenario = _text(str(runs[0].get("scenario") or "run"))
    return f"{scenario}: {' vs '.join(names)}" if len(runs) > 1 else f"{scenario}: {names[0]}, over time"


def _nodes_drawn(timelines: Sequence[Mapping[str, Any]]) -> tuple[list[str], str]:
    """The nodes the per-node panels draw (all, or the busiest ``NODES_DRAWN``) and a note on what is left out."""
    totals: dict[str, float] = {}
    for tl in timelines:
        for node, series in (tl.get("nodes") or {}).items():
            totals[node] = totals.get(node, 0.0) + sum(_values(series.get("requests"), 0.0))
    omitted = max(int(tl.get("nodes_omitted") or 0) for tl in timelines)
    if not totals:
        return [], (f"no per-node panels: the run kept overall series only ({omitted:,} nodes, more than its "
                    "timeline keeps per node)" if omitted else "no per-node panels: the run has no per-node series")
    nodes = list(totals)
    if len(nodes) > NODES_DRAWN:
        busiest = set(sorted(nodes, key=lambda n: -totals[n])[:NODES_DRAWN])
        return [n for n in nodes if n in busiest], f"the {NODES_DRAWN} busiest of {len(nodes):,} nodes"
    if omitted:
        return nodes, "a run without per-node series draws none"
    return nodes, ""


def _events(tl: Mapping[str, Any], end: float) -> list[Mapping[str, Any]]:
    """The timeline's events before ``end`` that have a time."""
    return [e for e in tl.get("events") or () if isinstance(e.get("t"), (int, float)) and e["t"] < end]


def _event_rows(timelines: Sequence[Mapping[str, Any]], end: float) -> tuple[list[tuple[str, str]], str]:
    """The strip's (target, kind) rows, by node, each node's faults first; a note if capped."""
    seen: dict[tuple[str, str], None] = {}
    for tl in timelines:
        for e in _events(tl, end):
            seen[(str(e.get("target")), str(e.get("kind")))] = None
    order = {k: i for i, k in enumerate(_KIND_ORDER)}
    targets = {t: i for i, t in enumerate(dict.fromkeys(n for tl in timelines for n in tl.get("nodes") or ()))}
    # Grouped by node (in the runs' node order), each node's faults first: what happened, then what followed.
    rows = sorted(seen, key=lambda r: (targets.get(r[0], len(targets)), r[0], order.get(r[1], len(order))))
    if len(rows) > EVENT_ROWS:
        return rows[:EVENT_ROWS], f"event strip: {EVENT_ROWS} of {len(rows):,} rows (all in the --report table)"
    return rows, ""


def _spans(events: Sequence[Mapping[str, Any]], end: float) -> list[tuple[float, float, str]]:
    """One row's events (time order) as (start, end, state) for every state that is not the normal one."""
    out: list[tuple[float, float, str]] = []
    if not events:
        return out
    events = sorted(events, key=lambda e: e["t"])
    state, since = str(events[0].get("from")), 0.0
    for e in events:
        if state not in _NORMAL and e["t"] > since:
            out.append((since, min(e["t"], end), state))
        state, since = str(e.get("to")), max(0.0, float(e["t"]))
    if state not in _NORMAL and since < end:
        out.append((since, end, state))
    return out


def _style(kind: str, state: str) -> tuple[str, str]:
    if kind == "fault":
        return _FAULT_STYLE.get(state.split(" ")[0], _OTHER) if "," not in state else _OTHER
    return _STATE_STYLE.get(state, _OTHER)


def _fault_spans(timelines: Sequence[Mapping[str, Any]], end: float) -> list[tuple[float, float, str]]:
    """Every distinct fault span of the runs, with its colour (a sim run's, as scheduled, and a live run's, as
    played, both drawn: they differ by how late the live one was)."""
    spans: dict[tuple[float, float, str], None] = {}
    for tl in timelines:
        faults: dict[str, list[Mapping[str, Any]]] = {}
        for e in _events(tl, end):
            if e.get("kind") == "fault":
                faults.setdefault(str(e.get("target")), []).append(e)
        for events in faults.values():
            for t0, t1, state in _spans(events, end):
                spans[(t0, t1, _style("fault", state)[0])] = None
    return list(spans)


# -- drawing ------------------------------------------------------------------------------------------

def _text(s: str, limit: int = 40) -> str:
    """A string from the results made safe to draw: shortened, and ``$`` escaped so it is never mathtext."""
    s = s if len(s) <= limit else s[:limit - 1] + "\u2026"
    return s.replace("$", r"\$")


def _label_panels(by_name: Mapping[str, Any], nodes: Sequence[str], node_note: str,
                  timelines: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    latency = by_name["latency"]
    values = [v for tl in timelines for key, _, _ in _PERCENTILES for v in _values(tl["overall"].get(key))
              if v > 0]
    log = bool(values) and max(values) > 10 * min(values)
    if log:
        from matplotlib.ticker import LogLocator, NullFormatter
        latency.set_yscale("log")
        latency.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        latency.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 200, not 2 x 10^2
        latency.yaxis.set_minor_formatter(NullFormatter())
    latency.set_ylabel("ms" + (" (log scale)" if log else ""))
    titles = {
        "latency": "response time of OK requests",
        "throughput": "throughput",
        "failures": "failed requests, by kind",
        "share": "each node's share of the requests" + (f" ({node_note})" if node_note else ""),
        "in_flight": "requests in flight at each node (at the interval's end)",
        "utilization": "utilization: each node's workers busy",
    }
    units = {"throughput": "OK responses/s", "failures": "failed/s", "share": "% of requests",
             "in_flight": "requests", "utilization": "% busy"}
    for name, ax in by_name.items():
        ax.set_title(titles[name], fontsize=10, loc="left")
        if name in units:
            ax.set_ylabel(units[name])
        if name != "latency":
            ax.set_ylim(bottom=0)
        if name == "in_flight":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "failures" and not any(v > 0 for tl in timelines for key, _, _ in _FAILURES
                                          for v in _values(tl["overall"].get(key), 0.0)):
            ax.set_ylim(0, 1)
            ax.text(0.5, 0.5, "no failed requests", transform=ax.transAxes, ha="center", va="center",
                    fontsize=9, color="0.4")
        if name in ("throughput", "failures", "in_flight"):
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
        ax.grid(True, which="major", alpha=0.3)
    for name in ("latency", "throughput", "failures", "share"):
        if name in by_name and by_name[name].get_legend_handles_labels()[0]:
            by_name[name].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False,
                                 fontsize=9, title="node" if name == "share" else None)


def _draw_strip(ax: Any, rows: Sequence[tuple[str, str]], timelines: Sequence[Mapping[str, Any]],
                end: float, modes: Sequence[str]) -> list[tuple[Any, float, float, str]]:
    """The event strip; returns the fault names drawn in their bars, to be kept only where they fit."""
    n = len(timelines)
    labels = []
    for k, tl in enumerate(timelines):
        by_row: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for e in _events(tl, end):
            by_row.setdefault((str(e.get("target")), str(e.get("kind"))), []).append(e)
        top, height = 0.1 + 0.8 * k / n, 0.8 / n
        for r, (target, kind) in enumerate(rows):
            bars: dict[str, list[tuple[float, float]]] = {}  # colour -> spans: one collection each, however many
            for t0, t1, state in _spans(by_row.get((target, kind)) or [], end):
                bars.setdefault(_style(kind, state)[0], []).append((t0, max(t1 - t0, 0.0)))
                if kind == "fault" and k == 0:
                    text = ax.text((t0 + t1) / 2, r + 0.5, _fault_name(state), ha="center", va="center",
                                   fontsize=8, color="white", clip_on=True)
                    labels.append((text, t0, t1, f"{_text(target, 20)} {_text(state, 30)} {t0:g}\u2013{t1:g} s"))
            for colour, spans in bars.items():
                # An edge as wide as a pixel keeps a state that lasted milliseconds visible.
                ax.broken_barh(spans, (r + top, height), facecolors=colour, edgecolors=colour, linewidth=1.0)
    ax.set_ylim(len(rows) if rows else 1, 0)
    ax.set_yticks([r + 0.5 for r in range(len(rows))], [f"{_text(t, 18)} {_ROW_NAMES.get(k, _text(k, 12))}"
                                                         for t, k in rows], fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.set_title("state changes: a bar wherever a node was not in its normal state"
                 + (f" (upper half: {modes[0]}, lower: {modes[1]})" if n == 2 else
                    " (one band per run, first at the top)" if n > 2 else ""), fontsize=10, loc="left")
    if not rows:
        ax.text(0.5, 0.5, "no faults or state changes in this run", transform=ax.transAxes, ha="center",
                va="center", fontsize=9, color="0.4")
    ax.grid(True, axis="x", alpha=0.3)
    return labels


def _fault_name(state: str) -> str:
    """A fault's state (``down``, ``error_rate 0.8``, ``extra_latency_ms 100``, or several) said short."""
    parts = []
    for part in state.split(", "):
        what, _, value = part.partition(" ")
        try:
            parts.append({"error_rate": f"{float(value):.0%} errors", "extra_latency_ms": f"+{value} ms"}[what])
        except (KeyError, ValueError):
            parts.append(part)
    return _text(", ".join(parts), 30)


def _fit_labels(labels: Sequence[tuple[Any, float, float, str]], fig: Any) -> list[str]:
    """Remove each fault name that is wider than its bar or touches one kept before; return their names."""
    renderer = fig.canvas.get_renderer()
    kept: list[Any] = []
    hidden = []
    for text, t0, t1, name in labels:
        box = text.get_window_extent(renderer)
        ax = text.axes
        left, right = (ax.transData.transform((t, 0))[0] for t in (t0, t1))
        if box.x0 < left + 2 or box.x1 > right - 2 or any(box.overlaps(other) for other in kept):
            text.remove()
            hidden.append(name)
        else:
            kept.append(box)
    return hidden


def _hidden_note(hidden: Sequence[str]) -> str:
    if not hidden:
        return ""
    shown = "; ".join(hidden[:4])
    return f"faults too short to name in their bars: {shown}" + (f" and {len(hidden) - 4} more" if len(hidden) > 4
                                                                  else "")


def _bottom_legend(runs: Sequence[Mapping[str, Any]], names: list[str], timelines: Sequence[Mapping[str, Any]],
                   rows: Sequence[tuple[str, str]], end: float) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    if len(runs) > 1:
        style_names = ("solid", "dashed", "dotted", "dash-dot")
        handles += [Line2D([], [], color="0.2", ls=_STYLES[k % len(_STYLES)], label=f"{style_names[k % 4]}: {name}")
                    for k, name in enumerate(names)]
    handles.append(Line2D([], [], color="0.5", ls=":", label="measurement window of the summary"))
    seen: dict[str, str] = {}
    shown = set(rows)
    for tl in timelines:
        by_row: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for e in _events(tl, end):
            by_row.setdefault((str(e.get("target")), str(e.get("kind"))), []).append(e)
        for (target, kind), events in by_row.items():
            # The states drawn, as bars: a "from" the strip never draws (a registry's "dead" before "rejoined",
            # whose bar is the "died" before it) names nothing in the legend.
            for _, _, state in _spans(events, end) if (target, kind) in shown else ():
                colour, label = _style(kind, state)
                seen.setdefault(label, colour)
    handles += [Patch(color=colour, label=label + (" (shaded in every panel)" if label.startswith("fault") else ""))
                for label, colour in seen.items()]
    return handles
