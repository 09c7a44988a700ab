"""`tune` against moto's AWS: the tuning job's request (ranges, objective and its metric definition, jobs, early
stopping, the training job it repeats), and the final kept-epoch line its objective reads."""
import re

import pytest

from mil_nb.cloud.launch import METRIC_DEFINITIONS
from mil_nb.cloud.launch_commands import launch_cli
from mil_nb.cloud.tuning import tune
from conftest import ROLE, moto_session


def recording_session(requests: list):
    session = moto_session()
    session.events.register("provide-client-params.sagemaker.CreateHyperParameterTuningJob",
                            lambda params, **kwargs: requests.append(params))
    return session


def test_the_tuning_job_request(aws, monkeypatch):
    monkeypatch.setenv("SAGEMAKER_VALIDATE_ROLE", "false")
    requests = []
    job = tune(ROLE, {"lr": (1e-5, 1e-3), "batch_size": (4, 32), "pooling": ["attention", "gated_attention"]},
               "final:validation:auc", max_jobs=12, max_parallel_jobs=3, hyperparameters={"epochs": 30},
               train_s3="s3://data/panda/", tiles_s3="s3://data/tiles/", output_s3="s3://runs/tuning/",
               boto_session=recording_session(requests))
    assert job.hyper_parameter_tuning_job_name.startswith("mil-nb-tune")
    request, = requests
    config = request["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "final:validation:auc"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 12, "MaxParallelTrainingJobs": 3}
    assert config["TrainingJobEarlyStoppingType"] == "Auto" and config["Strategy"] == "Bayesian"
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [{"Name": "lr", "MinValue": "1e-05", "MaxValue": "0.001",
                                                    "ScalingType": "Logarithmic"}]
    assert ranges["IntegerParameterRanges"] == [{"Name": "batch_size", "MinValue": "4", "MaxValue": "32",
                                                 "ScalingType": "Auto"}]
    assert ranges["CategoricalParameterRanges"] == [{"Name": "pooling", "Values": ["attention", "gated_attention"]}]
    definition = request["TrainingJobDefinition"]
    assert definition["StaticHyperParameters"]["epochs"] == "30"
    assert definition["AlgorithmSpecification"]["TrainingImage"].endswith("pytorch-training:2.5-gpu-py311")
    assert definition["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert {"Name": "final:validation:auc", "Regex": next(d["Regex"] for d in METRIC_DEFINITIONS
                                                          if d["Name"] == "final:validation:auc")} in \
        definition["AlgorithmSpecification"]["MetricDefinitions"]
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in definition["InputDataConfig"]}
    assert channels["train"] == "s3://data/panda/" and channels["tiles"] == "s3://data/tiles/"


def test_the_objective_reads_the_kept_epoch_not_the_last():
    log = ("epoch 1: train loss 0.7000, val loss 0.6000, val auc 0.7000\n"
           "epoch 2: train loss 0.5000, val loss 0.5000, val auc 0.9000\n"
           "epoch 3: train loss 0.4000, val loss 0.6500, val auc 0.8000\n"
           "final (kept epoch 2): val loss 0.500000, val auc 0.900000, val accuracy 0.850000\n")
    found = {d["Name"]: re.findall(d["Regex"], log) for d in METRIC_DEFINITIONS}
    assert found["validation:auc"][-1] == "0.8000"  # a definition yields its last match: the last epoch's
    assert found["final:validation:auc"] == ["0.900000"] and found["final:validation:loss"] == ["0.500000"]
    assert found["final:validation:qwk"] == []


def test_tune_usage_errors(capsys):
    for argv, error in [
        (["tune", "--role", ROLE, "--range", "learning_rate", "1e-5", "1e-3"], "'learning_rate' is not a parameter"),
        (["tune", "--role", ROLE, "--objective", "validation:auc"], "expected one of"),
        (["tune", "--role", ROLE, "--max_jobs", "2", "--max_parallel_jobs", "4"], "expected 1 <= parallel <= jobs"),
    ]:
        with pytest.raises(SystemExit) as stop: launch_cli(argv)
        assert stop.value.code == 2 and error in capsys.readouterr().err
