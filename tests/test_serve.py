"`mil_nb_serve` as a subprocess on a free port: the model's own answers, 4xx JSON errors for bad requests, and `bench_serve`."
import json

import numpy as np
import pytest
import torch

from mil_nb.bags.data import Bag, collate_bags
from mil_nb.serve.wire_formats import npy_body
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.models.saving import load_model, save_model
from mil_nb.serve.server import bench_serve, post, running_server
from mil_nb.slides.synth import make_synthetic_panda
from mil_nb.slides.tiling import TilingConfig, tile_slide

TILING = {"mode": "kaggle", "n_tiles": 8, "tile_size": 32, "level": 1}


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def model_dir(tmp_path_factory):
    "A small random model (32 px tiles) saved with its tiling settings, as the main job saves one."
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    save_model(AttentionMIL(MILConfig(tile_size=32)), path/"model.pt", tiling=TilingConfig(**TILING))
    return path


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def server(model_dir):
    "The `mil_nb_serve` console script serving `model_dir`, with bodies up to 1 MiB."
    with running_server(model_dir, "--max_body_mb", "1", command=("mil_nb_serve",)) as url: yield url


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def slide_file(tmp_path_factory):
    data = make_synthetic_panda(tmp_path_factory.mktemp("panda"), n_slides=1, size=1024, progress=False)
    return next((data/"train_images").glob("*.tiff"))


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def tiles():
    return np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)


def direct(model_dir, tiles):
    "Probability and attention of the model itself on `tiles`, in fp32 through the one data path."
    batch = collate_bags([Bag(tiles)])
    with torch.no_grad(): logits, attention = load_model(model_dir/"model.pt")(batch.instances, batch.mask)
    return torch.sigmoid(logits[0]).item(), attention[0].numpy()


def test_npy_and_json_bags_get_the_models_own_answer(server, model_dir, tiles):
    probability, attention = direct(model_dir, tiles)
    for body, content_type in [(npy_body(tiles), "application/x-npy"),
                               (json.dumps({"tiles": tiles.tolist()}).encode(), "application/json")]:
        status, answer = post(server, body, content_type)
        assert status == 200, answer
        assert answer["task"] == "binary" and answer["n_tiles"] == 12
        assert answer["probability"] == pytest.approx(probability, abs=1e-5)
        np.testing.assert_allclose(answer["attention"], attention, atol=1e-5)


def test_a_slide_is_tiled_on_the_server_with_the_models_tiling(server, model_dir, slide_file):
    status, answer = post(server, slide_file.read_bytes(), "image/tiff")
    assert status == 200, answer
    bag = tile_slide(slide_file, TilingConfig(**TILING))
    probability, attention = direct(model_dir, bag["tiles"])
    assert answer["coords"] == bag["coords"].tolist()
    assert answer["probability"] == pytest.approx(probability, abs=1e-5)
    np.testing.assert_allclose(answer["attention"], attention, atol=1e-5)


def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(server, tiles, slide_file):
    bad = {"unknown content type": (npy_body(tiles), "text/csv", 415),
           "wrong shape": (npy_body(tiles[0]), "application/x-npy", 400),
           "wrong dtype": (npy_body(tiles.astype(np.float32)), "application/x-npy", 400),
           "wrong tile size": (npy_body(tiles[:, :16, :16]), "application/x-npy", 400),
           "empty bag": (npy_body(tiles[:0]), "application/x-npy", 400),
           "empty JSON bag": (b'{"tiles": []}', "application/json", 400),
           "not .npy": (b"\x00" * 100, "application/x-npy", 400),
           "JSON without tiles": (b'{"bag": []}', "application/json", 400),
           "not a TIFF": (b"II*\x00" + bytes(100), "image/tiff", 400),
           "truncated TIFF": (slide_file.read_bytes()[:20_000], "image/tiff", 400),
           "over the size limit": (bytes(2 * 2**20), "application/x-npy", 413)}
    for problem, (body, content_type, expected) in bad.items():
        status, answer = post(server, body, content_type)
        assert (status, type(answer.get("error"))) == (expected, str), f"{problem}: {status} {answer}"
    assert post(server, npy_body(tiles))[0] == 200


@pytest.mark.slow
def test_bench_serve_8_clients_without_errors():
    figures = bench_serve(clients=8, requests=25)
    print(figures)
    assert figures["errors"] == 0 and figures["total_requests"] == 200
    assert 0 < figures["p50_ms"] <= figures["p95_ms"]
