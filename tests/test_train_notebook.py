"""The main job, `nbs/train.ipynb`, executed by papermill as a user runs it.

The fast tests run it on a small data set for 2 epochs; the slow one runs the defaults on the embedded data set
(about 4 minutes on 2 cores) and checks the validation AUC the README promises.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from conftest import REPO, papermill


def figures(notebook: Path) -> int:
    nb = nbformat.read(notebook, as_version=4)
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_train_notebook_small(tmp_path, small_panda):
    out = tmp_path/"not"/"yet"/"made"  # papermill's output folder does not exist yet: it is made
    run = papermill(out/"train.ipynb", "-p", "output_dir", str(out), "-p", "data_dir", str(small_panda),
                    "-p", "epochs", "2", "-p", "tile_size", "32", "-p", "n_tiles", "8", "-p", "batch_size", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out/"metrics.json").read_text())
    assert {"val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_confusion_matrix"} <= set(metrics)
    assert metrics["epochs"] == 2 and metrics["n_train"] + metrics["n_valid"] + metrics["n_test"] == 24
    saved = torch.load(out/"model.pt", weights_only=True)
    assert saved["config"]["tile_size"] == 32
    assert len((out/"history.csv").read_text().splitlines()) == 3
    assert figures(out/"train.ipynb") >= 6  # confusion matrix, ROC + learning curves, attention for 4 validation slides
    assert len(list(out.glob("attention_*.png"))) == 4
    assert saved["tiling"]["n_tiles"] == 8 and saved["tiling"]["mode"] == "kaggle"  # for serving


def test_train_notebook_isup_small(tmp_path, small_panda):
    "ISUP grading: the ordinal head, QWK as the metric the kept epoch is chosen on, a 6x6 confusion matrix."
    out = tmp_path/"isup"
    run = papermill(out/"train.ipynb", "-p", "output_dir", str(out), "-p", "data_dir", str(small_panda), "-p",
                    "task", "isup", "-p", "epochs", "2", "-p", "tile_size", "32", "-p", "n_tiles", "8", "-p",
                    "pooling", "gated_attention")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out/"metrics.json").read_text())
    assert metrics["monitor"] == "qwk" and -1 <= metrics["val_qwk"] <= 1 and 0 <= metrics["val_accuracy"] <= 1
    assert len(metrics["val_confusion_matrix"]) == 6 and all(len(row) == 6 for row in metrics["val_confusion_matrix"])
    saved = torch.load(out/"model.pt", weights_only=True)
    assert saved["config"]["task"] == "isup" and saved["state_dict"]["classifier.weight"].shape[0] == 5


def test_a_run_that_learns_nothing_says_so(tmp_path, small_panda):
    "At lr 1e-7 the model cannot leave the class prior: the Result section and metrics.json say it learnt nothing."
    out = tmp_path/"stuck"
    run = papermill(out/"train.ipynb", "-p", "output_dir", str(out), "-p", "data_dir", str(small_panda), "-p", "lr",
                    "1e-7", "-p", "epochs", "2", "-p", "tile_size", "32", "-p", "n_tiles", "8", "-p", "n_bootstrap", "100")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out/"metrics.json").read_text())
    assert metrics["learnt"] is False and "class-prior level" in metrics["learnt_reason"], metrics
    result = next(cell for cell in nbformat.read(out/"train.ipynb", as_version=4).cells
                  if "result.summary(output_dir)" in cell.source)
    shown = "".join(output.get("text", "") for output in result.outputs)
    assert "NOTE: this model learnt nothing" in shown and "(-p epochs 4)" in shown and "lr 1e-07" in shown, shown
    assert "tumour tiles (>= 10% tumour)" in shown and metrics["test_instance_auc_positives"] >= 0
    assert (metrics["seed"], metrics["model_seed"]) == (0, 0)  # model_seed None: the seed


def test_train_notebook_reports_missing_data_dir(tmp_path):
    run = papermill(tmp_path/"train.ipynb", "-p", "data_dir", str(tmp_path/"no_such_panda"),
                    "-p", "output_dir", str(tmp_path))
    assert run.returncode != 0
    assert "no_such_panda: no such folder" in run.stderr + run.stdout


@pytest.mark.slow
def test_train_notebook_defaults_reach_auc(main_job):
    "The README's main job on the embedded data set: val AUC >= 0.90 in a few minutes on 2 CPU cores."
    metrics = json.loads((main_job/"metrics.json").read_text())
    print(json.dumps(metrics), file=sys.stderr)
    assert metrics["val_auc"] >= 0.90 and metrics["n_valid"] >= 40
    assert metrics["learnt"] is True and metrics["learnt_reason"] is None, metrics
    assert metrics["epochs"] == 8 and metrics["max_instance_loss"] == 1.0  # the defaults on the default data
    assert metrics["test_instance_auc_positives"] >= 20, metrics
    assert figures(main_job/"train.ipynb") >= 6


@pytest.mark.slow
def test_isup_grading_on_the_embedded_data(tmp_path, main_job, embedded_cache):
    "`-p task isup` on the embedded data (reusing the main job's tiles): QWK, accuracy and a 6x6 confusion matrix."
    out = tmp_path/"isup"
    run = papermill(out/"train.ipynb", "-p", "output_dir", str(out), "-p", "task", "isup", "-p", "tiles_dir",
                    str(main_job / "tiles"), env={**os.environ, "MIL_NB_CACHE": str(embedded_cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out/"metrics.json").read_text())
    print(json.dumps({k: metrics[k] for k in ("val_qwk", "val_accuracy", "val_auc", "kept_epoch")}), file=sys.stderr)
    assert (
        np.array(metrics["val_confusion_matrix"]).shape == (6, 6)
        and np.sum(metrics["val_confusion_matrix"]) == metrics["n_valid"]
    )
    assert metrics["val_qwk"] >= 0.7 and metrics["val_auc"] >= 0.9  # measured: QWK 0.82, AUC 1.0


def test_the_notebook_source_keeps_test_hooks_and_second_passes_out():
    "The reader's view: no raw front-matter cell, no test-only parameter, no metrics.json read back, no second predict."
    nb = nbformat.read(REPO/"nbs"/"train.ipynb", as_version=4)
    source = "\n".join(cell.source for cell in nb.cells)
    assert not [cell for cell in nb.cells if cell.cell_type == "raw"]
    assert "raise_on_rank" not in source and "metrics.json\").read_text" not in source and "predict(" not in source


def test_relative_paths_resolve_against_the_repository(tmp_path, small_panda):
    "Run from nbs/ (as JupyterLab's kernel is), a relative output_dir still lands in <repo>/runs/, not nbs/runs/."
    name = f"runs/test-relative-{uuid.uuid4().hex[:8]}"
    command = ["papermill", "train.ipynb", str(tmp_path/"x.ipynb"), "-p", "output_dir", name, "-p", "data_dir",
               str(small_panda), "-p", "epochs", "1", "-p", "tile_size", "32", "-p", "n_tiles", "4"]
    try:
        run = subprocess.run(command, cwd=REPO/"nbs", capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert (REPO/name/"model.pt").exists() and not (REPO/"nbs"/name).exists()
    finally:
        shutil.rmtree(REPO/name, ignore_errors=True); shutil.rmtree(REPO/"nbs"/name, ignore_errors=True)


@pytest.mark.parametrize(
    "parameter, value", [("epochs", "0"), ("tile_size", "7"), ("valid_frac", "1.5"), ("task", "foo")]
)
def test_a_bad_parameter_stops_the_notebook_before_any_work(tmp_path, parameter, value):
    start = time.monotonic()
    run = papermill(tmp_path/"x.ipynb", "-p", parameter, value, "-p", "output_dir", str(tmp_path/"out"))
    assert run.returncode != 0 and time.monotonic() - start < 15
    assert f"{parameter}={value if parameter != 'task' else repr(value)}" in run.stderr + run.stdout
    assert not (tmp_path/"out"/"tiles").exists()
