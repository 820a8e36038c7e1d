"""Readable text for results: one run's summary, and a sweep's comparison table."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["run_summary", "sweep_table"]


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def run_summary(r: dict[str, Any]) -> str:
    """A summary of one run's results dict (sim or live)."""
    q, lat = r["requests"], r["latency_ms"]
    load = f", load {r['load']:.2f}" if r.get("load") is not None else ""
    rate = f", offered {r['offered_rate_per_s']:.1f}/s" if r.get("offered_rate_per_s") is not None else ""
    lines = [
        f"{r['scenario']} [{r['mode']}] strategy={r['strategy']} seed={r['seed']} "
        f"window={r['warmup_s']:g}..{r['duration_s']:g}s{rate}{load}",
        f"  requests: sent {q['sent']}, ok {q['ok']}, rate-limited {q['rate_limited']}, "
        f"backpressure {q['backpressure']}, circuit-open {q['circuit_open']}, errors {q['errors']}",
        f"  throughput {r['throughput_rps']:.1f}/s; latency ms: mean {_ms(lat['mean'])}  p50 {_ms(lat['p50'])}  "
        f"p90 {_ms(lat['p90'])}  p95 {_ms(lat['p95'])}  p99 {_ms(lat['p99'])}  max {_ms(lat['max'])}",
        f"  {'node':<12}{'requests':>9}{'share':>8}{'util':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}",
    ]
    for node_id, n in r["nodes"].items():
        nl = n["latency_ms"]
        lines.append(f"  {node_id:<12}{n['requests']:>9}{n['share']:>8.1%}{n['utilization']:>7.0%}"
                     f"{_ms(nl['p50']):>9}{_ms(nl['p95']):>9}{_ms(nl['p99']):>9}")
    errors = {k: v for k, v in r.get("errors_detail", {}).items() if v}
    if errors:
        lines.append("  errors: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in errors.items()))
    for f in r.get("faults") or []:
        lines.append(f"  fault at {f['at_s']:.1f}s on {f['node']}: {f['action']} ({f['result']})")
    if r.get("generator"):
        lines.extend(_generator_lines(r["generator"]))
    return "\n".join(lines)


def _generator_lines(g: dict[str, Any]) -> list[str]:
    lag = g["lag_ms"]
    asked = (f"asked {g['asked_rate_per_s']:.1f}/s, scheduled {g['scheduled_rate_per_s']:.1f}/s, "
             if g["asked_rate_per_s"] is not None else "closed loop, ")
    lines = [f"  load generator: {asked}sent {g['sent_rate_per_s']:.1f}/s; sent late by p50 {lag['p50']:.2f} ms, "
             f"p99 {lag['p99']:.2f} ms, max {lag['max']:.1f} ms"]
    if not g["kept_up"]:
        lines.append("  WARNING: the load generator could not offer this load on this machine: "
                     + "; ".join(g["problems"]) + ". The latencies above include its own delay; "
                     "lower the rate or run less beside it.")
    return lines


def _ci(cell: dict[str, float | None], fmt=_ms) -> str:
    if cell["mean"] is None:
        return "-"
    return fmt(cell["mean"]) + (f" ±{fmt(cell['ci95'])}" if cell["ci95"] is not None else "")


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per strategy and load: latency percentiles and node shares, mean ±95% CI over repetitions."""
    if not rows:
        return "(no runs)"
    nodes = list(rows[0]["share"])
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    head = (f"{'strategy':<28}{'load':>5}  {'p50 ms':>14}{'p95 ms':>16}{'p99 ms':>16}   "
            f"share % ({' / '.join(nodes)})")
    lines = [head, "-" * len(head)]
    for row in sorted(rows, key=lambda r: (r["strategy"], r["load"])):
        lat = row["latency_ms"]
        shares = " / ".join(_ci(row["share"][n], pct) for n in nodes)
        lines.append(f"{row['strategy']:<28}{row['load']:>5.2f}  {_ci(lat['p50']):>14}{_ci(lat['p95']):>16}"
                     f"{_ci(lat['p99']):>16}   {shares}")
    lines.append(f"(mean ±95% CI over {rows[0]['reps']} repetitions; the same seeds for every strategy)")
    return "\n".join(lines)
