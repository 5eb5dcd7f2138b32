"""JetBlock: Jet-Nemotron's linear mixer (gated delta rule with a dynamic convolution on v), as a sleep block.

Parameter names are the published checkpoint's (`q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, o_proj, A_log,
dt_bias, o_norm.weight, dynamic_conv1d.kernel_generator.{w1,w2}`), so the safetensors load unchanged.

Per token t, with x_t the (normed) block input:

* q_t = silu(q_proj x_t), k_t = silu(k_proj x_t), L2-normalised per head inside the gated delta rule;
* v_t = silu(sum_w W_t[:, w] * u_{t-3+w}) with u = v_proj x, where the kernel W_t = w2(silu(w1 x_t)) reshaped to
  `[value_dim, 4]` is generated from x_t (w2's bias is the static part of the kernel); see `retrofit.ops.dynamic_conv`
  for the tap order, which is upstream's;
* g_t = -exp(A_log) * softplus(a_proj x_t + dt_bias) (log decay, in float32 or wider), beta_t = sigmoid(b_proj x_t);
* the gated delta rule S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T, o_t = S_t^T q_t / sqrt(K);
* o_norm: an RMSNorm per value head times silu(g_proj x_t), then o_proj.

State across passes and chunks. The block's fast state is `LinearState(S, (conv_state,))`: S `[B, H, K, V]` and the
conv state `[B, value_dim, 4]`, the last four pre-conv values u (what upstream's cache holds). The block returns
both and the engine carries them as one: a sleep pass continues from the state the previous pass left (pass n+1
replays the chunk as a continuation of the stream, which is what running the blocks with a cache object does in the
paper's Algorithm 1), and the state after the last pass starts the next chunk. The conv state is treated exactly
like S rather than reset per pass, so that a one-pass sleep is bit-for-bit streaming inference and N passes are
N replays of the same stream; resetting only the conv state would make the first tokens of each replay see a
history that never happened.

Padding: padded positions get g = 0 and beta = 0 (an exact no-op on S), and the dynamic conv skips them exactly
(`retrofit.ops.padding`), as `retrofit.layers.gated_deltanet.GatedDeltaNet` does, so padding leaves every state as
it was, also when a sleep pass replays a padded chunk on top of a live conv window.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from model_patches.jet_nemotron.configuration import JetBlockSettings
from retrofit.blocks import Chunk, LinearState
from retrofit.layers.gated_deltanet import GatedDeltaRuleMixer, ShortConvolution
from retrofit.layers.packing import project
from retrofit.ops import dynamic_conv


class KernelProjection(nn.Linear):
    """The generator's output layer (upstream's `w2`): its bias is the static part of the kernel, `[dim * taps]` in
    `(dim, tap)` order, so a from-scratch model draws that bias as `nn.Conv1d` draws its kernel."""

    def __init__(self, in_features: int, dim: int, kernel_size: int) -> None:
        super().__init__(in_features, dim * kernel_size, bias=True)
        self.dim, self.kernel_size = dim, kernel_size

    def initial_static_kernel(self) -> Tensor:
        return ShortConvolution.initial_weight((self.dim, 1, self.kernel_size)).flatten()


class KernelGenerator(nn.Module):
    """`w2(silu(w1 x))`: one `[dim, kernel_size]` conv kernel per token (upstream's `kernel_generator`); w2's bias is
    the static part of the kernel. The JetBlock computes `w1 x` with its other projections of x
    (`retrofit.layers.packing`) and calls the generator on it."""

    def __init__(self, input_size: int, hidden_size: int, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.w1 = nn.Linear(input_size, hidden_size, bias=False)
        self.w2 = KernelProjection(hidden_size, dim, kernel_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """`hidden = w1 x` `[B, T, hidden_size]` -> kernels `[B, T, dim, kernel_size]`."""
        return self.w2(F.silu(hidden)).unflatten(-1, (self.dim, self.kernel_size))


def init_static_kernel(module: nn.Module) -> None:
    """Set a from-scratch `KernelProjection`'s static kernel (its bias); families call it from `_init_weights`.

    It acts on the parameter's own module: under ZeRO-3, transformers 5.17 gathers only the parameters of the module
    it initialises (later versions add its direct children's), so nothing else is there to read or write.
    """
    if isinstance(module, KernelProjection):
        init.copy_(module.bias, module.initial_static_kernel())


class DynamicShortConvolution(nn.Module):
    """Causal depthwise conv on `dim` channels whose kernel is generated per token from another input, then SiLU."""

    def __init__(self, dim: int, kernel_size: int, generator_input_size: int, generator_reduction: int) -> None:
        super().__init__()
        self.kernel_generator = KernelGenerator(generator_input_size, dim // generator_reduction, dim, kernel_size)

    def forward(
        self, x: Tensor, generator_hidden: Tensor, state: Tensor | None, valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x `[B, T, dim]`, `generator_hidden = kernel_generator.w1(generator input)` `[B, T, *]`, state
        `[B, dim, W]` or None -> (y, final state). Positions where `valid` is False (padding) are skipped exactly."""
        kernels = self.kernel_generator(generator_hidden)
        return dynamic_conv(x, kernels, initial_state=state, output_final_state=True, activation="silu", valid=valid)


class JetBlock(GatedDeltaRuleMixer):
    """Jet-Nemotron's linear mixer with an explicit fast state (see the module docstring)."""

    def __init__(self, hidden_size: int, settings: JetBlockSettings) -> None:
        num_heads = settings.num_heads
        super().__init__(hidden_size, num_heads, settings.head_dim, num_heads, settings.head_v_dim, settings.norm_eps)
        self.q_proj = nn.Linear(hidden_size, settings.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, settings.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, settings.value_dim, bias=False)
        self.dynamic_conv1d = DynamicShortConvolution(
            settings.value_dim, settings.conv_size, hidden_size, settings.generator_reduction
        )

    def input_projections(self) -> tuple[nn.Linear, ...]:
        """The projections of the block input, in the order `forward` reads them (`retrofit.layers.packing`)."""
        return self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.dynamic_conv1d.kernel_generator.w1

    def forward(self, x: Tensor, state: LinearState | None, kv: None, chunk: Chunk) -> tuple[Tensor, LinearState, None]:
        valid = chunk.valid if chunk.padded else None
        keep = valid[..., None].to(x.dtype) if valid is not None else None
        recurrent, conv_state = (state.recurrent, state.conv[0]) if state is not None else (None, None)
        q, k, u, gate, generator_hidden = project(x, self.input_projections())
        v, conv_state = self.dynamic_conv1d(u, generator_hidden, conv_state, valid)
        out, recurrent = self.mix(x, F.silu(q), F.silu(k), v, gate, recurrent, keep)
        return out, LinearState(recurrent, (conv_state,)), None
