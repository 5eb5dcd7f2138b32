"""`retrofit generate`: greedy generation from a saved sleeping model, with sleep every L tokens and, when asked,
a sleep of the partial window when the prompt ends (`--sleep-when-idle`). User errors exit 2 with one line.

It lives apart from `retrofit.generation` (the caches the models import), since it loads models itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from retrofit.apply import load_model
from retrofit.generation import CACHE_NAME, SleepCache
from retrofit.lora import is_adapter_dir, load_adapter
from retrofit.tasks.tokenizer import load_tokenizer


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `retrofit generate MODEL_DIR --prompt ... [--max-new-tokens N] [--sleep-when-idle]`."""
    parser = subparsers.add_parser("generate", help="generate text with a sleeping model (streaming, with sleep)")
    parser.add_argument(
        "model_dir", type=Path, help="a saved model or adapter folder (with its tokenizer), or a run directory"
    )
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--device", default=None, help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
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
    problem = prompt_problem(tokenizer, args.prompt)
    if problem:
        print(f"error: --prompt {problem}", file=sys.stderr)
        return 2
    inputs = tokenizer(args.prompt, return_tensors="pt", return_token_type_ids=False).to(device)
    cache = SleepCache()
    with torch.no_grad():
        output = model.generate(**inputs, **{CACHE_NAME: cache}, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        if args.sleep_when_idle:
            consolidated = model.sleep(cache)
            print(f"idle: consolidated {consolidated} token(s) of the partial window into the fast state")
    return 0
