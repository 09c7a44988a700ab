"""The code stays small enough to read: modules under 300 lines, exported cells of about 10 lines (none over 60),
lines under 120 characters in the notebooks' code."""
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES, MAX_CELL_LINES, MEDIAN_CELL_LINES, MAX_LINE = 300, 60, 10, 120


def code_cells(notebook: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]


def test_modules_are_under_300_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO/"mil_nb").rglob("*.py") if p.name != "_modidx.py"
            and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_exported_cells_are_small():
    sizes = {}
    for notebook in (REPO/"nbs").rglob("*.ipynb"):
        for i, source in enumerate(code_cells(notebook)):
            lines = source.splitlines()
            if lines and lines[0].replace(" ", "") in ("#|export", "#|exporti"):
                sizes[f"{notebook.relative_to(REPO)} cell {i}"] = len([l for l in lines[1:] if l.strip()])
    big = {cell: n for cell, n in sizes.items() if n > MAX_CELL_LINES}
    assert not big, big
    assert statistics.median(sizes.values()) <= MEDIAN_CELL_LINES, statistics.median(sizes.values())


def test_code_lines_are_under_120_characters():
    long = [f"{notebook.relative_to(REPO)}: {line[:60]}..." for notebook in (REPO/"nbs").rglob("*.ipynb")
            for source in code_cells(notebook) for line in source.splitlines() if len(line) > MAX_LINE]
    assert not long, long
