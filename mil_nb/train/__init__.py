"""Training: the run folder, `fit`, the main job's configuration (`TrainConfig`) and its stages (`run_main_job`),
and MNIST-bags. `from mil_nb.train import TrainConfig, run_main_job` imports each on first use, so a process that
needs one module of the package (a rank's entry, a server) does not import the whole main job."""
import importlib

_EXPORTS = {"TrainConfig": "config", "run_main_job": "main_job"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS: raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
