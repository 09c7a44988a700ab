"The cohort report as the README runs it: `papermill nbs/predict.ipynb ... -p model_dir <the main job> -p dest ...`."
import json
import os
import subprocess

import nbformat
import pandas as pd
import pytest

from conftest import REPO


@pytest.mark.slow
def test_predict_notebook_scores_the_embedded_slides(tmp_path, main_job, embedded_cache):
    out = tmp_path/"p"
    # heatmaps False: the report draws only the slides it shows (the README's command draws all 192, 1 minute more)
    run = subprocess.run(["papermill", "nbs/predict.ipynb", str(tmp_path/"p.ipynb"), "-p", "model_dir", str(main_job),
                          "-p", "dest", str(out), "-p", "heatmaps", "False", "-p", "n_bootstrap", "200",
                          "--log-output"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "MIL_NB_CACHE": str(embedded_cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    predictions = pd.read_csv(out/"predictions.csv")
    assert len(predictions) == 192 and predictions.probability.between(0, 1).all()
    assert json.loads((out/"metrics.json").read_text())["n"] == 192
    nb = nbformat.read(tmp_path/"p.ipynb", as_version=4)
    images = sum("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", []))
    assert images >= 1 + 2 * 3  # the distribution, and the heatmaps of the 3 most and 3 least suspicious slides
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "its 49 test slides alone" in text  # the main job's splits.csv: the honest subset is reported
