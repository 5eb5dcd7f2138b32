"""Gated DeltaNet mixer (fla's `GatedDeltaNet` layout and parameter names) with an explicit fast state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from retrofit.blocks import Chunk, LinearState
from retrofit.layers.gates import gate_projection
from retrofit.layers.norm import GatedRMSNorm
from retrofit.layers.packing import project
from retrofit.ops import gated_delta_rule, short_conv


class ShortConvolution(nn.Module):
    """Depthwise causal convolution with SiLU; `weight` is `[D, 1, W]` as in `nn.Conv1d` and fla."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(self.initial_weight((dim, 1, kernel_size)))

    @staticmethod
    def initial_weight(shape: torch.Size | tuple[int, ...]) -> Tensor:
        """`nn.Conv1d`'s default initialisation (Kaiming-uniform with a = sqrt(5))."""
        weight = torch.empty(shape)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        return weight

    def forward(self, x: Tensor, state: Tensor | None, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Conv from `state`; positions where `valid` is False are skipped exactly (padding)."""
        return short_conv(x, self.weight.squeeze(1), None, initial_state=state, output_final_state=True, valid=valid)


class GatedDeltaRuleMixer(nn.Module):
    """What every gated delta-rule mixer shares (fla's GatedDeltaNet layout, Jet-Nemotron's JetBlock).

    It owns the gate projections (`a_proj`, `b_proj`, `A_log`, `dt_bias`), the output gate `g_proj`, the
    per-head `o_norm` and `o_proj`; a subclass makes q, k, v its own way and calls `mix`. Padded positions get
    `g = 0` and `beta = 0`, an exact no-op on the recurrent state.
    """

    kind = "linear"
    window = None  # no KV

    def __init__(
        self, hidden_size: int, num_heads: int, head_k_dim: int, num_v_heads: int, head_v_dim: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.num_heads, self.head_k_dim = num_heads, head_k_dim
        self.num_v_heads, self.head_v_dim = num_v_heads, head_v_dim
        value_dim = num_v_heads * head_v_dim
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        A_log, dt_bias = self.initial_gates(num_v_heads)
        self.A_log = nn.Parameter(A_log)
        self.dt_bias = nn.Parameter(dt_bias)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    @staticmethod
    def initial_gates(num_heads: int) -> tuple[Tensor, Tensor]:
        """fla's initialisation: `A ~ U(0.01, 16)`, `dt ~ logU(1e-3, 0.1)` stored as `softplus^-1(dt)`."""
        A_log = torch.empty(num_heads).uniform_(1e-2, 16).log()
        dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        return A_log, dt + torch.log(-torch.expm1(-dt))

    def mix(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, recurrent: Tensor | None, keep: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The gated delta rule over `q, k` `[B, T, H*K]` and `v` `[B, T, HV*V]` from state `recurrent`,
        then the norm gated by `gate = g_proj(x)` and `o_proj`. Returns the mixer output and the final recurrent
        state. (The subclass computes `gate` with its other projections of x: `retrofit.layers.packing`.)"""
        batch, length, _ = x.shape
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 under bf16, fp64 in exact tests
        a = gate_projection(self.a_proj, x).to(gate_dtype)
        g = -self.A_log.to(gate_dtype).exp() * F.softplus(a + self.dt_bias.to(gate_dtype))
        beta = gate_projection(self.b_proj, x).sigmoid()
        if keep is not None:
            g, beta = g * keep.to(gate_dtype), beta * keep
        o, recurrent = gated_delta_rule(
            q.view(batch, length, self.num_heads, self.head_k_dim),
            k.view(batch, length, self.num_heads, self.head_k_dim),
            v.view(batch, length, self.num_v_heads, self.head_v_dim),
            g,
            beta,
            initial_state=recurrent,
            output_final_state=True,
            use_qk_l2norm=True,
        )
        gate = gate.view(batch, length, self.num_v_heads, self.head_v_dim)
        return self.o_proj(self.o_norm(o, gate).reshape(batch, length, -1)), recurrent


class GatedDeltaNet(GatedDeltaRuleMixer):
    """fla's Gated DeltaNet: q, k, v through short causal convs (SiLU), then the shared delta-rule mixing.

    The convs skip padded positions exactly, so padding never changes the conv windows either.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        num_v_heads: int | None = None,
        head_v_dim: int | None = None,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, num_v_heads or num_heads, head_v_dim or head_dim, norm_eps)
        key_dim, value_dim = num_heads * head_dim, self.num_v_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.q_conv1d = ShortConvolution(key_dim, conv_size)
        self.k_conv1d = ShortConvolution(key_dim, conv_size)
        self.v_conv1d = ShortConvolution(value_dim, conv_size)

    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The projections of the block input, in the order `forward` reads them (`retrofit.layers.packing`)."""
        return self.q_proj, self.k_proj, self.v_proj, self.g_proj

    def forward(self, x: Tensor, state: LinearState | None, kv: None, chunk: Chunk) -> tuple[Tensor, LinearState, None]:
        conv_state = state.conv if state is not None else (None, None, None)
        valid = chunk.valid if chunk.padded else None
        keep = valid[..., None].to(x.dtype) if valid is not None else None
        q, k, v, gate = project(x, self.input_projections())
        q, q_state = self.q_conv1d(q, conv_state[0], valid)
        k, k_state = self.k_conv1d(k, conv_state[1], valid)
        v, v_state = self.v_conv1d(v, conv_state[2], valid)
        out, recurrent = self.mix(x, q, k, v, gate, state.recurrent if state is not None else None, keep)
        return out, LinearState(recurrent, (q_state, k_state, v_state)), None


def init_delta_rule_parameters(module: nn.Module) -> None:
    """Draw the parameters transformers' generic `_init_weights` does not know: a mixer's gates and a short
    conv's kernel. Families call it from `_init_weights`, which runs for from-scratch models and never on
    weights loaded from a checkpoint."""
    if isinstance(module, GatedDeltaRuleMixer):
        A_log, dt_bias = module.initial_gates(module.num_v_heads)
        init.copy_(module.A_log, A_log)
        init.copy_(module.dt_bias, dt_bias)
    elif isinstance(module, ShortConvolution):
        init.copy_(module.weight, ShortConvolution.initial_weight(module.weight.shape))
