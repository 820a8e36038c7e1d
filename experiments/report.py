"""Readable text for results: one run's summary, and a sweep's comparison table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from experiments.compare import FAILURE_KINDS, failed_percent, failures

if TYPE_CHECKING:
    from core.scenario import Scenario

__all__ = ["NODES_LISTED", "SHARES_SHOWN", "differences", "run_summary", "scheduled_faults", "side_by_side",
           "sweep_table"]


#: A run's summary lists every node up to twice this many, else this many idlest and busiest.
NODES_LISTED = 3

#: Nodes beyond which a table gives the spread of the shares rather than every node's.
SHARES_SHOWN = 6


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
    nodes = list(r["nodes"].items())
    if len(nodes) > 2 * NODES_LISTED:  # the busiest and idlest few, not a thousand lines
        nodes.sort(key=lambda item: item[1]["requests"])
        lines.append(f"  ({len(nodes):,} nodes: the {NODES_LISTED} with the fewest requests, then the "
                     f"{NODES_LISTED} with the most)")
        nodes = nodes[:NODES_LISTED] + nodes[-NODES_LISTED:]
    for node_id, n in nodes:
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
    if r.get("overhead_ms") and r["overhead_ms"]["p50"] is not None:
        lines.append(_overhead_line(r["overhead_ms"]))
    return "\n".join(lines)


def scheduled_faults(scenario: Scenario) -> list[dict[str, Any]]:
    """The scenario's faults as a run's ``"faults"`` log (the live runner's schema: node, at_s, action,
    result), in time order. The simulator plays each one exactly at its ``start_s`` and ``end_s``."""
    log = []
    for spec in scenario.nodes:
        for f in spec.faults:
            on, off = (("crash", "restart") if f.down else
                       (f"faults on: error_rate={f.error_rate:g} extra_latency_ms={f.extra_latency_ms:g}", "faults off"))
            log += [{"node": spec.id, "at_s": f.start_s, "action": on, "result": "simulated"},
                    {"node": spec.id, "at_s": f.end_s, "action": off, "result": "simulated"}]
    return sorted(log, key=lambda e: e["at_s"])


def _overhead_line(o: dict[str, Any]) -> str:
    return (f"  overhead: GET /health through the balancer takes p50 {o['p50']:.2f} ms, mean {o['mean']:.2f} ms "
            "(in every live response time; not in the simulator's)")


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
    lines.extend(f"  note: {note}" for note in g.get("notes", ()))
    return lines


def _ci(cell: dict[str, float | None], fmt=_ms) -> str:
    if cell["mean"] is None:
        return "-"
    return fmt(cell["mean"]) + (f" ±{fmt(cell['ci95'])}" if cell["ci95"] is not None else "")


def _count(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"


def _failed(cell: dict[str, Any]) -> str:
    """Mean failed requests per run, their share of those sent (±95% CI) and the count by kind."""
    count = cell["count"]["mean"]
    if not count:
        return "0"
    kinds = {k.replace("_", "-"): c["mean"] for k, c in cell["by_kind"].items() if c["mean"]}
    by_kind = (next(iter(kinds)) if len(kinds) == 1
               else ", ".join(f"{k} {_count(v)}" for k, v in kinds.items()))
    return f"{_count(count)} ({_ci(cell['percent'], lambda v: f'{v:.1f}')}%) {by_kind}"


def _shares(rows: Sequence[dict[str, Any]]) -> tuple[str, list[str]]:
    """The share column's heading and cells: every node's share, or for many nodes the lowest
    and highest node's mean share beside the fair one."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    nodes = list(rows[0]["share"])
    if len(nodes) <= SHARES_SHOWN:
        return (f"share % ({' / '.join(nodes)})",
                [" / ".join(_ci(row["share"][n], pct) for n in nodes) for row in rows])
    cells = []
    for row in rows:
        means = [c["mean"] for c in row["share"].values() if c["mean"] is not None]
        cells.append(f"{100 * min(means):.2f} .. {100 * max(means):.2f}" if means else "-")
    return f"share %: min .. max of {len(nodes):,} (fair {100 / len(nodes):.2f})", cells


def _theory_cells(row: dict[str, Any], scenario: Scenario | None) -> tuple[str, str, float] | None:
    """The theory column, the deviation from it (``ok`` when it matches; ``*`` when the warm-up
    was too short for the point) and the warm-up it needs (s), or None where theory has nothing."""
    from experiments.theory import matches, mean_field_response_s, warmup_needed_s

    expected_s = mean_field_response_s(scenario, row["strategy"], row["load"]) if scenario else None
    if scenario is None or expected_s is None:
        return None
    expected, mean = 1000 * expected_s, row["latency_ms"]["mean"]
    needed_s = warmup_needed_s(scenario, row["strategy"], row["load"]) or 0.0
    short = "*" if scenario.warmup_s < needed_s else ""
    if mean["mean"] is None:
        return _ms(expected), "-" + short, needed_s
    verdict = "ok" if matches(mean["mean"], mean["ci95"], expected) else "OFF"
    return _ms(expected), f"{100 * (mean['mean'] - expected) / expected:+.1f}% {verdict}{short}", needed_s


def sweep_table(rows: Sequence[dict[str, Any]], *, scenario: Scenario | None = None) -> str:
    """Per strategy and load: mean and percentile latency of OK requests, node shares and failed
    requests, mean ±95% CI over repetitions. Given the sweep's ``scenario``, rows that queueing
    theory has a value for (:func:`experiments.theory.mean_field_response_s`) get it beside the
    mean, with the deviation and whether it matches."""
    if not rows:
        return "(no runs)"
    share_head, shares = _shares(rows)
    theory = [_theory_cells(row, scenario) for row in rows]
    shown = any(theory)
    width = max(len(s) for s in [*shares, share_head])
    extra = f"{'theory ms':>11}{'sim vs theory':>16}" if shown else ""
    head = (f"{'strategy':<28}{'load':>5}  {'mean ms':>14}{extra}{'p50 ms':>14}{'p95 ms':>16}{'p99 ms':>16}   "
            f"{share_head:<{width}}   failed (% of sent) by kind")
    lines = [head, "-" * len(head)]
    for row, share, th in sorted(zip(rows, shares, theory), key=lambda r: (r[0]["strategy"], r[0]["load"])):
        lat = row["latency_ms"]
        cells = (f"{th[0]:>11}{th[1]:>16}" if th else " " * 27) if shown else ""
        lines.append(f"{row['strategy']:<28}{row['load']:>5.2f}  {_ci(lat['mean']):>14}{cells}{_ci(lat['p50']):>14}"
                     f"{_ci(lat['p95']):>16}{_ci(lat['p99']):>16}   {share:<{width}}   {_failed(row['failed'])}")
    if rows[0]["reps"] > 1:
        lines.append(f"(mean ±95% CI over {rows[0]['reps']} repetitions; the same seeds for every strategy)")
    else:
        lines.append("(one run each; the same seed for every strategy)")
    lines.append("latency: of OK requests only. failed: mean per run of every other outcome (rate-limited, "
                 "backpressure, circuit-open;\n  errors: server, connect, no-backend, timeout), with its % of the "
                 "requests sent.")
    lines.append("share: of every request the balancer sent to the node, failed ones included.")
    if any(row["failed"]["count"]["mean"] for row in rows):
        lines.append("  The balancer ejects a node after consecutive failures for a while (eject_after_failures, "
                     "ejection_time_s),\n  so where requests fail, shares move away from the failing nodes.")
    if shown:
        lines.append(_THEORY_NOTE)
    short = [(row, th[2]) for row, th in zip(rows, theory) if th and th[1].endswith("*")]
    if short and scenario:
        worst = max(needed for _, needed in short)
        lines.append(f"  * the warm-up ({scenario.warmup_s:g} s) is shorter than this point needs (up to {worst:,.0f} s: "
                     "two M/M/1 relaxation times\n    for random), so its mean is biased low: run it with a longer "
                     "duration and warm-up.")
        lines.extend(filter(None, (_from_empty(row, scenario) for row, _ in short)))
    return "\n".join(lines)


def _from_empty(row: dict[str, Any], scenario: Scenario) -> str:
    """Under the * note: what a run this short should show where theory knows the transient
    (:func:`experiments.theory.from_empty_response_s`), against the mean; else nothing."""
    from experiments.theory import from_empty_response_s, matches

    expected_s = from_empty_response_s(scenario, row["strategy"], row["load"])
    if expected_s is None:
        return ""
    expected, mean = 1000 * expected_s, row["latency_ms"]["mean"]
    said = (f"    {row['strategy']} at {row['load']:g}: from empty, M/M/1 over {scenario.warmup_s:g}.."
            f"{scenario.duration_s:g} s averages {_ms(expected)} ms (exact transient)")
    if mean["mean"] is None:
        return said
    verdict = "ok" if matches(mean["mean"], mean["ci95"], expected) else "OFF"
    return f"{said}; sim {_ci(mean)}, {100 * (mean['mean'] - expected) / expected:+.1f}% {verdict}"


_THEORY_NOTE = (
    "theory: the mean-field limit (n -> infinity) of the supermarket model (identical one-worker nodes, Poisson\n"
    "  arrivals, exponential service): random is M/M/1, 1 / (mu - lambda) per node (exact at any n); power_of_two\n"
    "  sum_i rho^(2^i - 2) / mu (Vvedenskaya, Dobrushin, Karpelevich 1996; Mitzenmacher 2001), a little below any\n"
    "  finite n. sim vs theory: (mean - theory) / theory; ok when within the 95% CI or 3%, whichever is larger.")


def differences(sim: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """A live run against the simulated run of the same scenario and seed (the same arrivals):
    latency as a relative difference ((live - sim) / sim), per-node shares in percentage points,
    failed requests by kind side by side."""
    overhead = (live.get("overhead_ms") or {}).get("p50")

    def relative(got: float | None, want: float | None) -> float | None:
        return None if want is None or got is None or want == 0 else (got - want) / want

    latency, net = {}, {}
    for key in ("mean", "p50", "p95", "p99"):
        want, got = sim["latency_ms"][key], live["latency_ms"][key]
        latency[key] = relative(got, want)
        net[key] = relative(None if got is None or overhead is None else got - overhead, want)
    shares = {n: 100 * (live["nodes"][n]["share"] - node["share"]) for n, node in sim["nodes"].items()}
    sim_failed, live_failed = failures(sim), failures(live)
    counts = {k: {"sim": sim_failed[k], "live": live_failed[k], "relative": relative(live_failed[k], sim_failed[k])}
              for k in FAILURE_KINDS}
    return {"strategy": sim["strategy"], "load": sim["load"], "seed": sim["seed"], "latency_relative": latency,
            "latency_relative_net_of_overhead": net, "overhead_ms": overhead, "share_pp": shares, "counts": counts}


def side_by_side(same: dict[str, Any], row: dict[str, Any], live: dict[str, Any]) -> str:
    """One (strategy, load): the simulated run with the live run's seed (``same``), the mean ±95% CI
    over all simulated repetitions (``row``), the live run, and live against ``same``."""
    d = differences(same, live)
    rate = live.get("offered_rate_per_s")
    head = f"{same['strategy']} at load {same['load']:.2f}" + (f" ({rate:.1f} req/s)" if rate else "")
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"{head:<34}{'sim, seed ' + str(same['seed']):>16}{'sim, ' + str(row['reps']) + ' seeds':>20}"
             f"{'live':>11}{'live vs sim':>13}{'net of overhead':>17}"]
    signed = lambda v: "-" if v is None else f"{100 * v:+.1f}%"  # noqa: E731
    for key in ("mean", "p50", "p95", "p99"):
        lines.append(f"  {key + ' ms':<32}{_ms(same['latency_ms'][key]):>16}{_ci(row['latency_ms'][key]):>20}"
                     f"{_ms(live['latency_ms'][key]):>11}{signed(d['latency_relative'][key]):>13}"
                     f"{signed(d['latency_relative_net_of_overhead'][key]):>17}")
    for node, pp in d["share_pp"].items():
        lines.append(f"  {'share ' + node:<32}{pct(same['nodes'][node]['share']):>16}"
                     f"{_ci(row['share'][node], pct):>20}{pct(live['nodes'][node]['share']):>11}{f'{pp:+.1f} pp':>13}")
    failed = row["failed"]
    lines.append(f"  {'failed, % of sent':<32}{failed_percent(same):>15.1f}%{_ci(failed['percent'], _ms) + '%':>20}"
                 f"{failed_percent(live):>10.1f}%")
    for key, c in d["counts"].items():
        mean = failed["by_kind"][key]["mean"]
        if c["sim"] or c["live"] or mean:  # the kinds that happened, in either
            lines.append(f"  {'  ' + key.replace('_', ' '):<32}{c['sim']:>16,}"
                         f"{'-' if mean is None else f'{mean:,.1f}':>20}{c['live']:>11,}"
                         f"{'same' if c['sim'] == c['live'] else signed(c['relative']):>13}")
    if d["overhead_ms"] is not None:
        lines.append(f"  (overhead: a /health round trip through the live balancer took {d['overhead_ms']:.1f} ms at p50 "
                     "before the load; 'net of overhead' takes it off every live latency)")
    g = live.get("generator")
    if g and not g["kept_up"]:
        lines.append("  WARNING: the live load generator fell behind: " + "; ".join(g["problems"]))
    return "\n".join(lines)
