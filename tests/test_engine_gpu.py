"""The engine on CUDA: fla's kernels agree with the CPU torch path through a whole sleeping model."""

from __future__ import annotations

import pytest
import torch

from retrofit import SleepConfig, SleepEngine
from tests.helpers import random_batch, tiny_hybrid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KINDS = ("full_attention", "linear_attention", "sliding_attention", "linear_attention")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def loss_and_grads(model, ids, labels, config):
    model.zero_grad()
    loss = SleepEngine(model.get_sleep_adapter(), config).forward(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["none", "pass"])
def test_sleeping_model_on_fla_matches_the_torch_path(monkeypatch, checkpointing):
    config = SleepConfig(window=40, passes=3, eviction="sliding", checkpointing=checkpointing)
    model = tiny_hybrid(KINDS, dtype=torch.float32, mild_decay=True, vocab_size=64).cuda()
    ids, labels = (t.cuda() for t in random_batch(2, 150, 64))
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    fla_loss, fla_grads = loss_and_grads(model, ids, labels, config)
    monkeypatch.setenv("RETROFIT_OPS", "torch")
    torch_loss, torch_grads = loss_and_grads(model, ids, labels, config)
    assert rel(fla_loss, torch_loss) < 5e-3
    assert fla_grads.keys() == torch_grads.keys()
    worst = max(rel(fla_grads[n], torch_grads[n]) for n in torch_grads)
    assert worst < 2e-2, worst


def test_bf16_training_step_runs_and_is_finite():
    model = tiny_hybrid(KINDS, dtype=torch.float32, vocab_size=64).cuda().train()
    ids, labels = (t.cuda() for t in random_batch(4, 130, 64))
    config = SleepConfig(window=32, passes=4, sleep_on="context_only", checkpointing="pass")
    labels[:, :100] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = SleepEngine(model.get_sleep_adapter(), config).forward(ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
