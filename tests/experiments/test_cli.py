"""The ``testbed`` command line: check's outcomes and exit statuses, bench, usage errors,
and the installed console script end to end."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from core.rate_limiter import TokenBucket
from core.strategies import LeastConnectionsStrategy
from experiments.cli import EXIT_FAILED, EXIT_NOT_IMPLEMENTED, main
from tests.solutions.mutants import NoCap
from tests.solutions.test_impl import implemented, stubbed  # noqa: F401 - fixtures


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.mark.usefixtures("stubbed")
def test_check_auto_on_stubs_grades_the_solution_and_says_so() -> None:
    result = invoke("check", "--max-examples", "20")
    assert result.exit_code == 0, result.output
    assert result.output.count("not implemented yet; using the reference solution") == 2
    assert "PASS  window-bound" in result.output and "PASS  ties-shared" in result.output
    assert result.output.count("PASS  in simulation") == 2
    assert result.output.count("PASS  live (") == 2  # the processes got --impl solution too
    assert "Result: every check passes" in result.output


@pytest.mark.usefixtures("stubbed")
@pytest.mark.parametrize("how", ["flag", "env"])
def test_check_exercise_on_a_stub_is_not_implemented_yet(how: str) -> None:
    if how == "flag":
        result = invoke("check", "rate-limiter", "--impl", "exercise")
    else:
        result = invoke("check", "rate-limiter", env={"TESTBED_IMPL": "exercise"})
    assert result.exit_code == EXIT_NOT_IMPLEMENTED
    assert "NOT IMPLEMENTED YET" in result.output
    assert "Traceback" not in result.output
    assert "PASS" not in result.output and "FAIL" not in result.output  # stops at the first step


@pytest.mark.usefixtures("implemented")
def test_check_grades_the_students_code_once_written() -> None:
    # In-process only (the fixture patches the class), so no live step: its processes read the files.
    result = invoke("check", "least-connections", "--max-examples", "20", "--no-sim", "--no-live")
    assert result.exit_code == 0, result.output
    assert "using your LeastConnectionsStrategy.select_node()" in result.output
    assert "in simulation" not in result.output and "live" not in result.output


def test_check_reports_a_counterexample_in_plain_words(monkeypatch) -> None:
    monkeypatch.setattr(TokenBucket, "is_allowed", NoCap.is_allowed)
    result = invoke("check", "rate-limiter", "--impl", "exercise")
    assert result.exit_code == EXIT_FAILED, result.output
    assert "FAIL  window-bound" in result.output
    assert "requests were allowed" in result.output or "was allowed too" in result.output
    assert "Result: FAILED (rate-limiter)" in result.output
    assert "the simulation and live steps run once every property holds" in result.output


def test_check_reports_an_exception_in_student_code(monkeypatch) -> None:
    def broken(self, backends):
        return min(backends, key=lambda b: b.active)
    monkeypatch.setattr(LeastConnectionsStrategy, "select_node", broken)
    result = invoke("check", "least-connections", "--max-examples", "20")
    assert result.exit_code == EXIT_FAILED
    assert "raised AttributeError" in result.output and "'active'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, words", [
    (["check", "rate_limiter"], "'rate_limiter' is not one of 'all', 'rate-limiter', 'least-connections'"),
    (["check", "--impl", "mine"], "Invalid value for '--impl'"),
    (["check", "--max-examples", "0"], "--max-examples"),
    (["bench", "core", "--seconds", "-1"], "--seconds"),
])
def test_usage_errors_name_the_problem(args, words) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output, result.output


@pytest.mark.usefixtures("stubbed")
@pytest.mark.parametrize("args", [
    ["balancer", "--nodes", "5001", "--strategy", "least_connections", "--impl", "exercise"],
    ["node", "--rate-limit", "3", "--impl", "exercise"],
    ["sim", "run", "rate-limited", "--impl", "exercise"],
    ["live", "run", "seed", "--strategy", "least_connections", "--impl", "exercise"],
])
def test_forcing_a_stub_anywhere_ends_with_its_message_and_exit_3(args) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == EXIT_NOT_IMPLEMENTED, result.output
    assert "is not implemented yet" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "check" in result.output and "bench" in result.output


def test_bench_core_runs_and_writes_ratios(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    result = invoke("bench", "core", "--seconds", "0.01", "--json", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["rate_limiter"]["is_allowed_ns"] > 0
    assert data["rate_limiter"]["speedup_vs_fastest_peer"] > 0      # limits was measured
    assert data["circuit_breaker"]["speedup_vs_pybreaker"] > 0      # pybreaker was measured
    assert set(data["strategies_ns"]) >= {"round_robin", "least_connections", "weighted_least_connections"}
    assert all(set(row) == {"3", "100", "1000"} for row in data["strategies_ns"].values())
    assert "ns per call" in result.output


def console_script() -> str:
    script = pathlib.Path(sys.executable).with_name("testbed")
    if not script.exists():
        pytest.fail(f"the testbed console script is not installed next to {sys.executable}; "
                    "install the project with pip install -e '.[test]'")
    return str(script)


def test_console_script_end_to_end() -> None:
    proc = subprocess.run([console_script(), "check", "--impl", "solution", "--max-examples", "10", "--no-sim"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("properties hold") == 2, proc.stdout
    assert "Result: every check passes" in proc.stdout


def test_console_script_exercise_flag_exit_status() -> None:
    """Forcing --impl exercise: 3 on the shipped stubs, 0 once both are written."""
    from solutions.impl import EXERCISES, is_implemented
    stubs = not all(is_implemented(e) for e in EXERCISES.values())
    proc = subprocess.run([console_script(), "check", "--impl", "exercise", "--max-examples", "10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == (EXIT_NOT_IMPLEMENTED if stubs else 0), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [
    ["sim", "run", "seed", "--json", "/proc/testbed-results.json"],
    ["sim", "compare", "seed", "--plot", "/proc/testbed-plot.png"],
    ["compare", "--json", "/proc"],
    ["bench", "core", "--json", "/proc/x/y.json"],
])
def test_an_unwritable_output_is_refused_before_any_work(args) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert ("cannot write /proc/" in result.output or "is a folder" in result.output), result.output
    assert "Traceback" not in result.output and "simulating" not in result.output


@pytest.mark.parametrize("args", [
    ["sim", "compare", "seed", "--strategies", "least_connections", "--reps", "50", "--workers", "2"],
    ["check", "--max-examples", "100000", "--no-live"],
])
def test_ctrl_c_ends_every_command_with_130(args, tmp_path: pathlib.Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it; the command says so and exits 130."""
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Wait until it is at work: its first line on stderr (whose code runs, or what it grades).
        assert proc.stderr.readline()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in out + err and "Aborted" not in err, out + err
