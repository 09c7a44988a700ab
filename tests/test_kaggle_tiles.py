"""Kaggle tiling's fast path (a level that fits one strip read whole, no copy for zero padding, uint32 ranking) gives
the tiles of the rule as the Kaggle notebook wrote it, in its order, on slides like the tile benchmark's
(`embedded_dataset(seed=1, masks=False)`), whole and in strips."""
import numpy as np
import pytest

from mil_nb.slides.readers import open_slide
from mil_nb.slides.synth import make_synthetic_panda
from mil_nb.slides.tile_store import slide_sources
from mil_nb.slides.tiling import TilingConfig, _kaggle_selection, tile_slide


def kaggle_rule(img, sz=128, n=16):
    "The Kaggle notebook's rule, transcribed: pad to whole tiles with white, the n tiles of least pixel sum."
    pad0, pad1 = (sz - img.shape[0] % sz) % sz, (sz - img.shape[1] % sz) % sz
    img = np.pad(img, [[pad0 // 2, pad0 - pad0 // 2], [pad1 // 2, pad1 - pad1 // 2], [0, 0]], constant_values=255)
    img = img.reshape(img.shape[0] // sz, sz, img.shape[1] // sz, sz, 3).transpose(0, 2, 1, 3, 4).reshape(-1, sz, sz, 3)
    if len(img) < n: img = np.pad(img, [[0, n - len(img)], [0, 0], [0, 0], [0, 0]], constant_values=255)
    return img[np.argsort(img.reshape(img.shape[0], -1).sum(-1), kind="stable")[:n]]


@pytest.fixture(scope="module")
def bench_like_slides(tmp_path_factory):
    src = make_synthetic_panda(tmp_path_factory.mktemp("slides"), n_slides=3, seed=1, size=8192, masks=False,
                               progress=False)
    return list(slide_sources(src).image_file)


@pytest.mark.parametrize("level,tile_size", [(1, 128), (1, 96), (2, 128)])
def test_kaggle_tiles_are_the_rules(bench_like_slides, level, tile_size):
    config = TilingConfig(level=level, tile_size=tile_size)
    for image_file in bench_like_slides:
        bag = tile_slide(image_file, config)
        with open_slide(image_file) as reader:
            whole = reader.read_level(level)
            strips = _kaggle_selection(reader, level, config, strip_pixels=3 * tile_size * whole.shape[1])
        np.testing.assert_array_equal(bag["tiles"], kaggle_rule(whole, tile_size))  # 4096 px: one strip, read whole
        np.testing.assert_array_equal(strips[0], bag["tiles"])  # in strips of 3 tile rows: the same tiles, in order
        np.testing.assert_array_equal(strips[1], bag["coords"])
