"""The main job: `nbs/train.ipynb` executed by papermill as a user runs it (one small run, one bad parameter), and
`run_main_job` in this process for everything else the job does (each a small run of seconds on `small_panda`).

The slow test runs the defaults on the embedded data set (about 4 minutes on 2 cores) and checks the validation AUC
the README promises; the long one (`pytest -m long`, not in CI) grades ISUP on it with the defaults.
"""
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from conftest import REPO, SMALL, papermill, run_job
from mil_nb.train.config import TrainConfig, parameters_cell


def figures(notebook: Path) -> int:
    nb = nbformat.read(notebook, as_version=4)
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def notebook_run(tmp_path_factory, small_panda) -> Path:
    "`papermill nbs/train.ipynb` on small_panda for 2 epochs: its output folder (made by papermill)."
    out = tmp_path_factory.mktemp("notebook")/"not"/"yet"/"made"  # papermill's output folder does not exist yet
    run = papermill(out/"train.ipynb", "-p", "output_dir", str(out), "-p", "data_dir", str(small_panda),
                    "-p", "epochs", "2", "-p", "tile_size", "32", "-p", "n_tiles", "8", "-p", "batch_size", "4")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_train_notebook_small(notebook_run):
    "papermill runs the notebook: the executed copy is the report (its figures), next to the run's files."
    out = notebook_run
    metrics = json.loads((out/"metrics.json").read_text())
    assert {"val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1", "val_confusion_matrix"} <= set(metrics)
    assert metrics["epochs"] == 2 and metrics["n_train"] + metrics["n_valid"] + metrics["n_test"] == 24
    saved = torch.load(out/"model.pt", weights_only=True)
    assert saved["config"]["tile_size"] == 32
    assert len((out/"history.csv").read_text().splitlines()) == 3
    assert figures(out/"train.ipynb") >= 6  # confusion matrix, ROC + learning curves, attention for 4 test slides
    assert len(list(out.glob("attention_*.png"))) == 4
    assert saved["tiling"]["n_tiles"] == 8 and saved["tiling"]["mode"] == "kaggle"  # for serving


def test_run_main_job_writes_what_the_notebook_writes(notebook_run, small_panda, tmp_path):
    "The same run in this process: the same metrics.json (the clock aside, to 1e-6) and the same files."
    out = tmp_path/"run"
    job = run_job(data_dir=str(small_panda), output_dir=str(out), epochs=2, tile_size=32, n_tiles=8, batch_size=4)
    clock = {"train_seconds"}
    ours, theirs = (json.loads((folder/"metrics.json").read_text()) for folder in (out, notebook_run))
    assert ours.keys() == theirs.keys() and job.metrics.keys() == ours.keys()
    for key in ours.keys() - clock:
        assert np.allclose(ours[key], theirs[key], atol=1e-6, equal_nan=True) if isinstance(ours[key], float) \
            else ours[key] == theirs[key], key
    made = {p.name for p in out.iterdir()}
    assert made == {p.name for p in notebook_run.iterdir()} - {"train.ipynb"}, made


def test_train_notebook_isup_small(tmp_path, small_panda):
    "ISUP grading: the ordinal head, QWK as the metric the kept epoch is chosen on, a 6x6 confusion matrix."
    out = tmp_path/"isup"
    run_job(output_dir=str(out), data_dir=str(small_panda), task="isup", pooling="gated_attention", **SMALL)
    metrics = json.loads((out/"metrics.json").read_text())
    assert metrics["monitor"] == "qwk" and -1 <= metrics["val_qwk"] <= 1 and 0 <= metrics["val_accuracy"] <= 1
    assert len(metrics["val_confusion_matrix"]) == 6 and all(len(row) == 6 for row in metrics["val_confusion_matrix"])
    saved = torch.load(out/"model.pt", weights_only=True)
    assert saved["config"]["task"] == "isup" and saved["state_dict"]["classifier.weight"].shape[0] == 5


def test_a_run_that_learns_nothing_says_so(tmp_path, small_panda, capsys):
    "At lr 1e-7 the model cannot leave the class prior: the Result section and metrics.json say it learnt nothing."
    out = tmp_path/"stuck"
    run_job(output_dir=str(out), data_dir=str(small_panda), lr=1e-7, **SMALL)
    metrics = json.loads((out/"metrics.json").read_text())
    assert metrics["learnt"] is False and "class-prior level" in metrics["learnt_reason"], metrics
    shown = capsys.readouterr().out
    assert "NOTE: this model learnt nothing" in shown and "(-p epochs 4)" in shown and "lr 1e-07" in shown, shown
    assert "tumour tiles (>= 10% tumour)" in shown and metrics["test_instance_auc_positives"] >= 0
    assert (metrics["seed"], metrics["model_seed"]) == (0, 0)  # model_seed None: the seed


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


@pytest.mark.long
def test_isup_grading_on_the_embedded_data(tmp_path, embedded_cache, monkeypatch):
    """`task='isup'` on the embedded data: QWK, accuracy and a 6x6 confusion matrix. It tiles the slides itself (a few
    seconds), so that it runs beside the main job's tests, not after them."""
    monkeypatch.setenv("MIL_NB_CACHE", str(embedded_cache))
    metrics = run_job(output_dir=str(tmp_path/"isup"), task="isup").metrics
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


def test_the_parameters_cell_is_the_train_config():
    "One definition: the notebook's parameters cell is `TrainConfig`'s fields, defaults and comments, as written."
    nb = nbformat.read(REPO/"nbs"/"train.ipynb", as_version=4)
    cell, = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert cell.source == parameters_cell(), "nbs/train.ipynb's parameters cell is not parameters_cell()"


def test_relative_paths_resolve_against_the_repository(small_panda, monkeypatch):
    "Run from nbs/ (as JupyterLab's kernel is), a relative output_dir still lands in <repo>/runs/, not nbs/runs/."
    name = f"runs/test-relative-{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(REPO/"nbs")
    try:
        run_job(output_dir=name, data_dir=str(small_panda), **SMALL | {"epochs": 1, "n_tiles": 4})
        assert (REPO/name/"model.pt").exists() and not (REPO/"nbs"/name).exists()
    finally:
        shutil.rmtree(REPO/name, ignore_errors=True); shutil.rmtree(REPO/"nbs"/name, ignore_errors=True)


def test_a_bad_parameter_stops_the_notebook_before_any_work(tmp_path):
    "papermill: the first cell names the bad parameter; nothing is tiled."
    start = time.monotonic()
    run = papermill(tmp_path/"x.ipynb", "-p", "epochs", "0", "-p", "output_dir", str(tmp_path/"out"))
    assert run.returncode != 0 and time.monotonic() - start < 15
    assert "epochs=0: expected None or an integer >= 1" in run.stderr + run.stdout
    assert not (tmp_path/"out").exists()


@pytest.mark.parametrize("parameter, value", [("epochs", 0), ("tile_size", 7), ("valid_frac", 1.5), ("task", "foo"),
                                              ("data_dir", "no_such_panda")])
def test_a_bad_parameter_is_refused_before_any_work(tmp_path, parameter, value):
    with pytest.raises(ValueError, match=f"{parameter}[= ]"):
        run_job(**{parameter: value, "output_dir": str(tmp_path/"out")})
    assert not (tmp_path/"out").exists()
