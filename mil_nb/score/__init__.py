"""Scoring a cohort: a trained model over many slides, with heatmaps and GeoJSON per slide."""
