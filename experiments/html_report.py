"""One run (or a sim and a live run side by side) as a single self-contained HTML file.

Theory of operation
-------------------
:func:`write_report` writes what ``testbed sim run`` prints, and more, as one
file that opens anywhere, offline: the CSS is inline, the timeline figure
(:func:`experiments.timeline_plot.draw_timeline`) is a base64
``data:image/png`` and there is no script. In order: each run's particulars,
requests by outcome and latency (one column per run), each run's nodes
(requests, share, utilization, p50/p95/p99), the timeline figure with what
its timeline counts but cannot show, when not 0 (state changes missed,
responses after its last interval, OK responses after their interval's
percentiles settled: :data:`experiments.timeline_plot.COUNTS`), the faults
the run played and every state change of its timeline as a table.

Every string that comes from the results (node ids, scenario names, event
states) goes through :func:`html.escape`: a node may call itself anything.
Long tables are cut (``TABLE_ROWS``) and say how many rows they left out.
"""

from __future__ import annotations

import base64
import html
import io
import pathlib
from typing import Any, Mapping, Sequence

__all__ = ["TABLE_ROWS", "write_report"]

#: A table lists at most this many rows (nodes, events) and says how many it left out.
TABLE_ROWS = 500

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1320px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { padding: .25em .8em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
thead th { border-bottom: 2px solid #bbb; }
img { max-width: 100%; height: auto; }
.note { color: #666; font-size: .9em; }
"""


def write_report(path: str | pathlib.Path, runs: Sequence[Mapping[str, Any]], *, title: str) -> None:
    """Write ``runs`` (results dicts of ``testbed sim run`` / ``live run``, with their ``"timeline"``) to
    ``path`` as one self-contained HTML page titled ``title`` (parent folders created)."""
    if not runs:
        raise ValueError("no runs to report")
    names = [str(r.get("mode") or f"run {i + 1}") for i, r in enumerate(runs)]
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>", _particulars(runs, names),
             "<h2>Requests by outcome</h2>", _outcomes(runs, names),
             "<h2>Latency of OK requests</h2>", _latency(runs, names)]
    for name, run in zip(names, runs):
        parts += [f"<h2>Nodes{' of the ' + _e(name) + ' run' if len(runs) > 1 else ''}</h2>", _nodes(run)]
    parts += ["<h2>Timeline</h2>", _figure(runs, title), _counts(runs, names)]
    if any(r.get("faults") for r in runs):
        parts += ["<h2>Faults played</h2>", _faults(runs, names)]
    parts += ["<h2>State changes</h2>", _events(runs, names), "</body></html>\n"]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any, fmt: str = "{:,.1f}") -> str:
    """A number formatted, escaped; a dash for None; what is not a number, as it is (escaped)."""
    if v is None:
        return "&ndash;"
    try:
        return _e(fmt.format(v))
    except (TypeError, ValueError):
        return _e(v)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] | None = None,
           note: str = "") -> str:
    """A table of already-escaped cells; the ``numeric`` columns (default: all but the first) align right."""
    right = set(range(1, len(head)) if numeric is None else numeric)
    out = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" if i in right else f"<td class=\"text\">{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    if note:
        out.append(f"<p class=\"note\">{note}</p>")
    return "".join(out)


def _cut(rows: list[Any], what: str) -> tuple[list[Any], str]:
    if len(rows) <= TABLE_ROWS:
        return rows, ""
    return rows[:TABLE_ROWS], (f"the first {TABLE_ROWS:,} of {len(rows):,} {what}; all of them are in the results "
                               "JSON (--json)")


def _particulars(runs: Sequence[Mapping[str, Any]], names: list[str]) -> str:
    keys = (("scenario", "scenario", "{}"), ("strategy", "strategy", "{}"), ("seed", "seed", "{}"),
            ("impl", "whose exercise code (--impl)", "{}"), ("offered_rate_per_s", "offered rate (requests/s)",
                                                            "{:,.1f}"),
            ("load", "offered load (fraction of capacity)", "{:.2f}"), ("warmup_s", "measured from (s)", "{:g}"),
            ("duration_s", "measured to (s)", "{:g}"))
    rows = [[_e(label)] + [_num(r.get(key), fmt) if r.get(key) is not None else "&ndash;" for r in runs]
            for key, label, fmt in keys if any(r.get(key) is not None for r in runs)]
    rows.append(["timeline interval (s)"] + [_num((r.get("timeline") or {}).get("interval_s"), "{:g}") for r in runs])
    return _table(["", *map(_e, names)], rows)


def _outcomes(runs: Sequence[Mapping[str, Any]], names: list[str]) -> str:
    kinds = dict.fromkeys(k for r in runs for k in r.get("requests") or {})
    rows = [[_e(kind.replace("_", " "))] + [_num((r.get("requests") or {}).get(kind), "{:,}") for r in runs]
            for kind in kinds]
    details = [k for k in dict.fromkeys(k for r in runs for k in r.get("errors_detail") or {})
               if any((r.get("errors_detail") or {}).get(k) for r in runs)]
    rows += [[f"&nbsp;&nbsp;errors: {_e(k.replace('_', ' '))}"] + [_num((r.get("errors_detail") or {}).get(k), "{:,}")
                                                                  for r in runs] for k in details]
    rows.append(["throughput (OK/s)"] + [_num(r.get("throughput_rps")) for r in runs])
    return _table(["requests in the measurement window", *map(_e, names)], rows)


def _latency(runs: Sequence[Mapping[str, Any]], names: list[str]) -> str:
    keys = ("mean", "p50", "p90", "p95", "p99", "max")
    rows = [[k] + [_num((r.get("latency_ms") or {}).get(k)) for r in runs] for k in keys]
    return _table(["ms", *map(_e, names)], rows)


def _nodes(run: Mapping[str, Any]) -> str:
    items, note = _cut(list((run.get("nodes") or {}).items()), "nodes")
    rows = []
    for node_id, n in items:
        lat = n.get("latency_ms") or {}
        share, util = n.get("share"), n.get("utilization")
        rows.append([_e(node_id), _num(n.get("requests"), "{:,}"), _num(share, "{:.1%}"), _num(util, "{:.0%}"),
                     _num(lat.get("p50")), _num(lat.get("p95")), _num(lat.get("p99"))])
    return _table(["node", "requests", "share", "utilization", "p50 ms", "p95 ms", "p99 ms"], rows, note=_e(note))


def _figure(runs: Sequence[Mapping[str, Any]], title: str) -> str:
    import matplotlib.pyplot as plt

    from experiments.timeline_plot import draw_timeline, timeline_of

    try:
        for i, r in enumerate(runs):
            timeline_of(r, i)
    except ValueError as exc:
        return f"<p class=\"note\">No timeline figure: {_e(exc)}</p>"
    fig = draw_timeline(runs, title=title)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f"<img src=\"data:image/png;base64,{data}\" alt=\"{_e(title)}: response time, throughput, failures "
            "and per-node share, in-flight and utilization over time, with faults and state changes\">")


def _counts(runs: Sequence[Mapping[str, Any]], names: list[str]) -> str:
    """What each run's timeline counts but cannot show, when not 0, with why; nothing when all are 0."""
    from experiments.timeline_plot import counts_of

    items = []
    for name, r in zip(names, runs):
        timeline = r.get("timeline")
        for key, words, why in counts_of(timeline) if isinstance(timeline, Mapping) else ():
            run = f"{_e(name)}: " if len(runs) > 1 else ""
            items.append(f"<li>{run}{_e(words)} (<code>{_e(key)}</code>: {_e(why)})</li>")
    if not items:
        return ""
    return f"<p class=\"note\">What the timeline counts but cannot show:</p><ul class=\"note\">{''.join(items)}</ul>"


def _faults(runs: Sequence[Mapping[str, Any]], names: list[str]) -> str:
    rows = [[_num(f.get("at_s"), "{:.1f}"), _e(name), _e(f.get("node", "")), _e(f.get("action", "")),
             _e(f.get("result", ""))] for name, r in zip(names, runs) for f in r.get("faults") or ()]
    return _table(["at (s)", "run", "node", "action", "result"], rows, numeric=[0])


def _events(runs: Sequence[Mapping[str, Any]], names: list[str]) -> str:
    rows = [(e.get("t"), name, e) for name, r in zip(names, runs)
            for e in (r.get("timeline") or {}).get("events") or ()]
    if not rows:
        return "<p class=\"note\">No state changes: no breaker, ejector, health or membership change and no fault.</p>"
    rows.sort(key=lambda row: (row[0] if isinstance(row[0], (int, float)) else float("inf")))
    shown, note = _cut(rows, "state changes")
    cells = [[_num(t, "{:.3f}"), _e(name), _e(e.get("target", "")), _e(e.get("kind", "")), _e(e.get("from", "")),
              _e(e.get("to", "")), _e(e.get("detail", "") or "")] for t, name, e in shown]
    head = ["t (s)", "run", "target", "kind", "from", "to", "detail"]
    return _table(head, cells, numeric=[0], note=_e(note))
