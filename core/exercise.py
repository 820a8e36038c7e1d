"""The marker for the two student exercises.

A stubbed exercise method raises :class:`ExerciseNotImplemented`. Everything that
decides whose code runs (``solutions.impl``) recognises a stub by that exception,
never by inspecting source, so a student may edit the method freely.
"""

from __future__ import annotations

from core.errors import DataError

__all__ = ["ExerciseNotImplemented"]


class ExerciseNotImplemented(DataError, NotImplementedError):
    """An exercise method is still the shipped stub.

    ``exercise`` is its short name (``rate-limiter``), ``method`` the qualified
    method, ``path`` the file to edit and ``solution`` the reference file.
    """

    def __init__(self, exercise: str, method: str, path: str, solution: str, hint: str) -> None:
        super().__init__(
            f"exercise {exercise!r} is not implemented yet: write {method}() in {path} "
            f"({hint}). The reference solution is in {solution}; "
            f"'testbed check {exercise}' grades your version."
        )
        self.exercise = exercise
        self.method = method
        self.path = path
        self.solution = solution
