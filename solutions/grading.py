"""``testbed check``: grade an exercise implementation, step by step.

1. **Properties.** For each property the grader reports PASS, or FAIL with the
   counterexample in plain words. Hypothesis runs derandomized here, so the
   same code gets the same verdict and the same counterexample every time.
2. **Simulation** (only once every property holds). The implementation runs
   in the SimPy model beside the reference solution, on the same seeds:
   least connections on the seed scenario at 70% load must beat round robin
   the way the reference does; the rate limiter must refuse exactly the
   requests the reference refuses on the shipped rate-limited scenario.
3. **Live** (once the simulation step passes). A short live run of the same
   scenario on real processes, the implementation inside them: least
   connections in a real balancer, the rate limiter in real nodes. It must do
   live what it did in the simulator, on the same arrivals. The processes
   import the code from the files, so this step grades what is on disk.

A stub is its own outcome ("not implemented yet"), reported before any step runs.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from hypothesis import HealthCheck, Verbosity, settings as Settings

from core.exercise import ExerciseNotImplemented
from solutions.impl import EXERCISES, Impl, resolve
from solutions.properties import SUITES, Counterexample

__all__ = ["CHECK_SETTINGS", "ExerciseReport", "PropertyResult", "grade", "render"]

CHECK_SETTINGS = Settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    report_multiple_bugs=False,
    print_blob=False,
    verbosity=Verbosity.quiet,
    suppress_health_check=list(HealthCheck),
)


@dataclass(frozen=True)
class PropertyResult:
    name: str
    title: str
    passed: bool
    message: str = ""


@dataclass
class ExerciseReport:
    """The outcome for one exercise; ``not_implemented`` holds the stub's message when it applies."""

    exercise: str
    notice: str = ""
    not_implemented: str | None = None
    results: list[PropertyResult] = field(default_factory=list)
    simulation: PropertyResult | None = None
    live: PropertyResult | None = None

    @property
    def passed(self) -> bool:
        return (self.not_implemented is None and all(r.passed for r in self.results)
                and all(step is None or step.passed for step in (self.simulation, self.live)))


def _describe_failure(exc: BaseException) -> str:
    """Plain words for what broke a property: our message, or the exception and where it came from."""
    if isinstance(exc, Counterexample):
        return str(exc)
    if isinstance(exc, ExerciseNotImplemented):
        return f"the method is still the stub: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"{f.filename}:{f.lineno} in {f.name}" for f in reversed(frames)
                  if "/hypothesis/" not in f.filename), "")
    notes = [n for n in getattr(exc, "__notes__", []) if n.strip()]
    text = f"raised {type(exc).__name__}: {exc}"
    if where:
        text += f" (at {where})"
    if notes:
        text += "\n" + "\n".join(notes)
    return text


def grade(exercise: str, impl: Impl | str = Impl.AUTO, settings: Settings = CHECK_SETTINGS, *,
          simulate: bool = True, live: bool = True, say: Callable[[str], Any] | None = None) -> ExerciseReport:
    """Run ``exercise``'s property suite, then its simulation check, then its live run, on the
    implementation ``impl`` picks; each step only once the one before it passed."""
    report = ExerciseReport(exercise)
    try:
        resolution = resolve(exercise, impl)
    except ExerciseNotImplemented as exc:
        report.not_implemented = str(exc)
        return report
    report.notice = resolution.notice
    if say is not None:
        say(f"{exercise}: {len(SUITES[exercise])} properties, {settings.max_examples} examples each ...")
    for prop in SUITES[exercise]:
        try:
            prop.check(resolution.cls, settings)
        except Exception as exc:  # noqa: BLE001 - every failure of student code is reported, not raised
            report.results.append(PropertyResult(prop.name, prop.title, False, _describe_failure(exc)))
        else:
            report.results.append(PropertyResult(prop.name, prop.title, True))
    if simulate and all(r.passed for r in report.results):
        report.simulation = SIMULATION_CHECKS[exercise](resolution.cls)
    if live and all(r.passed for r in report.results) and (report.simulation is None or report.simulation.passed):
        if say is not None:
            say(f"{exercise}: live step, {LIVE_SECONDS:g} s on real processes on loopback ...")
        report.live = LIVE_CHECKS[exercise](resolution.chosen.value)
    return report


SIM_SEEDS = (42, 43)


def _simulate_least_connections(cls: type) -> PropertyResult:
    """On the seed scenario at 70% load: p95 well below round robin's and close to the reference's."""
    from experiments.scenarios import load
    from sim.model import Simulation
    from solutions.impl import EXERCISES

    title = "in simulation (seed scenario, 70% load) it beats round robin like the reference solution"
    base = load("seed").with_load(0.7).replace(duration_s=60)
    p95: dict[str, float] = {"graded": 0.0, "reference": 0.0, "round robin": 0.0}
    for seed in SIM_SEEDS:
        s = base.replace(seed=seed)
        for who, strategy, strategy_cls in [
                ("graded", "least_connections", cls),
                ("reference", "least_connections", EXERCISES["least-connections"].solution_cls),
                ("round robin", "round_robin", None)]:
            try:
                sim = Simulation(s.replace(strategy=strategy), strategy_cls=strategy_cls).run()
            except Exception as exc:  # noqa: BLE001 - the student's code may fail under load
                return PropertyResult("simulation", title, False, _describe_failure(exc))
            p95[who] += sim.results()["latency_ms"]["p95"] / len(SIM_SEEDS)
    figures = ", ".join(f"{who} {v:,.0f} ms" for who, v in p95.items())
    passed = p95["graded"] <= 1.25 * p95["reference"] and p95["graded"] * 2 < p95["round robin"]
    message = "" if passed else (
        f"p95 response time: {figures}; the graded one must be within 25% of the reference "
        "and under half of round robin's")
    return PropertyResult("simulation", f"{title} (p95: {figures})", passed, message)


def _simulate_rate_limiter(cls: type) -> PropertyResult:
    """On the shipped rate-limited scenario: the same 429s as the reference solution."""
    from experiments.scenarios import load
    from sim.model import Simulation
    from solutions.impl import EXERCISES

    title = "in simulation (rate-limited scenario, 50 clients) it refuses what the reference refuses"
    s = load("rate-limited").replace(duration_s=30)
    counts = {}
    for who, limiter_cls in [("graded", cls), ("reference", EXERCISES["rate-limiter"].solution_cls)]:
        try:
            counts[who] = Simulation(s, limiter_cls=limiter_cls).run().results()["requests"]
        except Exception as exc:  # noqa: BLE001
            return PropertyResult("simulation", title, False, _describe_failure(exc))
    mine, ref = counts["graded"]["rate_limited"], counts["reference"]["rate_limited"]
    figures = f"429s: graded {mine}, reference {ref}, of {counts['reference']['sent']} requests"
    passed = abs(mine - ref) <= 0.001 * counts["reference"]["sent"]
    return PropertyResult("simulation", f"{title} ({figures})", passed,
                          "" if passed else f"{figures}; they must match")


SIMULATION_CHECKS = {
    "least-connections": _simulate_least_connections,
    "rate-limiter": _simulate_rate_limiter,
}


LIVE_SECONDS = 12.0


def _live(scenario: Any, impl: str) -> tuple[dict[str, Any] | None, str]:
    """One short live run; (results, "") or (None, why it could not run)."""
    from experiments.options import TESTBED_COMMAND
    from live.run import LiveRunError, run_live
    try:
        return run_live(scenario, command=TESTBED_COMMAND, impl=impl, echo=lambda text: None), ""
    except LiveRunError as exc:
        return None, f"the live run could not be carried out: {exc}"


def _failures(r: dict[str, Any]) -> str:
    detail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["errors_detail"].items() if v)
    return (f"{r['requests']['errors']} of {r['requests']['sent']} requests failed ({detail}); "
            f"'testbed live run {r['scenario']} --impl exercise' shows the run")


def _live_least_connections(impl: str) -> PropertyResult:
    """Seed scenario at 70% live, with the graded strategy in a real balancer: it must keep the
    latency far below what round robin gets on the same arrivals, and give node-2 (four
    workers) the largest share."""
    from experiments.scenarios import load
    from solutions.impl import simulate

    title = (f"live ({LIVE_SECONDS:g} s of the seed scenario at 70% load, in a real balancer) it beats round robin "
             "like in simulation")
    s = load("seed").with_load(0.7).replace(strategy="least_connections", duration_s=LIVE_SECONDS, warmup_s=2.0)
    live, why = _live(s, impl)
    if live is None:
        return PropertyResult("live", title, False, why)
    rr = simulate(s.replace(strategy="round_robin"), "solution")
    if live["requests"]["errors"]:
        return PropertyResult("live", title, False, _failures(live))
    p95, rr_p95 = live["latency_ms"]["p95"], rr["latency_ms"]["p95"]
    shares = {n: v["share"] for n, v in live["nodes"].items()}
    figures = (f"p95 {p95:,.0f} ms against simulated round robin's {rr_p95:,.0f} ms on the same arrivals; shares "
               + " / ".join(f"{n} {v:.0%}" for n, v in shares.items()))
    passed = p95 * 2 < rr_p95 and max(shares, key=shares.__getitem__) == "node-2"
    return PropertyResult("live", f"{title} ({figures})", passed, "" if passed else (
        f"{figures}; the p95 must be under half of round robin's and node-2, "
        "with four workers, must get the largest share"))


def _live_rate_limiter(impl: str) -> PropertyResult:
    """The rate-limited scenario live, with the graded bucket in two real nodes behind the balancer:
    it must refuse about as many requests as it does in simulation on the same arrivals."""
    from experiments.scenarios import load
    from solutions.impl import simulate

    title = f"live ({LIVE_SECONDS:g} s of the rate-limited scenario, in real nodes) it refuses what it refuses in simulation"
    s = load("rate-limited").replace(duration_s=LIVE_SECONDS, warmup_s=2.0)
    live, why = _live(s, impl)
    if live is None:
        return PropertyResult("live", title, False, why)
    if live["requests"]["errors"]:
        return PropertyResult("live", title, False, _failures(live))
    sim = simulate(s, impl)
    got, want, sent = live["requests"]["rate_limited"], sim["requests"]["rate_limited"], live["requests"]["sent"]
    figures = f"429s: live {got}, simulated {want}, of {sent} requests"
    passed = want > 0 and abs(got - want) <= LIVE_429_TOLERANCE * sent
    return PropertyResult("live", f"{title} ({figures})", passed, "" if passed else (
        f"{figures}; they must agree within {LIVE_429_TOLERANCE:.0%} of the requests"))


#: Live and simulated 429 counts may differ by this fraction of the requests: live arrivals reach the
#: node a fraction of a millisecond later than scheduled, which moves a few decisions across a refill.
LIVE_429_TOLERANCE = 0.03

LIVE_CHECKS = {
    "least-connections": _live_least_connections,
    "rate-limiter": _live_rate_limiter,
}


def render(report: ExerciseReport) -> str:
    """The human-readable report of one exercise."""
    ex = EXERCISES[report.exercise]
    lines = [f"{report.exercise}: {ex.method}() in {ex.path}"]
    if report.not_implemented is not None:
        lines.append("  NOT IMPLEMENTED YET")
        lines.append(f"  {report.not_implemented}")
        return "\n".join(lines)
    lines.append(f"  {report.notice}")
    for r in report.results:
        lines.append(f"  {'PASS' if r.passed else 'FAIL'}  {r.name}: {r.title}")
        if not r.passed:
            lines.extend(f"        {line}" for line in r.message.splitlines())
    passed = sum(r.passed for r in report.results)
    lines.append(f"  {passed}/{len(report.results)} properties hold")
    for step in (report.simulation, report.live):
        if step is not None:
            lines.append(f"  {'PASS' if step.passed else 'FAIL'}  {step.title}")
            if not step.passed:
                lines.extend(f"        {line}" for line in step.message.splitlines())
    if report.results and not all(r.passed for r in report.results):
        lines.append("  (the simulation and live steps run once every property holds)")
    elif report.simulation is not None and not report.simulation.passed:
        lines.append("  (the live step runs once the simulation step passes)")
    return "\n".join(lines)
