"""The trainer: one recipe in, a trained model, checkpoints, logs and an evaluation out.

Read `train` from top to bottom: set up (accelerator, model, optimizer, data, resume), then each step enters its
stage when it starts one (`retrofit.training.stages`: what trains, how the model sleeps), draws its global batch
from (seed, step), runs forward/backward per micro-batch (gradients accumulate; DDP syncs on the last one), checks
the loss and gradient norm are finite, clips, steps optimizer and LR schedule, logs, and now and then checkpoints
and evaluates. At the end it saves the model (or its adapter), evaluates, writes the report and prints the table.

Runs on Accelerate: `accelerate launch -m retrofit train RECIPE.yaml` spreads it over processes, and mixed
precision is bf16 on GPU, fp32 on CPU (`train.precision: auto`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from peft import PeftModel
from tqdm.auto import tqdm

from retrofit.evaluation import EvalResult, evaluate, format_table, load_eval_set, load_result, write_report
from retrofit.optim import build_optimizer, build_scheduler
from retrofit.recipes import LoadedRecipe, Recipe, ResolvedRecipe, ResolvedStage, dump_recipe, resolve
from retrofit.tasks import DataTask
from retrofit.training.build import ModelSummary, build_model, describe_passes
from retrofit.training.checkpoint import (
    ADAPTER_DIR,
    EVAL_DIR,
    MODEL_DIR,
    RECIPE_FILE,
    Trained,
    TrainerState,
    checkpoint_dir,
    discard_after,
    good_checkpoints,
    load_checkpoint,
    mark_diverged,
    output_dir_lock,
    replaced_atomically,
    resume_point,
    save_checkpoint,
    save_model_files,
    saved_step,
    write_atomically,
)
from retrofit.training.data import StepBatches, accumulation_steps, micro_batch, prefetched
from retrofit.training.distributed import (
    align_sleep_plan,
    configure_distributed,
    gather_state_dict,
    micro_step,
    shard_for_training,
    uses_fsdp2,
    whole_model_init,
    zero_stage,
)
from retrofit.training.fsdp import local_part
from retrofit.training.resume import recipe_changes
from retrofit.training.stages import check_trainable, describe_stage, enter_stage, stage_at, trainable_names

LOG_FILE = "train.log"
DRY_RUN_EXAMPLES = 2  # the batch of `retrofit validate --dry-run`'s one step per stage


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; the run stopped (before stepping on it, except under
    DeepSpeed, which steps inside the backward)."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after a checkpoint of its last step; `exit_code`: 128 + the signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def diverged(
    accelerator: Accelerator, step: int, loss: float, grad_norm: float, output_dir: Path, *, stepped: bool
) -> TrainingDiverged:
    """The error a run stops with when step `step` (1-based) is not finite; `stepped`: DeepSpeed already took it.

    The checkpoints from the weights that step started from on are marked bad (`mark_diverged`), so the one named
    here, and the one `--resume auto` takes, is the newest whose weights trained on finitely."""
    if accelerator.is_main_process:
        mark_diverged(output_dir, step, loss)
    accelerator.wait_for_everyone()
    good = good_checkpoints(output_dir)
    kept = f"the last good checkpoint is {good[-1]}" if good else "no good checkpoint was saved"
    stopped = "stopped after DeepSpeed took that step" if stepped else "stopped before that step"
    return TrainingDiverged(
        f"training diverged at step {step}: loss {loss}, grad norm {grad_norm}; {stopped}, {kept}. "
        "Lower the learning rates or add warmup, then --resume auto"
    )


def make_accelerator(recipe: Recipe, *, trackers: bool) -> Accelerator:
    """bf16 autocast on GPU (or when asked), fp32 on CPU; trackers write under the output dir.

    With stages, DDP is told that some parameters get no gradient: it wraps the model once, with every parameter
    any stage trains, and a stage freezes some of them.
    """
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return Accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        log_with=recipe.train.log_with if trackers else None,
        # TensorBoard writes to OUTPUT/tensorboard/<project>: point TensorBoard at runs/*/tensorboard to compare runs
        project_config=ProjectConfiguration(
            project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "tensorboard")
        ),
        # DDP must expect parameters without a gradient: a stage freezes some, and a sleeping forward never reads
        # others (Ouro's early-exit gate). The cost is one walk of the autograd graph per backward.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def train(loaded: LoadedRecipe, *, resume: str | None = None, overwrite: bool = False) -> EvalResult:
    """Train the recipe; return the final evaluation. Raises `RecipeError`, `TrainingDiverged` or
    `TrainingInterrupted`.

    The first process holds a lock on the output folder for the whole run, and SIGINT/SIGTERM ask the run to stop
    after its current step, with a checkpoint."""
    output_dir = Path(loaded.recipe.output_dir)
    first_process = int(os.environ.get("RANK", "0")) == 0
    with output_dir_lock(output_dir) if first_process else contextlib.nullcontext(), stop_requests() as stop:
        return _train(loaded, resume=resume, overwrite=overwrite, stop=stop)


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While training, SIGINT and SIGTERM append their number to the yielded list instead of killing the process
    (a second SIGINT interrupts at once); the previous handlers come back afterwards."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _train(loaded: LoadedRecipe, *, resume: str | None, overwrite: bool, stop: list[int]) -> EvalResult:
    recipe = loaded.recipe
    resolved = resolve(recipe)
    task, train_cfg = resolved.task, recipe.train
    output_dir = Path(recipe.output_dir)
    resume_from = resume_point(resume, output_dir, overwrite=overwrite)

    # ---- set up: accelerator, model, optimizer, schedule, resume
    accelerator = make_accelerator(recipe, trackers=True)
    configure_distributed(accelerator, recipe)  # refuses what this launch cannot run; fills DeepSpeed's "auto"s
    accum = accumulation_steps(recipe, accelerator.num_processes)
    if overwrite and accelerator.is_main_process:  # what comes after the starting point belongs to another run
        discard_after(output_dir, saved_step(resume_from) if resume_from is not None else 0)
    accelerator.wait_for_everyone()
    set_seed(recipe.seed)
    with whole_model_init(accelerator):  # the same initial weights in every launch mode
        model = build_model(resolved)
    candidates = trainable_names(model)  # what the stages choose from; the optimizer holds all of it
    check_trainable(model, resolved.stages, candidates)
    if zero_stage(accelerator) is not None:  # ZeRO fixes what trains when its engine is built
        enter_stage(model, resolved.stages[0], candidates)
    if uses_fsdp2(recipe):  # the trainer shards; accelerate only started the processes
        model = shard_for_training(model, accelerator)
        optimizer = build_optimizer(model, recipe.optimizer)
    else:
        optimizer = build_optimizer(model, recipe.optimizer)
        model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, recipe.optimizer, train_cfg.max_steps)
    trained = Trained(model, optimizer, scheduler, resolved.config_overrides, task.tokenizer)
    log = RunLog(output_dir / LOG_FILE, accelerator)
    state = TrainerState(step=0, tokens_seen=0)
    if resume_from is not None:
        state, resume_from = _resume(accelerator, resume_from, trained, recipe, log, fallback=resume == "auto")
    recipe_yaml = dump_recipe(recipe)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RECIPE_FILE).write_text(recipe_yaml)
    eval_set = load_eval_set(recipe.eval, resolved.eval_task, resolved.sleep.window)
    history = _eval_history(output_dir, before=state.step)
    wandb = {k: v for k, v in {"name": train_cfg.run_name, "entity": train_cfg.wandb_entity}.items() if v}
    project = train_cfg.project or output_dir.resolve().name
    accelerator.init_trackers(project, config=_flat_config(recipe), init_kwargs={"wandb": wandb})
    _print_plan(log, accelerator, resolved, model, accum)

    pad_id = task.tokenizer.pad_token_id
    rank, world = accelerator.process_index, accelerator.num_processes
    last_checkpoint = resume_from  # output_dir holds none after it (resume_point, discard_after)

    def checkpoint_now() -> Path:
        """Save this step's checkpoint; weights that are not finite stop the run as diverged instead (the next
        step's loss could not be finite), so every checkpoint holds finite weights."""
        finite = torch.stack([torch.isfinite(local_part(p)).all() for p in model.parameters()]).all().float()[None]
        if accelerator.reduce(finite, reduction="sum").item() < accelerator.num_processes:
            progress.close()
            error = diverged(accelerator, state.step + 1, math.nan, math.nan, output_dir, stepped=False)
            log.write(f"error: {error}")
            raise error
        return save_checkpoint(accelerator, output_dir, state, recipe_yaml, train_cfg.keep_checkpoints, trained)

    def evaluate_and_log() -> EvalResult:
        """Evaluate the model now; log the scalars and write this step's eval JSON."""
        result = evaluate(
            model, eval_set, task=resolved.eval_task, step=state.step, batch_size=recipe.eval.batch_size,
            accelerator=accelerator, window=resolved.sleep.window,
        )  # fmt: skip
        _log_eval(accelerator, result, output_dir)
        log.write(format_table(result))
        return result

    # tqdm draws on a terminal only (`disable=None`); under nohup or Slurm the log lines below tell the progress
    progress = tqdm(
        total=train_cfg.max_steps, initial=state.step, disable=None if accelerator.is_main_process else True
    )

    def enter(new_stage: ResolvedStage) -> ResolvedStage:
        """Make the model train and sleep as `new_stage` says, and tell the user."""
        unwrapped = accelerator.unwrap_model(model)
        enter_stage(unwrapped, new_stage, candidates)
        progress.set_description(new_stage.name)
        if len(resolved.stages) > 1:
            log.say(describe_stage(resolved.stages, new_stage, unwrapped))
        return new_stage

    stage = enter(stage_at(resolved.stages, state.step))
    model.train()
    steps = range(state.step, train_cfg.max_steps)
    micro_size = recipe.micro_batch_size(world)
    batches = prefetched(
        StepBatches(task, recipe.seed, steps, accum, rank, world, micro_size, pad_id),
        pin_memory=accelerator.device.type == "cuda",
    )
    window_start, window_tokens, window_losses = time.perf_counter(), 0, []
    for step in steps:
        if stage_at(resolved.stages, step) is not stage:
            stage = enter(stage_at(resolved.stages, step))

        # ---- forward/backward over the micro-batches of this step's global batch
        loss_sum = torch.zeros((), device=accelerator.device)
        tokens = 0
        for micro in range(accum):
            batch = next(batches)  # made ahead in a worker process, as a pure function of (seed, step, micro)
            tokens += int(batch["attention_mask"].sum())  # on the host copy: no wait for the GPU
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            batch = align_sleep_plan(accelerator, model, batch, stage.sleep.window, pad_id)  # same calls everywhere
            loss_sum += micro_step(accelerator, model, batch, micro=micro, accum=accum)

        # ---- watchdog, clip, step
        # one reduction for both: the mean loss over processes, and the tokens all of them saw (lengths vary)
        # ... and whether a process was asked to stop (SIGINT, SIGTERM): all stop after the same step
        counts = torch.tensor([tokens, len(stop)], dtype=torch.float64, device=loss_sum.device)
        totals = accelerator.reduce(torch.cat([loss_sum.double()[None], counts]), reduction="sum").tolist()
        loss_value, tokens, stopping = totals[0] / world, int(totals[1]), totals[2] > 0
        # DeepSpeed clips (and steps) inside the last backward and reports the norm it saw, if any.
        norm = accelerator.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip or math.inf)
        grad_norm = math.nan if norm is None else float(norm)
        if not math.isfinite(loss_value) or (norm is not None and not math.isfinite(grad_norm)):
            progress.close()
            accelerator.end_training()
            stepped = zero_stage(accelerator) is not None
            error = diverged(accelerator, step + 1, loss_value, grad_norm, output_dir, stepped=stepped)
            log.write(f"error: {error}")
            raise error
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state = TrainerState(step=step + 1, tokens_seen=state.tokens_seen + tokens)

        # ---- log
        window_tokens += tokens
        window_losses.append(loss_value)
        progress.update(1)
        if state.step % train_cfg.log_every == 0 or state.step == train_cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            log.write(
                f"step {state.step}/{train_cfg.max_steps}: loss {sum(window_losses) / len(window_losses):.4f} "
                f"(mean of {len(window_losses)} steps), lr {lr:.3e}, grad norm {grad_norm:.3f}, "
                f"{tokens_per_s:,.0f} tokens/s",
                echo=bool(progress.disable),
            )
            window_start, window_tokens, window_losses = time.perf_counter(), 0, []
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            accelerator.log(
                {
                    "train/loss": loss_value,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens_per_s,
                    "train/tokens_seen": state.tokens_seen,
                    "train/stage": resolved.stages.index(stage) + 1,
                },
                step=state.step,
            )

        # ---- checkpoint, evaluate
        if train_cfg.checkpoint_every and state.step % train_cfg.checkpoint_every == 0:
            last_checkpoint = checkpoint_now()
        if stopping:
            progress.close()
            if last_checkpoint != checkpoint_dir(output_dir, state.step):
                last_checkpoint = checkpoint_now()
            accelerator.end_training()
            name = signal.Signals(stop[0]).name if stop else "a signal to another process"
            message = f"stopped by {name} after step {state.step}; saved {last_checkpoint}; continue with --resume auto"
            log.write(message)
            raise TrainingInterrupted(message, 128 + (stop[0] if stop else signal.SIGTERM))
        every = recipe.eval.every_steps
        if every and state.step % every == 0 and state.step < train_cfg.max_steps:
            history.append(evaluate_and_log())
    progress.close()

    # ---- finish: final checkpoint and model, evaluation, report
    if last_checkpoint != checkpoint_dir(output_dir, state.step):
        checkpoint_now()
    result = evaluate_and_log()
    state_dict = gather_state_dict(accelerator, model)  # on every process: a collective under ZeRO-3
    final = accelerator.unwrap_model(model)
    folder = ADAPTER_DIR if isinstance(final, PeftModel) else MODEL_DIR
    if accelerator.is_main_process:
        with replaced_atomically(output_dir / folder) as partial:
            save_model_files(final, partial, resolved.config_overrides, state_dict)
            task.tokenizer.save_pretrained(partial)
        write_report(result, output_dir, history)
    log.say(format_table(result))
    log.say(f"wrote {output_dir}/{{results.json, results.md, results.png, {folder}/, {LOG_FILE}}}")
    accelerator.end_training()
    return result


@dataclass(frozen=True)
class DryRunReport:
    """What `retrofit validate --dry-run` prints."""

    summary: ModelSummary
    tokens_per_step: int
    accumulation_steps: int
    passes: str
    loss: float
    device: str
    precision: str
    stages: tuple[str, ...] = ()  # one line per stage of a recipe with `stages:`


def dry_run(loaded: LoadedRecipe) -> DryRunReport:
    """Build model, training and eval data, apply sleep, and take one optimizer step on `DRY_RUN_EXAMPLES` examples
    in each stage (its sleep config and trainable parameters applied). Writes nothing.
    """
    recipe = loaded.recipe
    resolved = resolve(recipe)
    accelerator = make_accelerator(recipe, trackers=False)
    accum = accumulation_steps(recipe, accelerator.num_processes)
    set_seed(recipe.seed)
    with whole_model_init(accelerator):  # the same initial weights in every launch mode
        model = build_model(resolved)
    summary = ModelSummary.of(model)
    candidates = trainable_names(model)
    check_trainable(model, resolved.stages, candidates)
    optimizer = build_optimizer(model, recipe.optimizer)
    scheduler = build_scheduler(optimizer, recipe.optimizer, recipe.train.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    load_eval_set(recipe.eval, resolved.eval_task, resolved.sleep.window)
    batch = micro_batch(
        resolved.task,
        recipe.seed,
        0,
        range(DRY_RUN_EXAMPLES),
        resolved.task.tokenizer.pad_token_id,
        recipe.train.batch_size,
    )
    losses, stage_lines = [], []
    for stage in resolved.stages:
        unwrapped = accelerator.unwrap_model(model)
        enter_stage(unwrapped, stage, candidates)
        loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), recipe.optimizer.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(
                f"the dry-run loss of stage {stage.name!r} is {loss.item()}: the model or its initialisation is broken"
            )
        losses.append(loss.item())
        stage_lines.append(f"{describe_stage(resolved.stages, stage, unwrapped)}; one step: loss {loss.item():.4f}")
    return DryRunReport(
        summary=summary,
        tokens_per_step=recipe.train.batch_size * resolved.task.seq_len,
        accumulation_steps=accum,
        passes=describe_passes(resolved.sleep, resolved.task.seq_len),
        loss=losses[0],
        device=str(accelerator.device),
        precision=accelerator.mixed_precision,
        stages=tuple(stage_lines) if recipe.stages is not None else (),
    )


class RunLog:
    """The run's plain-text log (`OUTPUT/train.log`, appended to by a resumed run), written by the first process:
    the plan, the loss over each logging window, evaluations, resumes, stops and errors, each line timestamped."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, text: str, *, echo: bool = False) -> None:
        """Append `text` to the log (and print it with `echo`)."""
        if not self.accelerator.is_main_process:
            return
        if echo:
            print(text, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.path.open("a") as f:
            f.writelines(f"{stamp} {line}\n" for line in text.splitlines())

    def say(self, text: str) -> None:
        """Print `text` and log it."""
        self.write(text, echo=True)


def _resume(
    accelerator: Accelerator, checkpoint: Path, trained: Trained, recipe: Recipe, log: RunLog, *, fallback: bool
) -> tuple[TrainerState, Path]:
    """Load `checkpoint` (with `fallback`, the newest good one that loads, going back from it) after checking the
    recipe's changes since it was written (`recipe_changes`: refused, or applied and told)."""
    candidates = [checkpoint]
    if fallback:
        candidates += [c for c in reversed(good_checkpoints(checkpoint.parent.parent)) if c != checkpoint]
    for index, candidate in enumerate(candidates):
        for change in recipe_changes((candidate / RECIPE_FILE).read_text(), recipe):
            log.say(change.line())
        try:
            state = load_checkpoint(accelerator, candidate, trained)
        except Exception as exc:  # a corrupt or doctored checkpoint: any reader may fail, in its own way
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if index + 1 == len(candidates):
                raise ValueError(f"{candidate} cannot be loaded ({first}); start over with --overwrite") from exc
            log.say(f"resume: {candidate} cannot be loaded ({first}); trying {candidates[index + 1]}")
            continue
        log.say(f"resumed from {candidate} at step {state.step}")
        return state, candidate
    raise AssertionError("unreachable: the last candidate raises")


def _print_plan(
    log: RunLog, accelerator: Accelerator, resolved: ResolvedRecipe, model: torch.nn.Module, accum: int
) -> None:
    recipe = resolved.recipe
    summary = ModelSummary.of(accelerator.unwrap_model(model))
    processes = accelerator.num_processes
    log.say(
        f"{recipe.task.name}: {summary.parameters:,} parameters, {summary.blocks} blocks; "
        f"{recipe.train.batch_size} x {resolved.task.seq_len} tokens per step "
        f"({processes} process(es) x {recipe.micro_batch_size(processes)} x {accum} accumulation); "
        f"{describe_passes(resolved.sleep, resolved.task.seq_len)}; output {recipe.output_dir}"
    )
    task = resolved.task
    if isinstance(task, DataTask):
        grouped = task.padding_fraction(recipe.seed, recipe.train.batch_size, recipe.micro_batch_size(processes))
        log.say(
            f"data: {len(task.train_set):,} training and {len(task.eval_set):,} held-out examples; "
            f"{task.epoch_length(recipe.train.batch_size) / recipe.train.batch_size:,.0f} steps per epoch; "
            f"padding {grouped:.1%} of the tokens"
            + ("" if task.group_by_length else " (task.options.group_by_length: true would lower it)")
        )


def _log_eval(accelerator: Accelerator, result: EvalResult, output_dir: Path) -> None:
    """Send bucket accuracies/losses to the trackers and keep a JSON per evaluation under `eval/`."""
    values = {f"eval/accuracy/d{b.difficulty}": b.accuracy for b in result.buckets}
    values |= {f"eval/loss/d{b.difficulty}": b.loss for b in result.buckets}
    values["eval/accuracy"] = result.accuracy
    accelerator.log(values, step=result.step)
    if accelerator.is_main_process:
        path = output_dir / EVAL_DIR / f"step_{result.step:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(result.to_dict(), indent=2) + "\n")


def _eval_history(output_dir: Path, *, before: int) -> list[EvalResult]:
    """Evaluations a resumed run already made (for the accuracy-over-training plot)."""
    found = sorted((output_dir / EVAL_DIR).glob("step_*.json"))
    results = [load_result(p) for p in found]
    return [r for r in results if r.step <= before]


def _flat_config(recipe: Recipe) -> dict[str, str | int | float | bool]:
    """The recipe as flat scalar key/values, as trackers' hyperparameter tables want them."""
    out: dict[str, str | int | float | bool] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, str | int | float | bool):
            out[prefix] = value
        elif value is not None:
            out[prefix] = str(value)

    walk("", recipe.model_dump(mode="json"))
    return out
