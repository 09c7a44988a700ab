"""Cross-validation end to end (`mil_nb_cv` on a small data set: 3 folds, each a papermill run of the main job),
its resumption after a kill, its SageMaker submission against moto, and selection that never sees the test set."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from conftest import REPO, ROLE, moto_session, run_job
from mil_nb.cloud.cv import cv_cli, submit_folds
from mil_nb.cloud.resources import JobResources

SMALL_RUN = dict(epochs=3, tile_size=32, n_tiles=8, n_bootstrap=100)
SMALL = [part for key, value in SMALL_RUN.items() for part in ("-p", key, str(value))]


def cv_command(output_dir, small_panda) -> list[str]:
    return [sys.executable, "-c", "from mil_nb.cloud.cv import cv_cli; cv_cli()", "--folds", "3", "--output_dir",
            str(output_dir), "-p", "data_dir", str(small_panda), *SMALL]


def fold_metrics(output_dir, fold: int) -> dict:
    "A fold's metrics, less what depends on the clock."
    metrics = json.loads((output_dir/f"fold_{fold}"/"metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def cv_run(tmp_path_factory, small_panda):
    "`mil_nb_cv --folds 3` run to the end once: its output folder."
    out = tmp_path_factory.mktemp("cv")
    run = subprocess.run(cv_command(out, small_panda), cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    return out


def test_cv_writes_folds_summary_oof_and_ensemble(cv_run, small_panda):
    summary = json.loads((cv_run/"cv_metrics.json").read_text())
    per_fold = pd.read_csv(cv_run/"cv_folds.csv")
    assert per_fold.fold.tolist() == [0, 1, 2] and {"val_auc", "test_auc", "kept_epoch"} <= set(per_fold.columns)
    assert abs(summary["mean"]["test_auc"] - per_fold.test_auc.mean()) < 1e-9 and summary["sd"]["test_auc"] >= 0
    oof = pd.read_csv(cv_run/"cv_oof_predictions.csv")
    splits = [pd.read_csv(cv_run/f"fold_{k}"/"splits.csv") for k in range(3)]
    test_ids = set(splits[0].image_id[splits[0].split == "test"])
    assert all(set(s.image_id[s.split == "test"]) == test_ids for s in splits)  # one test set for every fold
    assert sorted(oof.image_id) == sorted(set(splits[0].image_id) - test_ids)  # every other slide once
    assert set(pd.read_csv(cv_run/"cv_test_ensemble.csv").image_id) == test_ids
    ensemble = summary["test_ensemble"]
    assert ensemble["n"] == len(test_ids) and len(ensemble["auc_ci"]) == 2 and "by_provider" in ensemble
    for k in range(3):  # validation folds are disjoint and never hold a test slide
        valid = set(splits[k].image_id[splits[k].split == "valid"])
        assert not valid & test_ids and all(not valid & set(s.image_id[s.split == "valid"]) for s in splits[k + 1:])


def test_cv_again_does_no_training(cv_run, small_panda):
    before = {k: (cv_run/f"fold_{k}"/"model.pt").stat().st_mtime_ns for k in range(3)}
    start = time.monotonic()
    run = subprocess.run(cv_command(cv_run, small_panda), cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("finished before, skipped") == 3 and time.monotonic() - start < 60
    assert before == {k: (cv_run/f"fold_{k}"/"model.pt").stat().st_mtime_ns for k in range(3)}


def test_a_killed_cv_resumes_to_the_same_fold_metrics(cv_run, small_panda, tmp_path):
    "SIGKILL the driver while the last fold trains: its papermill child dies too; a rerun ends with the same metrics."
    out = tmp_path/"cv"
    for finished in ("tiles", "fold_0", "fold_1"): shutil.copytree(cv_run/finished, out/finished)  # done: skipped
    driver = subprocess.Popen(cv_command(out, small_panda), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint, deadline = out/"fold_2"/"checkpoint.pt", time.monotonic() + 300
    while not checkpoint.exists() and driver.poll() is None and time.monotonic() < deadline: time.sleep(0.05)
    assert checkpoint.exists(), "fold 2 never wrote a checkpoint"
    children = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL); driver.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running after the driver was killed: {[p.pid for p in alive]}"
    assert "test_n" not in json.loads((out/"fold_2"/"metrics.json").read_text()) \
        if (out/"fold_2"/"metrics.json").exists() else True  # killed mid-fold
    run = subprocess.run(cv_command(out, small_panda), cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fold 0: finished before, skipped" in run.stdout and "fold 1: finished before, skipped" in run.stdout
    assert "fold 2 of 3: resuming" in run.stdout
    for k in range(3): assert fold_metrics(out, k) == fold_metrics(cv_run, k)


def test_cv_refuses_bad_input_before_any_work(tmp_path, small_panda, capsys):
    for args, message in [(["--folds", "3", "-p", "fold", "1"], "fold: set by the driver"),
                          (["--folds", "1"], "folds=1: expected None or an integer >= 2"),
                          (["--folds", "3", "-p", "epoch", "2"], "epoch: not parameters of"),
                          (["--folds", "30"], "folds=30, test_frac=0.25: needs at least 31 benign"),
                          (["--folds", "3", "-p", "group_column", "patient"], "group_column='patient': train.csv"),
                          (["--folds", "3", "-p", "test_frac", "0.02"], "test_frac=0.02: needs at least 50")]:
        with pytest.raises(SystemExit) as exit:
            cv_cli(["--output_dir", str(tmp_path/"cv"), *args, "-p", "data_dir", str(small_panda)])
        error = capsys.readouterr().err
        assert exit.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, (args, error)
        assert not (tmp_path/"cv").exists()



@pytest.mark.parametrize("output_dir, parameters, message", [
    ("/etc/passwd", {}, "output_dir /etc/passwd: /etc/passwd is a file, not a folder"),
    ("{file}/cv", {}, "output_dir {file}/cv: {file} is a file, not a folder"),
    ("{tmp}/cv", {"folds": "100", "n_slides": "16"}, "n_slides=16, the embedded data set's size: folds=100, "
                                                       "test_frac=0.25: needs at least 101 benign and 101 malignant"),
    ("{tmp}/cv", {"n_slides": "8", "test_frac": "0.5"}, "n_slides=8, the embedded data set's size: folds=3"),
])
def test_cv_refuses_a_bad_output_dir_or_too_few_embedded_slides_before_any_fold(tmp_path, capsys, monkeypatch,
                                                                                  output_dir, parameters, message):
    "Exit 2 with one line naming the problem; no fold runs (before: a traceback, or a fold failing after 48 s)."
    monkeypatch.setattr("mil_nb.cloud.cv.run_fold", lambda *args, **kwargs: pytest.fail("a fold ran"))
    (tmp_path/"file").write_text("not a folder")
    names = {"file": tmp_path/"file", "tmp": tmp_path}
    parameters = dict(parameters)
    folds = parameters.pop("folds", "3")
    argv = ["--folds", folds, "--output_dir", output_dir.format(**names)]
    argv += [part for key, value in parameters.items() for part in ("-p", key, value)]
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit: cv_cli(argv)
    error = capsys.readouterr().err
    assert exit.value.code == 2 and message.format(**names) in error, error
    assert len(error.strip().splitlines()) == 1 and time.perf_counter() - start < 10, error
    assert not (tmp_path/"cv").exists()

def test_submit_folds_to_sagemaker(aws, monkeypatch):
    "k folds are k training jobs, each with its fold among the hyperparameters (against moto)."
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    requests, session = [], moto_session()
    session.events.register("provide-client-params.sagemaker.CreateTrainingJob",
                            lambda params, **kwargs: requests.append(params))
    names = submit_folds(3, ROLE, {"epochs": 20}, "cvtest", resources=JobResources("ml.g5.2xlarge"),
                         boto_session=session)
    assert len(names) == 3 and all(name.startswith(f"cvtest-fold{k}") for k, name in enumerate(names))
    hyper = [r["HyperParameters"] for r in requests]
    assert [json.loads(h["fold"]) for h in hyper] == [0, 1, 2] and all(json.loads(h["folds"]) == 3 for h in hyper)
    assert all(json.loads(h["epochs"]) == 20 for h in hyper)
    assert [json.loads(h["model_seed"]) for h in hyper] == [0, 1, 2]  # each fold its own initialisation
    with pytest.raises(ValueError, match="fold: set by the driver"):
        submit_folds(3, ROLE, {"fold": 0}, boto_session=session)


def test_selection_never_sees_the_test_set(tmp_path, small_panda, cv_run):
    "With the split fixed by a split file, changing only the test slides' labels changes nothing that selection saw."
    splits = pd.read_csv(cv_run/"fold_0"/"splits.csv")  # a split of small_panda, written by a run
    splits[["image_id", "split"]].to_csv(tmp_path/"split.csv", index=False)
    relabelled = tmp_path/"relabelled"
    relabelled.mkdir()
    for folder in ("train_images", "train_label_masks"): (relabelled/folder).symlink_to(small_panda/folder)
    table = pd.read_csv(small_panda/"train.csv", dtype=str)
    test = table.image_id.isin(splits.image_id[splits.split == "test"])
    table.loc[test, "isup_grade"] = table.isup_grade[test].map(lambda g: "0" if g != "0" else "4")  # flip them all
    table.to_csv(relabelled/"train.csv", index=False)
    runs = {}
    for name, data in (("original", small_panda), ("relabelled", relabelled)):
        out = tmp_path/name
        run_job(output_dir=str(out), data_dir=str(data), split_file=str(tmp_path/"split.csv"), **SMALL_RUN)
        runs[name] = json.loads((out/"metrics.json").read_text())
        runs[name]["history"] = pd.read_csv(out/"history.csv").drop(columns=["train_bags_per_s", "seconds"])
    original, relabelled = runs["original"], runs["relabelled"]
    assert original["kept_epoch"] == relabelled["kept_epoch"]
    assert original["val_threshold"] == relabelled["val_threshold"]
    assert {k: v for k, v in original.items() if k.startswith("val_")} == \
        {k: v for k, v in relabelled.items() if k.startswith("val_")}
    pd.testing.assert_frame_equal(original["history"], relabelled["history"])
    assert original["test_accuracy"] != relabelled["test_accuracy"]  # the test labels did change


def test_the_main_job_refuses_a_bad_split_file_or_group_column_before_tiling(tmp_path, small_panda):
    pd.DataFrame({"image_id": ["nobody"], "split": ["test"]}).to_csv(tmp_path/"split.csv", index=False)
    for parameter, value, message in [("split_file", str(tmp_path/"split.csv"), "split.csv: 1 image_id(s) not in"),
                                      ("group_column", "patient", "group_column='patient': train.csv has no")]:
        out = tmp_path/parameter
        with pytest.raises(ValueError, match=re.escape(message)):
            run_job(data_dir=str(small_panda), output_dir=str(out), **{parameter: value})
        assert not (out/"tiles").exists()
