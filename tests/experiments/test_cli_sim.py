"""``testbed sim run``, ``testbed sim compare`` and ``testbed compare`` from the command line."""

from __future__ import annotations

import json
import os
import pathlib
import pty
import select
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from experiments.cli import main
from tests.experiments.test_cli import console_script


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_sim_run_prints_a_summary_and_writes_json(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "r.json"
    result = invoke("sim", "run", "seed", "--duration", "5", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "seed-heterogeneous [sim] strategy=round_robin seed=42" in result.output
    assert "node-2" in result.output and "p95" in result.output
    data = json.loads(out.read_text())
    assert data["mode"] == "sim" and data["duration_s"] == 5 and data["impl"] == "auto"


def test_sim_run_overrides_and_impl_notice() -> None:
    result = invoke("sim", "run", "seed", "--strategy", "least_connections", "--load", "0.5",
                    "--duration", "5", "--seed", "9", "--impl", "solution")
    assert result.exit_code == 0, result.output
    assert "using the reference solution" in result.output
    assert "strategy=least_connections seed=9" in result.output and "load 0.50" in result.output


@pytest.mark.parametrize("args, words", [
    (["sim", "run", "seed", "--rate", "10", "--load", "0.5"], "give --rate or --load, not both"),
    (["sim", "run", "no-such-scenario"], "no such file, and not a shipped scenario"),
    (["sim", "run", "seed", "--strategy", "fastest"], "'fastest' is not one of"),
    (["sim", "run", "seed", "--load", "3"], "--load"),
    (["sim", "compare", "seed", "--strategies", "round_robin,fastest"], "unknown strategy 'fastest'"),
    (["sim", "compare", "seed", "--loads", "0.5,zero"], "'zero' is not a number"),
    (["sim", "compare", "seed", "--loads", "0"], "out of range"),
    (["sim", "compare", "closed-loop", "--reps", "1"], "needs an open-loop workload"),
    (["sim", "compare", "seed", "--scheduler", "my-laptop"], "'my-laptop' is not a Dask scheduler address"),
    (["sim", "compare", "seed", "--scheduler", "tcp://127.0.0.1:99999"], "is not a Dask scheduler address"),
    (["sim", "compare", "seed", "--scheduler", "127.0.0.1:8786", "--executor", "process"],
     "does not go with --executor process"),
    (["sim", "compare", "seed", "--scheduler", "tcp://127.0.0.1:8786", "--workers", "2"],
     "a --scheduler's cluster has its own workers"),
    (["sim", "compare", "seed", "--executor", "threads"], "'threads' is not one of 'process', 'dask'"),
    (["sim", "compare", "seed", "--connect-timeout", "0"], "--connect-timeout"),
    (["compare", "--mode", "live", "--executor", "dask"], "go with --mode sim"),
])
def test_usage_errors_name_the_problem(args, words) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output, result.output


def test_a_bad_scenario_file_names_the_key(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[nodes]]\nid = "a"\nworkers = 0\n')
    result = CliRunner().invoke(main, ["sim", "run", str(bad)])
    assert result.exit_code == 2
    assert "bad.toml: nodes[0].workers = 0: must be an integer >= 1" in result.output


def test_sim_compare_table_plot_json_and_determinism(tmp_path: pathlib.Path) -> None:
    args = ["sim", "compare", "seed", "--strategies", "round_robin,least_connections", "--loads", "0.3,0.5",
            "--reps", "2", "--duration", "6"]
    one = invoke(*args, "--workers", "1", "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png"))
    assert one.exit_code == 0, one.output
    assert "least_connections            0.30" in one.output and "round_robin                  0.50" in one.output
    assert "mean ±95% CI over 2 repetitions" in one.output
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "a.json").read_text())
    assert len(data["runs"]) == 8 and data["seeds"] == [42, 43] and len(data["summary"]) == 4
    # The same seeds give the same numbers, on one process or on a pool.
    two = invoke(*args, "--workers", "2", "--json", str(tmp_path / "b.json"))
    assert two.exit_code == 0, two.output
    assert json.loads((tmp_path / "b.json").read_text())["summary"] == data["summary"]


def test_compare_defaults_to_the_seed_scenario(tmp_path: pathlib.Path) -> None:
    result = invoke("compare", "--loads", "0.3", "--reps", "1", "--duration", "5", "--workers", "1",
                    "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json"))
    assert result.exit_code == 0, result.output
    assert "seed-heterogeneous: 2 strategies x 1 loads x 1 repetitions" in result.output
    assert (tmp_path / "c.png").exists()


def test_console_script_compare_end_to_end(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run([console_script(), "compare", "--loads", "0.5", "--reps", "2", "--duration", "5",
                           "--plot", "out/c.png", "--json", "out/c.json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "c.png").exists() and (tmp_path / "out" / "c.json").exists()


SWEEP = ["sim", "compare", "seed", "--strategies", "round_robin", "--loads", "0.5", "--reps", "2", "--duration", "3",
         "--workers", "1"]


def test_no_progress_bar_when_not_on_a_terminal() -> None:
    # CliRunner's streams are no terminal, like a pipe or a log file: no bar, not even its label.
    result = invoke(*SWEEP)
    assert result.exit_code == 0, result.output
    assert "simulating" not in result.output and "round_robin                  0.50" in result.output
    result = invoke("sim", "run", "seed", "--duration", "3")
    assert result.exit_code == 0, result.output
    assert "simulating" not in result.output and "p95" in result.output


def on_a_terminal(args: list[str], cwd: pathlib.Path, timeout_s: float = 120.0) -> str:
    """Run the console script with a pseudo-terminal as stdin, stdout and stderr; return what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([console_script(), *args], stdin=slave, stdout=slave, stderr=slave, cwd=cwd)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
            try:
                data = os.read(master, 65536) if ready else b""
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_quiet(tmp_path: pathlib.Path) -> None:
    drawn = on_a_terminal(SWEEP, tmp_path)
    assert "simulating  [####################################]  2/2" in drawn, drawn
    quiet = on_a_terminal([*SWEEP, "--quiet"], tmp_path)
    assert "simulating" not in quiet and "round_robin                  0.50" in quiet, quiet


def test_a_long_simulation_draws_its_progress_in_simulated_time_on_a_terminal(tmp_path: pathlib.Path) -> None:
    run = ["sim", "run", "seed", "--duration", "20"]
    drawn = on_a_terminal(run, tmp_path)
    assert "simulating 20 s  [####################################]  100%" in drawn, drawn
    quiet = on_a_terminal([*run, "-q"], tmp_path)
    assert "simulating" not in quiet and "p95" in quiet, quiet


def test_dask_without_the_dask_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    result = CliRunner().invoke(main, [*SWEEP, "--executor", "dask"])
    assert result.exit_code == 1, result.output
    assert "Error: a sweep on Dask needs the dask extra" in result.output
    assert "pip install 'resilience-testbed[dask]'" in result.output and "Traceback" not in result.output


def test_sim_run_keeps_every_request_when_asked(tmp_path: pathlib.Path) -> None:
    import numpy as np

    rows, out = tmp_path / "rows.npz", tmp_path / "run.json"
    result = CliRunner().invoke(main, ["sim", "run", "seed", "--duration", "5", "--keep-requests", str(rows),
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    with np.load(rows) as kept:
        assert sorted(kept.files) == ["arrival", "end", "node", "outcome", "start"]
        arrival = kept["arrival"]
    assert len(arrival) == summary["simulated_requests"] > 0
    in_window = (arrival >= summary["warmup_s"]) & (arrival < summary["duration_s"])
    assert int(in_window.sum()) == summary["requests"]["sent"]


def test_sim_run_refuses_a_requests_file_it_cannot_write(tmp_path: pathlib.Path) -> None:
    (tmp_path / "dir").mkdir()
    result = CliRunner().invoke(main, ["sim", "run", "seed", "--duration", "5", "--keep-requests",
                                       str(tmp_path / "dir")])
    assert result.exit_code == 2 and "--keep-requests" in result.output and "Traceback" not in result.output
