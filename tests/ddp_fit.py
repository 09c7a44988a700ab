"""Run under torchrun by tests/test_distributed.py: `fit` on toy bags, data-parallel over the ranks torchrun starts.

Usage: torchrun --nproc_per_node N tests/ddp_fit.py OUT_DIR BATCH_SIZE [GRADIENT_COMPRESSION (default: auto)]
Rank 0 writes OUT_DIR/model.pt and metrics.json (through `fit`); every rank writes OUT_DIR/metrics.rank<r>.json, the
metrics it computes from the gathered validation predictions of the final model."""
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mil_nb.bags.data import Bag, bag_loader
from mil_nb.core.devices import set_seed
from mil_nb.core.distributed import init_distributed
from mil_nb.evaluate.evaluation import predict, task_metrics
from mil_nb.models.model import AttentionMIL, MILConfig
from mil_nb.train.training import FitConfig, fit

EPOCHS, LR = 2, 1e-3


def toy_bags(n: int, seed: int) -> list[Bag]:
    "Bags of 3-8 light tiles; odd-numbered bags hold one dark tile (the positives)."
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        tiles = rng.integers(150, 256, (int(rng.integers(3, 9)), 32, 32, 3), dtype=np.uint8)
        if i % 2: tiles[0] //= 3
        bags.append(Bag(tiles, float(i % 2), f"bag{i}", i % 2))
    return bags


def toy_model() -> AttentionMIL:
    set_seed(0)
    return AttentionMIL(MILConfig(tile_size=32, embed_dim=64, attention_dim=32))


def train(batch_size: int, num_replicas: int = 1, rank: int = 0, output_dir=None, gradient_compression="auto"):
    "The toy model after EPOCHS epochs of 32 bags (validation: 13 bags), and its history."
    model = toy_model()
    share = dict(num_replicas=num_replicas, rank=rank)
    valid_loader = bag_loader(toy_bags(13, 1), batch_size, **share)
    how = FitConfig(epochs=EPOCHS, lr=LR, device="cpu", precision="fp32", keep_best=False,
                    gradient_compression=gradient_compression)
    result = fit(model, bag_loader(toy_bags(32, 0), batch_size, shuffle=True, seed=0, **share), valid_loader, how,
                 output_dir=output_dir, progress=False)
    return model, result.history, valid_loader


if __name__ == "__main__":
    out, batch_size = Path(sys.argv[1]), int(sys.argv[2])
    world, device = init_distributed("gloo", "cpu")
    torch.set_num_threads(1)
    compression = sys.argv[3] if len(sys.argv) > 3 else "auto"
    model, history, valid_loader = train(batch_size, world.size, world.rank, out, compression)
    metrics = task_metrics(predict(model, valid_loader))
    (out/f"metrics.rank{world.rank}.json").write_text(json.dumps(metrics | {"world_size": world.size}))
