"""Models: attention-based MIL, the pretrained tile encoders, and the feature stores they fill."""
