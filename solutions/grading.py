"""``testbed check``: grade an exercise implementation against its property suite.

For each property the grader reports PASS, or FAIL with the counterexample in
plain words. A stub is its own outcome ("not implemented yet"), reported
before any property runs. Hypothesis runs derandomized here, so a student sees
the same verdict and the same counterexample every time for the same code.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

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

    @property
    def passed(self) -> bool:
        return self.not_implemented is None and all(r.passed for r in self.results)


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


def grade(exercise: str, impl: Impl | str = Impl.AUTO, settings: Settings = CHECK_SETTINGS) -> ExerciseReport:
    """Run ``exercise``'s property suite against the implementation ``impl`` picks."""
    report = ExerciseReport(exercise)
    try:
        resolution = resolve(exercise, impl)
    except ExerciseNotImplemented as exc:
        report.not_implemented = str(exc)
        return report
    report.notice = resolution.notice
    for prop in SUITES[exercise]:
        try:
            prop.check(resolution.cls, settings)
        except Exception as exc:  # noqa: BLE001 - every failure of student code is reported, not raised
            report.results.append(PropertyResult(prop.name, prop.title, False, _describe_failure(exc)))
        else:
            report.results.append(PropertyResult(prop.name, prop.title, True))
    return report


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
    return "\n".join(lines)
