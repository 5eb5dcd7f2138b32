"""The paper's Rule 110 model under sleep: training-step time and peak memory against N.

Model: 4 layers, d=256, attn→GDN→attn→GDN, L=24, T=101 (96 state bits, a query token, 4 labels), batch 512,
`context_only` sleep (the paper's Algorithm 1), bf16 autocast. Reports

* forward+backward time at N in {1, 2, 4}, and its ratio to N=1 next to the ideal ratio (layer-passes);
* peak CUDA memory of a step at N in {1, 4, 8}, with and without `checkpointing: pass`.

Run on a GPU machine: `python -m benchmarks.rule110_engine --out benchmarks/results`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import retrofit
from model_patches.hybrid import SleepHybridConfig, SleepHybridForCausalLM
from retrofit import SleepConfig, apply_sleep

WINDOW, LENGTH, BATCH = 24, 101, 512
CHECKPOINTING = ("none", "chunk", "pass")


def rule110_model(device: torch.device) -> SleepHybridForCausalLM:
    """The paper's 4-layer d=256 attn→GDN→attn→GDN hybrid (character vocabulary)."""
    config = SleepHybridConfig(
        vocab_size=8,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        num_attention_heads=4,
        linear_num_heads=4,
        linear_head_dim=64,
    )
    return SleepHybridForCausalLM(config).to(device)


def batch(device: torch.device, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 2, (size, LENGTH), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return ids, labels


def train_step(model, ids, labels) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=labels).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def step_time(model, ids, labels, repeats: int) -> float:
    """Median seconds of a forward+backward, after warm-up."""
    for _ in range(3):
        train_step(model, ids, labels)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, ids, labels)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory(model, ids, labels) -> float:
    """Peak allocated GiB during one forward+backward (weights and inputs included)."""
    train_step(model, ids, labels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, ids, labels)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def run(repeats: int) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = rule110_model(device)
    ids, labels = batch(device)
    chunks = -(-LENGTH // WINDOW)
    sleeping_chunks = chunks - 1
    times, memory = {}, {}
    for passes in (1, 2, 4):
        apply_sleep(model, SleepConfig(window=WINDOW, passes=passes, sleep_on="context_only"))
        times[passes] = step_time(model, ids, labels, repeats)
    times_pass = {}
    for passes in (1, 4):
        config = SleepConfig(window=WINDOW, passes=passes, sleep_on="context_only", checkpointing="pass")
        apply_sleep(model, config)
        times_pass[passes] = step_time(model, ids, labels, repeats)
    for checkpointing in CHECKPOINTING:
        for passes in (1, 4, 8):
            config = SleepConfig(window=WINDOW, passes=passes, sleep_on="context_only", checkpointing=checkpointing)
            apply_sleep(model, config)
            memory[f"{checkpointing}/N={passes}"] = peak_memory(model, ids, labels)

    def ideal(passes: int) -> float:  # layer-passes of a step, relative to N=1
        return (sleeping_chunks * passes + 1) / chunks

    return {
        "benchmark": "rule110_engine",
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "retrofit": retrofit.__version__,
        "host": platform.node(),
        "shape": {"batch": BATCH, "length": LENGTH, "window": WINDOW, "layers": 4, "d": 256},
        "step_seconds": {str(n): t for n, t in times.items()},
        "step_ratio_vs_n1": {str(n): times[n] / times[1] for n in times},
        "ideal_ratio_vs_n1": {str(n): ideal(n) for n in times},
        "step_seconds_checkpointing_pass": {str(n): t for n, t in times_pass.items()},
        "peak_gib": memory,
        "peak_ratio_n8_vs_n1": {c: memory[f"{c}/N=8"] / memory[f"{c}/N=1"] for c in CHECKPOINTING},
    }


def markdown(result: dict) -> str:
    lines = [
        f"Rule 110 model, batch {BATCH}, T={LENGTH}, L={WINDOW}, bf16 autocast, {result['device']}, {result['date']}",
        "",
        "| N | fwd+bwd (ms) | ratio to N=1 | ideal ratio |",
        "|---|---|---|---|",
    ]
    for n, seconds in result["step_seconds"].items():
        ratio, ideal = result["step_ratio_vs_n1"][n], result["ideal_ratio_vs_n1"][n]
        lines.append(f"| {n} | {seconds * 1e3:.1f} | {ratio:.2f} | {ideal:.2f} |")
    pass_times = result["step_seconds_checkpointing_pass"]
    lines.append(
        f"| checkpointing pass: N=1 {pass_times['1'] * 1e3:.1f} ms, N=4 {pass_times['4'] * 1e3:.1f} ms | | | |"
    )
    lines += ["", "| checkpointing | N=1 (GiB) | N=4 (GiB) | N=8 (GiB) | N=8 / N=1 |", "|---|---|---|---|---|"]
    for c in CHECKPOINTING:
        peaks = [result["peak_gib"][f"{c}/N={n}"] for n in (1, 4, 8)]
        cells = " | ".join(f"{p:.2f}" for p in peaks)
        lines.append(f"| {c} | {cells} | {result['peak_ratio_n8_vs_n1'][c]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    result = run(args.repeats)
    print(markdown(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"rule110-engine-{result['date']}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
