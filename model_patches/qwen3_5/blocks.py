"""Qwen3.5 and Qwen3-Next as the engine sees them: their Gated DeltaNet layouts and their gated attention.

* Gated DeltaNet (`retrofit.layers.views.GatedDeltaNetView`): Qwen3.5's separate `in_proj_qkv`, `in_proj_z`,
  `in_proj_b`, `in_proj_a`; Qwen3-Next's fused `in_proj_qkvz`, `in_proj_ba`, unpacked by the module's own
  `fix_query_key_value_ordering`. Both then `conv1d`, the layer's `norm(o, z)` and `out_proj`.
* Gated attention (`layer.self_attn`): `q_proj` gives queries and an output gate; `q_norm`/`k_norm` per head;
  partial RoPE through transformers' own `apply_rotary_pos_emb`; softmax attention over the retained window and the
  chunk (`retrofit.layers.attention.attend`); `o_proj(out * sigmoid(gate))`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrofit.blocks import Chunk, KVWindow
from retrofit.layers.attention import attend
from retrofit.layers.gates import gate_projection
from retrofit.layers.packing import project
from retrofit.layers.views import AttentionView, DeltaNetLayout, mlp_output


def qwen3_5_inputs(mixer: nn.Module) -> tuple[nn.Module, ...]:
    return mixer.in_proj_qkv, mixer.in_proj_z


def qwen3_5_projections(mixer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Qwen3.5's separate projections: q|k|v before the conv `[B, T, 2K + V]`, z `[B, T, V]`, b and a `[B, T, HV]`."""
    qkv, z = project(x, qwen3_5_inputs(mixer))
    return qkv, z, gate_projection(mixer.in_proj_b, x), gate_projection(mixer.in_proj_a, x)


def qwen3_next_projections(mixer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Qwen3-Next's fused, head-grouped projections, unpacked by the module's own method into Qwen3.5's layout."""
    q, k, v, z, b, a = mixer.fix_query_key_value_ordering(mixer.in_proj_qkvz(x), mixer.in_proj_ba(x))
    qkv = torch.cat([t.flatten(2) for t in (q, k, v)], dim=-1)
    return qkv, z.flatten(2), b, a


QWEN3_5_LAYOUT = DeltaNetLayout(qwen3_5_projections, input_projections=qwen3_5_inputs)
QWEN3_NEXT_LAYOUT = DeltaNetLayout(qwen3_next_projections)


class GatedAttentionBlock(AttentionView):
    """One decoder layer whose mixer is `self_attn` (Qwen3.5's or Qwen3-Next's attention: gated output, q/k norms)."""

    def forward(self, h: Tensor, state: None, kv: KVWindow | None, chunk: Chunk) -> tuple[Tensor, None, KVWindow]:
        layer, attention = self.layer, self.layer.self_attn
        x = layer.input_layernorm(h)
        batch, length, _ = x.shape
        head_dim = attention.head_dim
        q_and_gate, k, v = project(x, self.input_projections())
        q, gate = torch.chunk(q_and_gate.view(batch, length, -1, 2 * head_dim), 2, dim=-1)
        q = attention.q_norm(q).transpose(1, 2)
        k = attention.k_norm(k.view(batch, length, -1, head_dim)).transpose(1, 2)
        v = v.view(batch, length, -1, head_dim).transpose(1, 2)
        q, k = self.apply_rotary_pos_emb(q, k, *chunk.rope)
        out, own = attend(q, k, v, kv, chunk, None)
        out = out.transpose(1, 2).reshape(batch, length, -1) * torch.sigmoid(gate.reshape(batch, length, -1))
        return mlp_output(layer, h + attention.o_proj(out)), None, own
