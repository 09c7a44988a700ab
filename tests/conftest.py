"""Shared fixtures: a small synthetic PANDA-format data set, the main job on the embedded data (each made once per
session), the main job run in-process (`run_job`), and moto's AWS. Under pytest-xdist every process (the workers,
the kernels and ranks they start) uses one thread unless OMP_NUM_THREADS says otherwise."""
import os
import subprocess
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per process under xdist: OpenMP's threads oversubscribed
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the cores (two workers, their jobs' kernels and ranks) cost 15%

import boto3
import pytest
from filelock import FileLock
from moto import mock_aws

from mil_nb.slides.synth import embedded_dataset, make_synthetic_panda
from mil_nb.train.config import TrainConfig
from mil_nb.train.main_job import MainJob, run_main_job


@pytest.fixture(scope="session")
def small_panda(tmp_path_factory):
    "24 synthetic slides (level 0: 1024 px), enough for a 2-epoch run of the main job."
    return make_synthetic_panda(tmp_path_factory.mktemp("panda"), n_slides=24, seed=0, size=1024, progress=False)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory, worker_id):
    """A cache folder (MIL_NB_CACHE) holding the embedded data set, shared by every test process of the run: the first
    that needs it makes it (with both cores), the others wait for it (pytest-xdist's once-per-run fixture pattern)."""
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    with FileLock(root/"embedded_cache.lock"), pytest.MonkeyPatch.context() as env:
        env.setenv("MIL_NB_CACHE", str(root/"embedded_cache"))
        embedded_dataset()  # what the main job's defaults use: made here once, found by every later caller
    return root/"embedded_cache"


REPO = Path(__file__).resolve().parents[1]
SMALL = dict(epochs=2, tile_size=32, n_tiles=8, n_bootstrap=100, num_workers=0)  # a run of seconds on small_panda


def run_job(**parameters) -> MainJob:
    "The main job in this process, as `run_main_job(TrainConfig(**parameters))` runs it: what it made."
    return run_main_job(TrainConfig(**parameters))


def papermill(output: Path, *params: str, env=None) -> subprocess.CompletedProcess:
    "Run nbs/train.ipynb through papermill as a user does; the executed notebook goes to `output`."
    command = ["papermill", "nbs/train.ipynb", str(output), "--log-output", *params]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def main_job(tmp_path_factory, embedded_cache):
    "The README's main job with its defaults on the embedded data set (about 4 minutes on 2 cores): its output folder."
    out = tmp_path_factory.mktemp("main_job")
    run = papermill(
        out / "train.ipynb", "-p", "output_dir", str(out), env={**os.environ, "MIL_NB_CACHE": str(embedded_cache)}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def uses(item, fixture: str) -> bool:
    "Whether test `item` uses `fixture` (directly or through another fixture)."
    return fixture in getattr(item, "fixturenames", ())


def pytest_itemcollected(item):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as CI runs the tests) a module's tests share a worker, so its
    fixtures are made once; and every test of the main job on the embedded data shares one, so it is run once."""
    item.add_marker(pytest.mark.xdist_group("main_job" if uses(item, "main_job") else item.module.__name__))


# About how long each module's tests take in CI (seconds, both workers busy), for the order below; a module not here,
# or a figure gone stale, changes only the order in which the groups start
GROUP_SECONDS = {"test_job": 140, "test_cv": 130, "test_predict": 95, "test_tile_job": 85, "test_features_cli": 70,
                 "test_serve_load": 70, "test_docs_site": 50, "test_two_stage": 48, "test_train_notebook": 46,
                 "test_training_resume": 40, "test_serve_limits": 40, "test_launch": 35, "test_jupyterlab": 33,
                 "test_notebooks": 30, "test_cli": 30}


def pytest_collection_modifyitems(items):
    """The longest groups first: the main job's tests, then the other tests of the embedded data set, so that they
    start at once, then the rest from the longest, so that the short ones fill the end and both workers finish
    together (pytest.ini's `--no-loadscope-reorder` keeps this order)."""
    items.sort(key=lambda item: (not uses(item, "main_job"), not uses(item, "embedded_cache"),
                                 -GROUP_SECONDS.get(item.module.__name__, 0)))  # stable: a module's order is kept

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerExecution"


@pytest.fixture
def aws(monkeypatch):
    "moto's AWS, with fake credentials."
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    with mock_aws(): yield


def moto_session() -> boto3.Session:
    """A boto3 session that drops the empty objects moto 5 returns for unset fields (VpcConfig, DataCaptureConfig):
    sagemaker-core reads each resource back after creating it and rejects them."""
    session = boto3.Session(region_name=REGION)
    def drop_empty(parsed, **kwargs):
        for key in [key for key, value in parsed.items() if value == {}]: del parsed[key]
    session.events.register("after-call.sagemaker", drop_empty)
    return session
