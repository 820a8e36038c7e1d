"""The README's "Limits and failure behaviour" tables name real flags, each on the process its table is for.

A cap or timeout the README promises must be a flag its command takes (and a flag renamed in the code must
be renamed there too): each table's rows are read, every `--flag` in the first column is looked up in the
command's own parameters.
"""

from __future__ import annotations

import pathlib
import re

import click
import pytest

from experiments.cli_balancer import balancer_command
from experiments.cli_node import node_command
from experiments.cli_registry import registry_command

README = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
SECTION = README.split("## Limits and failure behaviour", 1)[1].split("\n## ", 1)[0]
COMMANDS = {"node": [node_command], "registry": [registry_command], "balancer": [balancer_command],
            "every": [node_command, registry_command, balancer_command]}


def tables() -> dict[str, list[str]]:
    """Each table's flags, under the word its bold lead-in names (``**Every process**``, ``**Node**``, ...)."""
    found: dict[str, list[str]] = {}
    for block in re.split(r"\n\*\*", SECTION)[1:]:
        title = block.split("**", 1)[0].split()[0].lower()
        rows = [line for line in block.splitlines() if line.startswith("| `--")]
        found[title] = [flag for row in rows for flag in re.findall(r"`(--[a-z][a-z-]*)", row.split("|")[1])]
    return {k: v for k, v in found.items() if v}


def test_the_section_has_a_table_per_process() -> None:
    assert set(tables()) == set(COMMANDS)


@pytest.mark.parametrize("title", sorted(COMMANDS))
def test_every_flag_in_a_table_is_a_flag_of_its_command(title: str) -> None:
    flags = tables()[title]
    assert flags
    for command in COMMANDS[title]:
        known = {opt for p in command.params if isinstance(p, click.Option) for opt in p.opts}
        missing = [f for f in flags if f not in known]
        assert not missing, f"the README's {title} table names {missing}, which `testbed {command.name}` lacks"
