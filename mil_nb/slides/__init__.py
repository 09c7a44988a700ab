"""Slides: PANDA's layout, readers, tissue, the synthetic data set, tiling and the tile store."""
