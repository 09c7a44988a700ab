"""A training run killed with SIGKILL in the middle of an epoch, then resumed, ends exactly where an
uninterrupted run with the same seed ends (CPU, fp32: to 1e-6)."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

RUN = """
import sys
from mil_nb.bags.data import bag_loader
from mil_nb.core.devices import set_seed
from mil_nb.train.mnist_bags import mnist_bags, mnist_digits, split_digits
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.train.training import FitConfig, fit
train_digits, test_digits = split_digits(*mnist_digits())
set_seed(0)
model = AttentionMIL(MILConfig(encoder="mnist", tile_size=28, channels=1, embed_dim=500))
fit(model, bag_loader(mnist_bags(*train_digits, 200), 8, shuffle=True, seed=0),
    bag_loader(mnist_bags(*test_digits, 50, seed=1), 50), FitConfig(epochs=3, lr=5e-4, device="cpu", precision="fp32"),
    output_dir=sys.argv[1], resume=sys.argv[2] == "resume", progress=False)
"""


def train(output_dir: Path, mode: str = "fresh") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(output_dir), mode], stderr=subprocess.PIPE, text=True)


def epochs_done(output_dir: Path) -> int:
    history = output_dir/"history.csv"
    return len(pd.read_csv(history)) if history.exists() else 0


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_equals_uninterrupted(tmp_path):
    complete, killed = tmp_path/"complete", tmp_path/"killed"
    assert train(complete).wait() == 0

    run = train(killed)
    while epochs_done(killed) < 1:  # wait for the first checkpoint, then kill it a moment into the second epoch
        assert run.poll() is None, run.stderr.read()
        time.sleep(0.05)
    time.sleep(0.3)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert epochs_done(killed) < 3 and not (killed/"metrics.json").exists(), "the run finished before it was killed"

    resumed = train(killed, "resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    expected, got = (json.loads((d/"metrics.json").read_text()) for d in (complete, killed))
    for key in ("val_loss", "val_auc", "val_accuracy", "val_instance_auc"):
        assert abs(expected[key] - got[key]) < 1e-6, (key, expected[key], got[key])
    assert expected["kept_epoch"] == got["kept_epoch"]
    a, b = (torch.load(d/"model.pt", weights_only=True)["state_dict"] for d in (complete, killed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    pd.testing.assert_frame_equal(pd.read_csv(complete / "history.csv").drop(columns=["train_bags_per_s", "seconds"]),
                                  pd.read_csv(killed / "history.csv").drop(columns=["train_bags_per_s", "seconds"]),
                                  atol=1e-6)
