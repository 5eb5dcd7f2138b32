"""CPU tests of `retrofit.ops`: the torch paths against the naive loops of `retrofit.ops.naive`, and dispatch."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from retrofit.ops import gated_delta_rule, gated_rms_norm, ops_backend, short_conv, training_kernels
from retrofit.ops.gated_delta_rule import l2norm
from retrofit.ops.naive import naive_gated_delta_rule, naive_gated_rms_norm, naive_short_conv

F64_TOL = 1e-9
F32_TOL = 1e-4


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETROFIT_OPS", raising=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (fla's error measure)."""
    a, b = a.double(), b.double()
    assert b.norm() > 0, "reference is all zeros: the comparison would be vacuous"
    return ((a - b).norm() / b.norm()).item()


def grads(outputs: list[torch.Tensor], upstream: list[torch.Tensor], leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of sum(output * upstream) with respect to the leaves."""
    loss = sum((out * up.to(out.dtype)).sum() for out, up in zip(outputs, upstream, strict=True))
    return list(torch.autograd.grad(loss, leaves))


def gdr_inputs(B, T, H, HV, K, V, *, dtype, qk_l2norm, g_zero, seed=0):
    """Random GDN inputs as leaves requiring grad (pre-normalised k unless the op normalises it itself)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    k = randn(B, T, H, K)
    tensors = {
        "q": randn(B, T, H, K),
        "k": k if qk_l2norm else F.normalize(k, dim=-1),
        "v": randn(B, T, HV, V),
        "g": torch.zeros(B, T, HV, dtype=torch.float64) if g_zero else F.logsigmoid(randn(B, T, HV)) * 0.1,
        "beta": torch.sigmoid(randn(B, T, HV)),
        "initial_state": randn(B, HV, K, V),
    }
    return {name: t.to(dtype).requires_grad_() for name, t in tensors.items()}


def as_f64_leaves(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().double().requires_grad_() for name, t in inputs.items()}


GDR_CASES = [
    # B, T, H, HV, K, V, chunk_size, use_qk_l2norm, g_zero, dtype
    pytest.param(2, 100, 2, 2, 16, 16, 32, False, False, torch.float64, id="T%C!=0-f64"),
    pytest.param(1, 20, 2, 2, 8, 12, 64, True, False, torch.float64, id="T<C-l2-f64"),
    pytest.param(2, 1, 1, 1, 8, 8, 64, False, False, torch.float64, id="T=1-f64"),
    pytest.param(2, 1, 2, 4, 8, 16, 64, True, False, torch.float64, id="T=1-gva-l2-f64"),
    pytest.param(1, 70, 2, 6, 8, 16, 16, True, False, torch.float64, id="gva3-l2-f64"),
    pytest.param(2, 50, 2, 4, 16, 8, 16, False, True, torch.float64, id="gva2-g0-f64"),
    pytest.param(1, 200, 1, 2, 32, 16, 64, True, False, torch.float64, id="default-chunk-f64"),
    pytest.param(2, 130, 2, 4, 32, 32, 64, True, False, torch.float32, id="gva-l2-f32"),
    pytest.param(1, 64, 2, 2, 16, 16, 64, False, True, torch.float32, id="T=C-g0-f32"),
    pytest.param(1, 1, 2, 2, 16, 16, 64, False, False, torch.float32, id="T=1-f32"),
]


@pytest.mark.parametrize(("B", "T", "H", "HV", "K", "V", "chunk_size", "qk_l2norm", "g_zero", "dtype"), GDR_CASES)
def test_gated_delta_rule_matches_naive(B, T, H, HV, K, V, chunk_size, qk_l2norm, g_zero, dtype):
    inputs = gdr_inputs(B, T, H, HV, K, V, dtype=dtype, qk_l2norm=qk_l2norm, g_zero=g_zero)
    ref_inputs = as_f64_leaves(inputs)
    o, final = gated_delta_rule(**inputs, output_final_state=True, use_qk_l2norm=qk_l2norm, chunk_size=chunk_size)
    o_ref, final_ref = naive_gated_delta_rule(**ref_inputs, use_qk_l2norm=qk_l2norm)

    assert o.dtype == dtype and o.shape == (B, T, HV, V)
    assert final.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert final.shape == (B, HV, K, V)
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert rel_err(o, o_ref) < tol
    assert rel_err(final, final_ref) < tol

    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dfinal = torch.randn(final_ref.shape, generator=gen, dtype=torch.float64)
    names = list(inputs)
    got = grads([o, final], [do, dfinal], [inputs[n] for n in names])
    ref = grads([o_ref, final_ref], [do, dfinal], [ref_inputs[n] for n in names])
    for name, a, b in zip(names, got, ref, strict=True):
        assert rel_err(a, b) < tol, f"d{name}"


def test_l2norm_uses_fla_epsilon():
    """The q/k l2norm is x / sqrt(sum(x^2) + 1e-6), like fla's in-kernel norm (visible on small vectors)."""
    x = torch.tensor([[3e-4, 4e-4], [3.0, 4.0]], dtype=torch.float64)
    expected = x / torch.sqrt((x**2).sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(l2norm(x), expected, rtol=1e-12, atol=0)
    assert l2norm(x)[0].norm() < 0.5  # far from unit length: the epsilon matters here


def test_gated_delta_rule_defaults():
    """Zero initial state when None, no final state unless asked for, scale K**-0.5, bf16 in -> bf16 out."""
    inputs = gdr_inputs(1, 10, 1, 1, 8, 8, dtype=torch.float64, qk_l2norm=False, g_zero=False)
    h0 = inputs.pop("initial_state")
    o, final = gated_delta_rule(**inputs)
    assert final is None
    o_ref, _ = naive_gated_delta_rule(**inputs, initial_state=torch.zeros_like(h0), scale=8**-0.5)
    assert rel_err(o, o_ref) < F64_TOL
    o2, _ = gated_delta_rule(**inputs, scale=0.3)
    o2_ref, _ = naive_gated_delta_rule(**inputs, scale=0.3)
    assert rel_err(o2, o2_ref) < F64_TOL

    bf16 = {name: t.detach().bfloat16() for name, t in inputs.items()}
    o_bf16, final_bf16 = gated_delta_rule(**bf16, initial_state=h0.detach().float(), output_final_state=True)
    assert o_bf16.dtype == torch.bfloat16 and final_bf16.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_delta_rule_strong_decay_stays_finite(dtype):
    """Cumulative decays far beyond exp's range inside a chunk: the masked exp must not overflow (inf * 0 = nan)."""
    inputs = gdr_inputs(1, 48, 1, 1, 8, 8, dtype=dtype, qk_l2norm=False, g_zero=False)
    with torch.no_grad():
        inputs["g"].fill_(-40.0)
    o, final = gated_delta_rule(**inputs, output_final_state=True)
    o_ref, final_ref = naive_gated_delta_rule(**as_f64_leaves(inputs))
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert rel_err(o, o_ref) < tol and rel_err(final, final_ref) < tol
    (o.sum() + final.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs.values())


def test_gated_delta_rule_chaining():
    """One call over T tokens equals several calls chained through final_state -> initial_state, gradients too."""
    T, splits = 90, [25, 1, 64]
    inputs = gdr_inputs(2, T, 2, 4, 8, 8, dtype=torch.float64, qk_l2norm=True, g_zero=False)
    o_whole, final_whole = gated_delta_rule(**inputs, output_final_state=True, use_qk_l2norm=True, chunk_size=16)

    state = inputs["initial_state"]
    pieces = []
    start = 0
    for length in splits:
        part = {n: inputs[n][:, start : start + length] for n in ("q", "k", "v", "g", "beta")}
        o, state = gated_delta_rule(
            **part, initial_state=state, output_final_state=True, use_qk_l2norm=True, chunk_size=16
        )
        pieces.append(o)
        start += length
    o_split = torch.cat(pieces, dim=1)
    assert rel_err(o_split, o_whole) < F64_TOL
    assert rel_err(state, final_whole) < F64_TOL

    gen = torch.Generator().manual_seed(2)
    do, dfinal = torch.randn(o_whole.shape, generator=gen), torch.randn(final_whole.shape, generator=gen)
    leaves = [inputs["initial_state"], inputs["k"]]
    for a, b in zip(
        grads([o_split, state], [do, dfinal], leaves), grads([o_whole, final_whole], [do, dfinal], leaves), strict=True
    ):
        assert rel_err(a, b) < F64_TOL


def conv_inputs(B, T, D, W, *, with_bias, with_state, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "x": torch.randn(B, T, D, generator=gen, dtype=torch.float64),
        "weight": torch.randn(D, W, generator=gen, dtype=torch.float64),
        "bias": torch.randn(D, generator=gen, dtype=torch.float64) if with_bias else None,
        "initial_state": torch.randn(B, D, W, generator=gen, dtype=torch.float64) if with_state else None,
    }
    return {n: t.requires_grad_() for n, t in tensors.items() if t is not None}


@pytest.mark.parametrize("T", [1, 2, 3, 10])
@pytest.mark.parametrize(("with_bias", "with_state", "activation"), [(True, True, "silu"), (False, False, None)])
def test_short_conv_matches_naive(T, with_bias, with_state, activation):
    inputs = conv_inputs(2, T, 6, 4, with_bias=with_bias, with_state=with_state)
    y, final = short_conv(**inputs, output_final_state=True, activation=activation)
    y_ref, final_ref = naive_short_conv(**inputs, activation=activation)
    assert y.shape == (2, T, 6) and final.shape == (2, 6, 4)
    assert rel_err(y, y_ref) < F64_TOL
    assert rel_err(final, final_ref) < F64_TOL

    gen = torch.Generator().manual_seed(1)
    dy, dfinal = torch.randn(y.shape, generator=gen, dtype=torch.float64), torch.randn(final.shape, generator=gen)
    leaves = list(inputs.values())
    for name, a, b in zip(
        inputs,
        grads([y, final], [dy, dfinal], leaves),
        grads([y_ref, final_ref], [dy, dfinal], leaves),
        strict=True,
    ):
        assert rel_err(a, b) < F64_TOL, f"d{name}"


def test_short_conv_final_state_is_last_inputs():
    """The final state holds the last W inputs of cat(state, x), oldest first, also when T < W."""
    state = torch.arange(4.0).view(1, 1, 4)
    x = torch.tensor([[[10.0], [11.0]]])
    _, final = short_conv(x, torch.ones(1, 4), initial_state=state, output_final_state=True)
    assert final.tolist() == [[[2.0, 3.0, 10.0, 11.0]]]
    _, none = short_conv(x, torch.ones(1, 4))
    assert none is None


def test_short_conv_chaining():
    """One call equals several calls chained through the state; the gradient reaches the first state."""
    inputs = conv_inputs(2, 10, 5, 4, with_bias=True, with_state=True)
    x, state0 = inputs["x"], inputs["initial_state"]
    y_whole, final_whole = short_conv(
        x, inputs["weight"], inputs["bias"], initial_state=state0, output_final_state=True
    )
    state, pieces, start = state0, [], 0
    for length in (3, 1, 6):
        y, state = short_conv(
            x[:, start : start + length], inputs["weight"], inputs["bias"], initial_state=state, output_final_state=True
        )
        pieces.append(y)
        start += length
    y_split = torch.cat(pieces, dim=1)
    assert rel_err(y_split, y_whole) < F64_TOL
    assert torch.equal(state, final_whole)
    gen = torch.Generator().manual_seed(3)
    dy, dfinal = torch.randn(y_whole.shape, generator=gen), torch.randn(final_whole.shape, generator=gen)
    leaves = [state0, inputs["weight"]]
    for a, b in zip(
        grads([y_split, state], [dy, dfinal], leaves), grads([y_whole, final_whole], [dy, dfinal], leaves), strict=True
    ):
        assert rel_err(a, b) < F64_TOL


def test_gated_rms_norm_matches_naive():
    gen = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(2, 5, 3, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    weight = torch.randn(16, generator=gen, dtype=torch.float64).requires_grad_()
    y = gated_rms_norm(x, gate, weight, eps=1e-5)
    y_ref = naive_gated_rms_norm(x, gate, weight, eps=1e-5)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert rel_err(y, y_ref) < F64_TOL
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    for name, a, b in zip(
        ("x", "gate", "weight"),
        grads([y], [dy], [x, gate, weight]),
        grads([y_ref], [dy], [x, gate, weight]),
        strict=True,
    ):
        assert rel_err(a, b) < F64_TOL, f"d{name}"


def test_gated_rms_norm_eps_and_bf16():
    """eps is used, and bf16 inputs are normalised in float32 and returned in bf16."""
    x = torch.full((1, 4), 1e-3, dtype=torch.float64)
    gate, weight = torch.ones(1, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert rel_err(gated_rms_norm(x, gate, weight, eps=1e-2), naive_gated_rms_norm(x, gate, weight, eps=1e-2)) < 1e-12
    assert gated_rms_norm(x, gate, weight, eps=1e-2).max() < 0.01  # eps dominates the tiny mean square

    gen = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(3, 64, generator=gen).bfloat16() for _ in range(2))
    weight = torch.randn(64, generator=gen)
    y = gated_rms_norm(x, gate, weight)
    assert y.dtype == torch.bfloat16
    ref = naive_gated_rms_norm(x.float(), gate.float(), weight)
    assert torch.equal(y, ref.bfloat16())


def test_backend_on_cpu_is_torch(monkeypatch: pytest.MonkeyPatch):
    x = torch.zeros(1, 1, 1, 4)
    assert ops_backend(x) == "torch"
    monkeypatch.setenv("RETROFIT_OPS", "torch")
    assert ops_backend(x) == "torch"
    monkeypatch.setenv("RETROFIT_OPS", "nonsense")
    with pytest.raises(ValueError, match="RETROFIT_OPS"):
        ops_backend(x)


def test_forcing_fla_on_cpu_raises_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    gdr = gdr_inputs(1, 4, 1, 1, 8, 8, dtype=torch.float32, qk_l2norm=False, g_zero=False)
    inputs = {n: t.detach() for n, t in gdr.items()}
    conv = {n: t.detach() for n, t in conv_inputs(1, 4, 3, 4, with_bias=False, with_state=False).items()}
    calls = [
        lambda: ops_backend(inputs["q"]),
        lambda: gated_delta_rule(**inputs),
        lambda: short_conv(**conv),
        lambda: gated_rms_norm(torch.ones(2, 4), torch.ones(2, 4), torch.ones(4)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        message = str(info.value)
        for needle in ("RETROFIT_OPS=fla", "CUDA", "triton", "pip install", "RETROFIT_OPS=torch"):
            assert needle in message, (needle, message)


@pytest.mark.parametrize("pattern", ["left", "holes", "right"])
def test_short_conv_skips_padding_exactly(pattern):
    """With `valid`, each row equals the conv over its real tokens alone, from the same state."""
    torch.manual_seed(0)
    B, T, D, W = 3, 9, 5, 4
    x, weight = torch.randn(B, T, D, dtype=torch.float64), torch.randn(D, W, dtype=torch.float64)
    state = torch.randn(B, D, W, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    if pattern == "left":
        valid[0, :3], valid[1, :8] = False, False
    elif pattern == "holes":
        valid[0, [1, 4, 5]], valid[2, ::2] = False, False
    else:
        valid[1, 6:] = False
    y, final = short_conv(x, weight, initial_state=state, output_final_state=True, valid=valid)
    for b in range(B):
        real = x[b : b + 1, valid[b]]
        y_ref, final_ref = naive_short_conv(real, weight, initial_state=state[b : b + 1])
        torch.testing.assert_close(y[b, valid[b]], y_ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[b], final_ref[0], rtol=1e-12, atol=1e-12)


def test_only_calls_no_backward_will_see_take_the_fused_recurrent_kernel(monkeypatch):
    """Which fla entry point `gated_delta_rule` picks (a fake fla records it): short no-grad calls the fused recurrent
    kernel; with gradients, or inside `training_kernels()` (a checkpointed forward), the chunk kernel."""
    module = importlib.import_module("retrofit.ops.gated_delta_rule")  # the module, not the function it exports
    calls = []
    fake = SimpleNamespace(
        fused_recurrent_gated_delta_rule=lambda **kw: calls.append("fused") or (kw["v"], None),
        chunk_gated_delta_rule=lambda **kw: calls.append("chunk") or (kw["v"], None),
    )
    monkeypatch.setattr(module, "select_fla_module", lambda tensor, name: fake)
    q, k, v = torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4, requires_grad=True)
    g, beta = -torch.rand(1, 3, 1), torch.rand(1, 3, 1)
    with torch.no_grad():
        gated_delta_rule(q, k, v, g, beta)
        with training_kernels():
            gated_delta_rule(q, k, v, g, beta)
    gated_delta_rule(q, k, v, g, beta)
    with torch.no_grad():
        gated_delta_rule(q.repeat(1, 30, 1, 1), k.repeat(1, 30, 1, 1), v.repeat(1, 30, 1, 1), g.repeat(1, 30, 1),
                         beta.repeat(1, 30, 1))  # fmt: skip
    assert calls == ["fused", "chunk", "chunk", "chunk"]  # 90 tokens: too long for the recurrent kernel


def test_small_16bit_heads_under_gradients_avoid_fla_backward(monkeypatch):
    """fla 0.6's gated backward crashes for 16-bit q/k heads of K <= 16: such calls take the torch path under
    `auto` (same result as the float64 reference) and raise a clear error under RETROFIT_OPS=fla; inference and
    larger heads still go to fla (a fake fla records the calls)."""
    module = importlib.import_module("retrofit.ops.gated_delta_rule")
    calls = []
    fake = SimpleNamespace(chunk_gated_delta_rule=lambda **kw: calls.append(kw["q"].shape[-1]) or (kw["v"], None))
    monkeypatch.setattr(module, "select_fla_module", lambda tensor, name: fake)
    gen = torch.Generator().manual_seed(0)

    def inputs(K, dtype=torch.bfloat16):
        q, k = (torch.randn(1, 80, 2, K, generator=gen).to(dtype) for _ in range(2))
        v = torch.randn(1, 80, 2, 8, generator=gen).to(dtype).requires_grad_()
        return q, k, v, -torch.rand(1, 80, 2, generator=gen), torch.rand(1, 80, 2, generator=gen)

    small = inputs(16)
    with pytest.warns(UserWarning, match="torch path"):
        o, _ = gated_delta_rule(*small, use_qk_l2norm=True)
    reference, _ = naive_gated_delta_rule(*(t.detach().double() for t in small), use_qk_l2norm=True)
    torch.testing.assert_close(o.double(), reference, rtol=2e-2, atol=2e-2)
    gated_delta_rule(*inputs(32))
    gated_delta_rule(*inputs(16, torch.float32))
    with torch.no_grad():
        gated_delta_rule(*small)
    assert calls == [32, 16, 16]
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    with pytest.raises(RuntimeError, match="K=16"):
        gated_delta_rule(*small)


@pytest.mark.parametrize(("T", "dtype"), [(1, torch.float32), (3, torch.float64)])
def test_compiled_inference_call_runs_as_one_op_and_matches_naive(T, dtype):
    """Under `torch.compile` without gradients, a short call is one opaque op
    (`sleep_retrofit::recurrent_gated_delta_rule`, so that a compiled decoding step keeps fla's fused kernel on CUDA);
    it equals the token-by-token reference."""
    inputs = {
        n: t.detach() for n, t in gdr_inputs(2, T, 2, 4, 8, 16, dtype=dtype, qk_l2norm=True, g_zero=False).items()
    }
    expected, expected_state = naive_gated_delta_rule(**as_f64_leaves(inputs), use_qk_l2norm=True)
    seen = []

    def backend(graph_module, example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    def step(q, k, v, g, beta, initial_state):
        return gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True, use_qk_l2norm=True
        )

    with torch.no_grad():
        o, state = torch.compile(step, backend=backend, fullgraph=True)(**inputs)
    assert "sleep_retrofit.recurrent_gated_delta_rule" in seen
    assert o.dtype == dtype and state.shape == expected_state.shape
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert rel_err(o, expected) < tol
    assert rel_err(state, expected_state) < tol


def test_recurrent_op_passes_torch_library_checks():
    """The op's fake (shape) function agrees with what it computes, as `torch.compile` relies on."""
    inputs = {
        n: t.detach()
        for n, t in gdr_inputs(1, 2, 1, 2, 8, 8, dtype=torch.float32, qk_l2norm=True, g_zero=False).items()
    }
    arguments = (*inputs.values(), 8**-0.5, True)
    torch.library.opcheck(torch.ops.sleep_retrofit.recurrent_gated_delta_rule.default, arguments)
    no_state = (*list(inputs.values())[:5], None, 8**-0.5, False)
    torch.library.opcheck(torch.ops.sleep_retrofit.recurrent_gated_delta_rule.default, no_state)
