"""Files, devices, processes, the network and torch.distributed: what every other package builds on."""
