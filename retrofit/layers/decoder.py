"""A pre-norm residual block: mixer (attention or linear) and, optionally, an MLP."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn

from retrofit.blocks import BlockState, Chunk, KVWindow
from retrofit.layers.mlp import SwiGLU
from retrofit.layers.norm import RMSNorm

Norm = Callable[[int, float], nn.Module]


class DecoderLayer(nn.Module):
    """`h + mixer(norm(h))`, then `h + mlp(norm(h))` when an MLP is given (Qwen2 parameter names).

    `norm(hidden_size, eps)` builds each norm (`RMSNorm` in Qwen2's order unless a family says otherwise).
    """

    def __init__(
        self, mixer: nn.Module, hidden_size: int, mlp: nn.Module | None, eps: float, norm: Norm = RMSNorm
    ) -> None:
        super().__init__()
        self.self_attn = mixer
        self.input_layernorm = norm(hidden_size, eps)
        self.mlp = mlp
        if mlp is not None:
            self.post_attention_layernorm = norm(hidden_size, eps)

    @property
    def kind(self) -> str:
        return self.self_attn.kind

    @property
    def kv_window(self) -> int | None:
        return self.self_attn.window

    def forward(
        self, h: Tensor, state: BlockState, kv: KVWindow | None, chunk: Chunk
    ) -> tuple[Tensor, BlockState, KVWindow | None]:
        out, state, kv_out = self.self_attn(self.input_layernorm(h), state, kv, chunk)
        h = h + out
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h, state, kv_out


def swiglu_decoder_layers(
    mixers: Iterable[nn.Module], hidden_size: int, intermediate_size: int, eps: float, norm: Norm = RMSNorm
) -> nn.ModuleList:
    """One pre-norm block per mixer, each with a SwiGLU MLP: the stack of the hybrid and Jet-Nemotron families."""
    return nn.ModuleList(
        DecoderLayer(mixer, hidden_size, SwiGLU(hidden_size, intermediate_size), eps, norm) for mixer in mixers
    )
