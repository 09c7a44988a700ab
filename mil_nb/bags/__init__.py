"""Bags: the tasks (binary, ISUP), the splits, and bags of tiles as padded batches with masks."""
