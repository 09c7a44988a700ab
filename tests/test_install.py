"""A non-editable install (`pip install .`) has the main job: its notebook is shipped in the package
(`mil_nb/train/train.ipynb`, where `TRAIN_NOTEBOOK` finds it) and `run_main_job` runs from the installed package,
outside the repository. Installed with `--no-deps --target` so that torch is not installed again."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_main_job_runs_from_a_non_editable_install(tmp_path, small_panda):
    source, target, work = tmp_path/"source", tmp_path/"site", tmp_path/"work"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "_proc", "_docs", "build",
                                                                "*.egg-info", "__pycache__"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(source)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target/"mil_nb"/"train"/"train.ipynb").is_file()
    work.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy first, before the editable one
    script = f"""
import mil_nb
from mil_nb.train import TrainConfig, run_main_job
from mil_nb.train.config import TRAIN_NOTEBOOK
assert mil_nb.__file__.startswith({str(target)!r}) and TRAIN_NOTEBOOK.is_relative_to({str(target)!r}), TRAIN_NOTEBOOK
run_main_job(TrainConfig(data_dir={str(small_panda)!r}, output_dir="api", epochs=1, tile_size=32, n_tiles=4,
                         n_bootstrap=100, num_workers=0))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, env=environment)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work/"api"/"model.pt").is_file() and (work/"api"/"metrics.json").is_file()
