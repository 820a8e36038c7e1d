"""The grading suites: they pass on the solutions (and on the student's code once
written), reject every mutant, and accept a solution method pasted into the exercise file."""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import re
import sys

import pytest
from hypothesis import settings

from solutions.impl import EXERCISES, is_implemented
from solutions.properties import SUITES, Counterexample
from tests.conftest import impl_classes
from tests.solutions import mutants
from tests.solutions.mutants import CAUGHT_BY

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Deterministic, so "the suite catches this mutant" is a fact about the suite, not luck.
MUTANT_SETTINGS = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                           report_multiple_bugs=False)


@pytest.mark.parametrize("cls", impl_classes("rate-limiter"))
@pytest.mark.parametrize("prop", SUITES["rate-limiter"], ids=lambda p: p.name)
def test_rate_limiter_property(prop, cls) -> None:
    prop.check(cls)


@pytest.mark.parametrize("cls", impl_classes("least-connections"))
@pytest.mark.parametrize("prop", SUITES["least-connections"], ids=lambda p: p.name)
def test_least_connections_property(prop, cls) -> None:
    prop.check(cls)


ALL = [(ex, p) for ex, props in SUITES.items() for p in props]


def test_every_property_has_a_mutant() -> None:
    assert {p.name for _, p in ALL} == set(CAUGHT_BY)


@pytest.mark.parametrize("exercise, prop", ALL, ids=[p.name for _, p in ALL])
def test_property_rejects_its_mutant(exercise, prop) -> None:
    mutant = CAUGHT_BY[prop.name]
    with pytest.raises(Counterexample) as info:
        prop.check(mutant, MUTANT_SETTINGS)
    assert len(str(info.value)) > 30  # a sentence, not a bare assert


def pasted_source(exercise: str, root: pathlib.Path = ROOT) -> str:
    """The exercise file's text with the solution's method pasted over the stub, as a student would."""
    ex = EXERCISES[exercise]
    cls_name, method = ex.method.split(".")
    source = (root / ex.path).read_text()
    solution = inspect.getsource(getattr(ex.solution_cls, method))  # indented as in a class body
    # The stub: from its "def" line to the next line indented no deeper than it.
    stub = re.compile(rf"^    def {method}\(.*?(?=^    \S|^\S|\Z)", re.S | re.M)
    start = re.search(rf"^class {cls_name}\b", source, re.M).start()
    match = stub.search(source, start)
    assert match and "ExerciseNotImplemented" in match.group(0), "stub not found"
    return source[:match.start()] + solution + "\n" + source[match.end():]


def paste_solution(exercise: str, tmp_path: pathlib.Path) -> type:
    """Copy the solution's method over the stub in a copy of the exercise file; return the class."""
    cls_name = EXERCISES[exercise].method.split(".")[0]
    pasted = pasted_source(exercise)
    path = tmp_path / f"pasted_{exercise.replace('-', '_')}.py"
    path.write_text(pasted)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        # strategies.py registers names; a second copy must not clash with the first.
        if exercise == "least-connections":
            import core.strategies as strategies
            saved = dict(strategies.STRATEGIES)
            strategies.STRATEGIES.clear()
            try:
                spec.loader.exec_module(module)
            finally:
                strategies.STRATEGIES.clear()
                strategies.STRATEGIES.update(saved)
            # The copy defines its own exception class; graders catch the real one.
            module.NoHealthyBackend = strategies.NoHealthyBackend
        else:
            spec.loader.exec_module(module)
    finally:
        del sys.modules[path.stem]
    return getattr(module, cls_name)


@pytest.mark.parametrize("exercise", list(EXERCISES))
def test_pasting_the_solution_method_makes_the_exercise_pass(exercise: str, tmp_path: pathlib.Path) -> None:
    cls = paste_solution(exercise, tmp_path)
    assert is_implemented(EXERCISES[exercise], cls)
    for prop in SUITES[exercise]:
        prop.check(cls)


# mutant -> the words its failure text must contain: the cause, not a neighbouring one
NAMED_CAUSE = {
    "NoCap": "not capped at the capacity",
    "BackwardsMints": "went backwards added tokens",
    "OffByOne": "less than one token",
    "SharedBucket": "share one bucket",
    "NeverRefills": "never refills",
}
# (property, mutant) pairs where the property fails and must name the cause
DIAGNOSED = [("window-bound", "NoCap"), ("window-bound", "OffByOne"), ("ideal-bucket", "OffByOne"),
             ("ideal-bucket", "SharedBucket"), ("ideal-bucket", "NeverRefills"), ("backwards-clock", "NoCap"),
             ("backwards-clock", "BackwardsMints"), ("backwards-clock", "OffByOne"),
             ("backwards-clock", "NeverRefills")]
RATE_LIMITER = {p.name: p for p in SUITES["rate-limiter"]}


@pytest.mark.parametrize("prop, mutant", DIAGNOSED)
def test_failure_text_names_the_likely_cause(prop: str, mutant: str) -> None:
    with pytest.raises(Counterexample) as info:
        RATE_LIMITER[prop].check(getattr(mutants, mutant), MUTANT_SETTINGS)
    assert NAMED_CAUSE[mutant] in str(info.value), str(info.value)


def test_a_bucket_without_the_cap_is_not_blamed_on_the_clock() -> None:
    """The issue's case: NoCap handles a backwards clock right, yet fails backwards-clock."""
    with pytest.raises(Counterexample) as info:
        RATE_LIMITER["backwards-clock"].check(mutants.NoCap, MUTANT_SETTINGS)
    text = str(info.value)
    assert NAMED_CAUSE["NoCap"] in text and NAMED_CAUSE["BackwardsMints"] not in text, text
