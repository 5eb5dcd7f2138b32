"""The GPU benchmark suite (issue 7): speed and memory of sleep on a Jet-Nemotron-2B-shaped model (or, with
`--model qwen3_5_2b`, on transformers' own Qwen3.5-2B shape, patched), in one run.

| id | what | target |
|---|---|---|
| a | training step at N in {1, 2, 4, 6}, L=2000, T=4000, `checkpointing: pass`: speed-up ÷ ideal speed-up | ≥ 0.9 |
| b | engine at N=1 with no eviction vs the plain forward/backward of the same model | ≤ 1.10× |
| c | peak memory N=6 vs N=1, with `checkpointing: pass` (and `none` for contrast) | ≤ 1.3× |
| d | wake decode ms/token (replayed CUDA graph) vs no sleep (one window), 2K/8K/32K context | ≤ 3 ms, ≤ 1.05×, flat |
| d | the same at batch 16: tokens/s ÷ batch 1 (eager steps reported for contrast) | ≥ 10× |
| e | latency of sleeping one L-token window at N passes vs N × prefill(L) | ≤ 1.1× |
| f | MFU of the N=1 training step (b's engine step) vs a bf16 matmul peak measured in this run | ≥ 30% |
| g | the Rule 110 model (4 layers, d=256, L=24): tokens/s at N in {1, 4} | report |
| h | all tokens labelled: the default head loss (fla's fused on CUDA) vs one call per chunk | less memory, ≤ 1.05× |

The ideal cost of item a counts layer-passes (block calls) in the forward. Ratios are measured within the run.
The model is random-init bf16 (weights and compute), batch 1.

    python -m benchmarks.run --suite all --out benchmarks/results        # GPU machine, < 10 minutes
    python -m benchmarks.run --suite all --dry-run                       # CPU: a tiny model through every item
    python -m benchmarks.run --suite de --model qwen3_5_2b --out OUT      # issue 23's items on the Qwen3.5 shape
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

import retrofit
from benchmarks.triton_cache import use_kept_autotuning
from retrofit import SleepConfig, SleepEngine, apply_sleep
from retrofit.generation import SleepCache
from retrofit.ops import cross_entropy

CONFIG_2B = Path(__file__).resolve().parent / "configs" / "jet-nemotron-2b.json"
QWEN_CONFIG_2B = Path(__file__).resolve().parent / "configs" / "qwen3.5-2b.json"
QWEN_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1,
             "linear_num_key_heads": 2, "linear_num_value_heads": 2, "vocab_size": 512}  # fmt: skip
ITEMS = "abcdefgh"
TARGETS = {
    "a": "efficiency >= 0.9 at every N",
    "b": "<= 1.10x",
    "c": "<= 1.3x",
    "d": "<= 3 ms/token, <= 1.05x no sleep, 32K/2K <= 1.05, batch 16 >= 10x tokens/s",
    "e": "<= 1.1x",
    "f": ">= 30%",
    "g": "report",
    "h": "peak below the plain head's, <= 1.05x its time",
}


@dataclass(frozen=True)
class Shape:
    """Sizes of one suite run: the paper's on a GPU, tiny ones for `--dry-run` on a CPU."""

    config_overrides: dict
    window: int
    length: int
    passes: tuple[int, ...]
    contexts: tuple[int, ...]
    decode_tokens: int
    repeats: int
    matmul_size: int
    decode_batch: int  # the batch of item d's throughput row


GPU_SHAPE = Shape({}, 2000, 4000, (1, 2, 4, 6), (2048, 8192, 32768), 48, 5, 8192, 16)
DRY_SHAPE = Shape(
    {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
     "num_hidden_layers": 8, "vocab_size": 512, "layer_types": ["jet", "attn", "jet", "swa", "jet", "jet", "attn",
     "jet"], "efficient_attention_config": {"jet": {"head_dim": 12, "num_heads": 2}, "swa": {"window_size": 24}}},
    40, 80, (1, 2), (48, 96), 3, 1, 128, 2,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- measuring


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of `fn`, with the GPU drained before and after."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def interleaved_medians(fns: dict, repeats: int, setup: Callable[[object], None] | None = None) -> dict:
    """Median wall time of each of `fns` (after one warm-up call each), the calls taken in turns.

    Taking turns makes the ratios between them immune to drift (clocks, other load on the host), which decides
    targets such as b's 1.10x; `setup(key)`, untimed, runs before each call of `fns[key]` (e.g. `apply_sleep`).
    """
    prepare = setup or (lambda _key: None)
    times: dict = {key: [] for key in fns}
    for round_ in range(repeats + 1):
        for key, fn in fns.items():
            prepare(key)
            seconds = timed(fn)
            if round_:
                times[key].append(seconds)
    return {key: statistics.median(values) for key, values in times.items()}


@contextmanager
def peak_memory() -> dict:
    """Peak allocated GiB inside the block (`{"gib": ...}`; None on a CPU)."""
    out = {"gib": None}
    if torch.cuda.is_available():
        synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield out
    if torch.cuda.is_available():
        synchronize()
        out["gib"] = torch.cuda.max_memory_allocated() / 2**30


def count_layer_passes(model: torch.nn.Module, fn: Callable[[], object]) -> int:
    """Block calls made by `fn` (the ideal cost unit of item a): every block of every pass counts once."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    handles = [block.register_forward_pre_hook(hook) for block in model.model.layers]
    try:
        with torch.no_grad():
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return calls[0]


# ---------------------------------------------------------------------------------------------- the model


def qwen3_5_model(tiny: bool, device: torch.device) -> torch.nn.Module:
    """transformers' own Qwen3.5-2B text model from the published config (or a tiny variant), random init with seed
    0, bf16, on `device`; not yet patched to sleep."""
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(QWEN_CONFIG_2B, Path(folder) / "config.json")
        config = AutoConfig.from_pretrained(folder).get_text_config()
    for key, value in (QWEN_TINY if tiny else {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def jet_model(shape: Shape, device: torch.device) -> torch.nn.Module:
    """Jet-Nemotron-2B's published config (or its tiny dry-run variant), random init, bf16, on `device`."""
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(CONFIG_2B, Path(folder) / "config.json")
        config = AutoConfig.from_pretrained(folder)
    for key, value in shape.config_overrides.items():
        if key == "efficient_attention_config":
            value = {k: {**config.efficient_attention_config[k], **v} for k, v in value.items()}
        setattr(config, key, value)
    if shape.config_overrides:  # the derived fields (block settings, layer count) follow the overrides
        config = type(config).from_dict(config.to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.train()


def train_step(model: torch.nn.Module, ids: torch.Tensor, forward: Callable | None = None) -> None:
    """One forward+backward with every token supervised; gradients are dropped after."""
    loss = (forward or model)(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def sleep_config(shape: Shape, passes: int, checkpointing: str = "pass", window: int | None = None) -> SleepConfig:
    return SleepConfig(window=window or shape.window, passes=passes, eviction="hard", checkpointing=checkpointing)


# ---------------------------------------------------------------------------------------------- the items


def item_a(model, shape: Shape, ids: torch.Tensor) -> dict:
    """Step time, layer-passes and peak memory at every N, `checkpointing: pass`; the N take turns."""
    configs = {passes: sleep_config(shape, passes) for passes in shape.passes}
    rows = {}
    for passes, config in configs.items():
        apply_sleep(model, config)
        cost = count_layer_passes(model, lambda: model(ids, labels=ids))
        with peak_memory() as peak:
            train_step(model, ids)
        rows[passes] = {"layer_passes": cost, "peak_gib": peak["gib"]}
    steps = dict.fromkeys(configs, lambda: train_step(model, ids))  # one step; `setup` applies each N's config
    seconds = interleaved_medians(steps, shape.repeats, lambda passes: apply_sleep(model, configs[passes]))
    base = shape.passes[0]
    for passes, row in rows.items():
        row["seconds"] = seconds[passes]
        speedup = seconds[base] / seconds[passes]
        ideal = rows[base]["layer_passes"] / row["layer_passes"]
        row["efficiency"] = speedup / ideal
        row["tokens_per_s"] = ids.numel() / seconds[passes]
    worst = min(row["efficiency"] for row in rows.values())
    return {"rows": rows, "value": worst, "met": worst >= 0.9}


def item_b(model, shape: Shape, ids: torch.Tensor) -> dict:
    """Engine at N=1 with one window over the whole sequence vs the plain forward, both without checkpointing."""
    apply_sleep(model, sleep_config(shape, 1, "none", window=ids.shape[1]))
    steps = {"engine": lambda: train_step(model, ids), "plain": lambda: train_step(model, ids, model.plain_forward)}
    seconds = interleaved_medians(steps, shape.repeats)
    engine, plain = seconds["engine"], seconds["plain"]
    ratio = engine / plain
    return {"engine_seconds": engine, "plain_seconds": plain, "value": ratio, "met": ratio <= 1.10}


def item_c(model, shape: Shape, ids: torch.Tensor, pass_rows: dict) -> dict:
    """Peak memory at the largest N against N=1: `pass` from item a, `none` measured here (OOM is reported)."""
    low, high = shape.passes[0], shape.passes[-1]
    peaks = {"pass": {low: pass_rows[low]["peak_gib"], high: pass_rows[high]["peak_gib"]}, "none": {}}
    for passes in (low, high):
        apply_sleep(model, sleep_config(shape, passes, "none"))
        try:
            with peak_memory() as peak:
                train_step(model, ids)
            peaks["none"][passes] = peak["gib"]
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            peaks["none"][passes] = None
            torch.cuda.empty_cache()
    ratio, contrast = (_ratio(peaks[mode][high], peaks[mode][low]) for mode in ("pass", "none"))
    return {"peak_gib": peaks, "value": ratio, "none_ratio": contrast, "met": None if ratio is None else ratio <= 1.3}


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either was not measured (a CPU run, or an out-of-memory)."""
    return a / b if a is not None and b else None


# Tokens decoded per timed call of item d: the host runs ahead of the device within a burst, as in generation.
DECODE_BURST = 8


@torch.no_grad()
def decode_latencies(
    model,
    configs: dict[str, tuple[SleepConfig, dict]],
    context: int,
    new_tokens: int,
    vocab: int,
    profile: Path | None = None,
    batch: int = 1,
) -> dict[str, float]:
    """Median seconds per greedy decoding step of `batch` rows after the same `context`-token prompt, under each of
    `configs` (a sleep config, and the `SleepCache` arguments: capture, compile), each streaming through its own
    cache; the configs decode in turns, `DECODE_BURST` tokens per timed call, `new_tokens` calls each. With
    `profile`, one more step of the last config is profiled."""
    generator = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, vocab, (batch, context), generator=generator).to(model.device)
    caches, next_ids = {}, {}
    for name, (config, cache_options) in configs.items():
        apply_sleep(model, config)
        caches[name] = SleepCache(**cache_options)
        next_ids[name] = model(prompt, cache=caches[name]).logits[:, -1:].argmax(-1)

    def tokens(name: str, count: int) -> Callable[[], None]:
        def decode() -> None:
            for _ in range(count):
                next_ids[name] = model(next_ids[name], cache=caches[name]).logits[:, -1:].argmax(-1)

        return decode

    seconds = interleaved_medians(
        {name: tokens(name, DECODE_BURST) for name in configs},
        new_tokens,
        lambda name: apply_sleep(model, configs[name][0]),
    )
    if profile is not None:
        last = list(configs)[-1]  # the config still applied
        write_profile(profile, tokens(last, 1))
    return {name: total / DECODE_BURST for name, total in seconds.items()}


def item_d(model, shape: Shape, vocab: int, profile_dir: Path | None = None) -> dict:
    """Per-token wake latency with sleep (KV bounded by L) vs no sleep (one window: all KV kept), per context, both
    through the captured CUDA graph of the wake step, compiled (`SleepCache(compile=True)`) and not; eager steps of
    the sleeping model for contrast; and, at the first context, the tokens/s of `decode_batch` rows against one.

    No decoded token crosses a window boundary (contexts are not multiples of L), so this is the wake cost alone.
    The targets are read on the compiled graphs. With `profile_dir`, one compiled sleeping token at the largest
    context is profiled to `profile-decode.txt`.
    """
    model.eval()
    rows = {}
    sleep = SleepConfig(window=shape.window, passes=shape.passes[-1], eviction="hard")
    graph, compiled, eager = {"capture": True}, {"capture": True, "compile": True}, {"capture": False}
    for context in tqdm(shape.contexts, desc="contexts", leave=False):
        no_sleep = SleepConfig(window=context + DECODE_BURST * (shape.decode_tokens + 3), passes=1, eviction="hard")
        configs = {
            "no_sleep": (no_sleep, compiled),
            "eager": (sleep, eager),
            "graph": (sleep, graph),
            "sleep": (sleep, compiled),
        }
        profile = profile_dir / "profile-decode.txt" if profile_dir and context == shape.contexts[-1] else None
        seconds = decode_latencies(model, configs, context, shape.decode_tokens, vocab, profile)
        ours, base = seconds["sleep"], seconds["no_sleep"]
        rows[context] = {
            "sleep_ms": ours * 1e3,
            "no_sleep_ms": base * 1e3,
            "ratio": ours / base,
            "graph_sleep_ms": seconds["graph"] * 1e3,
            "eager_sleep_ms": seconds["eager"] * 1e3,
        }
    context = shape.contexts[0]
    one, many = (
        decode_latencies(model, {"sleep": (sleep, compiled)}, context, shape.decode_tokens, vocab, batch=batch)["sleep"]
        for batch in (1, shape.decode_batch)
    )
    model.train()
    worst = max(row["ratio"] for row in rows.values())
    slowest = max(row["sleep_ms"] for row in rows.values())
    first, last = rows[shape.contexts[0]]["sleep_ms"], rows[shape.contexts[-1]]["sleep_ms"]
    flat = last / first
    throughput = shape.decode_batch * one / many
    return {
        "rows": rows,
        "value": worst,
        "flatness": flat,
        "slowest_ms": slowest,
        "batch": shape.decode_batch,
        "batch_throughput_ratio": throughput,
        "met": slowest <= 3 and worst <= 1.05 and flat <= 1.05 and throughput >= 10,
    }


def item_e(model, shape: Shape, ids: torch.Tensor) -> dict:
    """Sleeping one window at N passes vs N prefills of it (a prefill is one wake pass over the window); the
    prefill and every N take turns."""
    window_ids = ids[:, : shape.window]
    positions = torch.arange(shape.window, device=ids.device)[None]
    blocks = len(model.model.layers)
    prefill_engine = SleepEngine(model.get_sleep_adapter(), sleep_config(shape, 1, "none"))
    calls = {"prefill": lambda: prefill_engine.forward(window_ids)}
    for passes in shape.passes:
        engine = SleepEngine(model.get_sleep_adapter(), sleep_config(shape, passes, "none"))
        calls[passes] = lambda engine=engine: engine.sleep(window_ids, 0, positions, [None] * blocks, [None] * blocks)
    with torch.no_grad():
        seconds = interleaved_medians(calls, shape.repeats)
    prefill = seconds.pop("prefill")
    rows = {n: {"sleep_seconds": t, "ratio": t / (n * prefill)} for n, t in seconds.items()}
    worst = max(row["ratio"] for row in rows.values())
    return {"prefill_seconds": prefill, "rows": rows, "value": worst, "met": worst <= 1.1}


def matmul_peak_tflops(size: int, repeats: int) -> float:
    """bf16 dense matmul throughput on this device, the MFU denominator."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    seconds = median_seconds(lambda: a @ b, max(repeats, 10), warmup=3)
    return 2 * size**3 / seconds / 1e12


def training_flops(model, tokens: int) -> float:
    """Model FLOPs of one forward+backward over `tokens` tokens in one window (6 per matmul weight per token,
    plus causal attention: 3 × 2·T·T_attended·H·D, where sliding layers attend to their window)."""
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops = 6 * matmul_weights * tokens
    for layer in model.model.layers:
        attention = layer.self_attn
        if getattr(attention, "kind", None) in ("attention", "sliding"):
            span = min(tokens, attention.window or tokens)
            flops += 3 * 2 * tokens * span * attention.num_heads * attention.head_dim  # QK^T and PV, causal half
    return float(flops)


def item_f(model, shape: Shape, ids: torch.Tensor, engine_seconds: float, profile_dir: Path | None = None) -> dict:
    """MFU of item b's engine step; with `profile_dir`, that step is profiled to `profile-train.txt`."""
    peak = matmul_peak_tflops(shape.matmul_size, shape.repeats)
    if profile_dir is not None:
        apply_sleep(model, sleep_config(shape, 1, "none", window=ids.shape[1]))
        write_profile(profile_dir / "profile-train.txt", lambda: train_step(model, ids))
    achieved = training_flops(model, ids.numel()) / engine_seconds / 1e12
    mfu = achieved / peak
    return {"matmul_peak_tflops": peak, "achieved_tflops": achieved, "value": mfu, "met": mfu >= 0.30}


def item_g(dry_run: bool) -> dict:
    """The Rule 110 model's training throughput, where kernel-launch overhead dominates."""
    from benchmarks import rule110_engine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = rule110_engine.rule110_model(device)
    ids, labels = rule110_engine.batch(device, 8 if dry_run else rule110_engine.BATCH)
    rows = {}
    for passes in (1, 4):
        apply_sleep(model, SleepConfig(window=rule110_engine.WINDOW, passes=passes, sleep_on="context_only"))
        seconds = median_seconds(lambda: rule110_engine.train_step(model, ids, labels), 1 if dry_run else 5)
        rows[passes] = {"seconds": seconds, "tokens_per_s": ids.numel() / seconds}
    return {"rows": rows, "value": rows[4]["tokens_per_s"], "met": None}


# ---------------------------------------------------------------------------------------------- the suite


def item_h(model, shape: Shape, ids: torch.Tensor) -> dict:
    """Every token labelled (`train_step`'s labels are the inputs), N=1, `checkpointing: pass`: the head loss as the
    engine takes it by default (fla's fused linear cross-entropy on CUDA), the chunked torch loss
    (`retrofit.ops.cross_entropy`, `HEAD_ROWS` rows of logits at a time), and one call over each chunk's rows."""
    apply_sleep(model, sleep_config(shape, 1))
    default = cross_entropy.HEAD_ROWS

    def step_with(rows: int, fla: bool) -> Callable[[], None]:
        def step() -> None:
            cross_entropy.HEAD_ROWS, cross_entropy.USE_FLA = rows, fla
            try:
                train_step(model, ids)
            finally:
                cross_entropy.HEAD_ROWS, cross_entropy.USE_FLA = default, True

        return step

    steps = {
        "default": step_with(default, True),
        "chunked": step_with(default, False),
        "plain": step_with(ids.numel() + 1, False),
    }
    peaks = {}
    for name, step in steps.items():
        with peak_memory() as peak:
            step()
        peaks[name] = peak["gib"]
    seconds = interleaved_medians(steps, shape.repeats)
    ratio, memory = seconds["default"] / seconds["plain"], _ratio(peaks["default"], peaks["plain"])
    return {
        "seconds": seconds,
        "peak_gib": peaks,
        "value": ratio,
        "memory_ratio": memory,
        "chunked_value": seconds["chunked"] / seconds["plain"],
        "chunked_memory_ratio": _ratio(peaks["chunked"], peaks["plain"]),
        "met": None if memory is None else memory < 1 and ratio <= 1.05,
    }


DEFAULT_MODEL = "jet_nemotron_2b"
MODELS = {
    DEFAULT_MODEL: lambda shape, dry_run, device: jet_model(shape, device),
    "qwen3_5_2b": lambda shape, dry_run, device: qwen3_5_model(dry_run, device).train(),
}


def run_suite(
    items: str,
    dry_run: bool,
    profile_dir: Path | None,
    report: Callable[[dict], None],
    model_name: str = DEFAULT_MODEL,
) -> dict:
    """Run `items` in order on `model_name` (one of `MODELS`); after each one, hand the result so far to `report` (so
    a run cut short keeps it)."""
    shape = DRY_SHAPE if dry_run else GPU_SHAPE
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    model = MODELS[model_name](shape, dry_run, device)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, shape.length), generator=torch.Generator().manual_seed(0)).to(device)
    results: dict = {}
    result = {
        "benchmark": "suite",
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "retrofit": retrofit.__version__,
        "host": platform.node(),
        "shape": {"model": model_name, "window": shape.window, "length": shape.length, "batch": 1, "dtype": "bfloat16"},
        "targets": {k: TARGETS[k] for k in items},
        "results": results,
    }
    measure = {
        "a": lambda: item_a(model, shape, ids),
        "b": lambda: item_b(model, shape, ids),
        "c": lambda: item_c(model, shape, ids, (results.get("a") or item_a(model, shape, ids))["rows"]),
        "d": lambda: item_d(model, shape, vocab, profile_dir),
        "e": lambda: item_e(model, shape, ids),
        "f": lambda: item_f(
            model, shape, ids, (results.get("b") or item_b(model, shape, ids))["engine_seconds"], profile_dir
        ),
        "g": lambda: item_g(dry_run),
        "h": lambda: item_h(model, shape, ids),
    }
    for item in tqdm(items, desc="benchmark items", unit="item"):
        start = time.perf_counter()
        results[item] = measure[item]()
        results[item]["wall_seconds"] = time.perf_counter() - start
        report(result)
    return result


def write_profile(path: Path, fn: Callable[[], object]) -> None:
    """Profile one call of `fn` (after a warm-up call) with the torch profiler; write where the time goes to `path`.

    Two tables: by device time (which kernels), and by host time (dispatch: Python and launch overhead), headed by
    the profiled wall time and the number of kernel launches.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    head = f"wall {wall * 1e3:.1f} ms (profiled); kernel launches {launches}; device and host totals under each table"
    tables = [head]
    for sort in (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        tables += [f"\nsorted by {sort}", events.table(sort_by=sort, row_limit=30, max_name_column_width=70)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tables))


_SUMMARIES = {
    "a": lambda x: f"worst efficiency {x['value']:.2f}",
    "b": lambda x: f"{x['value']:.3f}x ({x['engine_seconds'] * 1e3:.0f} vs {x['plain_seconds'] * 1e3:.0f} ms)",
    "c": lambda x: f"pass {_x(x['value'])}; none {_x(x['none_ratio'])} (n/a: OOM or no GPU)",
    "d": lambda x: (
        f"slowest {x['slowest_ms']:.2f} ms/token; worst {x['value']:.3f}x no sleep; last/first context "
        f"{x['flatness']:.2f}; batch {x['batch']} {x['batch_throughput_ratio']:.1f}x tokens/s"
    ),
    "e": lambda x: f"worst {x['value']:.2f}x (prefill {x['prefill_seconds'] * 1e3:.0f} ms)",
    "f": lambda x: f"{x['value'] * 100:.1f}% ({x['achieved_tflops']:.0f} of {x['matmul_peak_tflops']:.0f} TFLOP/s)",
    "g": lambda x: ", ".join(f"N={n}: {row['tokens_per_s']:.3g} tokens/s" for n, row in x["rows"].items()),
    "h": lambda x: (
        f"time {x['value']:.3f}x, peak {_x(x['memory_ratio'])} of the plain head's (chunked torch: "
        f"{x['chunked_value']:.3f}x, {_x(x['chunked_memory_ratio'])})"
    ),
}


def summary_line(item: str, measured: dict) -> str:
    """One row of the suite's table: the item's measured value, its target and whether it is met."""
    flag = measured["met"]
    met = "report" if flag is None else ("yes" if flag else "**no**")
    return f"| {item} | {_SUMMARIES[item](measured)} | {TARGETS[item]} | {met} |"


def markdown(result: dict) -> str:
    """The suite's table: one line per item with its measured value and target, then the per-N details."""
    r = result["results"]
    lines = [f"{result['device']}, {result['date']}, torch {result['torch']}", "", "| id | measured | target | met |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [summary_line(item, r[item]) for item in ITEMS if item in r]
    if "a" in r:
        lines += [
            "",
            "| N | step (ms) | layer-passes | efficiency | tokens/s | peak (GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for n, row in r["a"]["rows"].items():
            lines.append(
                f"| {n} | {row['seconds'] * 1e3:.0f} | {row['layer_passes']} | {row['efficiency']:.2f} | "
                f"{row['tokens_per_s']:.0f} | {_x(row['peak_gib'], '')} |"
            )
    if "d" in r:
        lines += ["", "| context | sleep (ms/token) | no sleep (ms/token) | ratio | sleep, graph not compiled | "
                  "sleep, eager steps |", "|---|---|---|---|---|---|"]  # fmt: skip
        for context, row in r["d"]["rows"].items():
            lines.append(
                f"| {context} | {row['sleep_ms']:.2f} | {row['no_sleep_ms']:.2f} | {row['ratio']:.3f} | "
                f"{row.get('graph_sleep_ms', float('nan')):.2f} | {row.get('eager_sleep_ms', float('nan')):.2f} |"
            )
    if "e" in r:
        lines += ["", "| N | sleep one window (ms) | ÷ (N × prefill) |", "|---|---|---|"]
        for n, row in r["e"]["rows"].items():
            lines.append(f"| {n} | {row['sleep_seconds'] * 1e3:.0f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def plot(result_files: list[Path], out: Path) -> None:
    """Training-step cost against N (measured vs ideal, item a) and decode latency against context (item d),
    from one or more result JSONs of the same device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict = {}
    for path in result_files:
        results |= json.loads(path.read_text())["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if "a" in results:
        rows = {int(n): row for n, row in results["a"]["rows"].items()}
        passes, base = sorted(rows), rows[min(rows)]
        left.plot(passes, [rows[n]["seconds"] / base["seconds"] for n in passes], "o-", label="measured")
        left.plot(passes, [rows[n]["layer_passes"] / base["layer_passes"] for n in passes], "k--", label="ideal")
        left.set(xlabel="sleep passes N", ylabel="training-step time / N=1", title="a: step cost vs N")
        left.legend()
    if "d" in results:
        rows = {int(c): row for c, row in results["d"]["rows"].items()}
        contexts = sorted(rows)
        right.plot(contexts, [rows[c]["sleep_ms"] for c in contexts], "o-", label="sleep (KV <= L)")
        right.plot(contexts, [rows[c]["no_sleep_ms"] for c in contexts], "s--", label="no sleep (all KV)")
        right.set(xscale="log", xlabel="context (tokens)", ylabel="ms per token", title="d: decode latency")
        right.set_xticks(contexts, [f"{c / 1024:g}K" for c in contexts], minor=False)
        right.minorticks_off()
        right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _x(value: float | None, unit: str = "x") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="sleep-retrofit GPU benchmark suite (issue 7)")
    parser.add_argument("--suite", default="all", help=f"'all' or item ids, e.g. 'ab' (from {ITEMS})")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON result (and the profile)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the suite runs")
    parser.add_argument(
        "--profile", action="store_true", help="also profile f's training step and one decoded token (torch profiler)"
    )
    parser.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL, help="the model shape measured")
    parser.add_argument("--plot", type=Path, nargs="+", metavar="RESULT_JSON", help="only draw RESULT_JSONs to --out")
    args = parser.parse_args(argv)
    if args.plot:
        out = args.out or Path("suite.png")
        plot(args.plot, out)
        print(f"wrote {out}")
        return 0
    items = ITEMS if args.suite == "all" else args.suite
    unknown = set(items) - set(ITEMS)
    if unknown:
        parser.error(f"--suite: unknown item(s) {''.join(sorted(unknown))}; use 'all' or letters from {ITEMS}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("the suite measures a GPU: run it on a CUDA machine, or pass --dry-run to check it on a CPU")
    if not args.dry_run:
        use_kept_autotuning()
    profile_dir = (args.out or Path(tempfile.mkdtemp())) if args.profile else None
    stem = "dry-run" if args.dry_run else f"{date.today().isoformat()}-suite"
    if args.model != DEFAULT_MODEL:
        stem += f"-{args.model}"

    def report(result: dict) -> None:
        table = markdown(result)
        done = [item for item in items if item in result["results"]]
        tqdm.write(table if len(done) == len(items) else summary_line(done[-1], result["results"][done[-1]]))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
            (args.out / f"{stem}.md").write_text(table + "\n")

    run_suite(items, args.dry_run, profile_dir, report, args.model)
    if args.out is not None:
        print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
