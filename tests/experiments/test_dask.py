"""Sweeps on Dask: a real ``dask scheduler`` and ``dask worker`` processes on loopback give the very same
runs as the local pool; an unreachable or silent scheduler, or one without workers, ends in one line and
bounded time; a worker killed mid-sweep costs nothing but a retry."""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import subprocess
import sys
import sysconfig
from typing import Callable, Iterator

import pytest
from click.testing import CliRunner

from experiments.cli import main
from experiments.compare import sweep
from experiments.executors import ExecutorError, identity, mismatches, open_executor
from experiments.scenarios import load
from tests.experiments.test_cli import console_script
from tests.live.procs import free_port

distributed = pytest.importorskip("distributed", reason="the dask extra: pip install -e '.[dask]'")

DASK = str(pathlib.Path(sys.executable).with_name("dask"))
SWEEP = ["sim", "compare", "seed", "--strategies", "round_robin,least_connections", "--loads", "0.9",
         "--reps", "2", "--duration", "3"]


@contextlib.contextmanager
def dask_cluster(workers: int, logs: pathlib.Path) -> Iterator[tuple[str, subprocess.Popen, list[subprocess.Popen]]]:
    """``dask scheduler`` and ``workers`` x ``dask worker`` (one process each, no nanny, one thread) on
    127.0.0.1; yields the scheduler's address, its process and the workers', and stops every one by PID."""
    address = f"tcp://127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as files:
        def start(*args: str) -> subprocess.Popen:
            log = files.enter_context((logs / f"dask-{len(procs)}.log").open("w"))
            procs.append(subprocess.Popen([DASK, *args], stdout=log, stderr=subprocess.STDOUT, cwd=logs))
            return procs[-1]

        try:
            scheduler = start("scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard",
                  "--dashboard-address", "127.0.0.1:0")
            worker_procs = [start("worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                                  "--no-dashboard", "--dashboard-address", "127.0.0.1:0", "--name", f"w{i}",
                                  "--local-directory", str(logs))
                            for i in range(workers)]
            with distributed.Client(address, timeout=60, set_as_default=False) as client:  # the scheduler is up
                if workers:
                    client.wait_for_workers(workers, timeout=120)  # returns as soon as they have joined
            yield address, scheduler, worker_procs
        finally:
            for proc in reversed(procs):  # workers first, then the scheduler they would try to reach again
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dask_cluster(2, tmp_path_factory.mktemp("dask")) as (address, _, _):
        yield address


def sweep_json(tmp_path: pathlib.Path, name: str, *args: str) -> tuple[bytes, str]:
    path = tmp_path / f"{name}.json"
    result = CliRunner().invoke(main, [*SWEEP, *args, "--json", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path.read_bytes(), result.output


def test_the_same_runs_bit_for_bit_on_a_dask_cluster_a_local_cluster_and_in_this_process(
        cluster: str, tmp_path: pathlib.Path) -> None:
    on_cluster, said = sweep_json(tmp_path, "cluster", "--scheduler", cluster)
    assert f"dask: 2 workers at {cluster}, dashboard http://127.0.0.1:" in said, said
    one_by_one, _ = sweep_json(tmp_path, "sequential", "--workers", "1")
    local_cluster, said = sweep_json(tmp_path, "local", "--executor", "dask", "--workers", "2")
    assert "dask: 2 workers at a local cluster on 127.0.0.1 (tcp://127.0.0.1:" in said
    assert "dashboard http://127.0.0.1:" in said
    assert len(json.loads(on_cluster)["runs"]) == 4
    assert on_cluster == one_by_one == local_cluster


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # A subprocess with a timeout, so that a hang fails the test instead of stopping the suite.
    return subprocess.run([console_script(), *SWEEP, *args], capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_nobody_listening_is_one_line_after_the_connect_timeout() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    error = one_line_error(run_cli("--scheduler", address, "--connect-timeout", "1"))
    assert f"cannot reach the Dask scheduler at {address} within 1 s (connection refused)" in error
    assert "--connect-timeout" in error


def test_a_port_that_accepts_and_never_speaks_does_not_hang_the_sweep() -> None:
    # distributed.Client alone waits for ever on the handshake here.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        error = one_line_error(run_cli("--scheduler", address, "--connect-timeout", "1"))
    assert f"cannot reach the Dask scheduler at {address} within 1 s (no answer)" in error


def test_a_cluster_whose_workers_all_went_ends_the_sweep_in_one_line(tmp_path: pathlib.Path) -> None:
    scenario = load("seed").replace(duration_s=3)
    with dask_cluster(1, tmp_path) as (address, _, [worker]):
        def progress(done: int) -> None:
            if worker.poll() is None:
                worker.kill()  # the only worker, as the first run comes back: Dask would wait for ever
                worker.wait(15)

        with pytest.raises(ExecutorError, match=f"every worker of the Dask cluster at {address} has gone and none "
                                                "joined within 1 s; the sweep stopped"):
            with open_executor("dask", scheduler=address, connect_timeout_s=1, echo=lambda text: None) as pool:
                sweep(scenario, ["round_robin"], [0.5], 6, executor=pool.executor, check=pool.check,
                      progress=progress)
        # Now a scheduler without workers: a new sweep does not start.
        with pytest.raises(ExecutorError, match=f"the Dask scheduler at {address} has no worker"):
            with open_executor("dask", scheduler=address, connect_timeout_s=1, echo=lambda text: None):
                pass
        # Nor with a worker that cannot import the project (Python without site's .pth files: Dask, no project).
        site = sysconfig.get_paths()["purelib"]
        with (tmp_path / "bare.log").open("w") as log:
            bare = subprocess.Popen(
                [sys.executable, "-S", "-c", f"import sys; sys.path.append({site!r}); from dask.__main__ import main; "
                 "main()", "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--dashboard-address", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
            try:
                with pytest.raises(ExecutorError, match=r"worker tcp://127.0.0.1:\d+ cannot run the project "
                                                        r"\(ModuleNotFoundError.*No module named 'experiments'.*\); "
                                                        r"install it there"):
                    with open_executor("dask", scheduler=address, connect_timeout_s=60, echo=lambda text: None):
                        pass
            finally:
                bare.terminate()
                bare.wait(15)


def test_a_job_that_keeps_killing_workers_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import dask
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # the local cluster's scheduler is here
        with pytest.raises(ExecutorError, match=r"a job \(_exit-\S+\) was running on a Dask worker that died, 1 "
                                                r"time \(.*\), last on tcp://127.0.0.1:\d+; see that worker's log"):
            with open_executor("dask", workers=1, echo=lambda text: None) as pool:
                assert pool.executor is not None
                pool.executor.submit(os._exit, 1).result()


def killer(proc: subprocess.Popen) -> Callable[[int], None]:
    """A sweep's ``progress`` that SIGKILLs ``proc`` (by PID) as the first run comes back."""
    def progress(done: int) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)
    return progress


def test_a_worker_killed_mid_sweep_costs_a_retry_and_a_scheduler_killed_one_line(tmp_path: pathlib.Path) -> None:
    scenario = load("seed").replace(duration_s=3)
    grid = (["round_robin", "least_connections"], [0.9], 2)
    expected = sweep(scenario, *grid, workers=1)
    runs: list = []
    with dask_cluster(2, tmp_path) as (address, scheduler, [survivor, victim]):
        with pytest.raises(ExecutorError, match=r"the Dask cluster dropped the sweep's jobs \(did the "
                                                r"scheduler stop\?\)"):
            with open_executor("dask", scheduler=address, echo=lambda text: None) as pool:
                # The victim's jobs go to the survivor.
                runs = sweep(scenario, *grid, executor=pool.executor, check=pool.check, progress=killer(victim))
                assert victim.returncode is not None and survivor.poll() is None
                sweep(scenario, *grid, executor=pool.executor, check=pool.check, progress=killer(scheduler))
    assert json.dumps(runs) == json.dumps(expected)  # as written to JSON (where NaN is NaN)


def test_mismatches_name_the_worker_and_what_differs() -> None:
    here = identity()
    assert set(here) == {"python", "resilience-testbed", "simpy", "numpy", "code"}
    assert mismatches(here, {"tcp://10.0.0.2:4000": dict(here)}) == []
    other = {**here, "code": "0123456789ab", "numpy": "1.0"}
    [line] = mismatches(here, {"tcp://10.0.0.2:4000": other})
    assert line.startswith("worker tcp://10.0.0.2:4000 differs from this machine: numpy 1.0 (here ")
    assert f"code 0123456789ab (here {here['code']})" in line
    [line] = mismatches(here, {"tcp://10.0.0.3:4000": ModuleNotFoundError("No module named 'experiments'")})
    assert "cannot run the project (ModuleNotFoundError: No module named 'experiments')" in line


def test_bench_dask_smoke(tmp_path: pathlib.Path) -> None:
    from experiments.bench_dask import run
    lines: list[str] = []
    assert run(reps=2, workers=2, duration_s=2, rounds=1, json_path=str(tmp_path / "b.json"), echo=lines.append) == 0
    said = "\n".join(lines)
    assert "x faster than one after another (target >= 1.5x: " in said and "the same runs" in said, said
    assert "2 plain processes got " in said, said
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["same_runs"] is True and data["speedup"] > 0 and data["speedup_process_pool"] > 0
    assert len(data["times_s"]["dask"]) == len(data["times_s"]["process pool"]) == 1
    assert data["cpu_s"]["dask"] > 0 and data["speedup_on_free_cores"] > 0 and "on 2 free cores" in said
