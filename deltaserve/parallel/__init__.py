"""Tensor parallelism: one model's heads and widths split over processes (shard.py), the process group that sums
their partial outputs (group.py), and the worker processes that mirror the engine's runner (workers.py)."""
