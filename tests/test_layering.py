"""The notebooks read top to bottom: a notebook, and the module it exports, import only lower-numbered notebooks'
modules; and the task is decided in one place (`mil_nb.tasks`), never guessed from a tensor's shape."""
import ast
import json
import re
from pathlib import Path

from conftest import REPO

HEADER = re.compile(r"File to edit: \.\./nbs/(\d\d)_\w+\.ipynb")


def module_numbers() -> dict[str, int]:
    "Each exported module's notebook number, from the header nbdev writes into it."
    numbers = {}
    for path in (REPO/"mil_nb").glob("*.py"):
        found = HEADER.search(path.read_text())
        if found: numbers[path.stem] = int(found.group(1))
    return numbers


def imported_modules(source: str) -> set[str]:
    "The mil_nb modules `source` imports (relative `.x` or absolute `mil_nb.x`)."
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1: names.add(module.split(".")[0])
            elif module.startswith("mil_nb."): names.add(module.split(".")[1])
            elif module == "mil_nb": names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mil_nb.")}
    return names


def code(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def test_modules_import_only_lower_notebooks():
    numbers = module_numbers()
    assert len(numbers) > 20 and numbers["tasks"] < numbers["model"] < numbers["training"]
    wrong = [f"{name} ({numbers[name]:02d}) imports {other} ({numbers[other]:02d})"
             for name in numbers for other in imported_modules((REPO/"mil_nb"/f"{name}.py").read_text())
             if other in numbers and numbers[other] >= numbers[name]]
    assert not wrong, wrong


def test_notebooks_import_only_lower_notebooks():
    numbers = module_numbers()
    wrong = []
    for notebook in sorted((REPO/"nbs").glob("[0-9][0-9]_*.ipynb")):
        number = int(notebook.name[:2])
        wrong += [
            f"{notebook.name} imports {other} ({numbers[other]:02d})"
            for other in imported_modules(code(notebook))
            if other in numbers and numbers[other] > number
        ]
    assert not wrong, wrong


def test_the_task_is_decided_only_by_the_task_registry():
    guesses = re.compile(r"""== ?["'](binary|isup)["']|logits\.dim\(\) ?== ?1|\.ndim ?== ?1""")
    found = [f"{path.name}:{i}: {line.strip()}" for path in (REPO/"mil_nb").glob("*.py") if path.name != "tasks.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if guesses.search(line)]
    assert not found, found
