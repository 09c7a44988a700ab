"The training job's contract, run here as `mil_nb_launch --local 2` runs it: torchrun, 2 gloo ranks, a SageMaker container's folders."
import contextlib
import json
import os
import re
import signal
import subprocess
import time

import nbformat
import pandas as pd
import psutil
import pytest
import torch

from conftest import REPO
from mil_nb.cloud.launch import METRIC_DEFINITIONS


def launch_local(local_dir, *args, env=None) -> subprocess.CompletedProcess:
    command = ["mil_nb_launch", "--local", "2", "--local_dir", str(local_dir), *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


SMALL = ("-p", "epochs", "1", "-p", "n_tiles", "8", "-p", "tile_size", "64", "-p", "num_workers", "0")
WHOLE = ("-p", "epochs", "3", *SMALL[3:])  # three epochs: the spot test interrupts this job in its second


@pytest.fixture(scope="module")
def whole_job(small_panda, tmp_path_factory):
    "A 2-rank job of 3 epochs run to the end (the spot test's reference): its folder and the finished run."
    job = tmp_path_factory.mktemp("whole")/"job"
    return job, launch_local(job, "--data_dir", small_panda, *WHOLE)


def test_two_ranks_write_the_model_and_rank_0s_report(whole_job):
    job, run = whole_job
    assert run.returncode == 0, run.stderr[-3000:]
    assert (job/"model"/"model.pt").exists() and (job/"model"/"metrics.json").exists()
    report = job/"output"/"data"
    assert {"train.ipynb", "metrics.json", "history.csv", "confusion_matrix.png", "roc_and_learning_curves.png"} <= {
        p.name for p in report.iterdir()
    }
    metrics = json.loads((report/"metrics.json").read_text())
    assert (metrics["world_size"], metrics["n_train"] + metrics["n_valid"] + metrics["n_test"]) == (2, 24)
    executed = nbformat.read(report/"train.ipynb", as_version=4)
    assert "process 0 of 2 on cpu (gloo)" in json.dumps(
        executed.cells[next(i for i, c in enumerate(executed.cells) if "start_run(" in c.source)].outputs
    )
    # rank 0's notebook output is the job's log, where SageMaker's metric definitions find one value per epoch
    charted = {d["Name"]: len(re.findall(d["Regex"], run.stdout + run.stderr)) for d in METRIC_DEFINITIONS}
    assert charted == {  # one value per epoch (3)
        "train:loss": 3,
        "validation:loss": 3,
        "validation:auc": 3,
        "validation:qwk": 0,
        "validation:accuracy": 3,
        "final:validation:loss": 1,  # the kept epoch's, once: a tuning job's objective
        "final:validation:auc": 1,
        "final:validation:qwk": 0,
        "final:validation:accuracy": 1,
    }
    final_auc = next(re.findall(d["Regex"], run.stdout + run.stderr) for d in METRIC_DEFINITIONS
                     if d["Name"] == "final:validation:auc")
    assert abs(float(final_auc[0]) - metrics["val_auc"]) < 1e-6


def test_a_failing_rank_fails_the_job_and_keeps_its_notebook(small_panda, tmp_path):
    run = launch_local(
        tmp_path / "job", "--data_dir", small_panda, *SMALL, env={**os.environ, "MIL_NB_RAISE_ON_RANK": "1"}
    )
    assert run.returncode != 0
    assert "rank 1: train.ipynb failed in cell" in run.stderr and "RuntimeError: raise_on_rank=1" in run.stderr, (
        run.stderr[-3000:]
    )
    saved = nbformat.read(tmp_path/"job"/"output"/"data"/"train.rank1.ipynb", as_version=4)
    errors = [o for c in saved.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "RuntimeError"
    assert not (tmp_path/"job"/"model"/"model.pt").exists()


def test_a_misspelt_hyperparameter_stops_the_job(tmp_path):
    run = launch_local(tmp_path/"job", "-p", "epoch", "2")
    assert run.returncode != 0 and "hyperparameter(s) epoch: not parameters of" in run.stderr


@pytest.mark.long
def test_local_job_on_the_embedded_data(embedded_cache, tmp_path):
    "The issue's command: `mil_nb_launch --local 2 --local_dir DIR -p epochs 2` on the embedded data set."
    run = launch_local(tmp_path/"job", "-p", "epochs", "2", env={**os.environ, "MIL_NB_CACHE": str(embedded_cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path/"job"/"model"/"model.pt").exists()
    report = tmp_path/"job"/"output"/"data"
    assert (report/"train.ipynb").exists() and len(list(report.glob("attention_*.png"))) == 4
    metrics = json.loads((report/"metrics.json").read_text())
    print(
        "local 2-rank job on the embedded data:",
        {k: metrics[k] for k in ("val_auc", "val_accuracy", "world_size", "lr", "train_seconds")},
    )
    assert metrics["world_size"] == 2 and metrics["n_train"] + metrics["n_valid"] + metrics["n_test"] == 192


@pytest.mark.slow
def test_a_killed_spot_job_resumes_by_itself_to_the_same_weights(whole_job, small_panda, tmp_path):
    "A spot interruption: SIGKILL the whole job mid-epoch, start it again with the same folders and no resume flag."
    args = ["--data_dir", str(small_panda), *WHOLE]
    whole, run = whole_job
    assert run.returncode == 0, run.stderr[-3000:]
    command = ["mil_nb_launch", "--local", "2", "--local_dir", str(tmp_path/"spot"), *args]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    checkpoint = tmp_path/"spot"/"checkpoints"/"checkpoint.pt"
    assert wait_for(lambda: True if checkpoint.exists() else None, timeout=600), "no checkpoint was written"
    os.killpg(job.pid, signal.SIGKILL)  # the instance is taken away
    job.wait()
    done = len(pd.read_csv(tmp_path/"spot"/"checkpoints"/"history.csv"))
    assert 1 <= done < 3, f"{done} epochs when killed: the job was not interrupted mid-way"
    restarted = launch_local(tmp_path/"spot", *args)  # SageMaker restarts it with the restored checkpoints
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"after epoch {done}" in (restarted.stdout + restarted.stderr)
    trained = [torch.load(job/"model"/"model.pt", weights_only=True)["state_dict"] for job in (whole, tmp_path/"spot")]
    assert max((trained[0][k] - trained[1][k]).abs().max().item() for k in trained[0]) < 1e-6


def test_killing_a_rank_leaves_no_process_behind(small_panda, tmp_path):
    "SIGKILL one rank mid-epoch: the job fails, and within 10 s no process it started (kernel, loader workers) is left."
    command = ["mil_nb_launch", "--local", "2", "--local_dir", str(tmp_path/"job"), "--data_dir", str(small_panda),
               "-p", "epochs", "50", "-p", "n_tiles", "8", "-p", "tile_size", "64", "-p", "num_workers", "1"]
    launcher = psutil.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = []
    try:
        rank = wait_for(
            lambda: next((p for p in launcher.children(recursive=True) if is_rank(p, 1) and has_worker(p)), None),
            timeout=300,
        )
        started = launcher.children(recursive=True)
        rank.kill()
        killed_at = time.monotonic()
        launcher.wait(60)
        wait_for(lambda: [] if not alive(started) else None, timeout=10 - (time.monotonic() - killed_at))
        assert launcher.returncode != 0 and not (tmp_path/"job"/"tmp").exists()  # no kernel connection file left
        assert not alive(started), [" ".join(p.cmdline())[:200] for p in alive(started)]
    finally:
        for process in [launcher, *started]:
            with contextlib.suppress(psutil.Error): process.kill()


def wait_for(found, timeout: float):
    "`found()` once it is not None, polling every 0.2 s; None after `timeout` seconds."
    deadline = time.monotonic() + timeout
    while (value := found()) is None and time.monotonic() < deadline: time.sleep(0.2)
    return value


def is_rank(process: psutil.Process, rank: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return "mil_nb_job.py" in " ".join(process.cmdline()) and process.environ().get("RANK") == str(rank)
    return False


def has_worker(rank: psutil.Process) -> bool:
    "Whether the rank's notebook kernel has started a DataLoader worker (a kernel's child)."
    with contextlib.suppress(psutil.Error):
        return any(kernel.children() for kernel in rank.children() if "ipykernel" in " ".join(kernel.cmdline()))
    return False


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    "Those of `processes` still running (zombies waiting for their parent to reap them count as ended)."
    running = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE: running.append(process)
    return running
