"`deploy` against moto's AWS: the model's image, model data and environment, the endpoint's instance type; and the repacked artifact answers requests through the SageMaker inference toolkit, as in the serving container."
import io
import json
import os
import subprocess
import sys
import tarfile

import boto3
import numpy as np
import pytest
import torch

from mil_nb.cloud.deploy import deploy
from mil_nb.cloud.resources import JobResources
from mil_nb.serve.wire_formats import npy_body
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.models.saving import save_model
from mil_nb.slides.tiling import TilingConfig
from mil_nb.slides.synth import make_synthetic_panda

from conftest import REGION, ROLE, moto_session

def model_tar_gz(tmp_path) -> bytes:
    "A training job's model.tar.gz: model.pt at its root."
    torch.manual_seed(0)
    save_model(AttentionMIL(MILConfig(tile_size=32)), tmp_path/"model.pt",
               tiling=TilingConfig(n_tiles=8, tile_size=32, level=1))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar: tar.add(tmp_path/"model.pt", arcname="model.pt")
    return buffer.getvalue()


CONTAINER = """
# The serving container's request path: the SageMaker inference toolkit's Transformer imports the entry script named
# by SAGEMAKER_PROGRAM and calls model_fn, input_fn, predict_fn, output_fn; a BadRequest keeps its status.
import json, sys, types
import mil_nb
from sagemaker_inference.transformer import Transformer
code, model_dir = sys.argv[1], sys.argv[2]
assert mil_nb.__file__.startswith(code), mil_nb.__file__  # the packed copy, not the installed package

class Context:
    "The model server's request context, as far as the Transformer reads it."
    def __init__(self, content_type):
        self.system_properties = {"model_dir": model_dir}
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        self.request_processor = [types.SimpleNamespace(get_request_properties=lambda: headers)]
        self.status = 200
    def set_response_status(self, code, phrase): self.status = code
    def set_response_content_type(self, index, content_type): pass

transformer, answers = Transformer(), []
for body_file, content_type in zip(sys.argv[3::2], sys.argv[4::2]):
    context = Context(content_type)
    response, = transformer.transform([{"body": bytearray(open(body_file, "rb").read())}], context)
    answers.append([context.status, json.loads(response) if context.status == 200 else response.splitlines()[0]])
print(json.dumps(answers))
"""


def test_deploy_creates_model_and_endpoint_that_serve(aws, tmp_path):
    slide_file = next(
        (make_synthetic_panda(tmp_path / "panda", n_slides=1, size=1024, progress=False) / "train_images").glob(
            "*.tiff"
        )
    )
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="train-1/output/model.tar.gz", Body=model_tar_gz(tmp_path))

    endpoint = deploy("s3://models/train-1/output/model.tar.gz", JobResources("ml.g4dn.xlarge"), ROLE,
                      name="mil-nb-test",
                      boto_session=moto_session())

    sagemaker = boto3.client("sagemaker", region_name=REGION)
    container = sagemaker.describe_model(ModelName="mil-nb-test")["PrimaryContainer"]
    assert container["Image"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-gpu-py312"
    assert container["ModelDataUrl"] == "s3://models/train-1/output/mil-nb-test/model.tar.gz"
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["MIL_NB_PRECISION"] == "fp32"
    variant, = sagemaker.describe_endpoint_config(EndpointConfigName="mil-nb-test")["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"], variant["ModelName"]) == ("ml.g4dn.xlarge", 1,
                                                                                                "mil-nb-test")
    assert (
        sagemaker.describe_endpoint(EndpointName="mil-nb-test")["EndpointConfigName"]
        == endpoint.endpoint_config_name
        == "mil-nb-test"
    )

    # the repacked artifact, unpacked as the container unpacks it in /opt/ml/model, answers requests through the toolkit
    model_dir = tmp_path/"opt-ml-model"
    artifact = s3.get_object(Bucket="models", Key="train-1/output/mil-nb-test/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(artifact)) as tar: tar.extractall(model_dir, filter="data")
    assert {"model.pt", "code/inference.py", "code/requirements.txt", "code/mil_nb/serve/inference.py"} <= \
        {str(p.relative_to(model_dir)) for p in model_dir.rglob("*")}
    requests, args = [("bag.npy", npy_body(np.zeros((5, 32, 32, 3), np.uint8)), "application/x-npy"),
                      ("slide.tiff", slide_file.read_bytes(), "image/tiff"),
                      ("empty.npy", npy_body(np.zeros((0, 32, 32, 3), np.uint8)), "application/x-npy")], []
    for file, body, content_type in requests:
        (tmp_path/file).write_bytes(body)
        args += [str(tmp_path/file), content_type]
    code = model_dir/"code"
    run = subprocess.run([sys.executable, "-c", CONTAINER, str(code), str(model_dir), *args], cwd=code,
                         capture_output=True, text=True, env={**os.environ, "SAGEMAKER_PROGRAM": "inference.py"})
    assert run.returncode == 0, run.stderr
    (bag_status, bag), (slide_status, slide), empty = json.loads(run.stdout.splitlines()[-1])
    assert (bag_status, bag["n_tiles"], slide_status, len(slide["coords"])) == (200, 5, 200, 8)
    assert empty == [400, "the bag is empty: send at least one tile"]


def test_deploy_refuses_what_is_not_a_model_tar_gz(aws):
    with pytest.raises(ValueError, match="model.tar.gz"):
        deploy("s3://models/model.pt", JobResources("ml.m5.xlarge"), ROLE)


def test_deploy_packs_a_two_stage_models_encoder_weights(aws, tmp_path):
    from mil_nb.models.encoders import encoder_from_name, save_encoder_weights, weights_fingerprint
    resnet = encoder_from_name("resnet50-imagenet", random_weights=True)
    save_encoder_weights(resnet, tmp_path/"resnet.safetensors")
    head = AttentionMIL(MILConfig(encoder="identity", embed_dim=1024, hidden_dim=16, pretrained="resnet50-imagenet",
                                  tile_size=32))
    head.pretrained_weights = weights_fingerprint(resnet)
    save_model(head, tmp_path/"model.pt", tiling=TilingConfig(mode="tissue", n_tiles=8, tile_size=32, level=0))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar: tar.add(tmp_path/"model.pt", arcname="model.pt")
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="two-stage/model.tar.gz", Body=buffer.getvalue())

    deploy("s3://models/two-stage/model.tar.gz", JobResources("ml.m5.xlarge"), ROLE, name="two-stage",
           boto_session=moto_session(), encoder_weights=str(tmp_path/"resnet.safetensors"))

    environment = boto3.client("sagemaker", region_name=REGION).describe_model(
        ModelName="two-stage")["PrimaryContainer"]["Environment"]
    assert environment["MIL_NB_ENCODER_WEIGHTS"] == "/opt/ml/model/code/encoder/resnet.safetensors"
    model_dir = tmp_path/"opt-ml-model"
    artifact = s3.get_object(Bucket="models", Key="two-stage/two-stage/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(artifact)) as tar: tar.extractall(model_dir, filter="data")
    packed = model_dir/"code"/"encoder"/"resnet.safetensors"
    assert packed.read_bytes() == (tmp_path/"resnet.safetensors").read_bytes()
    (tmp_path/"bag.npy").write_bytes(npy_body(np.zeros((3, 32, 32, 3), np.uint8)))
    code = model_dir/"code"
    run = subprocess.run([sys.executable, "-c", CONTAINER, str(code), str(model_dir), str(tmp_path/"bag.npy"),
                          "application/x-npy"], cwd=code, capture_output=True, text=True,  # here, code/ is not at /opt/ml/model/code:
                         env={**os.environ, "SAGEMAKER_PROGRAM": "inference.py", "MIL_NB_ENCODER_WEIGHTS": str(packed)})
    assert run.returncode == 0, run.stderr
    (status, answer), = json.loads(run.stdout.splitlines()[-1])
    assert (status, answer["n_tiles"]) == (200, 3)
