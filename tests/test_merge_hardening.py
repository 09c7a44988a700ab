"""`mil_nb_launch predict --merge DIR` reads the shards in DIR as `mil_nb_predict` reads its own inputs: a shard file
that is a link, an unsafe or formula image_id, a missing value, an extra column, a summary without its keys, an
oversized GeoJSON: each is exit 2 naming the file, before anything is written; a huge file that names no scored
slide is never read. Called in this process as the console script calls it, but for two runs of the real command."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mil_nb.score.cohort import cohort_sources, predict_cohort
from mil_nb.core.devices import set_seed
from mil_nb.cloud.launch_commands import launch_cli
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.models.saving import save_model
from mil_nb.slides.synth import make_synthetic_panda
from mil_nb.slides.tiling import TilingConfig

GIB3 = 3 * 2**30


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
def shards(tmp_path_factory) -> Path:
    "Two shards of two slides each, as the Processing job's instances write them (algo-1/, algo-2/)."
    root = tmp_path_factory.mktemp("merge")
    panda = make_synthetic_panda(root/"panda", n_slides=4, seed=0, size=1024, progress=False)
    set_seed(0); (root/"model").mkdir()
    save_model(AttentionMIL(MILConfig()), root/"model"/"model.pt", TilingConfig(level=1))
    table = cohort_sources(panda)
    for k, part in enumerate([table[:2], table[2:]]):
        part[["image_id", "path", "isup_grade"]].to_csv(root/f"part{k}.csv", index=False)
        predict_cohort([root/"model"], root/f"part{k}.csv", root/"shards"/f"algo-{k + 1}", num_workers=0,
                       heatmaps=False, n_bootstrap=0, progress=False)
    return root/"shards"


def copy_of(shards: Path, tmp_path: Path) -> Path:
    shutil.copytree(shards, tmp_path/"dir")
    return tmp_path/"dir"


def edited(part: Path, column: str, value: str):
    "predictions.csv of `part` with `value` in `column` (a new column if it has none) of its first row."
    table = pd.read_csv(part/"predictions.csv", dtype=str, keep_default_na=False)
    table.loc[0, column] = value
    table.to_csv(part/"predictions.csv", index=False)


def linked(path: Path, target: Path):
    "`path` made a link to `target`, a copy of it outside the shards."
    shutil.copytree(path, target) if path.is_dir() else shutil.copy(path, target)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(target)


def sparse(path: Path, size: int = GIB3):
    "A file of `size` bytes that takes no disk."
    with open(path, "wb") as f: f.truncate(size)


def scored(part: Path) -> str:
    return pd.read_csv(part/"predictions.csv", dtype=str).image_id[0]


def outside(name: str):
    "The change: algo-2's `name` made a link to a copy of it outside the shards."
    return lambda part, out: linked(part/name, out/name)


CASES = {  # the change made to algo-2, and what the error says
    "predictions.csv links outside": (outside("predictions.csv"), "algo-2/predictions.csv: a link"),
    "meta.json links outside": (outside("meta.json"), "algo-2/meta.json: a link"),
    "failures.csv links outside": (outside("failures.csv"), "algo-2/failures.csv: a link"),
    "geojson/ links outside": (outside("geojson"), "algo-2/geojson/"),
    "a path as image_id": (lambda p, out: edited(p, "image_id", "../../etc/passwd"),
                           "algo-2/predictions.csv: row 2: image_id '../../etc/passwd' holds a path separator"),
    "a formula as image_id": (lambda p, out: edited(p, "image_id", '=HYPERLINK("http://x.example","y")'),
                              "algo-2/predictions.csv: row 2: image_id '=HYPERLINK"),
    "a NUL in an image_id": (lambda p, out: edited(p, "image_id", "a\0b"),
                             "algo-2/predictions.csv: row 2: image_id 'a\\x00b' holds a control character"),
    "no probability": (lambda p, out: edited(p, "probability", ""), "row 2: probability is ''; expected a number"),
    "no logit": (lambda p, out: edited(p, "logit", ""), "row 2: logit is ''; expected a number"),
    "an extra column": (lambda p, out: edited(p, "extra", "1"), "algo-2/predictions.csv: columns"),
    "summary.json {}": (lambda p, out: (p/"summary.json").write_text("{}"), "algo-2/summary.json: no 'slides' key"),
    "a 3 GiB geojson of a scored slide": (lambda p, out: sparse(p/"geojson"/f"{scored(p)}.geojson"),
                                          ".geojson: 3,221,225,472 bytes, over the limit"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_shard_is_exit_2_naming_its_file(shards, tmp_path, capsys, case):
    change, named = CASES[case]
    folder = copy_of(shards, tmp_path)
    (tmp_path/"outside").mkdir()
    change(folder/"algo-2", tmp_path/"outside")
    with pytest.raises(SystemExit) as stop: launch_cli(["predict", "--merge", str(folder)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and named in error, error
    assert str(folder/"algo-2") in error  # the file, with its path
    assert not (folder/"predictions.csv").exists() and not (folder/"geojson").exists()  # nothing written


def test_the_command_refuses_a_linked_shard_file(shards, tmp_path):
    folder = copy_of(shards, tmp_path)
    (tmp_path/"outside").mkdir()
    linked(folder/"algo-1"/"predictions.csv", tmp_path/"outside"/"predictions.csv")
    run = subprocess.run(["mil_nb_launch", "predict", "--merge", str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"{folder/'algo-1'/'predictions.csv'}: a link, or inside one" in run.stderr
    assert "Traceback" not in run.stderr and not (folder/"predictions.csv").exists()


PEAK_OF = """import os, subprocess, sys
job = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(job.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)"""  # a small parent: a child's peak counts its parent's at exec


def test_a_3gib_geojson_of_no_scored_slide_is_not_read(shards, tmp_path):
    "The real command, its own peak memory from the kernel (wait4): the file is skipped, never read nor copied."
    folder = copy_of(shards, tmp_path)
    sparse(folder/"algo-2"/"geojson"/"not_scored.geojson")
    with open(tmp_path/"err", "w") as err:
        run = subprocess.run([sys.executable, "-c", PEAK_OF, "mil_nb_launch", "predict", "--merge", str(folder)],
                             stdout=subprocess.PIPE, stderr=err, text=True, timeout=300)
    returncode, peak_kib = map(int, run.stdout.split()[-2:])
    assert returncode == 0, (tmp_path/"err").read_text()[-2000:]
    assert peak_kib < 1_000_000, f"peak {peak_kib / 1e6:.1f} GB"  # the file alone is 3.2 GB
    copied = sorted(p.name for p in (folder/"geojson").iterdir())
    assert "not_scored.geojson" not in copied and len(copied) == 4
    assert len(pd.read_csv(folder/"predictions.csv")) == 4
