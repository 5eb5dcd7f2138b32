"""Probe (issue 23): compiled wake decoding of the Jet-Nemotron-2B and Qwen3.5-2B shapes, batch 1 and 16.

Random init, bf16, sleeping with L = 2000, N = 6, hard eviction, `SleepCache(compile=True)`. Per shape: the seconds
of the first decoded step (which compiles) and of the second (which captures the graph); ms/token at batch 1 after
a 2K and a 32K prompt, at batch 16 after a 2K prompt (bursts of 8 tokens, as item d of `run.py`); sleep against
no sleep at batch 1 after a 2K prompt (`no_sleep`, as item d); and the profile of one token at batch 1 and 16
(`<shape>-b<batch>.txt`). `--unpacked` measures without packing the input projections (`retrofit.layers.packing`).

    python -m benchmarks.probes.decode_shapes --out OUT     # GPU machine
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import torch
import torch._inductor.config

from benchmarks.run import DECODE_BURST, GPU_SHAPE, decode_latencies, jet_model, qwen3_5_model, timed, write_profile
from retrofit import SleepConfig, apply_sleep, generation
from retrofit.generation import SleepCache

SLEEP = SleepConfig(window=2000, passes=6, eviction="hard")
RUNS = {"b1_2k": (1, 2048), "b1_32k": (1, 32768), "b16_2k": (16, 2048)}
TOKENS = 24  # decoded bursts per measure


def profile_token(model, vocab: int, batch: int, path: Path) -> None:
    """Profile one replayed token after a 2K prompt to `path` (`run.write_profile`'s tables)."""
    prompt = torch.randint(0, vocab, (batch, 2048), device=model.device)
    cache = SleepCache(compile=True)
    with torch.no_grad():
        ids = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        model(ids, cache=cache)  # the compiled first step; write_profile's warm-up call captures the graph
        write_profile(path, lambda: model(ids, cache=cache))


def first_steps(model, vocab: int) -> dict:
    """Seconds of the first two decoded tokens of a fresh `SleepCache(compile=True)` after a 64-token prompt: the
    first compiles the wake step (when nothing compiled it for this model before), the second captures it."""
    prompt = torch.randint(0, vocab, (1, 64), device=model.device)
    cache = SleepCache(compile=True)
    with torch.no_grad():
        ids = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        compiling = timed(lambda: model(ids, cache=cache))
        capturing = timed(lambda: model(ids, cache=cache))
    return {"compile_step_s": compiling, "capture_step_s": capturing}


def measure(name: str, model, out: Path, runs: list[str], profile_batches: list[int]) -> dict:
    model.eval()
    apply_sleep(model, SLEEP)
    vocab = model.config.vocab_size
    row = first_steps(model, vocab)
    print(name, " ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)
    for run in (run for run in runs if run in RUNS):
        batch, context = RUNS[run]
        seconds = decode_latencies(model, {"s": (SLEEP, {"compile": True})}, context, TOKENS, vocab, batch=batch)["s"]
        row[f"{run}_ms"] = seconds * 1e3
        print(name, run, f"{seconds * 1e3:.3f} ms/token", flush=True)
    if "no_sleep" in runs:  # as item d: sleep against one window longer than the stream, taking turns
        no_sleep = SleepConfig(window=2048 + DECODE_BURST * (TOKENS + 3), passes=1, eviction="hard")
        configs = {"sleep": (SLEEP, {"compile": True}), "no_sleep": (no_sleep, {"compile": True})}
        seconds = decode_latencies(model, configs, 2048, TOKENS, vocab)
        row["sleep_over_no_sleep_2k"] = seconds["sleep"] / seconds["no_sleep"]
        print(name, "sleep / no sleep", f"{row['sleep_over_no_sleep_2k']:.3f}", flush=True)
    if {"b1_2k", "b1_32k"} <= set(runs):
        row["flatness_32k_over_2k"] = row["b1_32k_ms"] / row["b1_2k_ms"]
    if {"b1_2k", "b16_2k"} <= set(runs):
        row["batch16_throughput_ratio"] = 16 * row["b1_2k_ms"] / row["b16_2k_ms"]
    for batch in profile_batches:
        profile_token(model, vocab, batch, out / f"{name}-b{batch}.txt")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="jet_nemotron_2b,qwen3_5_2b", help="comma-separated, measured in order")
    parser.add_argument(
        "--runs", default=",".join([*RUNS, "no_sleep"]), help=f"comma-separated among {', '.join(RUNS)}, no_sleep"
    )
    parser.add_argument("--profile", default="1,16", help="batches to profile one token of ('' for none)")
    parser.add_argument("--inductor", default="", help="inductor settings to try, as KEY=PYTHON_VALUE,...")
    parser.add_argument("--unpacked", action="store_true", help="without packed input projections (the baseline)")
    args = parser.parse_args()
    if args.unpacked:
        generation.pack_input_projections = lambda blocks: []
    for setting in filter(None, args.inductor.split(",")):
        key, value = setting.split("=", 1)
        setattr(torch._inductor.config, key, ast.literal_eval(value))
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    builders = {
        "jet_nemotron_2b": lambda: jet_model(GPU_SHAPE, device),
        "qwen3_5_2b": lambda: qwen3_5_model(False, device),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "inductor": args.inductor}
    results["packed"] = not args.unpacked
    for shape in args.shapes.split(","):
        profiled = [int(b) for b in args.profile.split(",") if b]
        results[shape] = measure(shape, builders[shape](), args.out, args.runs.split(","), profiled)
        torch.cuda.empty_cache()
        (args.out / "decode_shapes.json").write_text(json.dumps(results, indent=1))
        print(shape, " ".join(f"{k}={v:.3f}" for k, v in results[shape].items()), flush=True)


if __name__ == "__main__":
    main()
