"""`mil_nb_tile` on hostile input: decompression bombs, unsafe image ids, odd file names and encodings, grey and RGBA
pyramids, slides smaller than a tile; and a killed run leaves no worker behind."""
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import tifffile
from PIL import Image

from mil_nb.slides.readers import TiffReader, open_slide, write_bomb, write_wide_tiff
from mil_nb.slides.synth import make_synthetic_panda
from mil_nb.slides.tile_store import TileStore
from mil_nb.slides.tiling import TilingConfig, _malignant_fraction


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def panda(tmp_path_factory):
    return make_synthetic_panda(tmp_path_factory.mktemp("panda"), n_slides=4, seed=7, size=2048, progress=False)


def tile(src, dest, *options, **popen):
    return subprocess.run(["mil_nb_tile", str(src), str(dest), *options], capture_output=True, text=True, **popen)


def slides_folder(folder: Path, panda: Path, n: int = 2) -> list[str]:
    "A folder of `n` good slides; their ids."
    folder.mkdir()
    good = sorted((panda/"train_images").iterdir())[:n]
    for path in good: shutil.copy(path, folder/path.name)
    return [p.stem for p in good]


def test_a_bomb_is_one_failure_and_is_never_decoded(tmp_path, panda):
    good = slides_folder(tmp_path/"src", panda)
    write_bomb(tmp_path/"src"/"bomb.tiff")  # 70,000 px, 4 levels: 14.7 GB at level 0, 3.7 GB at level 1
    assert (tmp_path/"src"/"bomb.tiff").stat().st_size < 3e6
    measured = ("import resource, subprocess, sys; run = subprocess.run(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(run.returncode)")
    command = ["mil_nb_tile", str(tmp_path/"src"), str(tmp_path/"store"), "--level", "1", "--workers", "1"]
    run = subprocess.run([sys.executable, "-c", measured, *command], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    peak_mb = int(run.stdout.split()[-1]) / 1024
    assert peak_mb < 1000, f"peak RSS {peak_mb:.0f} MB"  # before: 7.6 GB
    store = TileStore(tmp_path/"store")
    assert sorted(store.image_ids) == sorted(good)
    (error,) = store.failures.error[store.failures.image_id == "bomb"]
    assert "the coarsest level (3: 8750 x 8750 px)" in error
    assert "over the limit of 67,108,864 px (thumbnail_pixels" in error
    assert "MIL_NB_MAX_THUMBNAIL_PIXELS" in error and "--max_thumbnail_pixels" in error
    strict = tile(tmp_path/"src", tmp_path/"strict", "--level", "1", "--workers", "1", "--max_slide_pixels", "1e9")
    assert strict.returncode == 1 and "over the limit of 1,000,000,000 px (slide_pixels" in strict.stdout



def test_a_wide_sample_tiff_is_refused_from_its_header_by_every_reader(tmp_path):
    "16 float64 samples a px, levels of 8192 and 4096 px (8.6 and 2.1 GB decoded): within a px budget, not a byte one."
    wide = tmp_path/"wide.tiff"
    write_wide_tiff(wide, sides=(8192, 4096), samples=16, dtype=np.float64)
    assert wide.stat().st_size < 1e6
    rss = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        for backend in ("auto", "tifffile", "openslide"):
            start = time.perf_counter()
            with pytest.raises(ValueError, match="level 0 .*has 16 samples per pixel") as refused:
                open_slide(wide, backend=backend)
            assert time.perf_counter() - start < 1, backend
            assert str(wide) in str(refused.value) and "64-bit float64 samples" in str(refused.value), backend
        with pytest.raises(ValueError, match=f"{wide}: level 0 has 16 samples per pixel"): TiffReader(wide)
        with pytest.raises(ValueError, match=f"{wide}: level 0 has 16 samples per pixel"):  # as a label mask
            _malignant_fraction(wide, "radboud", 1, 64, np.zeros((1, 2)), TilingConfig(tile_size=64), None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"peak {peak / 1e6:.0f} MB traced"
    assert psutil.Process().memory_info().rss - rss < 300e6

def test_unsafe_image_ids_are_listed_and_nothing_is_written_outside_dest(tmp_path, panda):
    src = tmp_path/"panda"
    shutil.copytree(panda, src)
    table = pd.read_csv(src/"train.csv", dtype={"image_id": str})
    unsafe = ["../x", "/abs/x", "a/b", f"{tmp_path}/outside", "../../outside_src/escaped"]
    for image_id in unsafe:  # each with a slide where the joined path points, so only the id check stops it
        target = src/"train_images"/f"{image_id}.tiff"
        if not image_id.startswith("/"):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src/"train_images"/f"{table.image_id[0]}.tiff", target)
    rows = pd.DataFrame({"image_id": unsafe, "data_provider": "radboud", "isup_grade": 0, "gleason_score": "0+0"})
    pd.concat([table, rows]).to_csv(src/"train.csv", index=False)
    before = {p for p in tmp_path.rglob("*")}
    run = tile(src, tmp_path/"dest", "--level", "1", "--png", "--workers", "2")
    assert run.returncode == 1, run.stderr  # 1: some slides failed (2 would be a usage error)
    store = TileStore(tmp_path/"dest")
    assert sorted(store.image_ids) == sorted(table.image_id)
    errors = dict(zip(store.failures.image_id, store.failures.error))
    assert sorted(errors) == sorted(unsafe)
    for image_id in unsafe: assert f"image_id {image_id!r} holds a path separator" in errors[image_id]
    written = {p for p in tmp_path.rglob("*")} - before
    assert all(p == tmp_path/"dest" or tmp_path/"dest" in p.parents for p in written), sorted(written)
    assert not Path("/abs/x.npz").exists() and not (tmp_path/"outside.npz").exists()
    assert len(list((tmp_path/"dest"/"png").iterdir())) == 16 * len(table)


def test_a_file_name_that_is_not_utf8_is_one_failure(tmp_path, panda):
    good = slides_folder(tmp_path/"src", panda)
    odd = os.fsencode(tmp_path/"src") + b"/caf\xe9.tiff"
    shutil.copy(tmp_path/"src"/f"{good[0]}.tiff", odd)
    run = tile(tmp_path/"src", tmp_path/"store", "--level", "1", "--workers", "1")
    assert run.returncode == 1, run.stderr
    store = TileStore(tmp_path/"store")
    assert sorted(store.image_ids) == sorted(good)
    assert list(store.failures.image_id) == ["caf\\xe9"]
    assert "image_id 'caf\\\\xe9' is not valid UTF-8" in store.failures.error[0]
    assert store.failures.file[0].endswith("caf\\xe9.tiff")


def test_a_train_csv_that_is_not_utf8_is_named(tmp_path):
    (tmp_path/"src").mkdir()
    (tmp_path/"src"/"train.csv").write_bytes("image_id,isup_grade\nabc,1\ncaf\u00e9,2\n".encode("latin-1"))
    run = tile(tmp_path/"src", tmp_path/"store", "--level", "1")
    assert run.returncode == 2
    assert f"{tmp_path/'src'/'train.csv'}: not UTF-8 text: byte 29 (line 3) is b'\\xe9'" in run.stderr


def test_grey_and_rgba_pyramids_are_tiled_and_a_tiny_slide_is_listed(tmp_path, panda):
    (tmp_path/"src").mkdir()
    original = sorted((panda/"train_images").iterdir())[0]
    shutil.copy(original, tmp_path/"src"/"rgb.tiff")
    with open_slide(original) as reader: levels = [reader.read_level(level) for level in range(3)]
    glass = [(im.min(-1) > 230)[..., None] for im in levels]
    formats = {"grey": ([np.asarray(Image.fromarray(im).convert("L")) for im in levels], "minisblack", None),
               "rgba": ([np.dstack([np.where(g, 0, im), np.where(g, 0, 255)]).astype(np.uint8)
                         for im, g in zip(levels, glass)], "rgb", ["unassalpha"])}
    for name, (images, photometric, extrasamples) in formats.items():
        with tifffile.TiffWriter(tmp_path/"src"/f"{name}.tiff") as tif:
            for level, im in enumerate(images):
                tif.write(im, photometric=photometric, tile=(256, 256), compression="zlib",
                          subfiletype=1 if level else 0, extrasamples=extrasamples, maxworkers=1)
    tifffile.imwrite(tmp_path/"src"/"tiny.tiff", np.full((5, 5, 3), 120, np.uint8), photometric="rgb", tile=(16, 16))
    for mode in ("kaggle", "tissue"):
        run = tile(tmp_path/"src", tmp_path/mode, "--mode", mode, "--level", "1", "--workers", "1")
        assert run.returncode == 1, run.stderr
        store = TileStore(tmp_path/mode)
        assert sorted(store.image_ids) == ["grey", "rgb", "rgba"]
        assert list(store.failures.image_id) == ["tiny"]
        assert "tiny.tiff: has 1 pyramid level(s); level 1 was asked for" in store.failures.error[0]
        rgb = store.load("rgb")
        for name in ("grey", "rgba"):  # tissue is found as on the colour slide
            bag = store.load(name)
            assert len(bag["tiles"]) >= 0.75 * len(rgb["tiles"]), (mode, name)
            assert abs(bag["tissue_fraction"].mean() - rgb["tissue_fraction"].mean()) < 0.1, (mode, name)
        assert (store.load("rgba")["tiles"].max(-1) > 0).all()  # transparent glass is white, never black
    run = tile(tmp_path/"src", tmp_path/"level0", "--level", "0", "--workers", "1")
    assert "level 0 is 5 x 5 px, smaller than one 128 px tile" in TileStore(tmp_path/"level0").failures.error[0]


def _children(pid: int) -> set[int]:
    "The child processes of `pid`, from /proc."
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try: found |= {int(c) for c in (task/"children").read_text().split()}
        except OSError: pass
    return found


def _alive(pid: int) -> bool:
    try: return (Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]) != "Z"
    except OSError: return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with their parent on Linux")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_mil_nb_tile_kills_its_workers(tmp_path, sig):
    (tmp_path/"src").mkdir()
    for name in ("a", "b", "c"): write_bomb(tmp_path/"src"/f"{name}.tiff", side=40_000)  # within budget: slow to tile
    command = ["mil_nb_tile", str(tmp_path/"src"), str(tmp_path/"store"), "--level", "0", "--workers", "2"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while len(workers := _children(run.pid)) < 2 and time.time() < deadline: time.sleep(0.05)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(1)  # they are decoding slides now
        assert run.poll() is None and all(map(_alive, workers))
        os.kill(run.pid, sig)
        run.wait()
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline: time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived mil_nb_tile"
    finally:
        if run.poll() is None: run.kill()
        for pid in _children(run.pid) | {p for p in locals().get("workers", ()) if _alive(p)}:
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
