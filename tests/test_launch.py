"`launch` against moto's AWS: what the training job asks SageMaker for, the torchrun settings and the source it stages in S3; `mil_nb_launch`'s dry run and usage errors."
import json
import re
from urllib.parse import urlparse

import boto3
import pytest

from mil_nb.cloud.launch import METRIC_DEFINITIONS, launch
from mil_nb.cloud.launch_commands import launch_cli
from mil_nb.cloud.resources import JobResources
from conftest import REGION, ROLE, moto_session


@pytest.fixture
def sagemaker_aws(aws, monkeypatch):
    "moto's AWS, with the SDK's IAM role validation off (moto cannot simulate policies)."
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")


def recording_session(requests: list) -> boto3.Session:
    "`moto_session()`, which also appends the parameters of every CreateTrainingJob call to `requests`."
    session = moto_session()
    session.events.register(
        "provide-client-params.sagemaker.CreateTrainingJob", lambda params, **kwargs: requests.append(params)
    )
    return session


def s3_files(uri: str) -> dict[str, bytes]:
    "The objects under the S3 prefix `uri`, by their path below it."
    s3, url = boto3.client("s3", region_name=REGION), urlparse(uri)
    prefix = url.path.lstrip("/").rstrip("/") + "/"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=url.netloc, Prefix=prefix)["Contents"]]
    return {key[len(prefix):]: s3.get_object(Bucket=url.netloc, Key=key)["Body"].read() for key in keys}


def test_launch_submits_a_torchrun_job(sagemaker_aws):
    requests = []
    job = launch(ROLE, JobResources("ml.g5.12xlarge", 2), processes_per_node=4,
                 hyperparameters={"epochs": 100, "task": "isup", "patience": None, "lr": 2e-4},
                 train_s3="s3://slides/panda/", output_s3="s3://runs/mil-nb/", checkpoint_s3="s3://runs/checkpoints/",
                 boto_session=recording_session(requests))

    described = boto3.client("sagemaker", region_name=REGION).describe_training_job(
        TrainingJobName=job.training_job_name
    )
    assert job.training_job_name.startswith("mil-nb-")
    assert (
        described["AlgorithmSpecification"]["TrainingImage"]
        == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5-gpu-py311"
    )
    assert described["ResourceConfig"] == {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2, "VolumeSizeInGB": 100}
    assert described["HyperParameters"] == {"epochs": "100", "task": "isup", "patience": "null", "lr": "0.0002"}
    assert described["OutputDataConfig"]["S3OutputPath"] == "s3://runs/mil-nb/"
    assert described["StoppingCondition"]["MaxRuntimeInSeconds"] == 24 * 3600
    assert described["RoleArn"] == ROLE
    assert described["CheckpointConfig"] == {"S3Uri": "s3://runs/checkpoints/", "LocalPath": "/opt/ml/checkpoints"}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in described["InputDataConfig"]}
    assert channels.keys() == {"train", "code", "sm_drivers"} and channels["train"] == "s3://slides/panda/"
    # moto describes every job with a canned metric definition: what SageMaker is asked for is in the request
    request, = requests
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS

    # torchrun: the container runs the SDK's sm_train.sh, whose torchrun driver reads distributed.json
    assert described["AlgorithmSpecification"]["ContainerArguments"][-1].endswith(
        "/opt/ml/input/data/sm_drivers/sm_train.sh"
    )
    drivers = s3_files(channels["sm_drivers"])
    assert json.loads(drivers["distributed.json"]) == {"process_count_per_node": 4, "smp": None}
    assert json.loads(drivers["sourcecode.json"])["entry_script"] == "mil_nb_job.py"
    train_script = drivers["sm_train.sh"].decode()
    assert (
        "install_requirements.py requirements.txt" in train_script
        and "distributed_drivers/torchrun_driver.py" in train_script
    )

    code = s3_files(channels["code"])
    assert {
        "mil_nb_job.py",
        "requirements.txt",
        "mil_nb/train/train.ipynb",  # the main job's notebook, where an installed package has it
        "mil_nb/__init__.py",
        "mil_nb/cloud/job.py",
        "mil_nb/train/training.py",
    } <= code.keys()
    assert b"from mil_nb.cloud.job import main" in code["mil_nb_job.py"]
    requirements = {re.split("[<>=!~]", r)[0] for r in code["requirements.txt"].decode().split()}
    assert {"papermill", "ipykernel"} <= requirements and not {"torch", "sagemaker"} & requirements


def test_a_spot_job_asks_for_spot_capacity_and_keeps_checkpoints(sagemaker_aws):
    requests = []
    launch(ROLE, JobResources("ml.g5.12xlarge", max_runtime_s=3600), checkpoint_s3="s3://runs/checkpoints/",
           spot=True, boto_session=recording_session(requests))
    request, = requests
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert request["CheckpointConfig"] == {"S3Uri": "s3://runs/checkpoints/", "LocalPath": "/opt/ml/checkpoints"}
    requests.clear()
    # on demand: no spot, no max wait
    launch(ROLE, JobResources("ml.g5.12xlarge"), boto_session=recording_session(requests))
    assert "EnableManagedSpotTraining" not in requests[0] or requests[0]["EnableManagedSpotTraining"] is False
    assert "MaxWaitTimeInSeconds" not in requests[0]["StoppingCondition"]
    with pytest.raises(ValueError, match="spot=True needs checkpoint_s3"): launch(ROLE, spot=True)
    with pytest.raises(SystemExit):
        launch_cli(["--role", ROLE, "--spot", "--max_wait_s", "10", "--checkpoints", "s3://c/", "--dry_run"])


def test_a_job_from_a_tile_store_gets_a_tiles_channel(sagemaker_aws):
    requests = []
    launch(ROLE, JobResources("ml.g5.12xlarge"), tiles_s3="s3://runs/tiles/", train_s3="s3://slides/panda/",
           train_input_mode="FastFile", boto_session=recording_session(requests))
    request, = requests
    channels = {c["ChannelName"]: c for c in request["InputDataConfig"]}
    assert channels["tiles"]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://runs/tiles/"
    assert channels["tiles"]["InputMode"] == "File"  # read every epoch: on the instance's disk
    assert channels["train"]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://slides/panda/"
    assert channels["train"]["InputMode"] == "FastFile"  # streamed: only train.csv and the report's slides are read
    requests.clear()
    launch(ROLE, JobResources("ml.g5.12xlarge"), tiles_s3="s3://runs/tiles/", boto_session=recording_session(requests))
    channels = {c["ChannelName"]: c for c in requests[0]["InputDataConfig"]}
    assert "train" not in channels and channels["tiles"]["InputMode"] == "File"  # labels: the store's train.csv
    with pytest.raises(ValueError, match="tiles_s3='runs/tiles/': expected an S3 URI"):
        launch(ROLE, tiles_s3="runs/tiles/")
    with pytest.raises(ValueError, match="train_input_mode='Pipe'"): launch(ROLE, train_input_mode="Pipe")
    requests.clear()
    launch(ROLE, JobResources("ml.g5.12xlarge"), encoder_s3="s3://weights/resnet-50/",
           hyperparameters={"encoder": "resnet50-imagenet"}, boto_session=recording_session(requests))
    channels = {c["ChannelName"]: c for c in requests[0]["InputDataConfig"]}
    assert channels["encoder"]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://weights/resnet-50/"  # encoder_weights
    assert channels["encoder"]["InputMode"] == "File"
    with pytest.raises(ValueError, match="encoder_s3='weights/': expected an S3 URI"):
        launch(ROLE, encoder_s3="weights/")


def test_launch_defaults(sagemaker_aws):
    "No data: no train channel (the job uses the notebook's embedded data); one process per GPU; the default bucket."
    job = launch(ROLE, JobResources("ml.g5.2xlarge"), boto_session=moto_session())
    described = boto3.client("sagemaker", region_name=REGION).describe_training_job(
        TrainingJobName=job.training_job_name
    )
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in described["InputDataConfig"]}
    assert channels.keys() == {"code", "sm_drivers"}
    assert json.loads(s3_files(channels["sm_drivers"])["distributed.json"])["process_count_per_node"] is None
    assert described["OutputDataConfig"]["S3OutputPath"] == "s3://sagemaker-us-east-1-123456789012/mil-nb"
    assert (described["ResourceConfig"]["InstanceCount"], described["HyperParameters"]) == (1, {})


def test_launch_refuses_bad_input(sagemaker_aws, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="train_s3='/data/panda': expected an S3 URI"):
        launch(ROLE, train_s3="/data/panda")
    with pytest.raises(ValueError, match="output_s3='runs/'"): launch(ROLE, output_s3="runs/")
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"): monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path/"no_config"))
    with pytest.raises(ValueError, match="no AWS region"): launch(ROLE)


def test_cli_dry_run_submits_nothing(sagemaker_aws, capsys):
    launch_cli(
        ["--role", ROLE, "--instance_type", "ml.m5.xlarge", "--dry_run", "-p", "epochs", "2", "-p", "task", "isup"]
    )
    assert "no job submitted" in capsys.readouterr().out
    assert boto3.client("sagemaker", region_name=REGION).list_training_jobs()["TrainingJobSummaries"] == []


def test_cli_usage_errors(capsys):
    for argv, error in [
        (["-p", "epochs", "2"], "--role ARN is needed"),
        (["--role", ROLE, "-p", "epochs"], "expected 2 arguments"),
        (["--role", ROLE, "--train", "panda/"], "train_s3='panda/'"),
        (["--role", ROLE, "--data_dir", "/data/panda"], "--data_dir is for --local runs"),
    ]:
        with pytest.raises(SystemExit) as exit: launch_cli(argv)
        assert exit.value.code == 2 and error in capsys.readouterr().err
