"""Kernels of the recurrent mixers: fla's Triton kernels on CUDA, pure-torch versions elsewhere.

`RETROFIT_OPS=auto|torch|fla` picks the backend (see `retrofit.ops.gated_delta_rule`); `ops_backend(t)` says which
one runs. `retrofit.ops.naive` holds loop-by-loop references of the same ops for tests.
"""

from retrofit.ops.conv import short_conv
from retrofit.ops.cross_entropy import head_cross_entropy, head_token_scores
from retrofit.ops.dynamic_conv import dynamic_conv
from retrofit.ops.gated_delta_rule import gated_delta_rule, ops_backend, training_kernels
from retrofit.ops.norm import gated_rms_norm

__all__ = [
    "dynamic_conv",
    "gated_delta_rule",
    "gated_rms_norm",
    "head_cross_entropy",
    "head_token_scores",
    "ops_backend",
    "short_conv",
    "training_kernels",
]
