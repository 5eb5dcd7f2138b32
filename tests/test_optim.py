"""`BatchedMuon` against `torch.optim.Muon`, its reference: the same update and state, batched by shape."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from retrofit import optim
from retrofit.optim import BatchedMuon

# Two of each shape (batched together), a tall one, a square one, and one that never gets a gradient.
SHAPES = [(8, 16), (16, 8), (8, 16), (12, 12), (16, 8), (8, 16), (4, 4)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in SHAPES]


def _train(optimizer_cls, params, steps: int = 3, **kwargs) -> torch.optim.Optimizer:
    optimizer = optimizer_cls(params, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params[:-1]:
            p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    ("nesterov", "weight_decay", "adjust_lr_fn"),
    list(itertools.product([True, False], [0.0, 0.1], [None, "match_rms_adamw"])),
)
def test_batched_muon_matches_torch_muon(nesterov, weight_decay, adjust_lr_fn):
    kwargs = {"lr": 0.02, "momentum": 0.9, "nesterov": nesterov, "weight_decay": weight_decay}
    kwargs["adjust_lr_fn"] = adjust_lr_fn
    reference, batched = _params(0), _params(0)
    ref_opt = _train(torch.optim.Muon, reference, **kwargs)
    ours = _train(BatchedMuon, batched, **kwargs)
    initial = _params(0)
    for ref, got, start in zip(reference[:-1], batched[:-1], initial, strict=False):
        assert (ref - start).abs().max() > 1e-2  # the updates are real
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.state[got]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"])
    assert torch.equal(batched[-1], initial[-1]) and not ours.state[batched[-1]]  # no gradient: untouched


def test_each_group_s_own_settings_and_schedule_apply():
    """Two groups with their own lr (one a tensor), weight decay and Nesterov, the lr changed between steps as a
    scheduler does; a float64 matrix among float32 ones of its shape; a matrix whose gradient is all zeros."""

    def groups(params):
        return [
            {"params": params[:4], "lr": 0.02, "weight_decay": 0.1, "nesterov": True},
            {"params": params[4:], "lr": torch.tensor(0.05), "weight_decay": 0.0, "nesterov": False},
        ]

    def params():
        made = _params(0)
        made[2] = torch.nn.Parameter(made[2].detach().double())
        return made

    reference, batched = params(), params()
    optimizers = [torch.optim.Muon(groups(reference)), BatchedMuon(groups(batched))]
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in reference[:-1]]
        grads[3].zero_()
        for optimizer, group_params in zip(optimizers, (reference, batched), strict=True):
            for p, g in zip(group_params, grads, strict=False):
                p.grad = g.clone()
            optimizer.param_groups[0]["lr"] = 0.02 / (step + 1)
            optimizer.step()
    for ref, got in zip(reference, batched, strict=True):
        assert got.dtype == ref.dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_batches_split_at_the_element_cap_and_give_the_same_update(monkeypatch):
    params = _params(0)
    assert sorted(map(len, optim._same_shape_batches(params))) == [1, 1, 2, 3]
    monkeypatch.setattr(optim, "MAX_BATCH_ELEMENTS", 2 * 8 * 16)
    assert sorted(map(len, optim._same_shape_batches(params))) == [1, 1, 1, 2, 2]
    reference, batched = _params(0), _params(0)
    _train(torch.optim.Muon, reference, lr=0.02)
    _train(BatchedMuon, batched, lr=0.02)
    for ref, got in zip(reference, batched, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_a_torch_muon_checkpoint_resumes_in_batched_muon():
    reference, batched = _params(0), _params(0)
    ref_opt = _train(torch.optim.Muon, reference, steps=2, lr=0.02)
    with torch.no_grad():
        for ref, got in zip(reference, batched, strict=True):
            got.copy_(ref)
    ours = BatchedMuon(batched, lr=0.02)
    ours.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # as from a file: no buffers shared
    gen = torch.Generator().manual_seed(7)
    for ref, got in zip(reference[:-1], batched[:-1], strict=True):
        ref.grad = got.grad = torch.randn(ref.shape, generator=gen)
    ref_opt.step()
    ours.step()
    for ref, got in zip(reference, batched, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_muon_matches_torch_muon_on_cuda():
    """cuBLAS may pick other bf16 kernels for a batch than for one matrix: equal to a bf16 rounding of the update."""
    lr = 0.02
    reference, batched = ([torch.nn.Parameter(p.detach().cuda()) for p in _params(0)] for _ in range(2))
    _train(torch.optim.Muon, reference, lr=lr, weight_decay=0.1)
    _train(BatchedMuon, batched, lr=lr, weight_decay=0.1)
    for ref, got, start in zip(reference[:-1], batched[:-1], _params(0), strict=False):
        assert (ref.cpu() - start).abs().max() > 1e-2  # the updates are real
        torch.testing.assert_close(got, ref, rtol=0, atol=lr * 1e-2)
