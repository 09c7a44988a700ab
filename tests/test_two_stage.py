"""The two-stage main job (in this process, `run_main_job`): a pretrained encoder (ResNet-50, saved random weights)
trains a head on cached features; `mil_nb_predict` and `mil_nb_serve` answer with the model it writes."""
import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_job
from mil_nb.bags.data import Bag, collate_bags
from mil_nb.models.encoders import attach_tile_encoder, encoder_from_name, save_encoder_weights
from mil_nb.serve.wire_formats import npy_body
from mil_nb.models.saving import load_model
from mil_nb.serve.server import post, running_server


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def two_stage(tmp_path_factory, small_panda):
    "The main job's folder after `-p encoder resnet50-imagenet -p encoder_weights FILE` on 24 small slides."
    out = tmp_path_factory.mktemp("two_stage")
    save_encoder_weights(encoder_from_name("resnet50-imagenet", random_weights=True), out.parent/"r50.safetensors")
    run_job(output_dir=str(out), data_dir=str(small_panda), encoder="resnet50-imagenet",
            encoder_weights=str(out.parent/"r50.safetensors"), epochs=2, n_tiles=4, n_bootstrap=100)
    return out


def test_the_job_trains_a_head_on_cached_features(two_stage):
    saved = torch.load(two_stage/"model.pt", weights_only=True)
    assert saved["config"].items() >= {"encoder": "identity", "pretrained": "resnet50-imagenet", "embed_dim": 1024,
                                       "hidden_dim": 512, "pooling": "gated_attention", "dropout": 0.25,
                                       "tile_size": 224}.items()
    assert saved["tiling"].items() >= {"mode": "tissue", "tile_size": 224, "mpp": 0.5}.items()
    assert not any(k.startswith("tile_encoder") for k in saved["state_dict"])  # the encoder is kept apart
    metrics = json.loads((two_stage/"metrics.json").read_text())
    assert (metrics["optimizer"], metrics["epochs_run"]) == ("adamw", 2)
    store, = (two_stage/"features").iterdir()
    assert store.name.startswith("resnet50-imagenet-")
    assert json.loads((store/"meta.json").read_text())["features"] == 1024
    assert (two_stage/"encoder.safetensors").is_file() and len(list(two_stage.glob("attention_*.png"))) == 4


def test_predict_scores_slides_as_the_job_did(two_stage, small_panda, tmp_path):
    run = subprocess.run(["mil_nb_predict", str(small_panda), str(tmp_path/"scores"), "--model_dir", str(two_stage),
                          "--no_heatmaps", "--workers", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    job = pd.read_csv(two_stage/"predictions_test.csv").set_index("image_id").probability
    scored = pd.read_csv(tmp_path/"scores"/"predictions.csv").set_index("image_id").probability
    assert len(scored) == 24
    np.testing.assert_allclose(scored[job.index], job, atol=5e-3)  # the job's features may be bf16


def test_serve_answers_through_the_encoder_found_next_to_the_model_or_by_the_environment(two_stage, tmp_path,
                                                                                        monkeypatch):
    tiles = np.random.default_rng(0).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    model = attach_tile_encoder(load_model(two_stage/"model.pt"), two_stage)
    batch = collate_bags([Bag(tiles)])
    with torch.no_grad(): expected = torch.sigmoid(model(batch.instances, batch.mask)[0][0]).item()
    alone = tmp_path/"alone"  # model.pt without the weights: $MIL_NB_ENCODER_WEIGHTS names them
    alone.mkdir(); shutil.copy(two_stage/"model.pt", alone/"model.pt")
    monkeypatch.setenv("MIL_NB_ENCODER_WEIGHTS", str(two_stage.parent/"r50.safetensors"))
    for model_dir in (two_stage, alone):
        with running_server(model_dir, command=("mil_nb_serve",)) as url:
            status, answer = post(url, npy_body(tiles))
        assert status == 200, answer
        assert answer["probability"] == pytest.approx(expected, abs=1e-5) and answer["n_tiles"] == 5
