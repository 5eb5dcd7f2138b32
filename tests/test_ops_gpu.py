"""GPU tests of `retrofit.ops`: fla's Triton kernels against this package's torch paths, on the same inputs.

Errors are fla's measure, ||a - b|| / ||b||: outputs and states <= 0.005, gradients <= 0.02. The reference is always the
torch path in float64 on the same (possibly bf16-valued) inputs, so only the kernels' own rounding is measured.
Needs CUDA plus triton>=3.7.1 on Hopper (`source .gpu/setup.sh`). Triton compiling and autotuning dominates (one to
four minutes per case on a fresh machine): `pytest tests/test_ops_gpu.py -n 8` took about 7 minutes on an H100.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrofit.ops import cross_entropy, gated_delta_rule, gated_rms_norm, ops_backend, short_conv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OUT_TOL = 0.005
GRAD_TOL = 0.02


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert b.norm() > 0, "reference is all zeros: the comparison would be vacuous"
    return ((a - b).norm() / b.norm()).item()


def grads(outputs: list[torch.Tensor], upstream: list[torch.Tensor], leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of sum(output * upstream) with respect to the leaves."""
    loss = sum((out * up.to(out.dtype)).sum() for out, up in zip(outputs, upstream, strict=True))
    return list(torch.autograd.grad(loss, leaves))


def f64_leaves(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().double().requires_grad_() for name, t in inputs.items()}


def run_both(monkeypatch: pytest.MonkeyPatch, op, inputs: dict[str, torch.Tensor], **kwargs):
    """(outputs, grads) of `op` on fla with `inputs`, and on the float64 torch path with float64 copies of them."""
    ref_inputs = f64_leaves(inputs)
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    outputs = op(**inputs, **kwargs)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    monkeypatch.setenv("RETROFIT_OPS", "torch")
    ref_outputs = op(**ref_inputs, **kwargs)
    ref_outputs = [ref_outputs] if isinstance(ref_outputs, torch.Tensor) else list(ref_outputs)
    gen = torch.Generator(device="cuda").manual_seed(1)
    # Upstream gradients in the outputs' dtypes, so both runs see exactly the same values.
    upstream = [torch.randn(out.shape, generator=gen, device="cuda").to(out.dtype) for out in outputs]
    got = grads(outputs, upstream, list(inputs.values()))
    ref = grads(ref_outputs, upstream, list(ref_inputs.values()))
    return outputs, ref_outputs, got, ref


def test_auto_backend_picks_fla_on_cuda(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RETROFIT_OPS", raising=False)
    x = torch.zeros(1, 1, 1, 64, device="cuda")
    assert ops_backend(x) == "fla"
    assert ops_backend(x.bfloat16()) == "fla"
    assert ops_backend(x.double()) == "torch"  # fla has no float64 kernels
    assert ops_backend(x.cpu()) == "torch"
    monkeypatch.setenv("RETROFIT_OPS", "torch")
    assert ops_backend(x) == "torch"


def gdr_inputs(B, T, H, HV, K, V, *, dtype, qk_l2norm, g_zero, seed=0):
    """q, k, v, beta in `dtype`; g and the initial state in float32 (as the mixers produce them)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    k = randn(B, T, H, K)
    tensors = {
        "q": randn(B, T, H, K).to(dtype),
        "k": (k if qk_l2norm else F.normalize(k, dim=-1)).to(dtype),
        "v": randn(B, T, HV, V).to(dtype),
        "g": torch.zeros(B, T, HV, device="cuda") if g_zero else F.logsigmoid(randn(B, T, HV)) * 0.1,
        "beta": torch.sigmoid(randn(B, T, HV)).to(dtype),
        "initial_state": randn(B, HV, K, V),
    }
    return {name: t.requires_grad_() for name, t in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("B", "T", "H", "HV", "K", "V", "qk_l2norm", "g_zero"),
    [
        pytest.param(2, 300, 4, 4, 64, 64, False, False, id="T300"),
        pytest.param(2, 300, 2, 4, 64, 64, True, False, id="T300-gva-l2"),
        pytest.param(1, 300, 4, 4, 64, 64, False, True, id="T300-g0"),
        pytest.param(2, 37, 2, 2, 128, 64, True, False, id="T37-K128"),
    ],
)
def test_gated_delta_rule_fla_matches_torch(monkeypatch, B, T, H, HV, K, V, qk_l2norm, g_zero, dtype):
    inputs = gdr_inputs(B, T, H, HV, K, V, dtype=dtype, qk_l2norm=qk_l2norm, g_zero=g_zero)
    (o, final), (o_ref, final_ref), got, ref = run_both(
        monkeypatch, gated_delta_rule, inputs, output_final_state=True, use_qk_l2norm=qk_l2norm
    )
    assert o.dtype == dtype and o.shape == (B, T, HV, V)
    assert final.dtype == torch.float32 and final.shape == (B, HV, K, V)
    assert rel_err(o, o_ref) <= OUT_TOL
    assert rel_err(final, final_ref) <= OUT_TOL
    for name, a, b in zip(inputs, got, ref, strict=True):
        assert a.dtype == inputs[name].dtype, name
        assert rel_err(a, b) <= GRAD_TOL, f"d{name}"


@pytest.mark.parametrize("T", [1, 20, 64])
def test_gated_delta_rule_inference_uses_fla_fused_recurrent(monkeypatch, T):
    """Short calls without gradients (decoding) take fla's fused recurrent kernel; it equals the float64 torch
    path, chained token by token through the state as a decoder does."""
    inputs = gdr_inputs(2, T, 2, 4, 64, 64, dtype=torch.bfloat16, qk_l2norm=True, g_zero=False)
    inputs = {name: t.detach() for name, t in inputs.items()}
    ref = {name: t.double() for name, t in inputs.items()}
    calls = []
    fla_module = importlib.import_module("fla.ops.gated_delta_rule")
    original = fla_module.fused_recurrent_gated_delta_rule
    monkeypatch.setattr(fla_module, "fused_recurrent_gated_delta_rule", lambda **kw: calls.append(1) or original(**kw))
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    with torch.no_grad():
        state, pieces = inputs["initial_state"], []
        for t in range(T):
            step = {n: inputs[n][:, t : t + 1] for n in ("q", "k", "v", "g", "beta")}
            o, state = gated_delta_rule(**step, initial_state=state, output_final_state=True, use_qk_l2norm=True)
            pieces.append(o)
        whole, whole_state = gated_delta_rule(
            **{n: inputs[n] for n in ("q", "k", "v", "g", "beta")},
            initial_state=inputs["initial_state"],
            output_final_state=True,
            use_qk_l2norm=True,
        )
    assert len(calls) == T + 1
    monkeypatch.setenv("RETROFIT_OPS", "torch")
    o_ref, state_ref = gated_delta_rule(**ref, output_final_state=True, use_qk_l2norm=True)
    assert rel_err(torch.cat(pieces, dim=1), o_ref) <= 2 * OUT_TOL  # bf16 inputs
    assert rel_err(whole, o_ref) <= 2 * OUT_TOL
    assert rel_err(state, state_ref) <= OUT_TOL and rel_err(whole_state, state_ref) <= OUT_TOL


def test_gated_delta_rule_fla_chained_calls(monkeypatch: pytest.MonkeyPatch):
    """Three fla calls chained through the state equal one torch call, including the gradient to the first state."""
    inputs = gdr_inputs(2, 300, 2, 4, 64, 64, dtype=torch.float32, qk_l2norm=True, g_zero=False)
    with torch.no_grad():
        inputs["g"].mul_(0.05)  # mild decay, so the first state still matters at the end (fla.md section 3.3)
    ref_inputs = f64_leaves(inputs)
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    state, pieces = inputs["initial_state"], []
    for start, stop in ((0, 100), (100, 101), (101, 300)):
        part = {n: inputs[n][:, start:stop] for n in ("q", "k", "v", "g", "beta")}
        o, state = gated_delta_rule(**part, initial_state=state, output_final_state=True, use_qk_l2norm=True)
        pieces.append(o)
    o = torch.cat(pieces, dim=1)
    monkeypatch.setenv("RETROFIT_OPS", "torch")
    o_ref, final_ref = gated_delta_rule(**ref_inputs, output_final_state=True, use_qk_l2norm=True)
    assert rel_err(o, o_ref) <= OUT_TOL
    assert rel_err(state, final_ref) <= OUT_TOL
    gen = torch.Generator(device="cuda").manual_seed(2)
    do = torch.randn(o_ref.shape, generator=gen, device="cuda", dtype=torch.float64)
    dfinal = torch.randn(final_ref.shape, generator=gen, device="cuda", dtype=torch.float64)
    (dh0,) = grads([o, state], [do, dfinal], [inputs["initial_state"]])
    (dh0_ref,) = grads([o_ref, final_ref], [do, dfinal], [ref_inputs["initial_state"]])
    assert rel_err(dh0, dh0_ref) <= GRAD_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("T", "with_state", "with_bias", "activation"),
    [
        pytest.param(300, True, True, "silu", id="T300-state-bias-silu"),
        pytest.param(300, False, False, None, id="T300-plain"),
        pytest.param(2, True, False, "silu", id="T2<W-state"),
        pytest.param(1, True, True, None, id="T1-state"),
    ],
)
def test_short_conv_fla_matches_torch(monkeypatch, T, with_state, with_bias, activation, dtype):
    B, D, W = 2, 192, 4
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen, device="cuda")).to(dtype).requires_grad_()

    inputs = {"x": randn(B, T, D), "weight": randn(D, W, std=0.5)}
    if with_bias:
        inputs["bias"] = randn(D)
    if with_state:
        inputs["initial_state"] = randn(B, D, W)
    (y, final), (y_ref, final_ref), got, ref = run_both(
        monkeypatch, short_conv, inputs, output_final_state=True, activation=activation
    )
    assert y.dtype == dtype and y.shape == (B, T, D)
    assert final.shape == (B, D, W)
    assert rel_err(y, y_ref) <= OUT_TOL
    assert rel_err(final, final_ref) <= OUT_TOL
    for name, a, b in zip(inputs, got, ref, strict=True):
        assert rel_err(a, b) <= GRAD_TOL, f"d{name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 300, 4, 64), (3, 7, 1024)], ids=["heads-D64", "D1024"])
def test_gated_rms_norm_fla_matches_torch(monkeypatch, shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = {
        name: torch.randn(*s, generator=gen, device="cuda").to(dtype).requires_grad_()
        for name, s in (("x", shape), ("gate", shape), ("weight", shape[-1:]))
    }
    (y,), (y_ref,), got, ref = run_both(monkeypatch, gated_rms_norm, inputs, eps=1e-5)
    assert y.dtype == dtype and y.shape == shape
    assert rel_err(y, y_ref) <= OUT_TOL
    for name, a, b in zip(inputs, got, ref, strict=True):
        assert rel_err(a, b) <= GRAD_TOL, f"d{name}"


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_fla_fused_head_loss_equals_the_chunked_loss_and_its_gradients(dtype, tolerance):
    """fla's fused linear cross-entropy (norm, then a 5000-word head, 3000 rows) gives the summed loss and the
    gradients of the hidden states, the head weight and the norm weight of the chunked torch path; in bf16 the head's
    weight gradient adds up in bf16 (`accumulate_grad_in_fp32` off), as autograd's would."""
    torch.manual_seed(0)
    norm, lm_head = nn.LayerNorm(64).cuda().to(dtype), nn.Linear(64, 5000, bias=False).cuda().to(dtype)
    hidden = torch.randn(3000, 64, device="cuda", dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 5000, (3000,), device="cuda")

    def loss_and_grads(parts):
        loss = cross_entropy.head_cross_entropy(lambda h: lm_head(norm(h)), hidden, targets, parts=parts)
        return loss.detach(), torch.autograd.grad(loss, [hidden, lm_head.weight, norm.weight])

    assert cross_entropy._fla_fused_loss(hidden, (norm, lm_head)) is not None  # the fused kernel serves
    fused_loss, fused_grads = loss_and_grads((norm, lm_head))
    chunked_loss, chunked_grads = loss_and_grads(None)
    assert rel_err(fused_loss, chunked_loss) < tolerance / 10
    for fused, chunked in zip(fused_grads, chunked_grads, strict=True):
        assert rel_err(fused, chunked) < tolerance
    hook = lm_head.register_forward_hook(lambda *_: None)  # e.g. ZeRO-3's gather: only the module call runs it
    assert cross_entropy._fla_fused_loss(hidden, (norm, lm_head)) is None
    hook.remove()
    with torch.no_grad():  # evaluation: the fused kernel would compute gradients for nothing
        assert cross_entropy._fla_fused_loss(hidden, (norm, lm_head)) is None
