"""The Qwen3.5-2B shape patched to sleep, against transformers' own model of that shape (issue 20), in one run.

| id | what | target |
|---|---|---|
| train | training step, B=1, T=4000, N=1 with L >= T (no eviction): ours ÷ transformers' forward/backward | ≤ 1.05× |
| decode | greedy decoding without sleep after a 2K-token prompt, ms/token: ours ÷ transformers' own cache | ≤ 1.0× |
| decode | the same, transformers' own ÷ ours (issue 23) | ≥ 15× |

Both models are built from `configs/qwen3.5-2b.json` (the published config, sources in `configs/README.md`), random
init with the same seed, bf16; fla's kernels serve both where installed. Ratios are measured within the run, the
two models taking turns.

    python -m benchmarks.native --out benchmarks/results      # GPU machine (--items decode: that item alone)
    python -m benchmarks.native --dry-run                     # CPU: a tiny shape through both items
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

import retrofit
from benchmarks.run import QWEN_CONFIG_2B, interleaved_medians, peak_memory, qwen3_5_model
from retrofit import SleepConfig, apply_sleep
from retrofit.generation import CACHE_NAME, SleepCache


def models(dry_run: bool, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' own model and the same weights patched to sleep (`apply_sleep` is applied by the items)."""
    return qwen3_5_model(dry_run, device), qwen3_5_model(dry_run, device)


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def item_train(theirs, ours, ids: torch.Tensor, repeats: int) -> dict:
    """One forward+backward, every token labelled; ours sleeps with one window over the sequence (no eviction)."""
    apply_sleep(ours, SleepConfig(window=ids.shape[1], passes=1, checkpointing="none"))
    steps = {"theirs": lambda: train_step(theirs, ids), "ours": lambda: train_step(ours, ids)}
    peaks = {}
    for name, step in steps.items():
        with peak_memory() as peak:
            step()
        peaks[name] = peak["gib"]
    seconds = interleaved_medians(steps, repeats)
    ratio = seconds["ours"] / seconds["theirs"]
    return {"seconds": seconds, "peak_gib": peaks, "value": ratio, "met": ratio <= 1.05}


def item_decode(theirs, ours, context: int, new_tokens: int) -> dict:
    """Seconds per greedy token after the same prompt: transformers' own cache against ours without sleep (one
    window longer than the stream), compiled and replayed as a CUDA graph, replayed uncompiled and, for contrast, in
    eager steps; the four take turns token by token."""
    apply_sleep(ours, SleepConfig(window=context + new_tokens + 8, passes=1))
    prompt = torch.randint(0, theirs.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(theirs.device)
    state: dict[str, tuple] = {}
    with torch.no_grad():
        first = theirs(prompt, use_cache=True)
        state["theirs"] = (getattr(first, CACHE_NAME), first.logits[:, -1:].argmax(-1))
        for name, capture, compile in (("ours", True, True), ("ours_graph", True, False), ("ours_eager", False, False)):
            cache = SleepCache(capture=capture, compile=compile)
            state[name] = (cache, ours(prompt, **{CACHE_NAME: cache}).logits[:, -1:].argmax(-1))

    def token(name: str, model: torch.nn.Module) -> Callable[[], None]:
        @torch.no_grad()
        def decode() -> None:
            cache, last = state[name]
            state[name] = (cache, model(last, **{CACHE_NAME: cache}, use_cache=True).logits[:, -1:].argmax(-1))

        return decode

    models = {"theirs": theirs, "ours": ours, "ours_graph": ours, "ours_eager": ours}
    seconds = interleaved_medians({name: token(name, model) for name, model in models.items()}, new_tokens)
    ratio = seconds["ours"] / seconds["theirs"]
    ms = {name: value * 1e3 for name, value in seconds.items()}
    return {"ms_per_token": ms, "value": ratio, "theirs_over_ours": 1 / ratio, "met": ratio <= 1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Qwen3.5-2B shape: ours against transformers' own model")
    parser.add_argument("--out", type=Path, help="folder for the JSON and markdown result")
    parser.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU: checks the script runs")
    parser.add_argument("--items", default="train,decode", help="comma-separated among train, decode")
    args = parser.parse_args(argv)
    items = args.items.split(",")
    if not items or not set(items) <= {"train", "decode"}:
        parser.error(f"--items {args.items!r}: name train, decode or both, comma-separated")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("this benchmark measures a GPU: run it on a CUDA machine, or pass --dry-run")
    device = torch.device("cpu" if args.dry_run else "cuda")
    length, context, new_tokens, repeats = (64, 48, 4, 2) if args.dry_run else (4000, 2048, 48, 5)
    theirs, ours = models(args.dry_run, device)
    ids = torch.randint(0, theirs.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    results = {}
    if "train" in items:
        results["train"] = item_train(theirs.train(), ours.train(), ids.to(device), repeats)
    if "decode" in items:
        results["decode"] = item_decode(theirs.eval(), ours.eval(), context, new_tokens)
    result = {
        "benchmark": "native",
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "retrofit": retrofit.__version__,
        "shape": {"config": QWEN_CONFIG_2B.name, "tiny": args.dry_run, "length": length, "context": context},
        "results": results,
    }
    lines = ["| item | ours ÷ transformers | target | met |", "|---|---:|---|---|"]
    names = {"train": f"train (T={length}, N=1, no eviction)", "decode": f"decode after {context} tokens, ms/token"}
    targets = {"train": "<= 1.05x", "decode": "<= 1.0x"}
    for item, row in results.items():
        lines.append(f"| {names[item]} | {row['value']:.3f}x | {targets[item]} | {row['met']} |")
    if "decode" in results:
        ms = results["decode"]["ms_per_token"]
        lines += [
            "",
            "| decode ms/token | " + " | ".join(ms) + " |",
            "|---|" + "---:|" * len(ms),
            "| | " + " | ".join(f"{value:.2f}" for value in ms.values()) + " |",
        ]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        stem = "native-dry-run" if args.dry_run else f"{date.today().isoformat()}-native"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(table + "\n")
        print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
