"""The package reads bottom to top: its sub-packages are layered (`PACKAGES`, lowest first), and a module imports
only modules of lower packages or earlier notebooks of its own package; a notebook likewise. No module needs
another to have been imported first (no import cycle), and the task is decided in one place (`mil_nb.bags.tasks`),
never guessed from a tensor's shape."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ["core", "slides", "bags", "models", "evaluate", "train", "serve", "score", "cloud", "bench", "cli"]
HEADER = re.compile(r"File to edit: (?:\.\./)+nbs/(\w+)/(\d\d)_\w+\.ipynb")


def module_positions() -> dict[str, tuple[int, int]]:
    "Each exported module (`package.name`) with its place: (package's layer, notebook number in its package)."
    positions = {}
    for path in (REPO/"mil_nb").glob("*/*.py"):
        found = HEADER.search(path.read_text())
        if found:
            assert found.group(1) == path.parent.name, f"{path} is exported from another package's notebook"
            positions[f"{path.parent.name}.{path.stem}"] = (PACKAGES.index(found.group(1)), int(found.group(2)))
    return positions


def imported_modules(source: str, package: str | None = None) -> set[str]:
    "The mil_nb modules (`package.name`) that `source` imports; relative imports are resolved from `package`."
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1: names.add(f"{package}.{module}")
            elif node.level == 2: names.add(module if "." in module else f"{module}.{node.names[0].name}")
            elif module.startswith("mil_nb."):
                parts = module.split(".")
                names.add(".".join(parts[1:3]) if len(parts) > 2 else f"{parts[1]}.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            names |= {".".join(a.name.split(".")[1:3]) for a in node.names if a.name.startswith("mil_nb.")}
    return names


def code(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def test_every_package_is_layered_and_every_module_placed():
    positions = module_positions()
    assert {name.split(".")[0] for name in positions} == set(PACKAGES)
    assert len(positions) == len(list((REPO/"mil_nb").glob("*/*.py"))) - len(PACKAGES)  # all but the __init__.py
    assert positions["bags.tasks"] < positions["models.model"] < positions["train.training"]


def test_modules_import_only_lower_modules():
    positions = module_positions()
    wrong = [f"{name} {positions[name]} imports {other} {positions[other]}"
             for name in positions
             for other in imported_modules((REPO/"mil_nb"/f"{name.replace('.', '/')}.py").read_text(),
                                           name.split(".")[0])
             if other in positions and positions[other] >= positions[name]]
    assert not wrong, wrong


def test_notebooks_import_only_lower_notebooks():
    positions = module_positions()
    wrong = []
    for notebook in sorted((REPO/"nbs").glob("*/[0-9][0-9]_*.ipynb")):
        place = (PACKAGES.index(notebook.parent.name), int(notebook.name[:2]))
        wrong += [f"{notebook.parent.name}/{notebook.name} imports {other} {positions[other]}"
                  for other in imported_modules(code(notebook)) if other in positions and positions[other] > place]
    assert not wrong, wrong


def test_each_module_imports_alone():
    "Each module imported first, in a process where no other mil_nb module has been imported (torch and the rest stay)."
    modules = sorted(module_positions())
    script = ("import importlib, sys, traceback\nfailed = []\n"
              f"for name in {modules!r}:\n"
              "    for loaded in [m for m in sys.modules if m.startswith('mil_nb')]: del sys.modules[loaded]\n"
              "    try: importlib.import_module('mil_nb.' + name)\n"
              "    except Exception: failed.append(name + ': ' + traceback.format_exc(limit=-1).strip())\n"
              "print('\\n'.join(failed)); sys.exit(bool(failed))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def test_the_task_is_decided_only_by_the_task_registry():
    guesses = re.compile(r"""== ?["'](binary|isup)["']|logits\.dim\(\) ?== ?1|\.ndim ?== ?1""")
    found = [f"{path.name}:{i}: {line.strip()}" for path in (REPO/"mil_nb").rglob("*.py") if path.name != "tasks.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if guesses.search(line)]
    assert not found, found
