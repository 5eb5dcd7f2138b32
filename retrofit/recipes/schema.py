"""The recipe schema: one pydantic model per YAML section, unknown keys forbidden.

A recipe is one YAML file per run (see `recipes/`). Sections:

- `task`: which generator makes the data (`retrofit.tasks.get_task(name, **options)`);
- `model`: a from-scratch config (`model.config`, a dict for the family's config class) or a checkpoint
  (`model.pretrained`, a local path or Hub id);
- `sleep`: the fields of `retrofit.SleepConfig` (checked by `SleepConfig` itself; `window` defaults to the task's);
- `train`: steps, batch sizes, precision, checkpoints and logging;
- `optimizer`: Muon for the blocks' matrices plus AdamW for the rest, or AdamW alone, with the LR schedule;
- `eval`: the evaluation by difficulty bucket;
- `adapter`: LoRA (`adapter: lora`, or a mapping with `type: lora` and its options; see `retrofit.lora`);
- `launch`, `stages`: reserved for multi-GPU launch configs and staged training.

The checks that need a task or a model (task options, sleep fields, loop range against the block count) live in
`retrofit.recipes.resolve`; this module only checks shapes and types.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

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
    """Exactly one of `config` (build from scratch) and `pretrained` (load a checkpoint)."""

    config: dict[str, Any] | None = None
    pretrained: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.config is None) == (self.pretrained is None):
            raise ValueError("set exactly one of model.config (a from-scratch config) and model.pretrained (a path)")
        return self


class TrainSection(Section):
    """How long and how big: `batch_size` is the global batch (all processes and accumulation steps)."""

    max_steps: PositiveInt
    batch_size: PositiveInt = 64
    micro_batch_size: PositiveInt | None = Field(
        default=None, description="examples per forward on one process; default: batch_size"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(default="auto", description="auto: bf16 on GPU, fp32 on CPU")
    checkpoint_every: int = Field(default=0, ge=0, description="0: only at the end")
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )

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


class LaunchSection(Section):
    """Reserved: the accelerate / DeepSpeed config a multi-GPU launch uses (names under recipes/)."""

    accelerate_config: str | None = None
    deepspeed_config: str | None = None


class AdapterSection(Section):
    """LoRA through PEFT (`retrofit.lora.apply_lora`); `adapter: lora` alone takes every default.

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
    """Reserved: one stage of staged training (e.g. warm up new layers with hard eviction first)."""

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
    launch: LaunchSection = Field(default_factory=LaunchSection)
    adapter: AdapterSection | None = None
    stages: list[StageSection] | None = None

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward on one process."""
        return self.train.micro_batch_size or self.train.batch_size
