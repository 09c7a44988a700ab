"""Training: the run folder, `fit`, the main job's configuration and MNIST-bags."""
