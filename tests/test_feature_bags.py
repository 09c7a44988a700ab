"""Feature bags end to end on the embedded tile store: `extract_features` with a small CNN (the main job's trained
tile encoder, frozen), then attention MIL on the 16 x 512 feature bags (an identity encoder), through the same
BagDataset -> collate_bags -> model path."""
import json
import sys

import pytest

from mil_nb.bags.data import BagDataset, bag_loader
from mil_nb.bags.splits import split_slides
from mil_nb.models.features import extract_features
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.models.saving import load_model
from mil_nb.slides.panda import read_slide_table
from mil_nb.slides.tile_store import TileStore
from mil_nb.train.training import FitConfig, fit


@pytest.mark.slow
def test_feature_bags_on_the_embedded_tile_store(tmp_path, main_job):
    tiles = TileStore(main_job/"tiles")
    encoder = load_model(main_job/"model.pt").encoder  # uint8 tiles (n, S, S, 3) in, as every tile encoder
    features = extract_features(encoder, tiles, tmp_path/"features", progress=False)
    assert features.image_ids == tiles.image_ids and features.meta["features"] == 512

    table = read_slide_table(tiles.meta["src"])
    train, valid = split_slides(table, 0.25, seed=0)
    model = AttentionMIL(MILConfig(encoder="identity", embed_dim=512))
    history = fit(model, bag_loader(BagDataset(features, train), 8, shuffle=True),
                  bag_loader(BagDataset(features, valid), 16), FitConfig(epochs=20, lr=1e-3), output_dir=tmp_path/"run",
                  progress=False).history
    metrics = json.loads((tmp_path/"run"/"metrics.json").read_text())
    print(
        json.dumps({k: metrics[k] for k in ("val_auc", "val_accuracy", "kept_epoch", "train_seconds")}), file=sys.stderr
    )
    assert history.train_loss.iloc[-1] < history.train_loss.iloc[0]
    # attention alone, on frozen features, in seconds
    assert metrics["val_auc"] >= 0.9 and metrics["train_seconds"] < 60
    assert load_model(tmp_path/"run"/"model.pt").config.encoder == "identity"
