"""Exceptions that carry data, and survive being pickled.

The project's exceptions carry what went wrong as attributes
(``ConfigError(field, allowed, value)``, ``ExerciseNotImplemented(exercise, ...)``)
and build their message from them. Python pickles an exception as
``type(exc)(*exc.args)``, and ``args`` holds only the message, so such an
exception cannot cross a process boundary: a sweep on a process pool would end
in ``BrokenProcessPool`` instead of the error. :class:`DataError` pickles the
message and the attributes as they are, without calling ``__init__`` again.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataError"]


def _rebuild(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    return cls.__new__(cls, *args)  # BaseException.__new__ sets args; pickle restores __dict__ next


class DataError(Exception):
    """Base of the exceptions whose ``__init__`` takes data rather than the message."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.args), self.__dict__
