"""A new task is one `Task` in one place: registered here, it is learnt by `fit` through `BagDataset` and
`bag_loader`, predicted, scored and served by name, with no edit anywhere else."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics

from mil_nb.bags.data import BagDataset, bag_loader
from mil_nb.bags.splits import split_slides
from mil_nb.evaluate.evaluation import predict, task_metrics
from mil_nb.serve.inference import ServedModel, predict_bag
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.models.saving import load_model
from mil_nb.slides.panda import read_slide_table
from mil_nb.bags.tasks import TASKS, Task, register_task
from mil_nb.slides.tile_store import tile_slides
from mil_nb.train.training import FitConfig, fit


def provider_metrics(targets: np.ndarray, logits: np.ndarray) -> dict:
    "Loss and accuracy of two-class logits."
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets).long()).item()
    return {"loss": loss, "accuracy": metrics.accuracy_score(targets, logits.argmax(1)), "n": len(targets)}


PROVIDER = Task(
    "provider", n_outputs=2, label=lambda row: float(row["data_provider"] == "radboud"),
    loss=lambda logits, targets: F.cross_entropy(logits.float(), targets.long()), metrics=provider_metrics,
    monitor="accuracy", answer=lambda logits: {"provider": ["karolinska", "radboud"][int(np.argmax(logits))]},
    positive_probability=lambda logits: torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy(),
    is_positive=lambda targets: targets > 0)


@pytest.fixture
def provider_task():
    register_task(PROVIDER)
    yield PROVIDER
    del TASKS["provider"]


def test_a_new_task_is_one_entry(provider_task, small_panda, tmp_path):
    store = tile_slides(small_panda, tmp_path/"tiles", n_tiles=4, tile_size=32, num_workers=1, progress=False)
    train, valid = split_slides(read_slide_table(small_panda), 0.25, seed=0)
    train_bags, valid_bags = BagDataset(store, train, "provider"), BagDataset(store, valid, "provider")
    np.testing.assert_array_equal(train_bags.labels, (train.data_provider == "radboud").to_numpy(np.float32))
    model = AttentionMIL(MILConfig(tile_size=32, embed_dim=32, attention_dim=16, task="provider"))
    result = fit(model, bag_loader(train_bags, 4, shuffle=True), bag_loader(valid_bags, 6),
                 FitConfig(epochs=2, lr=1e-3, precision="fp32"), output_dir=tmp_path/"run", progress=False,
                 tiling=store.tiling)
    assert result.metrics["monitor"] == "accuracy" and 0 <= result.metrics["val_accuracy"] <= 1
    assert result.predictions.logits.shape == (len(valid_bags), 2)
    assert task_metrics(predict(model, bag_loader(valid_bags, 6))) == pytest.approx(
        task_metrics(result.predictions), abs=1e-6)
    served = ServedModel(load_model(tmp_path/"run"/"model.pt"), store.tiling, torch.device("cpu"), "fp32")
    answer = predict_bag(served, valid_bags[0])
    assert answer["task"] == "provider" and answer["provider"] in ("karolinska", "radboud")
