"""A run's timeline drawn (``experiments.timeline_plot``), reported as one HTML file (``experiments.html_report``),
and both from ``testbed sim run --plot/--report/--interval``."""

from __future__ import annotations

import base64
import json
import pathlib
import re
from typing import Any

import matplotlib
import pytest
from click.testing import CliRunner

from experiments.cli import main
from experiments.html_report import write_report
from experiments.scenarios import load
from experiments.timeline_plot import EVENT_ROWS, draw_timeline, plot_timeline
from solutions.impl import simulate

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def faults_run() -> dict[str, Any]:
    """The faults scenario for 30 s: node-1 is down from 20 s to 40 s (so to the end)."""
    return simulate(load("faults").replace(duration_s=30), "solution")


def synthetic(mode: str = "sim", n: int = 20, nodes: tuple[str, ...] = ("node-1", "node-2"),
              events: list[dict[str, Any]] | None = None, p99: float = 40.0, omitted: int = 0) -> dict[str, Any]:
    """A results dict with a hand-made timeline of ``n`` intervals of 1 s."""
    def series(scale: float) -> dict[str, list[Any]]:
        return {"requests": [10 * scale] * n, "ok": [9 * scale] * n, "rate_limited": [0] * n,
                "backpressure": [1] * n, "circuit_open": [0] * n, "errors": [0] * n,
                "throughput_rps": [9.0 * scale] * n, "p50_ms": [None] + [10.0] * (n - 1),
                "p95_ms": [20.0] * n, "p99_ms": [p99] * n, "in_flight": [2] * n, "utilization": [0.5] * n}
    per_node = {} if omitted else {node: {**series(1.0), "share": [1 / len(nodes)] * n} for node in nodes}
    return {"scenario": "synthetic", "mode": mode, "strategy": "round_robin", "seed": 1, "warmup_s": 2.0,
            "duration_s": float(n), "requests": {"sent": 100, "ok": 90, "rate_limited": 0, "backpressure": 10,
                                                 "circuit_open": 0, "errors": 0},
            "errors_detail": {"server": 0}, "throughput_rps": 9.0,
            "latency_ms": {"mean": 12.0, "p50": 10.0, "p90": 18.0, "p95": 20.0, "p99": p99, "max": 50.0},
            "nodes": {node: {"requests": 50, "share": 0.5, "utilization": 0.5,
                             "latency_ms": {"mean": 12.0, "p50": 10.0, "p90": 18.0, "p95": 20.0, "p99": p99,
                                            "max": 50.0}} for node in nodes},
            "timeline": {"interval_s": 1.0, "t": [float(k) for k in range(n)], "later": 0,
                         "overall": series(len(nodes)), "nodes": per_node, "nodes_omitted": omitted,
                         "events": events or []}}


def fault(target: str, start: float, end: float, what: str = "down") -> list[dict[str, Any]]:
    return [{"t": start, "target": target, "kind": "fault", "from": "ok", "to": what},
            {"t": end, "target": target, "kind": "fault", "from": what, "to": "ok"}]


def texts(fig: Any) -> list[str]:
    """Every piece of text in a figure: titles, labels, tick labels, legends, texts."""
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def titles(fig: Any) -> list[str]:
    return [ax.get_title(loc="left") for ax in fig.axes]


def test_a_simulated_run_with_a_crash_draws_every_panel_and_names_the_fault(faults_run, tmp_path) -> None:
    fig = draw_timeline([faults_run])
    try:
        assert titles(fig) == [
            "response time of OK requests", "throughput", "failed requests, by kind",
            "each node's share of the requests", "requests in flight at each node (at the interval's end)",
            "utilization: each node's workers busy",
            "state changes: a bar wherever a node was not in its normal state"]
        words = texts(fig)
        assert {"node-1 fault", "node-1 health check"} <= set(words)  # the strip's rows
        assert "down" in words  # the fault's name, inside its bar
        assert {"p50", "p95", "p99", "node-1", "node-2", "node-3", "OK responses/s"} <= set(words)
        assert "fault: node down (shaded in every panel)" in words
        assert "time since the run began (s); values per interval, drawn at its middle" in words
        share = fig.axes[3]
        node_1 = [line for line in share.get_lines() if line.get_label() == "node-1"][0]
        x, y = node_1.get_data()
        crashed = [v for t, v in zip(x, y) if 21 < t < 30]
        assert crashed and max(crashed) == 0  # node-1 took nothing while it was down
        assert fig.axes[-1].get_xlim() == (0.0, pytest.approx(faults_run["timeline"]["t"][-1] + 1.0, abs=1.0))
    finally:
        plt.close(fig)
    plot_timeline([faults_run], tmp_path / "sub" / "t.png")
    assert (tmp_path / "sub" / "t.png").read_bytes()[:8] == PNG


def test_a_run_without_failures_says_so_on_an_axis_from_0_to_1() -> None:
    run = synthetic()
    run["timeline"]["overall"]["backpressure"] = [0] * 20
    fig = draw_timeline([run])
    try:
        assert fig.axes[2].get_ylim() == (0.0, 1.0) and "no failed requests" in texts(fig)
    finally:
        plt.close(fig)


def test_latency_is_on_a_log_scale_only_when_it_spans_more_than_ten_times() -> None:
    for p99, scale in ((40.0, "linear"), (400.0, "log")):
        fig = draw_timeline([synthetic(p99=p99)])
        try:
            assert fig.axes[0].get_yscale() == scale
            assert fig.axes[0].get_ylabel() == ("ms (log scale)" if scale == "log" else "ms")
        finally:
            plt.close(fig)


def test_two_runs_overlay_solid_and_dashed_and_the_legend_says_which_is_which() -> None:
    events = fault("node-1", 5, 9) + [{"t": 5.5, "target": "node-1", "kind": "health", "from": "up", "to": "down"}]
    fig = draw_timeline([synthetic("sim", events=events), synthetic("live", events=events)])
    try:
        styles = {line.get_linestyle() for line in fig.axes[0].get_lines() if line.get_color() in ("C0", "C1", "C3")}
        assert {"-", "--"} <= styles
        words = texts(fig)
        assert "solid: sim (round_robin, seed 1)" in words and "dashed: live (round_robin, seed 1)" in words
        assert fig._suptitle.get_text() == "synthetic: sim (round_robin, seed 1) vs live (round_robin, seed 1)"
        assert "(upper half: sim, lower: live)" in fig.axes[-1].get_title(loc="left")
    finally:
        plt.close(fig)


def test_a_run_without_per_node_series_skips_those_panels_and_says_so() -> None:
    fig = draw_timeline([synthetic(omitted=1000)])
    try:
        assert len(fig.axes) == 4  # latency, throughput, failures, the event strip
        note = fig.axes[0].get_title(loc="right")
        assert "no per-node panels" in note and "1,000 nodes" in note
    finally:
        plt.close(fig)


def test_short_faults_are_named_in_the_note_and_many_rows_are_capped() -> None:
    events = fault("node-1", 10, 10.2, "error_rate 0.5")
    events += [e for i in range(EVENT_ROWS + 6) for e in fault(f"n{i}", 1, 2)]
    fig = draw_timeline([synthetic(n=100, events=events)])
    try:
        note = fig.axes[0].get_title(loc="right")
        assert "faults too short to name in their bars: node-1 error_rate 0.5 10\u201310.2 s" in note
        assert f"event strip: {EVENT_ROWS} of {EVENT_ROWS + 7} rows" in note
        assert len(fig.axes[-1].get_yticks()) == EVENT_ROWS
    finally:
        plt.close(fig)


def test_what_a_timeline_counts_but_cannot_show_is_said_under_the_title_and_in_the_report(tmp_path) -> None:
    quiet, live = synthetic("sim"), synthetic("live")
    live["timeline"].update(events_missed=3, later=1, unsettled=12)
    fig = draw_timeline([quiet])
    try:
        assert fig.axes[0].get_title(loc="right") == ""  # all 0: nothing said
    finally:
        plt.close(fig)
    fig = draw_timeline([quiet, live])
    try:
        note = fig.axes[0].get_title(loc="right")
        assert note.splitlines()[0] == ("live (round_robin, seed 1): 3 state changes missed (events_missed); "
                                        "1 response after the last interval (later); 12 OK responses after their "
                                        "interval's percentiles settled (unsettled)")
        assert "sim" not in note  # the run with nothing to say is not named
    finally:
        plt.close(fig)
    write_report(tmp_path / "r.html", [quiet, live], title="counts")
    page = (tmp_path / "r.html").read_text()
    assert "<li>live: 3 state changes missed (<code>events_missed</code>: pushed out of a process" in page
    assert "<li>live: 12 OK responses after their interval&#x27;s percentiles settled (<code>unsettled</code>" in page
    write_report(tmp_path / "quiet.html", [quiet], title="quiet")
    assert "cannot show" not in (tmp_path / "quiet.html").read_text()


def test_a_cut_table_says_where_all_its_rows_are(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("experiments.html_report.TABLE_ROWS", 2)
    write_report(tmp_path / "r.html", [synthetic(events=fault("node-1", 3, 8) + fault("node-2", 4, 9))], title="cut")
    page = (tmp_path / "r.html").read_text()
    assert "the first 2 of 4 state changes; all of them are in the results JSON (--json)" in page


def test_a_hostile_node_id_is_drawn_as_plain_text(tmp_path: pathlib.Path) -> None:
    nasty = r"$\frac{" + HOSTILE
    plot_timeline([synthetic(nodes=(nasty, "node-2"), events=fault(nasty, 3, 8))], tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("runs, words", [
    ([{"mode": "sim", "requests": {}}], 'run 1 (sim) has no "timeline" to draw'),
    ([synthetic(), {"mode": "live", "timeline": None}], 'run 2 (live) has no "timeline"'),
    ([{"timeline": {"t": []}}], 'its "timeline" lacks interval_s, overall'),
    ([], "no runs to draw"),
])
def test_runs_without_a_timeline_are_a_value_error_naming_the_run(runs, words, tmp_path) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        plot_timeline(runs, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_html_report_is_self_contained_and_escapes_what_the_results_say(tmp_path: pathlib.Path) -> None:
    events = fault(HOSTILE, 3, 8) + [{"t": 4.0, "target": HOSTILE, "kind": "breaker", "from": "CLOSED",
                                      "to": "OPEN", "detail": "trip"}]
    runs = [synthetic("sim", nodes=(HOSTILE, "node-2"), events=events), synthetic("live", nodes=("node-2",))]
    runs[0]["faults"] = [{"node": HOSTILE, "at_s": 3.0, "action": "crash", "result": "simulated"}]
    path = tmp_path / "r" / "report.html"
    write_report(path, runs, title=f"synthetic {HOSTILE}")
    page = path.read_text()
    assert HOSTILE not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)  # nothing from the network
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 1 and base64.b64decode(images[0])[:8] == PNG
    for heading in ("Requests by outcome", "Latency of OK requests", "Nodes of the sim run", "Nodes of the live run",
                    "Timeline", "Faults played", "State changes"):
        assert f"<h2>{heading}</h2>" in page
    assert "<td>4.000</td><td class=\"text\">sim</td>" in page and "<td class=\"text\">trip</td>" in page


def test_the_html_report_without_a_timeline_still_has_its_tables(tmp_path: pathlib.Path) -> None:
    run = synthetic()
    del run["timeline"]
    write_report(tmp_path / "r.html", [run], title="no timeline")
    page = (tmp_path / "r.html").read_text()
    assert "No timeline figure: run 1 (sim) has no &quot;timeline&quot;" in page and "<h2>Nodes</h2>" in page


def test_sim_run_plot_report_and_interval(tmp_path: pathlib.Path) -> None:
    png, page, data = tmp_path / "x.png", tmp_path / "x.html", tmp_path / "x.json"
    result = CliRunner().invoke(main, ["sim", "run", "faults", "--duration", "20", "--interval", "0.5", "--plot",
                                       str(png), "--report", str(page), "--json", str(data)])
    assert result.exit_code == 0, result.output
    assert f"wrote {png}" in result.output and f"wrote {page}" in result.output
    assert png.read_bytes()[:8] == PNG
    assert "faults: least_connections, seed 7, simulated" in page.read_text()
    timeline = json.loads(data.read_text())["timeline"]
    assert timeline["interval_s"] == 0.5 and timeline["t"][:3] == [0.0, 0.5, 1.0] and len(timeline["t"]) >= 40


def test_a_long_run_without_interval_gets_the_first_round_one_that_fits(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "x.json"
    result = CliRunner().invoke(main, ["sim", "run", "faults", "--rate", "1", "--duration", "7300", "--json",
                                       str(data)])
    assert result.exit_code == 0, result.output
    assert json.loads(data.read_text())["timeline"]["interval_s"] == 5.0  # 1 and 2 s would need over 3,600


@pytest.mark.parametrize("args, words", [
    (["--interval", "0"], "'--interval': 0 is not a timeline interval: give a number of seconds above 0"),
    (["--interval", "-1"], "is not a timeline interval"),
    (["--interval", "inf"], "is not a timeline interval"),
    (["--interval", "soon"], "'soon' is not a number of seconds"),
    (["--duration", "3601", "--interval", "1"], "a run of 3601 s in intervals of 1 s needs 3,601 intervals, more "
                                                "than a timeline holds (3,600); give an interval of 1.01 s or more"),
    (["--duration", "100", "--interval", "0.01"], "needs 10,000 intervals"),
])
def test_a_bad_interval_is_a_usage_error_before_the_run(args, words) -> None:
    result = CliRunner().invoke(main, ["sim", "run", "faults", *args])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output
    assert "requests: sent" not in result.output  # nothing ran


def test_an_unwritable_plot_or_report_is_a_usage_error_before_the_run(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for option in ("--plot", "--report"):
        result = CliRunner().invoke(main, ["sim", "run", "faults", option, str(blocker / "dir" / "x.png")])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}': cannot write" in result.output and "Traceback" not in result.output
        assert "requests: sent" not in result.output
