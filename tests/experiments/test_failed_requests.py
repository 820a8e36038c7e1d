"""A sweep tells the whole truth: failed requests in the table and the plot, the plot says what its
error bars are, one load draws points, the legend covers no data, and ``sim run`` lists its faults."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from experiments.cli import main
from experiments.compare import aggregate
from experiments.plot import draw_sweep
from experiments.report import side_by_side, sweep_table


def run(strategy: str, load: float, rep: int, *, ok: int, sent: int = 1000, timeout: int = 0,
        rate_limited: int = 0, server: int = 0) -> dict[str, Any]:
    """A results dict as a run reports it (core.results), with made-up numbers."""
    lat = {k: 10.0 * (1 + rep) for k in ("mean", "p50", "p90", "p95", "p99", "max")}
    nodes = {"a": {"requests": sent // 4, "share": 0.25, "utilization": 0.5, "latency_ms": lat},
             "b": {"requests": sent - sent // 4, "share": 0.75, "utilization": 0.5, "latency_ms": lat}}
    assert ok + timeout + rate_limited + server == sent
    return {"strategy": strategy, "load": load, "rep": rep, "seed": 42 + rep, "latency_ms": lat,
            "throughput_rps": ok / 10, "nodes": nodes,
            "requests": {"sent": sent, "ok": ok, "rate_limited": rate_limited, "backpressure": 0, "circuit_open": 0,
                         "errors": timeout + server},
            "errors_detail": {"server": server, "connect": 0, "no_backend": 0, "timeout": timeout}}


RUNS = [run("round_robin", 0.7, 0, ok=800, timeout=200), run("round_robin", 0.7, 1, ok=820, timeout=180),
        run("least_connections", 0.7, 0, ok=1000), run("least_connections", 0.7, 1, ok=1000),
        run("random", 0.7, 0, ok=900, rate_limited=90, server=10), run("random", 0.7, 1, ok=900, rate_limited=90,
                                                                       server=10)]


def test_aggregate_counts_every_failed_request_by_kind() -> None:
    rows = {r["strategy"]: r for r in aggregate(RUNS)}
    failed = rows["round_robin"]["failed"]
    assert failed["count"]["mean"] == 190 and failed["percent"]["mean"] == pytest.approx(19.0)
    assert failed["by_kind"]["timeout"]["mean"] == 190 and failed["by_kind"]["server"]["mean"] == 0
    assert rows["random"]["failed"]["by_kind"]["rate_limited"]["mean"] == 90
    assert rows["least_connections"]["failed"]["count"]["mean"] == 0


def test_the_table_has_a_failed_column_with_count_percent_and_kind() -> None:
    table = sweep_table(aggregate(RUNS)).splitlines()
    assert "failed (% of sent) by kind" in table[0]
    line = {row.split()[0]: row for row in table[2:8]}
    assert line["round_robin"].endswith("190 (19.0 ±12.7%) timeout")
    assert line["random"].endswith("100 (10.0 ±0.0%) rate-limited 90, server 10")
    assert line["least_connections"].endswith(" 0")
    text = "\n".join(table)
    assert "latency: of OK requests only" in text and "failed ones included" in text
    assert "eject_after_failures" in text  # why shares move where requests fail


def test_side_by_side_shows_failed_requests_by_kind() -> None:
    rows = {r["strategy"]: r for r in aggregate(RUNS)}
    live = run("round_robin", 0.7, 0, ok=700, timeout=300)
    text = side_by_side(RUNS[0], rows["round_robin"], live)
    lines = [line.split() for line in text.splitlines()]
    assert ["failed,", "%", "of", "sent", "20.0%", "19.0", "±12.7%", "30.0%"] in lines
    assert ["timeout", "200", "190.0", "300", "+50.0%"] in lines
    assert "rate limited" not in text  # only the kinds that happened


def _marker_faces(ax) -> dict[float, str]:
    """x -> face colour of every circle marker drawn on ``ax``."""
    faces = {}
    for line in ax.get_lines():
        if line.get_marker() == "o":
            for x in line.get_xdata():
                faces[round(float(x), 1)] = line.get_markerfacecolor()
    return faces


def test_the_plot_marks_failed_points_explains_error_bars_and_keeps_the_legend_off_the_data() -> None:
    import matplotlib.pyplot as plt

    runs = [*RUNS, *(run(s, 0.3, r, ok=1000) for s in ("round_robin", "least_connections", "random") for r in (0, 1))]
    fig = draw_sweep(aggregate(runs), title="t")
    try:
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["p50 response time (OK requests)", "p95 response time (OK requests)",
                                                   "p99 response time (OK requests)", "failed requests"]
        assert "error bars: 95% CI over 2 seeds" in fig._suptitle.get_text()
        assert axes[3].get_ylabel() == "% of requests sent" and "milliseconds" in axes[0].get_ylabel()
        # round robin (orange, C1) failed at 0.7: hollow there, filled at 0.3
        rr = [ln for ln in axes[1].get_lines() if ln.get_marker() == "o" and ln.get_color() == "C1"]
        faces = {round(float(x), 1): ln.get_markerfacecolor() for ln in rr for x in ln.get_xdata()}
        assert faces[0.7] in ("white", (1.0, 1.0, 1.0, 1.0)) and faces[0.3] == "C1"
        assert "19.0%" in [t.get_text() for t in axes[3].texts]
        # The legend is the figure's, below every panel: it covers no data.
        assert not any(ax.get_legend() for ax in axes) and len(fig.legends) == 1
        fig.canvas.draw()
        legend_box = fig.legends[0].get_window_extent()
        assert all(not legend_box.overlaps(ax.get_window_extent()) for ax in axes)
    finally:
        plt.close(fig)


def test_one_load_is_points_on_a_readable_axis() -> None:
    import matplotlib.pyplot as plt

    fig = draw_sweep(aggregate(RUNS), title="t")
    try:
        for ax in fig.axes:
            low, high = ax.get_xlim()
            assert low < 0.7 - 0.02 and high > 0.7 + 0.02
            assert list(ax.get_xticks()) == [0.7]
    finally:
        plt.close(fig)


def test_one_seed_says_there_are_no_error_bars() -> None:
    import matplotlib.pyplot as plt

    fig = draw_sweep(aggregate([r for r in RUNS if r["rep"] == 0]), title="t")
    try:
        assert "one seed per point, no error bars" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_compare_prints_the_failed_column_for_round_robin_past_saturation(tmp_path) -> None:
    result = CliRunner().invoke(main, ["compare", "--loads", "0.9", "--reps", "1", "--duration", "40",
                                       "--workers", "1", "--plot", str(tmp_path / "c.png"), "--json", ""],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rr = next(line for line in result.output.splitlines() if line.startswith("round_robin"))
    assert rr.endswith("timeout") and "%)" in rr, rr


def test_sim_run_lists_the_faults_it_played() -> None:
    result = CliRunner().invoke(main, ["sim", "run", "faults", "--duration", "90"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [line.strip() for line in result.output.splitlines() if "fault at" in line] == [
        "fault at 20.0s on node-1: crash (simulated)",
        "fault at 40.0s on node-1: restart (simulated)",
        "fault at 50.0s on node-2: faults on: error_rate=0.8 extra_latency_ms=0 (simulated)",
        "fault at 65.0s on node-2: faults off (simulated)",
        "fault at 70.0s on node-2: faults on: error_rate=0 extra_latency_ms=100 (simulated)",
        "fault at 80.0s on node-2: faults off (simulated)",
    ]
