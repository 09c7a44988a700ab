"""Feature bags end to end on the embedded tile store: `extract_features` with a small CNN, then attention MIL on
the 16 x D feature bags (an identity encoder), through the same BagDataset -> collate_bags -> model path."""
import json
import sys

import pytest
from torch import nn

from mil_nb.data import BagDataset, bag_loader, split_slides
from mil_nb.devices import set_seed
from mil_nb.features import extract_features
from mil_nb.model import AttentionMIL, MILConfig, load_model
from mil_nb.panda import read_slide_table
from mil_nb.tiling import TileStore
from mil_nb.training import fit


@pytest.mark.slow
def test_feature_bags_on_the_embedded_tile_store(tmp_path, main_job):
    tiles = TileStore(main_job/"tiles")
    set_seed(0)
    small_cnn = nn.Sequential(nn.Conv2d(3, 32, 5, stride=2), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1))
    features = extract_features(small_cnn, tiles, tmp_path/"features", progress=False)
    assert features.image_ids == tiles.image_ids and features.meta["features"] == 64

    table = read_slide_table(tiles.meta["src"])
    train, valid = split_slides(table, 0.25, seed=0)
    model = AttentionMIL(MILConfig(encoder="identity", embed_dim=64, attention_dim=32))
    history = fit(model, bag_loader(BagDataset(features, train), 8, shuffle=True), bag_loader(BagDataset(features, valid), 16),
                  epochs=20, lr=1e-3, output_dir=tmp_path/"run", progress=False)
    metrics = json.loads((tmp_path/"run"/"metrics.json").read_text())
    print(json.dumps({k: metrics[k] for k in ("val_auc", "val_accuracy", "kept_epoch", "train_seconds")}), file=sys.stderr)
    assert history.train_loss.iloc[-1] < history.train_loss.iloc[0]
    assert metrics["train_seconds"] < 60
    assert load_model(tmp_path/"run"/"model.pt").config.encoder == "identity"
