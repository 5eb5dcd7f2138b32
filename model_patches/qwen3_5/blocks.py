"""The engine's blocks over transformers' Qwen3.5 decoder layers (dense `Qwen3_5DecoderLayer` and MoE alike).

Each block is a view of one loaded layer: it calls the layer's own norms, projections, gated norm and MLP (or sparse
MoE block) and reads its conv and gate parameters, so the weights stay where transformers put them. What it adds is
the engine's contract: an explicit fast state in and out (`LinearState`: the delta-rule state and the conv window),
keys and values as a `KVWindow`, and padding that leaves both untouched.

* Gated DeltaNet (`layer.linear_attn`): `in_proj_qkv` -> depthwise causal conv `conv1d` with SiLU -> q, k, v;
  `g = -exp(A_log) softplus(in_proj_a x + dt_bias)`, `beta = sigmoid(in_proj_b x)`; the gated delta rule with
  l2-normalised q, k (`retrofit.ops`: fla on CUDA, the exact torch path on CPU; each q/k head serves
  `linear_num_value_heads / linear_num_key_heads` value heads); the layer's `norm(o, in_proj_z x)`; `out_proj`.
* Gated attention (`layer.self_attn`): `q_proj` gives queries and an output gate; `q_norm`/`k_norm` per head;
  partial RoPE through transformers' own `apply_rotary_pos_emb`; softmax attention over the retained window and the
  chunk (`retrofit.layers.attention.attend`); `o_proj(out * sigmoid(gate))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrofit.blocks import BlockState, Chunk, KVWindow, LinearState
from retrofit.layers.attention import attend
from retrofit.ops import gated_delta_rule, short_conv


def mlp_output(layer: nn.Module, h: Tensor) -> Tensor:
    """`h + mlp(post_attention_layernorm(h))`, whether the MLP is dense or a MoE block that also returns router
    logits."""
    out = layer.mlp(layer.post_attention_layernorm(h))
    return h + (out[0] if isinstance(out, tuple) else out)


class GatedDeltaNetBlock(nn.Module):
    """One Qwen3.5 decoder layer whose mixer is `linear_attn` (a `Qwen3_5GatedDeltaNet`)."""

    kind = "linear"
    kv_window = None

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(
        self, h: Tensor, state: BlockState, kv: KVWindow | None, chunk: Chunk
    ) -> tuple[Tensor, LinearState, None]:
        layer, mixer = self.layer, self.layer.linear_attn
        x = layer.input_layernorm(h)
        batch, length, _ = x.shape
        valid = chunk.valid if chunk.padded else None
        qkv, conv = short_conv(
            mixer.in_proj_qkv(x),
            mixer.conv1d.weight.squeeze(1),
            mixer.conv1d.bias,
            initial_state=state.conv[0] if state is not None else None,
            output_final_state=True,
            valid=valid,
        )
        q, k, v = torch.split(qkv, [mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
        gate_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 under bf16, fp64 in exact tests
        g = -mixer.A_log.to(gate_dtype).exp() * F.softplus(mixer.in_proj_a(x).to(gate_dtype) + mixer.dt_bias)
        beta = mixer.in_proj_b(x).sigmoid()
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
        z = mixer.in_proj_z(x).reshape(-1, mixer.head_v_dim)
        o = mixer.norm(o.reshape(-1, mixer.head_v_dim), z).reshape(batch, length, -1)
        return mlp_output(layer, h + mixer.out_proj(o)), LinearState(recurrent, (conv,)), None


class GatedAttentionBlock(nn.Module):
    """One Qwen3.5 decoder layer whose mixer is `self_attn` (a `Qwen3_5Attention`: gated output, q/k norms)."""

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
