"""`mil_nb_features` as a user runs it: a tile store in, a feature store that `BagDataset` reads out; a rerun does
nothing; a run killed part way and run again completes with the features of an uninterrupted run; a truncated bag and
a bag of 30,000 tiles (measured from its header, never decoded) are listed failures naming their files."""
import json
import shutil
import signal
import subprocess
import time
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from mil_nb.bags.data import BagDataset
from mil_nb.models.encoders import encoder_from_name, save_encoder_weights
from mil_nb.models.features import features_cli
from mil_nb.slides.panda import read_slide_table
from mil_nb.slides.tile_store import TileStore


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def store_and_weights(tmp_path_factory, small_panda):
    "The 24 small slides tiled (4 tiles of 64 px), and a saved ResNet-50 (random weights: none can be downloaded)."
    out = tmp_path_factory.mktemp("features")
    tiled = subprocess.run(["mil_nb_tile", str(small_panda), str(out/"tiles"), "--level", "1", "--tile_size", "64",
                            "--n_tiles", "4", "--workers", "1"], capture_output=True, text=True)
    assert tiled.returncode == 0, tiled.stderr
    torch.manual_seed(0)
    save_encoder_weights(encoder_from_name("resnet50-imagenet", random_weights=True), out/"resnet50.safetensors")
    return out


def features(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["mil_nb_features", *map(str, args)], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def first_run(store_and_weights):
    "`mil_nb_features` run once, uninterrupted: its result and its feature store."
    dest = store_and_weights/"run1"
    run = features(store_and_weights/"tiles", dest, "--encoder", "resnet50-imagenet", "--weights",
                   store_and_weights/"resnet50.safetensors", "--precision", "fp32")
    assert run.returncode == 0, run.stderr
    return run, dest


def test_a_feature_store_that_bagdataset_reads_and_a_rerun_that_does_nothing(store_and_weights, first_run,
                                                                              small_panda):
    (run, dest), tiles = first_run, store_and_weights/"tiles"
    weights = ["--weights", store_and_weights/"resnet50.safetensors", "--precision", "fp32"]
    assert json.loads(run.stdout) == {"bags": 24, "features": 1024, "encoder": "resnet50-imagenet", "dest": str(dest)}
    assert "tiles of 64 px are resized to the 224 px resnet50-imagenet takes" in run.stderr  # the fallback, said
    bags = BagDataset(TileStore(dest), read_slide_table(small_panda))
    assert len(bags) == 24 and bags[0].instances.shape == (4, 1024) and bags[0].instances.dtype == np.float32
    written = {p: p.stat().st_mtime_ns for p in (dest/"bags").iterdir()}
    again = features(tiles, dest, "--encoder", "resnet50-imagenet", *weights)
    assert again.returncode == 0 and {p: p.stat().st_mtime_ns for p in (dest/"bags").iterdir()} == written
    other = features(tiles, dest, "--encoder", "resnet50-imagenet", "--random_weights")
    assert other.returncode == 2 and "choose another folder" in other.stderr  # made by other weights: refused


def test_a_killed_run_completes_when_run_again(store_and_weights, first_run):
    tiles, weights = store_and_weights/"tiles", store_and_weights/"resnet50.safetensors"
    dest = store_and_weights/"killed"
    command = ["mil_nb_features", str(tiles), str(dest), "--weights", str(weights), "--precision", "fp32"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (dest/"bags").is_dir() or not any((dest/"bags").glob("*.npz")):
        assert job.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL); job.wait()
    assert not (dest/"index.csv").exists() and len(list((dest/"bags").glob("*.npz"))) < 24  # stopped part way
    rerun = features(tiles, dest, "--weights", weights, "--precision", "fp32")
    assert rerun.returncode == 0, rerun.stderr
    done, expected = TileStore(dest), TileStore(first_run[1])
    assert done.image_ids == expected.image_ids
    for image_id in expected.image_ids:
        np.testing.assert_allclose(done.load(image_id)["features"], expected.load(image_id)["features"], atol=1e-5)


def test_bad_arguments_exit_2_before_any_work(store_and_weights, tmp_path, capsys):
    "Called as the console script calls it (in this process, to spare five interpreter starts)."
    tiles = store_and_weights/"tiles"
    for args, message in [((tmp_path/"none", tmp_path/"d", "--random_weights"), "not a tile store"),
                          ((tiles, tmp_path/"d", "--encoder", "vgg", "--random_weights"), "encoder 'vgg'"),
                          ((tiles, tmp_path/"d", "--encoder", "phikon"), "give weights=PATH"),
                          ((tiles, tmp_path/"d", "--encoder", "phikon", "--weights",
                            store_and_weights/"resnet50.safetensors"), "not a phikon checkpoint"),
                          ((tiles, tmp_path/"d", "--random_weights", "--batch_size", "0"), "batch_size=0"),
                          ((tiles, tmp_path/"d", "--random_weights", "--device", "gpu7"), "device='gpu7'"),
                          ((tiles, tiles, "--random_weights"), "the source folder itself")]:
        with pytest.raises(SystemExit) as stop: features_cli([*map(str, args)])
        assert stop.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path/"d").exists()


def test_a_truncated_bag_and_a_bag_over_max_tiles_are_listed_failures(store_and_weights, tmp_path):
    tiles = tmp_path/"tiles"
    shutil.copytree(store_and_weights/"tiles", tiles)
    index = pd.read_csv(tiles/"index.csv", dtype=str, keep_default_na=False)
    index[:3].to_csv(tiles/"index.csv", index=False)  # a good bag, and the two below
    good, short, big = index.image_id[:3]
    truncated = tiles/"bags"/f"{short}.npz"
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    with zipfile.ZipFile(tiles/"bags"/f"{big}.npz", "w", zipfile.ZIP_DEFLATED) as archive:  # 30,000 tiles of zeros
        with archive.open("tiles.npy", "w", force_zip64=True) as member:
            header = {"descr": "|u1", "fortran_order": False, "shape": (30_000, 64, 64, 3)}
            np.lib.format.write_array_header_1_0(member, header)
            for _ in range(30): member.write(bytes(1000 * 64 * 64 * 3))
    assert (tiles/"bags"/f"{big}.npz").stat().st_size < 2e6  # 0.37 GB of tiles in well under 2 MB
    start = time.time()
    run = subprocess.run(["mil_nb_features", str(tiles), str(tmp_path/"dest"), "--random_weights", "--precision",
                          "fp32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]  # 1: some bags failed, listed (a traceback would be 1 too)
    assert "Traceback" not in run.stderr and time.time() - start < 120
    failures = pd.read_csv(tmp_path/"dest"/"failures.csv", dtype=str).set_index("image_id")
    assert failures.file[short] == str(truncated) and f"{truncated}: not a readable bag (BadZipFile" in run.stdout
    assert f"{big}.npz: 30,000 tiles of (64, 64, 3) uint8, over the limit of 2,048 (max_tiles)" in failures.error[big]
    assert TileStore(tmp_path/"dest").image_ids == [good]
