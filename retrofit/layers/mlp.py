"""The SwiGLU MLP with Qwen2 parameter names."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from retrofit.layers.packing import project


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The projections of the input, in the order `forward` reads them (`retrofit.layers.packing`)."""
        return self.gate_proj, self.up_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, self.input_projections())
        return self.down_proj(F.silu(gate) * up)
