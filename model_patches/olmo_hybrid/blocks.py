"""OLMo-Hybrid as the engine sees it: its Gated DeltaNet layout and its post-norm attention layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retrofit.blocks import Chunk, KVWindow
from retrofit.layers.attention import attend
from retrofit.layers.gates import gate_projection
from retrofit.layers.packing import project
from retrofit.layers.views import AttentionView, DeltaNetLayout


def olmo_hybrid_inputs(mixer: nn.Module) -> tuple[nn.Module, ...]:
    return mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.g_proj


def olmo_hybrid_projections(mixer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q|k|v before the conv, the output gate `g_proj`, then b and a."""
    q, k, v, gate = project(x, olmo_hybrid_inputs(mixer))
    return torch.cat([q, k, v], dim=-1), gate, gate_projection(mixer.b_proj, x), gate_projection(mixer.a_proj, x)


OLMO_HYBRID_LAYOUT = DeltaNetLayout(
    olmo_hybrid_projections,
    norm="o_norm",
    out="o_proj",
    beta_scale=lambda mixer: 2.0 if mixer.allow_neg_eigval else 1.0,
    input_projections=olmo_hybrid_inputs,
)


class PostNormAttentionBlock(AttentionView):
    """One OLMo-Hybrid attention layer: `h + post_attention_layernorm(attn(h))`, then
    `h + post_feedforward_layernorm(mlp(h))`; q and k are normed over all heads, RoPE is optional."""

    def forward(self, h: Tensor, state: None, kv: KVWindow | None, chunk: Chunk) -> tuple[Tensor, None, KVWindow]:
        layer, attention = self.layer, self.layer.self_attn
        batch, length, _ = h.shape
        heads = (batch, length, -1, attention.head_dim)
        q, k, v = project(h, self.input_projections())
        q = attention.q_norm(q).view(heads).transpose(1, 2)
        k = attention.k_norm(k).view(heads).transpose(1, 2)
        v = v.view(heads).transpose(1, 2)
        if chunk.rope is not None:
            q, k = self.apply_rotary_pos_emb(q, k, *chunk.rope)
        out, own = attend(q, k, v, kv, chunk, None)
        h = h + layer.post_attention_layernorm(attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1)))
        return h + layer.post_feedforward_layernorm(layer.mlp(h)), None, own
