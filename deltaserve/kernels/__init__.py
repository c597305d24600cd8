"""The one dispatch point for the model's kernels.

Layers call these names only. Today every device runs the torch reference; the CUDA backend
plugs in here (its own issue) and is checked against the reference.
"""

from .reference import attention, causal_conv, gated_delta_rule

__all__ = ["attention", "causal_conv", "gated_delta_rule"]
