"""Probe (issue 23): what the pieces of one decoded token cost at batch 1 and 16, each replayed in a CUDA graph.

Two tables, in microseconds per call:

* the weighted sum of a decoded token's attention, `weights [B, H_kv, G, R] @ values [B, H_kv, R, D]` over a KV
  ring for L = 2000, in the layouts of `weighted_sums`, for the attention shapes of the Jet-Nemotron-2B and
  Qwen3.5-2B models;
* every distinct `nn.Linear` shape of both models at one token per row, with the count per token, the bandwidth it
  reaches, and its share of the token (count x time).

    python -m benchmarks.probes.decode_kernels --out OUT     # GPU machine
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.run import GPU_SHAPE, jet_model, qwen3_5_model

WINDOW = 2000  # KVRing storage for L = 2000: capacity 1,999 slots, padded to 2,000
ATTENTION = {"jet_nemotron_2b": (2, 6, 128), "qwen3_5_2b": (2, 4, 256)}  # (H_kv, G, D)


def graph_microseconds(fn: Callable[[], object], calls: int = 20, replays: int = 20) -> float:
    """Mean microseconds per call of `fn`, `calls` of them captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def weighted_sums(weights: Tensor, values: Tensor) -> dict[str, Callable[[], Tensor]]:
    """The product over a ring of R = capacity slots, `weights` `[B, H_kv, G, R]` (R a multiple of 8), four ways:
    over an odd capacity R - 1 as a view into weights joined with the token's own (what decoding did before
    KVRing's storage was padded to 8 slots), as a contiguous copy of that, over the aligned R slots, and as the
    multiply-and-sum that inductor compiles into one reduction."""
    odd = weights[..., :-1]
    odd_values = values[..., :-1, :]
    odd_contiguous = odd.contiguous()

    def reduction(w, v):
        return (w.unsqueeze(-1).float() * v.unsqueeze(-3).float()).sum(-2).to(v.dtype)

    compiled = torch.compile(reduction)
    return {
        "odd view": lambda: odd @ odd_values,
        "odd contiguous": lambda: odd_contiguous @ odd_values,
        "aligned": lambda: weights @ values,
        "compiled reduction": lambda: compiled(weights, values),
    }


def attention_table() -> list[dict]:
    rows = []
    for shape, (kv_heads, group, dim) in ATTENTION.items():
        for batch in (1, 16):
            weights = torch.rand(batch, kv_heads, group, WINDOW, device="cuda").softmax(-1).bfloat16()
            values = torch.randn(batch, kv_heads, WINDOW, dim, device="cuda", dtype=torch.bfloat16)
            row = {"shape": shape, "batch": batch}
            for name, fn in weighted_sums(weights, values).items():
                row[name] = graph_microseconds(fn)
            rows.append(row)
            print(row, flush=True)
    return rows


def linear_table(models: dict[str, nn.Module]) -> list[dict]:
    rows = []
    for shape, model in models.items():
        counts = collections.Counter(
            (m.in_features, m.out_features, m.bias is not None) for m in model.modules() if isinstance(m, nn.Linear)
        )
        for (inputs, outputs, bias), count in sorted(counts.items()):
            layer = nn.Linear(inputs, outputs, bias=bias, device="cuda", dtype=torch.bfloat16)
            for batch in (1, 16):
                x = torch.randn(batch, 1, inputs, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    us = graph_microseconds(lambda layer=layer, x=x: layer(x))
                row = {"shape": shape, "in": inputs, "out": outputs, "bias": bias, "count": count, "batch": batch}
                row |= {"us": us, "GB/s": 2 * inputs * outputs / us / 1e3, "us per token": count * us}
                rows.append(row)
                print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="attention,linear", help="comma-separated tables to measure")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    parts = args.parts.split(",")
    if "attention" in parts:
        results["attention"] = attention_table()
        (args.out / "decode_kernels.json").write_text(json.dumps(results, indent=1))
    if "linear" in parts:
        device = torch.device("cuda")
        models = {"jet_nemotron_2b": jet_model(GPU_SHAPE, device), "qwen3_5_2b": qwen3_5_model(False, device)}
        results["linear"] = linear_table(models)
        (args.out / "decode_kernels.json").write_text(json.dumps(results, indent=1))
    for part in parts:
        for row in results[part]:
            print(part, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
