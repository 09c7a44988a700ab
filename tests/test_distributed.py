"""Data-parallel training under torchrun is exact: 2 gloo ranks with batch b train like one process with batch 2b;
with compressed gradients (on by default across machines), nearly so."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mil_nb.core.net import free_port

from mil_nb.bags.data import bag_loader
from mil_nb.evaluate.evaluation import predict, task_metrics
from mil_nb.models.saving import load_model

sys.path.insert(0, str(Path(__file__).parent))
from ddp_fit import toy_bags, toy_model, train  # noqa: E402


def max_difference(a, b) -> float:
    return max((a.state_dict()[k] - b.state_dict()[k]).abs().max().item() for k in a.state_dict())


@pytest.fixture(scope="session")  # one per test process (xdist: per worker)
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


def test_across_two_machines_gradients_go_in_fp16_and_train_nearly_alike(tmp_path):
    "Two torchrun agents of one process each (two 'machines'): auto compression all-reduces in fp16 on gloo."
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=two-machines",
                                str(Path(__file__).parent/"ddp_fit.py"), str(tmp_path), "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=300) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], [err[-3000:] for _, err in outputs]
    saved = json.loads((tmp_path/"metrics.json").read_text())
    assert (saved["world_size"], saved["gradient_compression"]) == (2, "fp16")
    model, _, _ = train(batch_size=8)
    weights = [torch.cat([v.flatten() for v in m.state_dict().values()])
               for m in (model, load_model(tmp_path/"model.pt"), toy_model())]
    relative = ((weights[1] - weights[0]).norm() / (weights[0] - weights[2]).norm()).item()
    print(f"fp16-compressed gradients, 2 machines x 1 process: weights {relative:.2%} of training's step away from "
          "1 process's (L2)")
    assert 0 < relative < 0.05  # rounded gradients: not exact, but close
