"""`retrofit generate`: generation from a saved sleeping model, with sleep every L tokens and, when asked, a sleep of
the partial window when the prompt ends (`--sleep-when-idle`). Greedy by default; `--temperature`, `--top-p` and
`--top-k` sample (`--seed` repeats a draw); `--stop` ends a continuation at a string; several `--prompt`s run as one
left-padded batch (each row as the engine computes it on the padded batch). User errors exit 2 with one line.

It lives apart from `retrofit.generation` (the caches the models import), since it loads models itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from retrofit.apply import load_model
from retrofit.generation import CACHE_NAME, SleepCache
from retrofit.lora import is_adapter_dir, load_adapter
from retrofit.tasks.tokenizer import load_tokenizer


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `retrofit generate MODEL_DIR --prompt ... [--prompt ...] [--max-new-tokens N] [sampling]
    [--stop S] [--compile] [--sleep-when-idle]`."""
    parser = subparsers.add_parser("generate", help="generate text with a sleeping model (streaming, with sleep)")
    parser.add_argument(
        "model_dir", type=Path, help="a saved model or adapter folder (with its tokenizer), or a run directory"
    )
    parser.add_argument(
        "--prompt", required=True, action="append", help="the prompt text; repeat it to generate for a batch"
    )
    parser.add_argument("--device", default=None, help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this probability")
    parser.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the sampling (default 0)")
    parser.add_argument("--stop", action="append", default=[], help="end a continuation at this string; repeatable")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="on CUDA, compile the wake step (torch.compile) before capturing it: some seconds of compiling, then "
        "faster tokens; for long generations",
    )
    parser.add_argument(
        "--sleep-when-idle",
        action="store_true",
        help="after generating, consolidate the partial window (model.sleep(cache)) as a server would when idle",
    )
    parser.set_defaults(run=run_generate)


def prompt_problem(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str | None:
    """Why `prompt` cannot be generated from (empty, or with text the vocabulary lacks), or None."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt.strip() or not ids:
        return "is empty; give the text to continue"
    unknown = tokenizer.unk_token_id
    if unknown is not None and unknown in ids:
        missing = sorted(
            {c for c in prompt if tokenizer.unk_token_id in tokenizer(c, add_special_tokens=False)["input_ids"]}
        )
        shown = ", ".join(repr(c) for c in missing[:5]) or "some text"
        return f"holds {shown}, which the model's vocabulary lacks (it would read <unk>); rephrase without it"
    return None


def run_generate(args: argparse.Namespace) -> int:
    """Greedy generation from `args.prompt`; prints the continuation. User errors exit 2 with one line."""
    saved = [args.model_dir / d for d in ("model", "adapter")] + [args.model_dir]
    model_dir = next((d for d in saved if (d / "config.json").is_file() or is_adapter_dir(d)), None)
    if model_dir is None:
        print(
            f"error: {args.model_dir} holds no saved model (no config.json or adapter_config.json, here or in its "
            "model/ or adapter/ folder)",
            file=sys.stderr,
        )
        return 2
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    adapter = is_adapter_dir(model_dir)  # a LoRA run: the adapter on its base, sleeping as trained
    model = (load_adapter(model_dir) if adapter else load_model(model_dir)).eval()
    if getattr(model, "sleep_config", None) is None:
        print(f"error: {model_dir} is not a sleeping model (its config.json has no sleep_config)", file=sys.stderr)
        return 2
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"error: --device {args.device}, but this machine has no CUDA device; leave --device out", file=sys.stderr
        )
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    tokenizer = load_tokenizer(model_dir)
    for prompt in args.prompt:
        problem = prompt_problem(tokenizer, prompt)
        if problem:
            print(f"error: --prompt {problem}", file=sys.stderr)
            return 2
    sampling = sampling_options(args)
    if isinstance(sampling, str):
        print(f"error: {sampling}", file=sys.stderr)
        return 2
    tokenizer.padding_side = "left"  # generation continues every row at the batch's right edge
    inputs = tokenizer(args.prompt, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
    cache = SleepCache(compile=args.compile)
    start = inputs["input_ids"].shape[1]
    stops = (
        {"stopping_criteria": StoppingCriteriaList([StopAtStrings(tokenizer, args.stop, start)])} if args.stop else {}
    )
    torch.manual_seed(args.seed)
    with torch.no_grad():
        output = model.generate(
            **inputs, **{CACHE_NAME: cache}, **sampling, **stops, max_new_tokens=args.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        for row in range(len(args.prompt)):
            text = tokenizer.decode(output[row, start:], skip_special_tokens=True)
            text = cut_at_stop(text, args.stop)
            print(text if len(args.prompt) == 1 else f"[{row + 1}] {text}")
        if args.sleep_when_idle:
            consolidated = model.sleep(cache)
            print(f"idle: consolidated {consolidated} token(s) of the partial window into the fast state")
    return 0


def sampling_options(args: argparse.Namespace) -> dict | str:
    """`generate`'s sampling arguments from the flags (greedy without any), or the error of a bad value."""
    if args.temperature is None and args.top_p is None and args.top_k is None:
        return {"do_sample": False}
    if args.temperature is not None and args.temperature <= 0:
        return "--temperature must be above 0 (leave the sampling flags out for greedy decoding)"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return "--top-p must be in (0, 1]"
    if args.top_k is not None and args.top_k < 1:
        return "--top-k must be at least 1"
    chosen = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return {"do_sample": True, **{key: value for key, value in chosen.items() if value is not None}}


class StopAtStrings(StoppingCriteria):
    """Ends each row once its continuation (the tokens after `start`, decoded) holds one of `stops`.

    transformers' own `stop_strings` reads the tokenizer's vocabulary as byte-level BPE, which word-level and other
    tokenizers are not (it raises); decoding the continuation works for every tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], start: int) -> None:
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to and including the first of `stops` it holds."""
    ends = [text.index(stop) + len(stop) for stop in stops if stop in text]
    return text[: min(ends)] if ends else text
