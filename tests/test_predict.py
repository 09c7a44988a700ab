"""`mil_nb_predict` as a user runs it: answers equal the served model's, QuPath GeoJSON on the tiles' boxes, ensembles,
bad slides and bad arguments, a killed run resumed; `mil_nb_launch predict` here (--local 2) and its Processing job
request against moto."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest

from mil_nb.score.cohort import predict_cli
from mil_nb.bags.data import Bag
from mil_nb.core.devices import set_seed
from mil_nb.serve.inference import load_served_model, predict_bag
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.models.saving import save_model
from mil_nb.cloud.processing import launch_predict
from mil_nb.cloud.resources import JobResources
from mil_nb.slides.readers import open_slide
from mil_nb.slides.tiling import TilingConfig, tile_side_level0, tile_slide
from conftest import REGION, ROLE, moto_session


def saved_model(folder: Path, seed: int, task: str = "binary", tiling=TilingConfig(level=1)) -> Path:
    set_seed(seed)
    folder.mkdir(parents=True)
    save_model(AttentionMIL(MILConfig(task=task)), folder/"model.pt", tiling)
    return folder


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return saved_model(root/"one", 1), saved_model(root/"two", 2)


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def eight(tmp_path_factory, small_panda):
    "A folder of 8 of the small data set's slides, and their labels."
    folder = tmp_path_factory.mktemp("eight")
    (folder/"slides").mkdir()
    table = pd.read_csv(small_panda/"train.csv", dtype={"image_id": str}).head(8)
    for image_id in table.image_id:
        (folder/"slides"/f"{image_id}.tiff").symlink_to(small_panda/"train_images"/f"{image_id}.tiff")
    table.to_csv(folder/"labels.csv", index=False)
    return folder


def predict(*args, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(["mil_nb_predict", *map(str, args)], capture_output=True, text=True, **popen)


def read(dest: Path) -> pd.DataFrame:
    return pd.read_csv(dest/"predictions.csv", dtype={"image_id": str})


def test_answers_equal_the_models_and_geojson_holds_the_tiles(tmp_path, small_panda, models):
    run = predict("--model_dir", models[0], "--n_bootstrap", "100", small_panda, tmp_path/"p")
    assert run.returncode == 0, run.stderr
    frame = read(tmp_path/"p")
    table = pd.read_csv(small_panda/"train.csv", dtype={"image_id": str})
    assert sorted(frame.image_id) == sorted(table.image_id)
    served = load_served_model(models[0], device="cpu")
    for row in frame.itertuples():
        bag = tile_slide(row.path, served.tiling)
        answer = predict_bag(served, Bag(bag["tiles"], coords=bag["coords"]))
        assert abs(answer["probability"] - row.probability) < 1e-5
        collection = json.loads((tmp_path/"p"/"geojson"/f"{row.image_id}.geojson").read_text())
        on_slide = bag["coords"][~np.isnan(bag["coords"][:, 0])]
        assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(on_slide)
        with open_slide(row.path) as reader: side0 = tile_side_level0(reader, served.tiling)
        for feature, (x, y) in zip(collection["features"], on_slide):
            assert feature["properties"]["objectType"] == "tile"
            assert feature["geometry"]["coordinates"] == [[[x, y], [x + side0, y], [x + side0, y + side0],
                                                           [x, y + side0], [x, y]]]
        assert np.allclose([f["properties"]["measurements"]["attention"] for f in collection["features"]],
                           np.array(answer["attention"])[~np.isnan(bag["coords"][:, 0])], atol=1e-6)
    assert len(list((tmp_path/"p"/"heatmaps").glob("*.png"))) == len(frame)
    metrics = json.loads((tmp_path/"p"/"metrics.json").read_text())
    assert metrics["n"] == len(frame) and "auc_ci" in metrics


def test_two_models_are_an_ensemble_of_their_mean_probability(tmp_path, eight, models):
    options = ["--no_heatmaps", "--n_bootstrap", "100", "--labels", eight/"labels.csv"]
    for name, dirs in [("one", models[:1]), ("two", models[1:]), ("both", models)]:
        run = predict(*[a for d in dirs for a in ("--model_dir", d)], *options, eight/"slides", tmp_path/name)
        assert run.returncode == 0, run.stderr
    one, two, both = read(tmp_path/"one"), read(tmp_path/"two"), read(tmp_path/"both")
    np.testing.assert_allclose(both.probability, (one.probability + two.probability) / 2, atol=1e-6)
    np.testing.assert_allclose(both.model1_probability, one.probability, atol=1e-6)
    np.testing.assert_allclose(both.model2_probability, two.probability, atol=1e-6)


def test_bad_slides_are_listed_and_bad_arguments_refused(tmp_path, small_panda, models, capsys):
    src = tmp_path/"slides"
    src.mkdir()
    good = sorted((small_panda/"train_images").iterdir())[:3]
    for path in good: shutil.copy(path, src/path.name)
    (src/"truncated.tiff").write_bytes(good[0].read_bytes()[:20000])
    (src/"notes.svs").write_text("this is a text file, not a slide")
    run = predict("--model_dir", models[0], "--no_heatmaps", src, tmp_path/"p")
    assert run.returncode == 1, run.stderr
    assert sorted(read(tmp_path/"p").image_id) == sorted(p.stem for p in good)
    failures = pd.read_csv(tmp_path/"p"/"failures.csv")
    assert sorted(failures.image_id) == ["notes", "truncated"] and failures.error.str.len().min() > 0
    assert not (tmp_path/"p"/"metrics.json").exists()  # no labels
    (tmp_path/"empty").mkdir()
    isup = saved_model(tmp_path/"isup", 3, "isup")
    other_tiling = saved_model(tmp_path/"kaggle2", 4, tiling=TilingConfig(level=2))
    for args, message in [
        (["--model_dir", tmp_path/"empty", src, tmp_path/"q"], "no model.pt in model_dir"),
        (["--model_dir", models[0], "--model_dir", isup, src, tmp_path/"q"], "task isup differs"),
        (["--model_dir", models[0], "--model_dir", other_tiling, src, tmp_path/"q"], "tiling TilingConfig"),
        (["--model_dir", models[0], tmp_path/"empty", tmp_path/"q"], "neither train.csv nor any slide"),
        (["--model_dir", models[0], "--batch_size", "0", src, tmp_path/"q"], "batch_size=0"),
        (["--model_dir", models[1], src, tmp_path/"p"], "choose another folder"),  # scored by another model
    ]:
        with pytest.raises(SystemExit) as stop: predict_cli([str(a) for a in args])
        assert stop.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path/"q").exists()  # refused before anything was written
    assert sorted(read(tmp_path/"p").image_id) == sorted(p.stem for p in good)  # nothing written is lost


def test_sigkill_then_rerun_writes_the_same_predictions(tmp_path, small_panda, models):
    options = ["--model_dir", models[0], "--workers", "2", "--batch_size", "4", "--n_bootstrap", "100", "--no_heatmaps"]
    assert predict(*options, small_panda, tmp_path/"whole").returncode == 0
    killed = subprocess.Popen(["mil_nb_predict", *map(str, options), str(small_panda), str(tmp_path/"killed")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records, deadline = tmp_path/"killed"/"records", time.time() + 120
    while time.time() < deadline:
        done = list(records.glob("*.json")) if records.exists() else []
        for path in done: json.loads(path.read_text())  # any record that is visible is complete
        if len(done) >= 6: break
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    n_done = len(list(records.glob("*.json")))
    assert 6 <= n_done < 24, f"{n_done} slides scored when killed: the run was not interrupted mid-way"
    assert not (tmp_path/"killed"/"predictions.csv").exists()
    for path in (tmp_path/"killed").rglob("*.geojson"): json.loads(path.read_text())
    rerun = predict(*options, small_panda, tmp_path/"killed")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((tmp_path/"killed"/"summary.json").read_text())["already_scored"] >= n_done
    for name in ("predictions.csv", "metrics.json", "failures.csv"):
        assert (tmp_path/"whole"/name).read_text() == (tmp_path/"killed"/name).read_text(), name
    assert not list((tmp_path/"killed").rglob("*.part"))


def test_launch_predict_local_equals_the_plain_cli(tmp_path, eight, models):
    options = ["--no_heatmaps", "--n_bootstrap", "100", "--workers", "1"]
    labels = ["--labels", str(eight/"labels.csv")]
    assert predict("--model_dir", models[0], *labels, *options, eight/"slides", tmp_path/"plain").returncode == 0
    run = subprocess.run(["mil_nb_launch", "predict", "--local", "2", "--slides", str(eight/"slides"), *labels,
                          "--model", str(models[0]), "--output", str(tmp_path/"sharded"), "--local_dir",
                          str(tmp_path/"job"), "--", *options], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    plain, sharded = read(tmp_path/"plain"), read(tmp_path/"sharded")
    pd.testing.assert_frame_equal(plain.drop(columns="path"), sharded.drop(columns="path"), check_exact=False,
                                  atol=1e-6, rtol=0)
    shards = [json.loads((tmp_path/"sharded"/h/"summary.json").read_text())["scored"] for h in ("algo-1", "algo-2")]
    assert shards == [4, 4]
    assert json.loads((tmp_path/"sharded"/"metrics.json").read_text())["n"] == 8


def test_the_processing_job_request(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    requests, session = [], moto_session()
    session.events.register("provide-client-params.sagemaker.CreateProcessingJob",
                            lambda params, **kwargs: requests.append(params))
    job = launch_predict(ROLE, "s3://slides/cohort/", ["s3://runs/fold0/model.tar.gz", "s3://runs/fold1/model.tar.gz"],
                         "s3://runs/scored/", labels_s3="s3://slides/labels.csv", options=["--precision", "bf16"],
                         resources=JobResources("ml.m5.4xlarge", 4), boto_session=session)
    assert job.processing_job_name.startswith("mil-nb-predict-")
    request, = requests
    assert request["AppSpecification"]["ImageUri"] == \
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-cpu-py311"
    assert request["ProcessingResources"]["ClusterConfig"] == {"InstanceCount": 4, "InstanceType": "ml.m5.4xlarge",
                                                              "VolumeSizeInGB": 100}
    inputs = {i["InputName"]: i["S3Input"] for i in request["ProcessingInputs"]}
    assert inputs["slides"]["S3Uri"] == "s3://slides/cohort/"
    assert inputs["slides"]["S3DataDistributionType"] == "ShardedByS3Key"
    assert inputs["slides"]["LocalPath"] == "/opt/ml/processing/input/slides"
    for m, uri in [(1, "s3://runs/fold0/model.tar.gz"), (2, "s3://runs/fold1/model.tar.gz")]:
        assert inputs[f"model{m}"]["S3Uri"] == uri
        assert inputs[f"model{m}"]["S3DataDistributionType"] == "FullyReplicated"
    assert inputs["labels"]["S3Uri"] == "s3://slides/labels.csv"
    output, = request["ProcessingOutputConfig"]["Outputs"]
    assert output["S3Output"]["S3Uri"] == "s3://runs/scored/"
    assert output["S3Output"]["LocalPath"] == "/opt/ml/processing/output/predictions"
    # the SDK's runproc.sh installs requirements.txt, then runs the entry script with these arguments
    assert request["AppSpecification"]["ContainerArguments"] == ["predict", "--precision", "bf16"]
    code = inputs["code"]["S3Uri"]
    s3, bucket, prefix = boto3.client("s3", region_name=REGION), *code[5:].split("/", 1)
    runproc = s3.get_object(Bucket=bucket, Key=prefix.rstrip("/") + "/runproc.sh")["Body"].read().decode()
    assert "mil_nb_process.py" in runproc and "requirements.txt" in runproc
    described = boto3.client("sagemaker", region_name=REGION).describe_processing_job(
        ProcessingJobName=job.processing_job_name)
    assert described["ProcessingInputs"][0]["S3Input"]["S3DataDistributionType"] == "ShardedByS3Key"


def test_launch_predict_refuses_bad_input(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    for kwargs, message in [
        (dict(slides_s3="/data/cohort"), "slides='/data/cohort': expected an S3 URI"),
        (dict(model_s3="s3://runs/model.tar.gz"), "expected a list of URIs"),
        (dict(output_s3="runs/"), "output_s3='runs/'"),
        (dict(options=["--model_dir", "x"]), "the job sets these itself"),
    ]:
        arguments = dict(slides_s3="s3://s/", model_s3=["s3://m/model.tar.gz"], output_s3="s3://o/") | kwargs
        with pytest.raises(ValueError, match=message):
            launch_predict(ROLE, **arguments, boto_session=moto_session())
    with pytest.raises(ValueError, match="instance_count=0"):  # the resources are checked when made
        launch_predict(ROLE, "s3://s/", ["s3://m/model.tar.gz"], "s3://o/",
                       resources=JobResources("ml.m5.4xlarge", instance_count=0), boto_session=moto_session())
