"Shared fixtures: a small synthetic PANDA-format data set, made once per test session."
import pytest

from mil_nb.synth import make_synthetic_panda


@pytest.fixture(scope="session")
def small_panda(tmp_path_factory):
    "24 synthetic slides (level 0: 1024 px), enough for a 2-epoch run of the main job."
    return make_synthetic_panda(tmp_path_factory.mktemp("panda"), n_slides=24, seed=0, size=1024, progress=False)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    "A cache folder (MIL_NB_CACHE) shared by the slow tests, so the embedded data set is made once per run."
    return tmp_path_factory.mktemp("cache")
