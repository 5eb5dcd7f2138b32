"""`retrofit.ops.dynamic_conv` against the token-by-token loop of `retrofit.ops.naive_dynamic_conv`, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retrofit.ops.dynamic_conv import dynamic_conv
from retrofit.ops.naive_dynamic_conv import naive_dynamic_conv

TOL = 1e-12


def inputs(B: int, T: int, D: int, W: int, *, seed: int = 0, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype)
    kernels = torch.randn(B, T, D, W, generator=gen, dtype=torch.float64).to(dtype)
    state = torch.randn(B, D, W, generator=gen, dtype=torch.float64).to(dtype)
    return x, kernels, state


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [1, 3, 4, 11])  # T < W, T = W, T > W
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_the_token_loop(T, with_state, activation):
    x, kernels, state = inputs(2, T, 5, 4)
    initial = state if with_state else None
    y, final = dynamic_conv(x, kernels, initial_state=initial, output_final_state=True, activation=activation)
    y_ref, final_ref = naive_dynamic_conv(x, kernels, initial_state=initial, activation=activation)
    assert close(y, y_ref)
    assert close(final, final_ref)


def test_tap_alignment_is_oldest_first():
    """A kernel that is one-hot on tap w copies the input from W - 1 - w tokens back (tap W - 1 = the token)."""
    x = torch.arange(1.0, 7.0, dtype=torch.float64).view(1, 6, 1)
    state = torch.tensor([[[-4.0, -3.0, -2.0, -1.0]]], dtype=torch.float64)  # the four inputs before x
    for w, expected in [(3, [1, 2, 3, 4, 5, 6]), (2, [-1, 1, 2, 3, 4, 5]), (0, [-3, -2, -1, 1, 2, 3])]:
        kernels = torch.zeros(1, 6, 1, 4, dtype=torch.float64)
        kernels[..., w] = 1.0
        y, final = dynamic_conv(x, kernels, initial_state=state, output_final_state=True)
        assert y.flatten().tolist() == expected
        assert final.flatten().tolist() == [3.0, 4.0, 5.0, 6.0]


def test_split_equals_whole():
    x, kernels, state = inputs(2, 13, 6, 4, seed=3)
    whole, whole_state = dynamic_conv(x, kernels, initial_state=state, output_final_state=True, activation="silu")
    parts, carried = [], state
    for s, e in [(0, 2), (2, 3), (3, 9), (9, 13)]:  # pieces shorter and longer than W
        y, carried = dynamic_conv(
            x[:, s:e], kernels[:, s:e], initial_state=carried, output_final_state=True, activation="silu"
        )
        parts.append(y)
    assert close(torch.cat(parts, dim=1), whole)
    assert close(carried, whole_state)


def test_gradients_match_the_token_loop():
    leaves = [t.requires_grad_() for t in inputs(2, 7, 3, 4, seed=5)]
    upstream = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)

    def grads(fn, **kwargs):
        y, final = fn(leaves[0], leaves[1], initial_state=leaves[2], activation="silu", **kwargs)
        return torch.autograd.grad((y * upstream[0]).sum() + (final * upstream[1]).sum(), leaves)

    fast = grads(dynamic_conv, output_final_state=True)
    reference = grads(naive_dynamic_conv)
    assert all(close(a, b) for a, b in zip(fast, reference, strict=True))
    assert all(g.abs().sum() > 0 for g in fast)


def test_bf16_accumulates_in_float32():
    x, kernels, state = inputs(1, 9, 8, 4, seed=7, dtype=torch.bfloat16)
    y, final = dynamic_conv(x, kernels, initial_state=state, output_final_state=True)
    y_ref, _ = naive_dynamic_conv(x.double(), kernels.double(), initial_state=state.double())
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
    assert close(y.double(), y_ref, 2e-2)


def test_rejects_mismatched_shapes():
    x, kernels, state = inputs(1, 4, 3, 4)
    with pytest.raises(ValueError, match="kernels"):
        dynamic_conv(x, kernels[:, :3])
    with pytest.raises(ValueError, match="initial_state"):
        dynamic_conv(x, kernels, initial_state=state[..., :3])
    with pytest.raises(ValueError, match="activation"):
        dynamic_conv(x, kernels, activation="gelu")


def test_padding_is_skipped_exactly():
    """With `valid`, each row equals the conv over its real tokens alone (holes and left padding), state included."""
    torch.manual_seed(0)
    B, T, D, W = 2, 8, 3, 4
    x, kernels = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, W, dtype=torch.float64)
    state = torch.randn(B, D, W, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :5], valid[1, [2, 3, 6]] = False, False
    y, final = dynamic_conv(x, kernels, initial_state=state, output_final_state=True, activation="silu", valid=valid)
    for b in range(B):
        y_ref, final_ref = naive_dynamic_conv(
            x[b : b + 1, valid[b]], kernels[b : b + 1, valid[b]], initial_state=state[b : b + 1], activation="silu"
        )
        torch.testing.assert_close(y[b, valid[b]], y_ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[b], final_ref[0], rtol=1e-12, atol=1e-12)


def test_bf16_silu_follows_the_cast_as_jet_nemotron_orders_it():
    """The published code sums the taps in float32, casts to bf16, then applies SiLU in bf16; written out here per
    token and compared exactly, plus a check that SiLU before the cast would differ (so the test can fail)."""
    x, kernels, state = inputs(2, 12, 64, 4, seed=9, dtype=torch.bfloat16)
    y, _ = dynamic_conv(x, kernels, initial_state=state, activation="silu")
    history = torch.cat([state[..., 1:].transpose(1, 2), x], dim=1).float()
    summed = torch.stack(
        [(kernels[:, t].float() * history[:, t : t + 4].transpose(1, 2)).sum(-1) for t in range(12)], 1
    )
    assert torch.equal(y, F.silu(summed.to(torch.bfloat16)))
    assert not torch.equal(y, F.silu(summed).to(torch.bfloat16))
