"The `mil_nb_synth` console script writes slides that OpenSlide opens as 3-level pyramids."
import subprocess

import openslide
import pandas as pd


def test_mil_nb_synth_output_opens_in_openslide(tmp_path):
    subprocess.run(
        ["mil_nb_synth", str(tmp_path / "data"), "--n_slides", "3", "--seed", "1", "--size", "2048"], check=True
    )
    table = pd.read_csv(tmp_path/"data"/"train.csv")
    assert len(table) == 3
    for image_id in table.image_id:
        for path in (
            tmp_path / "data" / "train_images" / f"{image_id}.tiff",
            tmp_path / "data" / "train_label_masks" / f"{image_id}_mask.tiff",
        ):
            with openslide.OpenSlide(path) as slide:
                assert slide.level_count == 3
                assert slide.level_downsamples == (1.0, 4.0, 16.0)
                assert slide.level_dimensions == ((2048, 2048), (512, 512), (128, 128))
                region = slide.read_region((0, 0), 2, (128, 128))
                assert region.size == (128, 128)
