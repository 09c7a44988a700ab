"""Every notebook passes nbdev's own processing (what `nbdev_docs` does to a notebook before Quarto renders it: it
executes the exported cells, the cells with imports and the `show_doc` cells, in a fresh shell), without cells that
mix imports with other code (nbdev warns of them: they run their code during the docs build too).

Run it on some notebooks alone: `python tests/test_notebooks.py nbs/models/10_model.ipynb ...`."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import gc, json, sys, warnings
from execnb.nbio import read_nb
from nbdev.processors import FilterDefaults
problems = {}
for path in sys.argv[1:]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try: FilterDefaults()(read_nb(path))
        except Exception as error: problems[path] = str(error)[:600]; continue
    mixed = [str(w.message).split("---")[1].strip()[:200] for w in caught if "imports and other code" in str(w.message)]
    if mixed: problems[path] = "cells that mix imports with other code: " + " | ".join(mixed)
print(json.dumps(problems))
gc.freeze()  # IPython's exit handler runs a full collection for each of the ~80 shells made above: 26 s of CPU
"""


def processing_problems(notebooks: list) -> dict:
    "nbdev's processing of each notebook in a fresh process: {notebook: what went wrong}."
    run = subprocess.run([sys.executable, "-c", CHECK, *map(str, notebooks)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_notebook_passes_nbdev_processing():
    problems = processing_problems(sorted((REPO/"nbs").rglob("*.ipynb")))
    assert not problems, "\n".join(f"{path}: {problem}" for path, problem in problems.items())


if __name__ == "__main__":
    found = processing_problems(sys.argv[1:])
    print("\n".join(f"{path}: {problem}" for path, problem in found.items()) or "ok")
