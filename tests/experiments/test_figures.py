"""Every figure the README shows exists, ``testbed figures`` knows the command that draws it, and
that command still runs (at small sizes, into a temporary directory: the shipped PNGs stay)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

from click.testing import CliRunner

from experiments.cli import main
from experiments.figures import FIGURES, FIGURES_DIR
from tests.live.procs import TESTBED

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SHOWN = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", README)
PNG = b"\x89PNG\r\n\x1a\n"


def test_every_figure_the_readme_shows_exists_and_has_a_command() -> None:
    assert SHOWN, "the README shows no figure?"
    for path in SHOWN:
        assert (ROOT / path).read_bytes()[:8] == PNG, path
        assert (ROOT / path).resolve().parent == FIGURES_DIR, path
        assert pathlib.Path(path).name in {f.shown for f in FIGURES.values()}, \
            f"testbed figures does not know how to make {path}"
    # ... and makes nothing the README does not show
    assert {f.shown for f in FIGURES.values()} == {pathlib.Path(p).name for p in SHOWN}
    assert "testbed figures" in README


def test_figures_lists_each_command() -> None:
    result = CliRunner().invoke(main, ["figures", "--list"])
    assert result.exit_code == 0, result.output
    assert "seed-compare.png (about 10 s): testbed compare seed --plot" in result.output
    assert "seed-sim-vs-live.png" in result.output and "--mode both" in result.output
    assert ("testbed sim compare supermarket --strategies random,power_of_two,least_connections "
            "--loads 0.5,0.7,0.9,0.95,0.99 --plot") in result.output


def test_figures_refuses_bad_names_and_quick_over_the_shipped_ones() -> None:
    result = CliRunner().invoke(main, ["figures", "nope"])
    assert result.exit_code == 2 and "no figure 'nope'; the README's figures are: seed-compare.png" in result.output
    result = CliRunner().invoke(main, ["figures", "--quick"])
    assert result.exit_code == 2 and "give --out DIR so the shipped ones stay" in result.output
    assert "Traceback" not in result.output


def test_every_figure_is_drawn_by_its_command_at_small_sizes(tmp_path: pathlib.Path) -> None:
    """Every figure, the live one included (two live runs of 3 s) and the supermarket one (eight
    runs of 1,000 nodes for 1 s): about 40 s in all on 2 cores."""
    shipped = {p: p.stat().st_mtime_ns for p in FIGURES_DIR.glob("*.png")}
    done = subprocess.run([TESTBED, "figures", "--quick", "--out", str(tmp_path), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    for name, figure in FIGURES.items():
        assert (tmp_path / figure.shown).read_bytes()[:8] == PNG, name
        assert (tmp_path / figure.shown).stat().st_size > 20_000, name
        assert (tmp_path / name).with_suffix(".json").exists(), name
    assert "failed (% of sent) by kind" in done.stdout and "live vs sim" in done.stdout
    assert "sim vs theory" in done.stdout and "mean-field limit (n -> infinity)" in done.stdout  # supermarket.png
    assert {p: p.stat().st_mtime_ns for p in FIGURES_DIR.glob("*.png")} == shipped
