"""The engine's blocks over transformers' Qwen3.5 and Qwen3-Next decoder layers (dense and MoE alike).

Each block is a view of one loaded layer: it calls the layer's own norms, projections, gated norm and MLP (or sparse
MoE block) and reads its conv and gate parameters, so the weights stay where transformers put them. What it adds is
the engine's contract: an explicit fast state in and out (`LinearState`: the delta-rule state and the conv window),
keys and values as a `KVWindow`, and padding that leaves both untouched.

* Gated DeltaNet (`layer.linear_attn`): the projections (Qwen3.5: `in_proj_qkv`, `in_proj_z`, `in_proj_b`,
  `in_proj_a`; Qwen3-Next: the fused `in_proj_qkvz`, `in_proj_ba`, unpacked by the module's own
  `fix_query_key_value_ordering`) -> depthwise causal conv `conv1d` with SiLU on q|k|v;
  `g = -exp(A_log) softplus(a + dt_bias)`, `beta = sigmoid(b)`; the gated delta rule with
  l2-normalised q, k (`retrofit.ops`: fla on CUDA, the exact torch path on CPU; each q/k head serves
  `linear_num_value_heads / linear_num_key_heads` value heads); the layer's `norm(o, in_proj_z x)`; `out_proj`.
* Gated attention (`layer.self_attn`): `q_proj` gives queries and an output gate; `q_norm`/`k_norm` per head;
  partial RoPE through transformers' own `apply_rotary_pos_emb`; softmax attention over the retained window and the
  chunk (`retrofit.layers.attention.attend`); `o_proj(out * sigmoid(gate))`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrofit.blocks import BlockState, Chunk, KVWindow, LinearState
from retrofit.layers.attention import attend
from retrofit.ops import gated_delta_rule, short_conv

Projections = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def qwen3_5_projections(mixer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Qwen3.5's separate projections: q|k|v before the conv `[B, T, 2K + V]`, z `[B, T, V]`, b and a `[B, T, HV]`."""
    return mixer.in_proj_qkv(x), mixer.in_proj_z(x), mixer.in_proj_b(x), mixer.in_proj_a(x)


def qwen3_next_projections(mixer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Qwen3-Next's fused, head-grouped projections, unpacked by the module's own method into Qwen3.5's layout."""
    q, k, v, z, b, a = mixer.fix_query_key_value_ordering(mixer.in_proj_qkvz(x), mixer.in_proj_ba(x))
    qkv = torch.cat([t.flatten(2) for t in (q, k, v)], dim=-1)
    return qkv, z.flatten(2), b, a


def mlp_output(layer: nn.Module, h: Tensor) -> Tensor:
    """`h + mlp(post_attention_layernorm(h))`, whether the MLP is dense or a MoE block that also returns router
    logits."""
    out = layer.mlp(layer.post_attention_layernorm(h))
    return h + (out[0] if isinstance(out, tuple) else out)


class GatedDeltaNetBlock(nn.Module):
    """One decoder layer whose mixer is `linear_attn` (a Qwen3.5 or Qwen3-Next Gated DeltaNet)."""

    kind = "linear"
    kv_window = None

    def __init__(self, layer: nn.Module, projections: Projections) -> None:
        super().__init__()
        self.layer = layer
        self.projections = projections

    def forward(
        self, h: Tensor, state: BlockState, kv: KVWindow | None, chunk: Chunk
    ) -> tuple[Tensor, LinearState, None]:
        layer, mixer = self.layer, self.layer.linear_attn
        x = layer.input_layernorm(h)
        batch, length, _ = x.shape
        valid = chunk.valid if chunk.padded else None
        qkv, z, b, a = self.projections(mixer, x)
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
        beta = b.sigmoid()
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
        o = mixer.norm(o.reshape(-1, mixer.head_v_dim), z.reshape(-1, mixer.head_v_dim)).reshape(batch, length, -1)
        return mlp_output(layer, h + mixer.out_proj(o)), LinearState(recurrent, (conv,)), None


class GatedAttentionBlock(nn.Module):
    """One decoder layer whose mixer is `self_attn` (Qwen3.5's or Qwen3-Next's attention: gated output, q/k norms)."""

    kind = "attention"
    kv_window = None

    def __init__(self, layer: nn.Module, apply_rotary_pos_emb) -> None:
        super().__init__()
        self.layer = layer
        self.apply_rotary_pos_emb = apply_rotary_pos_emb

    def forward(self, h: Tensor, state: None, kv: KVWindow | None, chunk: Chunk) -> tuple[Tensor, None, KVWindow]:
        layer, attention = self.layer, self.layer.self_attn
        x = layer.input_layernorm(h)
        batch, length, _ = x.shape
        head_dim = attention.head_dim
        q, gate = torch.chunk(attention.q_proj(x).view(batch, length, -1, 2 * head_dim), 2, dim=-1)
        q = attention.q_norm(q).transpose(1, 2)
        k = attention.k_norm(attention.k_proj(x).view(batch, length, -1, head_dim)).transpose(1, 2)
        v = attention.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
        q, k = self.apply_rotary_pos_emb(q, k, *chunk.rope)
        out, own = attend(q, k, v, kv, chunk, None)
        out = out.transpose(1, 2).reshape(batch, length, -1) * torch.sigmoid(gate.reshape(batch, length, -1))
        return mlp_output(layer, h + attention.o_proj(out)), None, own
