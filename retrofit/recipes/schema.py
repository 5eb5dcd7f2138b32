"""The recipe schema: one pydantic model per YAML section, unknown keys forbidden.

A recipe is one YAML file per run (see `recipes/`). Sections:

- `task`: which generator makes the data (`retrofit.tasks.get_task(name, **options)`);
- `model`: a from-scratch config (`model.config`, a dict for the family's config class) or a checkpoint
  (`model.pretrained`, a local path or Hub id, with `model.config_overrides` changing fields of its config);
- `sleep`: the fields of `retrofit.SleepConfig` (checked by `SleepConfig` itself; `window` defaults to the task's);
- `train`: steps, batch sizes, precision, checkpoints and logging;
- `optimizer`: Muon for the blocks' matrices plus AdamW for the rest, or AdamW alone, with the LR schedule;
- `eval`: the evaluation by difficulty bucket;
- `adapter`: LoRA (`adapter: lora`, or a mapping with `type: lora` and its options; see `retrofit.lora`);
- `stages`: staged training; each stage has a length, the parameters it trains and its changes to `sleep`;
- `launch`: how `retrofit train` starts the run (`single_gpu`, `multi_gpu`, `zero2`, `zero3`, `fsdp2`; see
  `retrofit.launch`).

The checks that need a task or a model (task options, sleep fields, loop range against the block count) live in
`retrofit.recipes.resolve`; this module only checks shapes and types.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from retrofit.tasks import TASKS


class Section(BaseModel):
    """A recipe section: unknown keys are errors; values are coerced where YAML is ambiguous (`1e-3` is a string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSection(Section):
    """The data: a task generator and its keyword options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
        return name


class ModelSection(Section):
    """Exactly one of `config` (build from scratch) and `pretrained` (load a checkpoint).

    `config_overrides` changes fields of a checkpoint's config (e.g. Ouro's `jet_mixer_layers`, where the retrofit
    inserts its mixers); `retrofit.training.pretrained.load_pretrained` says when each one applies.
    """

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    revision: str | None = None
    config_overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.config is None and self.pretrained is None:
            raise ValueError("set model.config (a from-scratch config) or model.pretrained (a path or Hub id)")
        if self.config is not None and self.pretrained is not None:
            raise ValueError(
                "both model.config and model.pretrained are set (one may come from a base recipe); keep one, e.g. "
                "add model.config: null (or --set model.config=null) to load the checkpoint"
            )
        return self


class TrainSection(Section):
    """How long and how big: `batch_size` is the global batch (all processes and accumulation steps)."""

    max_steps: PositiveInt
    batch_size: PositiveInt = 64
    micro_batch_size: PositiveInt | None = Field(
        default=None, description="examples per forward on one process; default: batch_size / processes"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto: bf16 on GPU, fp32 on CPU")
    checkpoint_every: int = Field(default=0, ge=0, description="0: only at the end")
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )
    project: str | None = Field(default=None, description="the trackers' project; default: output_dir's folder name")
    run_name: str | None = Field(default=None, description="the run's name in W&B; default: W&B's own")
    wandb_entity: str | None = Field(default=None, description="the W&B team or user; default: the logged-in one")

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> TrainSection:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


class MuonSection(Section):
    """`torch.optim.Muon` for the 2-D weight matrices of the blocks."""

    lr: PositiveFloat = 2e-3
    momentum: float = Field(default=0.95, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    nesterov: bool = True
    ns_steps: PositiveInt = 5
    adjust_lr_fn: Literal["original", "match_rms_adamw"] | None = None


class AdamWSection(Section):
    """`torch.optim.AdamW` for everything else (or for everything, with `optimizer.name: adamw`)."""

    lr: PositiveFloat = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    weight_decay: float = Field(default=0.0, ge=0)


class OptimizerSection(Section):
    """The optimizer(s) and the LR schedule (linear warmup, then cosine/linear decay to `min_lr_ratio`)."""

    name: Literal["muon", "adamw"] = "muon"
    muon: MuonSection = Field(default_factory=MuonSection)
    adamw: AdamWSection = Field(default_factory=AdamWSection)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_clip: PositiveFloat | None = 1.0


class EvalSection(Section):
    """Evaluation by difficulty bucket: exact match of all supervised tokens, one forward pass."""

    every_steps: int = Field(default=0, ge=0, description="0: only at the end")
    source: Literal["frozen", "generated"] = "frozen"
    path: str | None = Field(default=None, description="frozen eval JSONL; default data/<task>/eval.jsonl")
    num_per_difficulty: PositiveInt = Field(default=128, description="examples per bucket when generated")
    seed: int = 0
    batch_size: PositiveInt = 64
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="task options changed for evaluation, e.g. more difficulty buckets"
    )


LaunchMode = Literal["single_gpu", "multi_gpu", "zero2", "zero3", "fsdp2"]


class LaunchSection(Section):
    """How `retrofit train` starts the run: `launch: zero3`, or `launch: {mode: zero3, num_processes: 8}`.

    Modes: `single_gpu` (one process), `multi_gpu` (DDP), `zero2` and `zero3` (DeepSpeed ZeRO stage 2 or 3),
    `fsdp2` (torch's FSDP2, `retrofit.training.fsdp`).
    `num_processes` defaults to the number of visible GPUs (1 for `single_gpu`). `retrofit.launch` holds the
    configs of each mode and the rules that tie a mode to the rest of the recipe.
    """

    mode: LaunchMode
    num_processes: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"mode": data} if isinstance(data, str) else data

    @field_validator("num_processes")
    @classmethod
    def _one_process_on_one_gpu(cls, num_processes: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("mode") == "single_gpu" and num_processes not in (None, 1):
            raise ValueError("single_gpu runs one process; use mode multi_gpu, zero2 or zero3 for more")
        return num_processes


class AdapterSection(Section):
    """LoRA through PEFT (`retrofit.lora.apply_lora`) on a `model.pretrained`; `adapter: lora` takes every default.

    `target_modules: null` targets the attention and linear-mixer projections (`retrofit.lora.DEFAULT_TARGETS`);
    `modules_to_save: null` fully trains the modules the retrofit inserted (Ouro's Jet mixers).
    """

    type: Literal["lora"] = "lora"
    r: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data


class StageSection(Section):
    """One stage of staged training (e.g. warm up the inserted layers with hard eviction first).

    Stages run in order for `max_steps` optimizer steps each (`train.max_steps` must be their sum). `trainable` lists
    shell-style glob patterns over parameter names (`*` matches dots too; `["*"]` is every parameter); the others
    are frozen for the stage. With an `adapter`, a stage chooses among the parameters the adapter trains (its LoRA
    weights and `modules_to_save`). `sleep` holds `SleepConfig` fields merged over the recipe's top-level `sleep`.
    """

    name: str
    max_steps: PositiveInt
    trainable: list[str] = Field(default_factory=lambda: ["*"])
    sleep: dict[str, Any] = Field(default_factory=dict)


class Recipe(Section):
    """One training run. `base:` and `--set` are resolved by the loader before this model sees the data."""

    description: str | None = None
    output_dir: str
    seed: int = 0
    task: TaskSection
    model: ModelSection
    sleep: dict[str, Any] = Field(default_factory=dict)
    train: TrainSection
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    launch: LaunchSection | None = None
    adapter: AdapterSection | None = None
    stages: list[StageSection] | None = None

    def micro_batch_size(self, num_processes: int = 1) -> int:
        """Examples per forward on one process: `train.micro_batch_size`, by default the global batch split evenly
        over the `num_processes` processes (no accumulation)."""
        return self.train.micro_batch_size or max(self.train.batch_size // num_processes, 1)
