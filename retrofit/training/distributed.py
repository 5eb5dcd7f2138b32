"""What the trainer does differently when one process is not the whole run (DDP, DeepSpeed ZeRO-2/3, FSDP2).

The trainer calls, in this order:
1. `configure_distributed(accelerator, recipe)` after building the accelerator, before `accelerator.prepare`:
   refuses what this launch cannot run (`retrofit.launch.check_launch`, also for a plain `accelerate launch`) and
   fills the DeepSpeed config's `"auto"` values from the recipe (accelerate would need a dataloader for them).
   Under `launch: fsdp2` it then shards the model itself (`retrofit.training.fsdp.shard_model`) instead of
   `prepare`.
2. `align_sleep_plan` on each micro-batch, then `micro_step` for its forward and backward.
3. `gather_state_dict` on every process whenever a model folder is saved.

ZeRO-3 (and FSDP2) and the sleep loop. ZeRO-3 keeps 1/world of every weight on each process and all-gathers a module's
weights when the module is called. Collectives pair up by call order, so every process must call the same modules in the
same order, or they wait forever or exchange the wrong shards. Sleep calls the blocks of the loop range N times per
chunk. N is no risk: the pass counts (`passes`, `wake_passes`, `grad_passes`, `truncate_chunks`) are fixed by the
recipe's sleep config and the stage, which is a function of the step, and nothing in sleep is sampled. The batch is: the
number of chunks follows the padded length, and whether a chunk wakes or sleeps (`context_only`), or runs the head
(`every_chunk`), follows where its labels are. `align_sleep_plan` pads every process's micro-batch to the longest one
(padding changes no loss or gradient; `SleepConfig`'s padding contract) and refuses, before any collective could pair
wrongly, a batch whose chunks with loss tokens still differ between processes.

ZeRO-3 leaf modules, and why they stay off by default. A leaf module is gathered whole when called, with no hooks
on its submodules: one all-gather per block call instead of one per projection, norm and convolution
(`sleep_block_class_names` gives the classes to name in the DeepSpeed config's `zero_optimization.leaf_module`;
the prelude and coda share the loop range's classes). DeepSpeed 0.19 reduces a leaf's gradients in the leaf's
module backward hook, which fires once per call, and sleep calls a looped block N x chunks times per backward:
reductions then run before all of a weight's uses have added their gradient, and ZeRO-3's count of expected hooks
assumes one per leaf. Leaves were made for MoE experts, called at most once per forward. So the default relies
instead on `zero3.json`'s `stage3_max_reuse_distance` and `stage3_max_live_parameters` (1e9 elements each), which
keep the loop range's weights gathered from one pass to the next once the module order repeats between steps; a
per-parameter gradient hook fires once per backward however often the weight was used. `benchmarks/distributed.py`
runs ZeRO-3 with leaves (`tiny/zero3_leaf`): under DeepSpeed 0.19.8 it stops in the first backward, on the
assertion that a gradient bucket holds each parameter once (`stage3.py`, `__reduce_and_partition_ipg_grads`).

Muon under ZeRO is refused (`retrofit.launch`); under DDP it runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft import PeftModel
from torch import Tensor, nn

from retrofit.engine import chunk_bounds, next_token_targets
from retrofit.launch import check_launch, deepspeed_values, fill_deepspeed_config
from retrofit.recipes import Recipe, RecipeError
from retrofit.tasks import IGNORE_INDEX
from retrofit.training.fsdp import full_model_state, is_sharded, shard_model


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this run, or `None` without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


@contextlib.contextmanager
def whole_model_init(accelerator: Accelerator) -> Iterator[None]:
    """Within it, transformers builds models whole, also under ZeRO-3; DeepSpeed shards them at `prepare`.

    Under ZeRO-3, transformers otherwise builds a new model inside `deepspeed.zero.Init` and initialises it module by
    module on rank 0, drawing the random weights in another order than on one GPU: a seeded from-scratch run then
    starts elsewhere (tiny Jet on 2x H200: step-1 loss 4.695 against 4.469). Built whole, every launch mode starts
    from the same weights (what `recipes/accelerate/deepspeed_zero3.yaml`'s `zero3_init_flag: false` asks for, which
    accelerate 1.15 does not pass on to transformers). A model too large for one process's host memory would need
    zero.Init; the 2B and 4B models fit.
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # transformers' ZeRO-3 view, for saving


def launch_mode(accelerator: Accelerator, recipe: Recipe) -> str | None:
    """The `launch:` mode this process runs under (`multi_gpu`, `zero2`, `zero3`, `fsdp2`), or `None` for one
    process.

    DeepSpeed below stage 3 counts as `zero2`: its optimizer sees flat shards as well. FSDP2 runs on a plain launch
    (the trainer shards), so a recipe that asks for it runs it, on one process too.
    """
    stage = zero_stage(accelerator)
    if stage is not None:
        return "zero3" if stage == 3 else "zero2"
    if uses_fsdp2(recipe):
        return "fsdp2"
    return "multi_gpu" if accelerator.num_processes > 1 else None


def uses_fsdp2(recipe: Recipe) -> bool:
    return recipe.launch is not None and recipe.launch.mode == "fsdp2"


def shard_for_training(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """`launch: fsdp2`: the model on this process's device, sharded over its sleep blocks, the loop range of its
    sleep config kept gathered (`retrofit.training.fsdp`). A LoRA model shards its base model's blocks."""
    blocks, loop = _sleep_blocks(model)
    return shard_model(model.to(accelerator.device), blocks, loop, accelerator.device)


def _sleep_blocks(model: nn.Module) -> tuple[Sequence[nn.Module], range]:
    """The sleep engine's blocks of `model` (of its base model under LoRA) and its loop range."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    adapter = base.get_sleep_adapter()
    return adapter.blocks, range(*(base.sleep_config.loop_range or adapter.default_loop_range))


def gathers_per_call(accelerator: Accelerator, model: nn.Module) -> bool:
    """Whether the weights are sharded and gathered at each module call (ZeRO-3, FSDP2): then every process must
    make the same module calls in the same order."""
    return zero_stage(accelerator) == 3 or is_sharded(model)


def configure_distributed(accelerator: Accelerator, recipe: Recipe) -> None:
    """Check the recipe against this launch and fill DeepSpeed's `"auto"` values; call before `prepare`.

    Raises `RecipeError` when the recipe names another launch mode than the one running, or when the running mode
    cannot train the recipe (`check_launch`).
    """
    mode = launch_mode(accelerator, recipe)
    if mode is None:
        return
    wanted = recipe.launch.mode if recipe.launch else None
    if wanted is not None and wanted != mode:
        raise RecipeError(
            "launch",
            f"the recipe asks for {wanted}, but this process was started as {mode}; start it with "
            "`retrofit train RECIPE`, or change launch:",
        )
    check_launch(recipe, mode, origin=f"this process runs under {mode}")
    if zero_stage(accelerator) is None:
        return
    plugin = accelerator.state.deepspeed_plugin
    values = deepspeed_values(recipe, accelerator.num_processes)
    filled = fill_deepspeed_config(plugin.deepspeed_config, values, "given to accelerate")
    plugin.deepspeed_config.update(filled)  # in place: accelerate and DeepSpeed both read this dict
    accelerator.gradient_accumulation_steps = values["gradient_accumulation_steps"]


def micro_step(
    accelerator: Accelerator, model: nn.Module, batch: dict[str, Tensor], *, micro: int, accum: int
) -> Tensor:
    """Forward and backward of micro-batch `micro` of `accum`; returns its loss / accum, detached.

    Gradients add up over the micro-batches and are synchronised on the last. Under DDP the others run in
    `no_sync` (forward included: DDP decides in the forward whether the backward syncs), under FSDP2 without
    gradient reduction, in the autocast `prepare` would have applied; FSDP2's loop range, kept gathered through them
    all (`retrofit.training.fsdp`), reshards after the last. Under DeepSpeed the engine
    owns accumulation: it divides the loss by its `gradient_accumulation_steps` (= `accum`, see
    `configure_distributed`) and, on the micro-batch marked as the boundary, reduces, clips and steps the optimizer.
    """
    last = micro == accum - 1
    if zero_stage(accelerator) is not None:
        accelerator.sync_gradients = last
        loss = model(**batch).loss
        accelerator.backward(loss)
        return loss.detach() / accum
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        with accelerator.autocast():
            loss = model(**batch).loss / accum
        accelerator.backward(loss)
        if last:  # the loop range stayed gathered through the backwards; clipping and the step read the shards
            blocks, loop = _sleep_blocks(model)
            for index in loop:
                blocks[index].reshard()
        return loss.detach()
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        loss = model(**batch).loss / accum
        accelerator.backward(loss)
    return loss.detach()


def align_sleep_plan(
    accelerator: Accelerator, model: nn.Module, batch: dict[str, Tensor], window: int, pad_token_id: int
) -> dict[str, Tensor]:
    """Under ZeRO-3 and FSDP2, the micro-batch padded so every process runs the same chunks; elsewhere `batch`.

    Raises `RecipeError` (`launch`) when the chunks with loss tokens differ between processes: their wake/sleep plans,
    and with them their module calls, would differ. Every process raises, so none waits on the others.
    """
    if not gathers_per_call(accelerator, model):
        return batch
    lengths = accelerator.gather(torch.tensor([batch["input_ids"].shape[1]], device=accelerator.device))
    batch = pad_batch(batch, int(lengths.max()), pad_token_id)
    plans = accelerator.gather(chunks_with_loss(batch, window)[None])
    if not bool((plans == plans[0]).all()):
        rows = "; ".join(f"process {i}: {row.tolist()}" for i, row in enumerate(plans))
        raise RecipeError(
            "launch",
            "zero3 and fsdp2 need every process to make the same module calls, but the chunks with loss tokens differ "
            f"between processes ({rows}), so their sleep plans differ; use launch: zero2 or multi_gpu for this task",
        )
    return batch


def chunks_with_loss(batch: dict[str, Tensor], window: int) -> Tensor:
    """`[chunks]` int64, the sleep engine's per-chunk plan: 0 where no row of a chunk of `window` tokens has a loss
    token, 1 where some rows have (under `context_only` those wake and the others sleep), 2 where every row has."""
    targets = next_token_targets(batch["labels"], batch["attention_mask"].bool())
    supervised = targets != IGNORE_INDEX
    rows = torch.stack([supervised[:, s:e].any(1) for s, e in chunk_bounds(targets.shape[1], window)])
    return rows.any(1).long() + rows.all(1).long()


def pad_batch(batch: dict[str, Tensor], length: int, pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad a collated batch to `length` tokens: pad tokens, attention_mask 0, labels -100."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: F.pad(value, (0, extra), value=fill[key]) for key, value in batch.items()}


def sleep_block_class_names(model: nn.Module) -> list[str]:
    """Fully qualified class names of the blocks the sleep engine calls, in order of first appearance."""
    names = [f"{type(b).__module__}.{type(b).__qualname__}" for b in model.get_sleep_adapter().blocks]
    return list(dict.fromkeys(names))


def gather_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor] | None:
    """Under DeepSpeed and FSDP2, the prepared model's full state dict on the main process; every process must call
    it (FSDP2: `retrofit.training.fsdp.full_model_state`).

    Under ZeRO-3 it all-gathers the 16-bit shards (`recipes/deepspeed/zero3.json` sets
    `stage3_gather_16bit_weights_on_model_save: true` for this); under ZeRO-2 it is the bf16 copy the engine trains.
    Pass it as `save_pretrained(directory, state_dict=...)` to the unwrapped model, whose own weights under ZeRO-3
    are empty shards. `None` on the other processes, and without DeepSpeed, where the unwrapped model's own weights
    are complete and save as they are.
    """
    if is_sharded(model):
        state_dict = full_model_state(model)
        return state_dict if accelerator.is_main_process else None
    if zero_stage(accelerator) is None:
        return None
    state_dict = accelerator.get_state_dict(model)
    return state_dict if accelerator.is_main_process else None
