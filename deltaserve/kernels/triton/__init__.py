"""Triton kernels for CUDA devices, one module per op: kernel -> launcher -> public function.

Imported lazily by `deltaserve.kernels` when a tensor is on a CUDA device, so CPU installs need no
Triton. Every kernel addresses per-sequence state by slot index (-1 marks a padding row, which
reads and writes no state), and is checked against the torch reference in tests/cuda.
"""
