"""Layers against formulas written out here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from retrofit.blocks import Chunk, KVWindow
from retrofit.layers.attention import Attention, attend
from retrofit.layers.gates import gate_projection
from retrofit.layers.norm import RMSNorm
from retrofit.layers.rope import RotaryEmbedding


def test_rms_norm_matches_qwen2_formula():
    """x / sqrt(mean(x^2) + eps) in (at least) float32, cast back, then times the weight (Qwen2's order)."""
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=gen) + 0.5)
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    expected = norm.weight.double() * (x / (x.square().mean(-1, keepdim=True) + 1e-5).sqrt())
    torch.testing.assert_close(copy.deepcopy(norm).double()(x), expected, rtol=1e-12, atol=1e-12)

    low = x.to(torch.bfloat16)
    normed = low.float() * torch.rsqrt(low.float().square().mean(-1, keepdim=True) + 1e-5)
    out = norm(low)
    assert out.dtype == torch.float32  # a float32 weight times the bf16 normalised input, as in Qwen2
    torch.testing.assert_close(out, norm.weight * normed.to(torch.bfloat16), rtol=0, atol=0)


def _kernel_names(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.key for event in prof.key_averages()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoded_token_attention_avoids_cudnn():
    """cuDNN's attention plans per shape, and a decoded token's key count changes every step (item d of the
    benchmarks); the layer keeps single queries off it, with the same result as the math kernel."""
    torch.manual_seed(0)
    layer = Attention(512, 8, 2, 64).cuda().to(torch.bfloat16)
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
    keys, values = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    valid = torch.ones(1, 300, dtype=torch.bool, device="cuda")
    window = KVWindow(keys, values, valid, 0, False)
    positions = torch.tensor([[300]], device="cuda")
    chunk = Chunk(300, positions, valid[:, :1], RotaryEmbedding(64, 10000.0)(positions, torch.bfloat16), None, False)
    q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    plain = _kernel_names(lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=True))
    if not any("cudnn" in name for name in plain):
        pytest.skip("torch does not pick cuDNN attention for a single query on this machine")
    with torch.no_grad():
        names = _kernel_names(lambda: layer(x, None, window, chunk))
        out = layer(x, None, window, chunk)[0]
        with sdpa_kernel([SDPBackend.MATH]):
            reference = layer(x, None, window, chunk)[0]
    assert not any("cudnn" in name for name in names), sorted(n for n in names if "cudnn" in n)
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)


def test_masked_decoded_token_over_grouped_heads_equals_softmax_over_valid_keys():
    """A decoded token with grouped KV heads under a mask (padding in the window, a sliding window) folds its query
    heads into its KV heads' queries; the result is each query head's softmax over the keys it may see, written out."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, length, window = 8, 2, 16, 12, 9
    q = torch.randn(2, heads, 1, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, length + 1, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(2, length + 1, dtype=torch.bool)
    valid[1, 5:7] = False  # padding inside row 1's window
    retained = KVWindow(k[:, :, :length], v[:, :, :length], valid[:, :length], 0, True)
    positions = torch.full((2, 1), length)
    chunk = Chunk(length, positions, valid[:, length:], None, None, False)
    out, _ = attend(q, k[:, :, length:], v[:, :, length:], retained, chunk, window)

    sees = valid & (torch.arange(length + 1) > length - window)  # [B, R]: valid and within the window
    for b in range(2):
        for h in range(heads):
            keys, values = k[b, h // (heads // kv_heads)][sees[b]], v[b, h // (heads // kv_heads)][sees[b]]
            weights = torch.softmax(keys @ q[b, h, 0] / dim**0.5, dim=0)
            torch.testing.assert_close(out[b, h, 0], weights @ values, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_gate_projection_is_a_fused_sum_equal_to_the_linear(bias):
    """In a compiled step without gradients a gate projection is traced as a multiply-and-sum (no matmul for cuBLAS)
    that equals the float64 linear map; with gradients, for a subclass (an adapter) or under hooks, the module runs."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(24, 5, bias=bias)
    x = torch.randn(3, 2, 24, generator=gen)
    expected = F.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op != "placeholder")
        return graph_module.forward

    with torch.no_grad():
        y = torch.compile(gate_projection, backend=backend, fullgraph=True)(linear, x)
    assert not any("linear" in t or "matmul" in t or "mm" in t.split(".")[-1] for t in traced), traced
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    traced.clear()
    torch.compile(gate_projection, backend=backend, fullgraph=True)(linear, x)
    assert any("linear" in t for t in traced), traced  # training keeps the module's own matmul

    class Adapted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    adapted = Adapted(24, 5, bias=bias)
    adapted.load_state_dict(linear.state_dict())
    hooked = copy.deepcopy(linear)
    hooked.register_forward_hook(lambda module, args, out: out + 1)  # as ZeRO-3 or offloading hooks would act
    for module in (adapted, hooked):
        with torch.no_grad():
            y = torch.compile(gate_projection, backend="eager", fullgraph=True)(module, x)
        torch.testing.assert_close(y.double(), expected + 1, rtol=1e-5, atol=1e-5)
