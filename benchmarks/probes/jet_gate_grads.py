"""Probe: where do fla's and the torch path's A_log/dt_bias gradients part inside a sleeping tiny Jet-Nemotron?

1. Whole model, float32 on CUDA: fla and torch (TF32 off and on) against the torch path in float64, for
   `checkpointing` none and pass: relative error of every gradient.
2. Every `gated_delta_rule` call of the fla run (checkpointing none) replayed alone in float64 with the same upstream
   gradients: the relative error of each input gradient, so a bad op call shows up by name and index.

Run on a GPU machine: `python -m benchmarks.probes.jet_gate_grads`.

Finding (H100, 2026-11-22): fla and the torch path with TF32 matmuls are both O(1) off float64 in layer 0's A_log
and dt_bias (1.9 and 2.7), while the torch path in fp32 is within 5e-4. On a CPU, perturbing every gated-delta-rule
output of this model (unit-scale random weights from `write_official_checkpoint`) by a relative 1.5e-3 moves the
median gradient by 80%: the model is chaotic, not fla wrong. `tests/test_jet_nemotron.py` now compares on the
family's own initialisation, with tolerances calibrated by that perturbation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import retrofit.layers.gated_deltanet as mixer_module
from retrofit import SleepConfig, SleepEngine
from retrofit.ops.gated_delta_rule import _gated_delta_rule_torch
from tests.helpers import random_batch
from tests.jet_checkpoint import tiny_config, write_official_checkpoint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only a dry run of the probe itself
FLA = "fla" if DEVICE == "cuda" else "torch"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


def model_grads(directory: Path, dtype: torch.dtype, backend: str, checkpointing: str, tf32: bool = False):
    import os

    os.environ["RETROFIT_OPS"] = backend
    torch.backends.cuda.matmul.allow_tf32 = tf32
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(DEVICE)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.fill_(-4.0)
    ids, labels = (t.to(DEVICE) for t in random_batch(2, 150, model.config.vocab_size))
    sleep = SleepConfig(window=40, passes=3, eviction="sliding", checkpointing=checkpointing)
    loss = SleepEngine(model.get_sleep_adapter(), sleep).forward(ids, labels=labels).loss
    loss.backward()
    torch.backends.cuda.matmul.allow_tf32 = False
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class Recorder:
    """Wraps the mixers' `gated_delta_rule` and keeps every call's inputs, upstream and input gradients."""

    def __init__(self, op):
        self.op, self.calls = op, []

    def __call__(self, q, k, v, g, beta, **kwargs):
        record = {"kwargs": {n: kwargs[n] for n in ("use_qk_l2norm",)}, "grads": {}}
        named = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": kwargs.get("initial_state")}
        record["inputs"] = {n: (t.detach().clone() if t is not None else None) for n, t in named.items()}
        for name, tensor in named.items():
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(lambda grad, name=name: record["grads"].__setitem__(name, grad.detach().clone()))
        o, final = self.op(q, k, v, g, beta, **kwargs)
        record["strides"] = {n: tuple(t.stride()) for n, t in named.items() if t is not None}
        for name, tensor in (("do", o), ("dht", final)):  # a final state nothing reads gets no gradient (None)
            tensor.register_hook(
                lambda grad, name=name: grad is None or record.__setitem__(name, grad.detach().clone())
            )
        self.calls.append(record)
        return o, final


def replay(record) -> dict[str, float]:
    inputs = {n: (t.double().requires_grad_() if t is not None else None) for n, t in record["inputs"].items()}
    o, final = _gated_delta_rule_torch(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
        initial_state=inputs["initial_state"], output_final_state=True,
        scale=inputs["q"].shape[-1] ** -0.5, chunk_size=64, **record["kwargs"],
    )  # fmt: skip
    outputs, upstream = [o], [record.get("do", torch.zeros_like(o)).double()]
    if "dht" in record:
        outputs.append(final)
        upstream.append(record["dht"].double())
    torch.autograd.backward(outputs, upstream)
    return {n: rel(record["grads"][n], t.grad) for n, t in inputs.items() if n in record["grads"]}


def main() -> None:
    directory = Path(tempfile.mkdtemp())
    config = tiny_config()
    config["efficient_attention_config"]["jet"] |= {"head_dim": 8, "expand_v": 2}
    write_official_checkpoint(directory, config)

    print("== whole model: relative gradient error against the float64 torch path (worst 4) ==")
    for checkpointing in ("none", "pass"):
        ref_loss, ref = model_grads(directory, torch.float64, "torch", checkpointing)
        for label, backend, tf32 in (("fla", FLA, False), ("torch32", "torch", False), ("torch32+tf32", "torch", True)):
            loss, got = model_grads(directory, torch.float32, backend, checkpointing, tf32)
            worst = sorted(((rel(got[n], ref[n]), n) for n in ref), reverse=True)[:4]
            shown = ", ".join(f"{n.removeprefix('model.layers.')} {e:.1e}" for e, n in worst)
            print(f"{checkpointing:5s} {label:13s} loss {rel(loss, ref_loss):.1e} | {shown}")

    print("== fla calls replayed alone in float64 (checkpointing none) ==")
    import os

    os.environ["RETROFIT_OPS"] = FLA
    recorder = Recorder(mixer_module.gated_delta_rule)
    mixer_module.gated_delta_rule = recorder
    model_grads(directory, torch.float32, FLA, "none")
    mixer_module.gated_delta_rule = recorder.op
    for index, record in enumerate(recorder.calls):
        errors = replay(record)
        shape = tuple(record["inputs"]["v"].shape)
        g = record["inputs"]["g"]
        shown = " ".join(f"d{n} {e:.1e}" for n, e in errors.items())
        print(f"call {index:2d} v{shape} g[{float(g.min()):.3f},{float(g.max()):.3f}] dht={'dht' in record} {shown}")
        # dinitial_state is not comparable: a state tensor that starts several calls gets their summed gradient.
        if max(e for n, e in errors.items() if n != "initial_state") > 1e-2:
            print("   strides", record["strides"], "do", tuple(record["do"].stride()) if "do" in record else None)


if __name__ == "__main__":
    main()
