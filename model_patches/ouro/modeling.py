"""Ouro (LoopLM) for transformers 5 and the sleep engine, loading the published safetensors unchanged.

Layout (the published weight names): `model.embed_tokens`; `model.layers.{i}` = a sandwich-norm block,
`h + input_layernorm_2(self_attn(input_layernorm(h)))` then `h + post_attention_layernorm_2(mlp(
post_attention_layernorm(h)))`, with multi-head attention (no biases, RoPE) and the SwiGLU `mlp`; `model.norm`;
`model.early_exit_gate` (a `Linear(hidden, 1)` with bias); an untied `lm_head`.

One *step* runs the whole stack and then `model.norm`; the normed state feeds the next step (no input
injection), `total_ut_steps` times. Every step shares the RoPE positions of the tokens.

Native forward (no `sleep_config`), as the published `OuroForCausalLM.forward`: all steps run; then
  * `exit_at_step=s` (0-based) reads out step s;
  * with `labels` (and no `exit_at_step`), the logits are the *expected* logits `sum_t p_t lm_head(h_t)` under the
    exit distribution `p_t = lambda_t prod_{j<t} (1 - lambda_j)` (`lambda_t = sigmoid(gate(h_t))`, the last step
    takes the remaining mass), and the loss is their cross-entropy: the published model's training readout, so its
    loss is the one the base model was trained on. `use_weighted_exit=True` gives them without labels only when
    there is no threshold (the published config's 1.0 is one, and its rule comes first);
  * otherwise, the inference rule: per token, the first step whose cumulative `p` reaches `exit_threshold`
    (default `config.early_exit_threshold`, 1.0 in the published configs), the last step if none does. The gate,
    `p` and its cumulative sum are computed in the model's dtype, as published: in bf16 the sum often rounds up to
    1.0 before the last step, so many tokens exit early. The threshold rule comes before `use_weighted_exit`, which
    applies only when there is no threshold at all.

With a cache (`generate`) the model without sleep streams: each step keeps its own keys and values, as the
published cache keeps one slot per (step, layer), so decoding costs one token's work per step.

Sleep retrofit (`prepare_for_sleep`, called by `retrofit.apply_sleep`): MLP-free Jet mixer blocks
(`DecoderLayer(JetBlock, mlp=None)`, pre-norm residual) follow the layers listed in `config.jet_mixer_layers`
(6 evenly spaced by default). They live in `model.jet_mixers.{i}` (i = the Ouro layer they follow), so the base
weight names do not move and `model.jet_mixers.*` names exactly the new parameters (`jet_mixer_parameter_names`).
Their `o_proj` starts at zero, so until trained the retrofitted model computes what the base model computes.

Under sleep the engine sees one block per layer and mixer, in stack order, the last one followed by `model.norm`;
the loop range is the whole stack, so one loop pass is one Ouro step and the head is `lm_head` alone. A wake with
`wake_passes = w` reads out step w (the paper's Ouro runs `w = 1`), with no exit gate.

Mixer state across steps: in the native forward every step's mixers start from a zero state (each step sees the
sequence afresh, as each published step has its own KV); in the engine, pass n+1 continues from the state pass n
left (DESIGN.md, "Sleep"). The two agree for one step, and for any number of steps while the mixers are untrained
(`o_proj = 0`); once trained, the engine's multi-pass wake is the retrofitted model's definition.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from model_patches.jet_nemotron import JetBlock
from model_patches.jet_nemotron.jet_block import init_static_kernel
from model_patches.ouro.configuration import (
    DEFAULT_JET_MIXER_CONFIG,
    NUM_JET_MIXERS,
    OuroConfig,
    evenly_spaced_layers,
)
from retrofit.blocks import BlockState, Chunk, KVWindow
from retrofit.config import SleepConfig
from retrofit.generation import StreamCache, cached_output
from retrofit.layers.attention import Attention
from retrofit.layers.decoder import DecoderLayer
from retrofit.layers.gated_deltanet import GatedDeltaNet
from retrofit.layers.mlp import SwiGLU
from retrofit.layers.norm import RMSNorm
from retrofit.layers.rope import RotaryEmbedding
from retrofit.modeling import DecoderAdapter, SleepCausalLMMixin, next_token_loss

MIXER_PREFIX = "model.jet_mixers."


class OuroDecoderLayer(DecoderLayer):
    """Ouro's sandwich-norm block: each branch's output is normed again before the residual add."""

    def __init__(self, config: OuroConfig) -> None:
        hidden, eps = config.hidden_size, config.rms_norm_eps
        attention = Attention(hidden, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        super().__init__(attention, hidden, SwiGLU(hidden, config.intermediate_size), eps)
        self.input_layernorm_2 = RMSNorm(hidden, eps)
        self.post_attention_layernorm_2 = RMSNorm(hidden, eps)

    def forward(
        self, h: Tensor, state: BlockState, kv: KVWindow | None, chunk: Chunk
    ) -> tuple[Tensor, BlockState, KVWindow | None]:
        out, state, kv_out = self.self_attn(self.input_layernorm(h), state, kv, chunk)
        h = h + self.input_layernorm_2(out)
        h = h + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(h)))
        return h, state, kv_out


class StepEnd(nn.Module):
    """The stack's last block followed by `model.norm`: ends one Ouro step (the engine's view only, no parameters
    of its own)."""

    def __init__(self, block: nn.Module, norm: RMSNorm) -> None:
        super().__init__()
        self.block, self.norm = block, norm

    @property
    def kind(self) -> str:
        return self.block.kind

    @property
    def kv_window(self) -> int | None:
        return self.block.kv_window

    def forward(
        self, h: Tensor, state: BlockState, kv: KVWindow | None, chunk: Chunk
    ) -> tuple[Tensor, BlockState, KVWindow | None]:
        h, state, kv_out = self.block(h, state, kv, chunk)
        return self.norm(h), state, kv_out


def jet_mixer(config: OuroConfig) -> DecoderLayer:
    """One inserted mixer block: pre-norm `h + JetBlock(norm(h))`, no MLP; its `o_proj` is marked zero-init."""
    block = JetBlock(config.hidden_size, config.jet_mixer_settings())
    block.o_proj.zero_init = True
    return DecoderLayer(block, config.hidden_size, None, config.rms_norm_eps)


def exit_distribution(gate_logits: Tensor) -> Tensor:
    """`p_t = lambda_t prod_{j<t} (1 - lambda_j)` over steps, the last step taking the rest.

    `gate_logits` `[S, B, T]` -> probabilities `[S, B, T]` in the gate's own dtype: the published code computes the
    sigmoid, the surviving mass and each `p_t` step by step in the model's dtype, and in bf16 that rounding decides
    which step a token exits at.
    """
    lam = torch.sigmoid(gate_logits)
    survive = torch.ones_like(lam[0])
    probabilities = []
    for step in range(lam.shape[0] - 1):
        probabilities.append(lam[step] * survive)
        survive = survive * (1 - lam[step])
    return torch.stack([*probabilities, survive])


class OuroPreTrainedModel(PreTrainedModel):
    config_class = OuroConfig
    base_model_prefix = "model"
    _no_split_modules = ["OuroDecoderLayer", "DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init; mixer gates as fla, the static conv kernel as `nn.Conv1d`, marked layers at zero.

        Only for new modules: weights loaded from a checkpoint are never re-initialised.
        """
        super()._init_weights(module)
        if isinstance(module, JetBlock):
            A_log, dt_bias = GatedDeltaNet.initial_gates(module.num_heads)
            init.copy_(module.A_log, A_log)
            init.copy_(module.dt_bias, dt_bias)
        elif getattr(module, "zero_init", False):
            init.zeros_(module.weight)
        init_static_kernel(module)


class OuroModel(OuroPreTrainedModel):
    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(OuroDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_parameters["rope_theta"])
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True)
        self.jet_mixers = nn.ModuleDict({str(i): jet_mixer(config) for i in config.jet_mixer_layers or ()})
        self.post_init()

    def stack(self) -> nn.ModuleList:
        """One Ouro step as engine blocks: each layer, then its mixer if it has one; the last block ends in the norm."""
        blocks: list[nn.Module] = []
        for i, layer in enumerate(self.layers):
            blocks.append(layer)
            if str(i) in self.jet_mixers:
                blocks.append(self.jet_mixers[str(i)])
        blocks[-1] = StepEnd(blocks[-1], self.norm)
        return nn.ModuleList(blocks)


class OuroAdapter(DecoderAdapter):
    """The engine's view of Ouro: the step's blocks (the norm inside the last), and `lm_head` as the head."""

    def __init__(self, causal_lm: OuroForCausalLM) -> None:
        super().__init__(causal_lm, causal_lm.default_loop_range())
        self.blocks = causal_lm.model.stack()

    def head_features(self, h: Tensor) -> Tensor:
        """Nothing: the step's last block applies the norm."""
        return h


class OuroForCausalLM(SleepCausalLMMixin, OuroPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: OuroConfig) -> None:
        super().__init__(config)
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ------------------------------------------------------------------ sleep hooks

    def default_loop_range(self) -> tuple[int, int]:
        """The whole stack, mixers included (the paper loops all blocks of Ouro)."""
        return (0, len(self.model.layers) + len(self.model.jet_mixers))

    def get_sleep_adapter(self) -> OuroAdapter:
        return OuroAdapter(self)

    def prepare_for_sleep(self, config: SleepConfig) -> None:
        """Insert the Jet mixers once (idempotent), at `config.jet_mixer_layers` or 6 evenly spaced positions.

        New mixers get a fresh init with `o_proj = 0` (exact no-ops until trained), on the model's device and dtype,
        and the placement and settings are written to the model config so `save_pretrained` keeps them.
        `config` (the sleep schedule) does not affect the insertion.
        """
        self.config.validate_layer_type()  # `jet_mixer_layers` may have been set after loading
        wanted = self.config.jet_mixer_layers
        if wanted is None:
            wanted = evenly_spaced_layers(self.config.num_hidden_layers, NUM_JET_MIXERS)
        config.check_blocks(self.config.num_sleep_blocks)  # before the model changes
        built = [int(i) for i in self.model.jet_mixers]
        if built:
            if built != list(wanted):
                raise ValueError(f"Jet mixers are already inserted after layers {built}; cannot move them to {wanted}")
            return
        self.config.jet_mixer_layers = list(wanted)
        self.config.jet_mixer_config = dict(self.config.jet_mixer_config or DEFAULT_JET_MIXER_CONFIG)
        weight = self.model.embed_tokens.weight
        for i in wanted:
            mixer = jet_mixer(self.config)
            mixer.apply(self._init_weights)
            self.model.jet_mixers[str(i)] = mixer.to(device=weight.device, dtype=weight.dtype)

    def jet_mixer_parameter_names(self) -> list[str]:
        """Names of the inserted mixers' parameters: exactly those matching the glob `model.jet_mixers.*`."""
        return [name for name, _ in self.named_parameters() if name.startswith(MIXER_PREFIX)]

    # ------------------------------------------------------------------ native forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_logits: bool | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        *,
        ut_steps: int | None = None,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        use_weighted_exit: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """A sleeping model runs the engine (the exit options do not apply); otherwise see `plain_forward`.

        `position_ids` (`[B, T]`, in kwargs) replace the RoPE positions of a model without sleep; a cache
        (`cache=`, `past_key_values=` before transformers 5.25, or `use_cache=True`) streams the new tokens with one
        KV set per step, as the published model caches.
        """
        if self.sleep_config is not None:
            given = {"ut_steps": ut_steps, "exit_at_step": exit_at_step, "exit_threshold": exit_threshold}
            if use_weighted_exit or any(v is not None for v in given.values()):
                raise ValueError(
                    "a sleeping Ouro reads out its last loop pass, so ut_steps, exit_at_step, exit_threshold and "
                    "use_weighted_exit do not apply: set sleep_config.wake_passes for the wake's loop passes"
                )
            return super().forward(input_ids, attention_mask, labels, return_logits, cache, use_cache, **kwargs)
        cache, valid, positions = self.stream_inputs(input_ids, attention_mask, cache, use_cache, labels, kwargs)
        return self.plain_forward(
            input_ids,
            valid,
            labels,
            cache=cache,
            positions=positions,
            ut_steps=ut_steps,
            exit_at_step=exit_at_step,
            exit_threshold=exit_threshold,
            use_weighted_exit=use_weighted_exit,
        )

    def plain_forward(
        self,
        input_ids: Tensor,
        valid: Tensor | None = None,
        labels: Tensor | None = None,
        cache: StreamCache | None = None,
        positions: Tensor | None = None,
        *,
        ut_steps: int | None = None,
        exit_at_step: int | None = None,
        exit_threshold: float | None = None,
        use_weighted_exit: bool = False,
    ) -> CausalLMOutputWithPast:
        """The model without sleep: `ut_steps` (default `total_ut_steps`) steps of full causal attention, read out
        as the published model does (module docstring). `ut_steps=1` is the one-pass model that a sleep with N = 1
        and L >= T equals. With a `cache` the tokens continue its stream; `valid` marks the real tokens of
        `input_ids` (all by default), and `positions` replace the RoPE positions.
        """
        steps = self.config.total_ut_steps if ut_steps is None else ut_steps
        if steps < 1:
            raise ValueError(f"ut_steps = {steps}: the stack must run at least once")
        if exit_at_step is not None and not 0 <= exit_at_step < steps:
            raise ValueError(f"exit_at_step = {exit_at_step}: choose a step in [0, {steps}) (0 is the first)")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        streamed = cache if cache is not None else StreamCache()
        states = streamed.run(self.get_sleep_adapter(), input_ids, valid, steps, positions)
        if labels is not None:  # the published training readout: the expected logits, unless a step is named
            logits = self.expected_logits(states) if exit_at_step is None else self.lm_head(states[exit_at_step])
            return CausalLMOutputWithPast(loss=next_token_loss(logits, labels, valid), logits=logits)
        logits = self.exit_readout(states, exit_at_step, exit_threshold, use_weighted_exit)
        return cached_output(logits, cache) if cache is not None else CausalLMOutputWithPast(logits=logits)

    def exit_readout(
        self, states: list[Tensor], exit_at_step: int | None, exit_threshold: float | None, weighted: bool
    ) -> Tensor:
        """Logits from the per-step (normed) states `[B, T, D]`, in the published order of rules: a fixed step;
        else the per-token threshold rule (the threshold defaults to `config.early_exit_threshold`, so with the
        published 1.0 it comes before `weighted`); else the expected logits when `weighted`; else the last step.
        """
        if exit_at_step is not None:
            return self.lm_head(states[exit_at_step])
        threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        if threshold is None:
            return self.expected_logits(states) if weighted else self.lm_head(states[-1])
        stacked = torch.stack(states)
        p = exit_distribution(self.model.early_exit_gate(stacked).squeeze(-1))
        reached = torch.cumsum(p, dim=0) >= threshold  # in the model's dtype, as published
        reached[-1] = True  # fall back to the last step
        chosen = reached.long().argmax(dim=0)  # first step that reaches the threshold, [B, T]
        index = chosen[None, ..., None].expand(1, *stacked.shape[1:])
        return self.lm_head(stacked.gather(0, index).squeeze(0))

    def expected_logits(self, states: list[Tensor]) -> Tensor:
        """`sum_t p_t lm_head(h_t)` under the exit distribution, accumulated step by step in the logits' dtype."""
        p = exit_distribution(self.model.early_exit_gate(torch.stack(states)).squeeze(-1))
        expected = None
        for step, h in enumerate(states):
            logits = self.lm_head(h)
            term = logits * p[step, ..., None].to(logits.dtype)
            expected = term if expected is None else expected + term
        return expected
