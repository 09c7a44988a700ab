"""Tiling at scale: `mil_nb_launch tile --local 2` makes the store that `mil_nb_tile` makes, and the Processing job
request `launch_tiling` sends, against moto."""
import json
import subprocess

import numpy as np
import pytest

from mil_nb.processing import launch_tiling
from mil_nb.tile_store import TileStore
from conftest import ROLE, moto_session


def test_two_shards_make_the_store_one_run_makes(tmp_path, small_panda):
    options = ["--level", "1", "--workers", "1"]
    one = subprocess.run(["mil_nb_tile", str(small_panda), str(tmp_path/"one"), *options], capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr
    run = subprocess.run(["mil_nb_launch", "tile", "--local", "2", "--slides", str(small_panda), "--output",
                          str(tmp_path/"sharded"), "--local_dir", str(tmp_path/"job"), "--", *options],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    whole, merged = TileStore(tmp_path/"one"), TileStore(tmp_path/"sharded")
    assert sorted(merged.image_ids) == sorted(whole.image_ids) and len(whole.image_ids) == 24
    for image_id in whole.image_ids:
        for key, array in whole.load(image_id).items(): np.testing.assert_array_equal(merged.load(image_id)[key], array)
    assert merged.tiling == whole.tiling
    parts = [json.loads((tmp_path/"sharded"/h/"summary.json").read_text())["tiled"] for h in ("algo-1", "algo-2")]
    assert parts == [12, 12]
    (tmp_path/"sharded"/"algo-2"/"summary.json").unlink()  # as if the second instance had been stopped
    merge = subprocess.run(["mil_nb_launch", "tile", "--merge", str(tmp_path/"sharded")], capture_output=True,
                           text=True)
    assert merge.returncode == 2 and "algo-2: a part that did not finish" in merge.stderr


def test_the_tiling_job_request(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    requests, session = [], moto_session()
    session.events.register("provide-client-params.sagemaker.CreateProcessingJob",
                            lambda params, **kwargs: requests.append(params))
    job = launch_tiling(ROLE, "s3://data/panda/train_images/", "s3://data/tiles/", "s3://data/panda/train.csv",
                        "s3://data/panda/train_label_masks/", ["--mode", "tissue", "--mpp", "2.0"], instance_count=8,
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
