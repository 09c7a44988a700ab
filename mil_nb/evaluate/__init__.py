"""Evaluation: metrics with confidence intervals, plots, attention heatmaps and QuPath GeoJSON."""
