"`mil_nb_tile` as a user runs it: bad slides among good ones, non-TIFF slides through OpenSlide, SIGKILL and resume."
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from mil_nb.slides.readers import OpenSlideReader, open_slide, write_svs
from mil_nb.slides.synth import make_synthetic_panda, write_pyramid
from mil_nb.slides.tile_store import TileStore, tile_slides


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def panda(tmp_path_factory):
    return make_synthetic_panda(tmp_path_factory.mktemp("panda"), n_slides=16, seed=3, size=4096, progress=False)


def tile(src, dest, *options, **popen):
    return subprocess.run(["mil_nb_tile", str(src), str(dest), *options], capture_output=True, text=True, **popen)


def test_bad_slides_are_listed_and_the_good_ones_tiled(tmp_path, panda):
    src = tmp_path/"slides"
    src.mkdir()
    good = sorted((panda/"train_images").iterdir())[:3]
    for path in good: shutil.copy(path, src/path.name)
    (src/"truncated.tiff").write_bytes(good[0].read_bytes()[:20000])
    (src/"notes.tiff").write_text("this is a text file, not a slide")
    write_pyramid(src/"blank.tiff", np.full((1024, 1024, 3), 245, np.uint8))
    run = tile(src, tmp_path/"store", "--level", "1", "--workers", "2")
    assert run.returncode == 1, run.stderr
    store = TileStore(tmp_path/"store")
    assert sorted(store.image_ids) == sorted(p.stem for p in good)
    reasons = dict(zip(store.failures.image_id, store.failures.error))
    assert sorted(reasons) == ["blank", "notes", "truncated"]
    assert "no tissue detected" in reasons["blank"]
    assert "not a slide that can be read" in reasons["notes"]
    assert reasons["truncated"]  # tifffile's or OpenSlide's own words for the damage
    assert "3 of 6 slides could not be tiled" in run.stdout
    summary = json.loads((tmp_path/"store"/"summary.json").read_text())
    assert (summary["tiled"], summary["failed"]) == (3, 3)


def test_svs_slides_go_through_openslide(tmp_path, panda):
    src = tmp_path/"svs"
    src.mkdir()
    for path in sorted((panda/"train_images").iterdir())[:2]:
        with open_slide(path) as reader: write_svs(src/f"{path.stem}.svs", reader.read_level(1), mpp=2.0)
        assert isinstance(open_slide(src/f"{path.stem}.svs"), OpenSlideReader)
    run = tile(src, tmp_path / "store", "--mode", "tissue", "--mpp", "4.0", "--tile_size", "64", "--n_tiles", "0",
               "--workers", "1")
    assert run.returncode == 0, run.stderr
    store = TileStore(tmp_path/"store")
    assert len(store.image_ids) == 2
    bag = store.load(store.image_ids[0])
    assert bag["tiles"].shape[1:] == (64, 64, 3) and len(bag["tiles"]) > 4
    assert int(bag["level"]) == 0  # 4 um/px: read at level 0 (2 um/px; level 1 is 8 um/px) and resampled
    assert (bag["coords"] % 128 == 0).all()  # a 64 px tile at 4 um/px covers 128 px of level 0


def _bags(store):
    return {p.name: dict(np.load(p)) for p in sorted((store/"bags").glob("*.npz"))}


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, panda):
    options = ["--mode", "tissue", "--level", "1", "--png", "--workers", "2"]
    assert tile(panda, tmp_path/"whole", *options).returncode == 0
    killed = subprocess.Popen(["mil_nb_tile", str(panda), str(tmp_path/"killed"), *options],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    bags_dir, deadline = tmp_path/"killed"/"bags", time.time() + 60
    while time.time() < deadline:
        done = list(bags_dir.glob("*.npz")) if bags_dir.exists() else []
        for path in done: np.load(path)["tiles"]  # any bag that is visible is complete
        if len(done) >= 4: break
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    n_done = len(list(bags_dir.glob("*.npz")))
    assert 4 <= n_done < 16, f"{n_done} bags when killed: the run was not interrupted mid-way"
    assert not (tmp_path/"killed"/"index.csv").exists()
    for path in bags_dir.glob("*.npz"): np.load(path)["tiles"]
    rerun = tile(panda, tmp_path/"killed", *options)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((tmp_path/"killed"/"summary.json").read_text())["already_tiled"] >= n_done
    whole, resumed = _bags(tmp_path/"whole"), _bags(tmp_path/"killed")
    assert whole.keys() == resumed.keys() and len(whole) == 16
    for name in whole:
        assert whole[name].keys() == resumed[name].keys()
        for key in whole[name]: np.testing.assert_array_equal(whole[name][key], resumed[name][key])
    for name in ("index.csv", "failures.csv", "meta.json"):
        assert (tmp_path/"whole"/name).read_text() == (tmp_path/"killed"/name).read_text()
    pngs = lambda d: {p.name: p.read_bytes() for p in (d/"png").iterdir()}
    assert pngs(tmp_path/"whole") == pngs(tmp_path/"killed")
    assert not list((tmp_path/"killed").rglob("*.part"))


@pytest.mark.slow
def test_tissue_mode_gives_every_embedded_slide_its_tiles(tmp_path, embedded_cache, monkeypatch):
    monkeypatch.setenv("MIL_NB_CACHE", str(embedded_cache))
    from mil_nb.slides.synth import embedded_dataset
    store = tile_slides(embedded_dataset(), tmp_path/"store", mode="tissue", n_tiles=16, level=1, num_workers=2)
    assert len(store.failures) == 0 and len(store.image_ids) == 192
    for image_id in store.image_ids:
        bag = store.load(image_id)
        assert len(bag["tiles"]) == 16 and (bag["tissue_fraction"] >= 0.1).all(), image_id
