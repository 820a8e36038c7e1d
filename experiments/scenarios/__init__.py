"""Scenario files: the ones shipped here, and loading any TOML file into a ``core.scenario.Scenario``.

``load("seed")`` finds a shipped scenario by name; ``load("path/to/file.toml")``
reads a file. Errors name the file and the key (``ScenarioError``), or say that
the file is missing or not valid TOML.
"""

from __future__ import annotations

import pathlib
import re
import tomllib

from core.scenario import Scenario, ScenarioError

__all__ = ["SHIPPED", "ScenarioError", "load", "shipped"]

SHIPPED = pathlib.Path(__file__).resolve().parent


def shipped() -> dict[str, pathlib.Path]:
    """Name -> path of every scenario that comes with the project."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.toml"))}


def load(name_or_path: str | pathlib.Path) -> Scenario:
    """Load a shipped scenario by name, or any scenario file by path."""
    path = pathlib.Path(name_or_path)
    if not path.exists() and str(name_or_path) in shipped():
        path = shipped()[str(name_or_path)]
    if not path.is_file():
        raise ScenarioError(str(name_or_path), None, None,
                            f"no such file, and not a shipped scenario ({', '.join(shipped())})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(path.name, None, None, f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ScenarioError(path.name, None, None, f"cannot be read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(path.name, None, None, _syntax_error(text, str(exc))) from None
    return Scenario.from_mapping(data, source=path.name)


def _syntax_error(text: str, message: str) -> str:
    """tomllib's message as "line L, column C: what", with the line itself and a caret under the column."""
    where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if where is None:  # e.g. "(at end of document)": the message says where
        return f"not valid TOML: {message}"
    line, column = int(where.group(1)), int(where.group(2))
    source_lines = text.splitlines() or [""]
    shown = source_lines[min(line, len(source_lines)) - 1]
    return (f"line {line}, column {column}: not valid TOML: {message[:where.start()]}\n"
            f"    {shown}\n    {' ' * (column - 1)}^")
