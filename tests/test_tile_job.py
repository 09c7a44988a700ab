"""Tiling at scale: `mil_nb_launch tile --local 2` makes the store that `mil_nb_tile` makes, a training job trains from
its parts without tiling, and the Processing job request `launch_tiling` sends, against moto."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from mil_nb.models.saving import load_model
from mil_nb.cloud.processing import launch_tiling
from mil_nb.cloud.resources import JobResources
from mil_nb.slides.tile_store import TileStore
from conftest import REPO, ROLE, moto_session


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def tiled_twice(tmp_path_factory, small_panda):
    "The 24 small slides tiled by `mil_nb_tile` (one/) and by `mil_nb_launch tile --local 2` (sharded/, merged)."
    out = tmp_path_factory.mktemp("tiled")
    options = ["--level", "1", "--workers", "1", "--tile_size", "64", "--n_tiles", "8"]
    runs = [subprocess.run(command, capture_output=True, text=True) for command in (
        ["mil_nb_tile", str(small_panda), str(out/"one"), *options],
        ["mil_nb_launch", "tile", "--local", "2", "--slides", str(small_panda), "--output", str(out/"sharded"),
         "--local_dir", str(out/"job"), "--", *options])]
    assert [run.returncode for run in runs] == [0, 0], [run.stderr[-3000:] for run in runs]
    return out


def test_two_shards_make_the_store_one_run_makes(tiled_twice, tmp_path):
    whole, merged = TileStore(tiled_twice/"one"), TileStore(tiled_twice/"sharded")
    assert sorted(merged.image_ids) == sorted(whole.image_ids) and len(whole.image_ids) == 24
    for image_id in whole.image_ids:
        for key, array in whole.load(image_id).items(): np.testing.assert_array_equal(merged.load(image_id)[key], array)
    assert merged.tiling == whole.tiling
    assert (tiled_twice/"sharded"/"train.csv").read_bytes() == (tiled_twice/"one"/"train.csv").read_bytes()
    parts = [json.loads((tiled_twice/"sharded"/h/"summary.json").read_text())["tiled"] for h in ("algo-1", "algo-2")]
    assert parts == [12, 12]
    shutil.copytree(tiled_twice/"sharded", tmp_path/"sharded")
    (tmp_path/"sharded"/"algo-2"/"summary.json").unlink()  # as if the second instance had been stopped
    merge = subprocess.run(["mil_nb_launch", "tile", "--merge", str(tmp_path/"sharded")], capture_output=True,
                           text=True)
    assert merge.returncode == 2 and "algo-2: a part that did not finish" in merge.stderr


@pytest.mark.slow
def test_a_job_trains_from_the_parts_without_tiling(tiled_twice, tmp_path):
    "`mil_nb_launch tile --local 2`'s parts as a `tiles` channel, as a job given their S3 prefix sees them: no merge."
    for part in ("algo-1", "algo-2"): shutil.copytree(tiled_twice/"sharded"/part, tmp_path/"parts"/part)
    shutil.copytree(tiled_twice/"one", tmp_path/"one")
    parameters = ["-p", "epochs", "2", "-p", "n_tiles", "8", "-p", "tile_size", "64", "-p", "num_workers", "0",
                  "-p", "n_bootstrap", "100"]
    runs = {store: subprocess.run(["mil_nb_launch", "--local", "2", "--local_dir", str(tmp_path/f"job_{store}"),
                                   "--tiles", str(tmp_path/store), *parameters],
                                  cwd=REPO, capture_output=True, text=True, timeout=900)
            for store in ("parts", "one")}
    for store, run in runs.items():
        assert run.returncode == 0, run.stderr[-3000:]
        log = run.stdout + run.stderr  # rank 0's notebook output: the job's log
        assert f"tiles: the tile store {tmp_path/f'job_{store}'/'input'/'data'/'tiles'}, tiled elsewhere" in log
        assert "used as it is; nothing tiled" in log
        assert not (tmp_path/f"job_{store}"/"tiles").exists()  # the job's own tile store: never made
        report = tmp_path/f"job_{store}"/"output"/"data"
        assert "these slides are not here (trained from tiles alone)" in log
        assert len(list(report.glob("attention_*.png"))) == 4  # each slide's tiles by attention, without the slide
    states = [load_model(tmp_path/f"job_{store}"/"model"/"model.pt").state_dict() for store in ("parts", "one")]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=1e-5)


def test_the_tiling_job_request(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    requests, session = [], moto_session()
    session.events.register("provide-client-params.sagemaker.CreateProcessingJob",
                            lambda params, **kwargs: requests.append(params))
    job = launch_tiling(ROLE, "s3://data/panda/train_images/", "s3://data/tiles/", "s3://data/panda/train.csv",
                        "s3://data/panda/train_label_masks/", ["--mode", "tissue", "--mpp", "2.0"],
                        resources=JobResources("ml.c5.4xlarge", 8),
                        boto_session=session)
    assert job.processing_job_name.startswith("mil-nb-tile-")
    request, = requests
    assert request["AppSpecification"]["ImageUri"] == \
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-cpu-py311"
    assert request["AppSpecification"]["ContainerArguments"] == ["tile", "--mode", "tissue", "--mpp", "2.0"]
    assert request["ProcessingResources"]["ClusterConfig"] == {"InstanceCount": 8, "InstanceType": "ml.c5.4xlarge",
                                                              "VolumeSizeInGB": 100}
    inputs = {i["InputName"]: i["S3Input"] for i in request["ProcessingInputs"]}
    assert (inputs["slides"]["S3Uri"], inputs["slides"]["S3DataDistributionType"]) == \
        ("s3://data/panda/train_images/", "ShardedByS3Key")
    for name, uri in [("labels", "s3://data/panda/train.csv"), ("masks", "s3://data/panda/train_label_masks/")]:
        assert (inputs[name]["S3Uri"], inputs[name]["S3DataDistributionType"]) == (uri, "FullyReplicated")
    output, = request["ProcessingOutputConfig"]["Outputs"]
    assert output["S3Output"]["S3Uri"] == "s3://data/tiles/"
    assert output["S3Output"]["LocalPath"] == "/opt/ml/processing/output/tiles"
    with pytest.raises(ValueError, match="masks_s3 needs labels_s3"):
        launch_tiling(ROLE, "s3://d/i/", "s3://d/t/", masks_s3="s3://d/m/", boto_session=session)
    with pytest.raises(ValueError, match="mil_nb_tile options"):
        launch_tiling(ROLE, "s3://d/i/", "s3://d/t/", options=["--mode"], boto_session=session)
