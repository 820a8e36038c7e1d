"""Scenario files: the ones shipped here, and loading any TOML file into a ``core.scenario.Scenario``.

``load("seed")`` finds a shipped scenario by name; ``load("path/to/file.toml")``
reads a file. Errors name the file and the key (``ScenarioError``), or say that
the file is missing or not valid TOML.
"""

from __future__ import annotations

import pathlib
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
        raise ScenarioError(str(name_or_path), "(file)", str(name_or_path),
                            f"no such file, and not a shipped scenario ({', '.join(shipped())})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(path.name, "(syntax)", None, f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(path.name, "(encoding)", None, f"not UTF-8 text: {exc}") from None
    return Scenario.from_mapping(data, source=path.name)
