"""Blocks that are views of the decoder layers transformers loaded (the native families of `retrofit.native`).

A view calls the layer's own norms, projections, gated norm and MLP (or sparse MoE block) and reads its conv and
gate parameters, so the weights stay where transformers put them. What it adds is the engine's contract: an explicit
fast state in and out (`LinearState`: the delta-rule state and the conv window) and padding that leaves it untouched.

The Gated DeltaNet of transformers' hybrids (Qwen3.5, Qwen3-Next, OLMo-Hybrid) differs between families only in
where its parts live (`DeltaNetLayout`): the projections -> depthwise causal conv `conv1d` with SiLU on q|k|v ->
`g = -exp(A_log) softplus(a + dt_bias)`, `beta = sigmoid(b)` (times 2 with negative eigenvalues) -> the gated delta
rule with l2-normalised q, k (`retrofit.ops`: fla on CUDA, the exact torch path on CPU; each q/k head serves
`num_v_heads / num_k_heads` value heads) -> the gated norm with z -> the output projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrofit.blocks import BlockState, Chunk, KVWindow, LinearState
from retrofit.ops import gated_delta_rule, short_conv

Projections = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def mlp_output(layer: nn.Module, h: Tensor) -> Tensor:
    """`h + mlp(post_attention_layernorm(h))`, whether the MLP is dense or a MoE block that also returns router
    logits."""
    out = layer.mlp(layer.post_attention_layernorm(h))
    return h + (out[0] if isinstance(out, tuple) else out)


@dataclass(frozen=True)
class DeltaNetLayout:
    """Where a transformers Gated DeltaNet module keeps its parts.

    Attributes:
        projections: `(mixer, x) -> (q|k|v before the conv [B, T, 2K + V], output gate z [B, T, V], b, a [B, T, HV])`.
        norm: the name of its gated norm module (called as `norm(o, z)` on `[N, head_v_dim]` rows).
        out: the name of its output projection.
        beta_scale: `(mixer) -> factor` on `sigmoid(b)`: 2 where negative eigenvalues are allowed (beta in (0, 2)).
        input_projections: `(mixer) -> the linears that projections computes together with
            `retrofit.layers.packing.project` (none where the module already fuses them).
    """

    projections: Projections
    norm: str = "norm"
    out: str = "out_proj"
    beta_scale: Callable[[nn.Module], float] = lambda mixer: 1.0
    input_projections: Callable[[nn.Module], tuple[nn.Module, ...]] = lambda mixer: ()


class GatedDeltaNetView(nn.Module):
    """One pre-norm decoder layer whose mixer is a transformers Gated DeltaNet (`layer.linear_attn`), as a block."""

    kind = "linear"
    kv_window = None

    def __init__(self, layer: nn.Module, layout: DeltaNetLayout) -> None:
        super().__init__()
        self.layer = layer
        self.layout = layout

    def input_projections(self) -> tuple[nn.Module, ...]:
        """The mixer's projections of the block input that its layout computes together (`retrofit.layers.packing`)."""
        return self.layout.input_projections(self.layer.linear_attn)

    def forward(
        self, h: Tensor, state: BlockState, kv: KVWindow | None, chunk: Chunk
    ) -> tuple[Tensor, LinearState, None]:
        layer, mixer, layout = self.layer, self.layer.linear_attn, self.layout
        x = layer.input_layernorm(h)
        batch, length, _ = x.shape
        valid = chunk.valid if chunk.padded else None
        qkv, z, b, a = layout.projections(mixer, x)
        qkv, conv = short_conv(
            qkv,
            mixer.conv1d.weight.squeeze(1),
            mixer.conv1d.bias,
            initial_state=state.conv[0] if state is not None else None,
            output_final_state=True,
            valid=valid,
        )
        q, k, v = torch.split(qkv, [mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 under bf16, fp64 in exact tests
        g = -mixer.A_log.to(gate_dtype).exp() * F.softplus(a.to(gate_dtype) + mixer.dt_bias)
        beta = b.sigmoid() * layout.beta_scale(mixer)
        if valid is not None:  # g = 0 and beta = 0: an exact no-op on the state
            g, beta = g * valid[..., None], beta * valid[..., None]
        o, recurrent = gated_delta_rule(
            q.reshape(batch, length, mixer.num_k_heads, mixer.head_k_dim),
            k.reshape(batch, length, mixer.num_k_heads, mixer.head_k_dim),
            v.reshape(batch, length, mixer.num_v_heads, mixer.head_v_dim),
            g,
            beta,
            initial_state=state.recurrent if state is not None else None,
            output_final_state=True,
            use_qk_l2norm=True,
        )
        rows = (-1, mixer.head_v_dim)
        o = getattr(mixer, layout.norm)(o.reshape(rows), z.reshape(rows)).reshape(batch, length, -1)
        return mlp_output(layer, h + getattr(mixer, layout.out)(o)), LinearState(recurrent, (conv,)), None


class AttentionView(nn.Module):
    """What the views of a native attention layer share: the layer, and transformers' own RoPE function of its model
    (which handles partial rotary dimensions). Subclasses compute the layer's forward with `attend`."""

    kind = "attention"
    kv_window = None

    def __init__(self, layer: nn.Module, apply_rotary_pos_emb: Callable) -> None:
        super().__init__()
        self.layer = layer
        self.apply_rotary_pos_emb = apply_rotary_pos_emb

    def input_projections(self) -> tuple[nn.Module, ...]:
        """`self_attn`'s q, k and v projections, which a subclass computes with `retrofit.layers.packing.project`."""
        attention = self.layer.self_attn
        return attention.q_proj, attention.k_proj, attention.v_proj
