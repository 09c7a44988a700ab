"""Training: the run folder, `fit`, the main job's configuration (`TrainConfig`) and its stages (`run_main_job`),
and MNIST-bags."""
from .config import TrainConfig
from .main_job import run_main_job
