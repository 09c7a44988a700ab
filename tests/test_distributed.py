"Data-parallel training under torchrun is exact: 2 gloo ranks with batch b train like one process with batch 2b."
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mil_nb.data import bag_loader
from mil_nb.evaluation import predict, task_metrics
from mil_nb.model import load_model

sys.path.insert(0, str(Path(__file__).parent))
from ddp_fit import toy_bags, toy_model, train  # noqa: E402


def max_difference(a, b) -> float:
    return max((a.state_dict()[k] - b.state_dict()[k]).abs().max().item() for k in a.state_dict())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    "tests/ddp_fit.py under torchrun, 2 ranks with 4 bags each per step: its output folder."
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).parent/"ddp_fit.py"), str(out), "4"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_two_ranks_train_like_one_process_with_twice_the_batch(two_ranks):
    model, history, _ = train(batch_size=8)
    ddp_model = load_model(two_ranks/"model.pt")
    assert max_difference(model, toy_model()) > 1e-3  # training moved the weights
    assert max_difference(model, ddp_model) < 1e-5
    saved = json.loads((two_ranks/"metrics.json").read_text())
    assert (saved["world_size"], saved["batch_size"], saved["n_train"]) == (2, 4, 32)
    assert abs(saved["val_loss"] - history.val_loss.iloc[-1]) < 1e-5


def test_gathered_validation_metrics_equal_one_process_metrics(two_ranks):
    "Each rank predicted its share of the 13 validation bags; the metrics from the gathered predictions are exact."
    one_process = task_metrics(predict(load_model(two_ranks/"model.pt"), bag_loader(toy_bags(13, 1), 4)))
    for rank in (0, 1):
        gathered = json.loads((two_ranks/f"metrics.rank{rank}.json").read_text())
        assert gathered["world_size"] == 2 and gathered["n"] == 13
        assert {k: gathered[k] for k in one_process if k != "loss"} == {
            k: v for k, v in one_process.items() if k != "loss"
        }
        assert abs(gathered["loss"] - one_process["loss"]) < 1e-6
