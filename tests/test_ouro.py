"""Ouro: loading the published layout on transformers 5, the native looped forward, the Jet-mixer retrofit, and the
engine's semantics on the retrofitted model.

Checkpoints are tiny and random, written by `tests.ouro_checkpoint` from the published key names and shapes (not from
our modules). Comparisons run in float64.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import retrofit
from model_patches.ouro import OuroConfig, OuroForCausalLM, evenly_spaced_layers
from retrofit import SleepConfig, SleepEngine, apply_sleep
from retrofit.blocks import LinearState
from retrofit.generation import CACHE_NAME, StreamCache
from retrofit.recipes import Recipe, RecipeError, load_recipe, resolve
from tests.helpers import left_padding_runs, minimal_recipe, random_batch, stream_wake_logits, timed_gpu_training_step
from tests.ouro_checkpoint import LAYER_NORMS, official_shapes, tiny_config, write_official_checkpoint

TOL = 1e-10
STEPS = tiny_config()["total_ut_steps"]
MIXER_LAYERS = [1, 3]  # with 4 layers: the engine sees layer 0, layer 1, mixer, layer 2, layer 3, mixer
TINY_MIXER = {"num_heads": 2, "head_dim": 8, "expand_v": 2, "conv_size": 4, "dconv_generator_reduction": 4}


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models spend their time in intra-op thread synchronisation on a busy shared CPU: use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("ouro-official")
    return directory, write_official_checkpoint(directory)


@pytest.fixture(scope="module")
def base(checkpoint) -> OuroForCausalLM:
    assert retrofit.__version__  # `import retrofit` registers the family
    return AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float64).eval()


def retrofitted(base: OuroForCausalLM, sleep: SleepConfig | None = None, *, trained: bool = False) -> OuroForCausalLM:
    """A copy of `base` with tiny mixers after `MIXER_LAYERS`; `trained` gives them random output projections."""
    model = copy.deepcopy(base)
    model.config.jet_mixer_layers, model.config.jet_mixer_config = MIXER_LAYERS, TINY_MIXER
    apply_sleep(model, sleep or SleepConfig(window=4))
    if trained:
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for mixer in model.model.jet_mixers.values():
                o_proj = mixer.self_attn.o_proj.weight
                o_proj.copy_(
                    torch.randn(o_proj.shape, generator=generator, dtype=o_proj.dtype) / o_proj.shape[1] ** 0.5
                )
    return model


def engine_for(model, **config) -> SleepEngine:
    return SleepEngine(model.get_sleep_adapter(), SleepConfig(**config))


# ---------------------------------------------------------------------------------------------- loading


def test_official_layout_loads_without_remote_code(checkpoint):
    directory, written = checkpoint
    loaded, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, output_loading_info=True)
    assert isinstance(loaded, OuroForCausalLM)  # our registration wins over auto_map (the stubs would raise)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    state = loaded.state_dict()
    assert set(state) == set(written)
    assert all(torch.equal(state[name], tensor.double()) for name, tensor in written.items())
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()  # untied
    assert loaded.config.total_ut_steps == STEPS and loaded.config.jet_mixer_layers is None
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert AutoModelForCausalLM.from_pretrained(directory).dtype == torch.bfloat16


def test_base_checkpoint_round_trips_exactly(base, checkpoint, tmp_path):
    base.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in saved and saved["model_type"] == "ouro" and saved["total_ut_steps"] == STEPS
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(checkpoint[1])  # publishable in the official layout
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids, labels = random_batch(2, 9, base.config.vocab_size)
    with torch.no_grad():
        a, b = base(ids, labels=labels), loaded(ids, labels=labels)
    # Identical weights in two instances: equal up to float64 rounding (memory layout changes SIMD paths).
    assert close(a.logits, b.logits) and close(a.loss, b.loss)


def test_published_shapes_and_default_retrofit_on_meta():
    """Ouro-1.4B's shapes, the default 6 mixers after every 4th layer, and their share of the parameters."""
    published = tiny_config(num_layers=24, total_ut_steps=4) | {
        "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 49152, "max_position_embeddings": 65536, "rope_theta": 1e6,
    }  # fmt: skip
    with torch.device("meta"):
        model = OuroForCausalLM(OuroConfig(**published))
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        assert shapes == official_shapes(published)
        base_count = sum(p.numel() for p in model.parameters())
        apply_sleep(model, SleepConfig(window=2000, passes=4))
    assert model.config.jet_mixer_layers == [3, 7, 11, 15, 19, 23] == evenly_spaced_layers(24)
    assert evenly_spaced_layers(48) == [7, 15, 23, 31, 39, 47]
    assert evenly_spaced_layers(28) == [4, 8, 13, 18, 22, 27]  # spread to the end when 6 does not divide it
    assert model.default_loop_range() == (0, 30)
    names = model.jet_mixer_parameter_names()
    added = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert sum(p.numel() for p in model.parameters()) - base_count == added
    assert 0.05 < added / base_count < 0.10, added / base_count  # the paper's "<10% extra parameters"


# ---------------------------------------------------------------------------------------------- native forward


def reference_steps(
    state: dict[str, torch.Tensor], config: dict, ids: torch.Tensor, positions: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The looped stack written out from the spec in float64: per step, every sandwich-norm layer, then the norm.
    `positions` (`[T]`, default 0..T-1) are the RoPE positions."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, eps = hidden // heads, config["rms_norm_eps"]
    B, T = ids.shape

    def rms(x, weight):
        return weight * x / (x.square().mean(-1, keepdim=True) + eps).sqrt()

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    positions = torch.arange(T) if positions is None else positions
    angles = positions.to(torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # [B, H, T, D], rotate_half convention
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = state["model.embed_tokens.weight"][ids]
    steps = []
    for _ in range(config["total_ut_steps"]):
        for i in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{i}."
            w = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            x = rms(h, w["input_layernorm.weight"])
            q, k, v = (
                (x @ w[f"self_attn.{n}_proj.weight"].T).view(B, T, heads, head_dim).transpose(1, 2) for n in "qkv"
            )
            scores = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(head_dim)
            attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
            attn = attn.transpose(1, 2).reshape(B, T, hidden) @ w["self_attn.o_proj.weight"].T
            h = h + rms(attn, w["input_layernorm_2.weight"])
            x = rms(h, w["post_attention_layernorm.weight"])
            gate, up, down = (w[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
            mlp = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
            h = h + rms(mlp, w["post_attention_layernorm_2.weight"])
        h = rms(h, state["model.norm.weight"])
        steps.append(h)
    return steps


def test_native_forward_equals_a_float64_recomputation(base, checkpoint):
    written = {name: t.double() for name, t in checkpoint[1].items()}
    ids, labels = random_batch(2, 10, base.config.vocab_size)
    steps = reference_steps(written, tiny_config(), ids)
    logits = [h @ written["lm_head.weight"].T for h in steps]
    lam = [
        torch.sigmoid(h @ written["model.early_exit_gate.weight"].T + written["model.early_exit_gate.bias"])[..., 0]
        for h in steps
    ]
    p, survive = [], torch.ones_like(lam[0])
    for t in range(STEPS):
        p.append(survive if t == STEPS - 1 else lam[t] * survive)
        survive = survive * (1 - lam[t])
    expected = sum(pt[..., None] * z for pt, z in zip(p, logits, strict=True))
    cumulative = torch.cumsum(torch.stack(p), 0)
    first = [
        [next(t for t in range(STEPS) if t == STEPS - 1 or cumulative[t, b, i] >= 0.5) for i in range(10)]
        for b in range(2)
    ]
    assert len({s for row in first for s in row}) > 1  # the threshold rule picks different steps for different tokens
    by_threshold = torch.stack([torch.stack([logits[first[b][i]][b, i] for i in range(10)]) for b in range(2)])
    with torch.no_grad():
        trained_readout = base(ids, labels=labels)  # labels -> expected logits, as the published code trains
        last = base(ids)  # early_exit_threshold 1.0 -> the last step
        half = base(ids, exit_threshold=0.5)
        second = base(ids, exit_at_step=1)
        one_step = base(ids, ut_steps=1)
    assert close(trained_readout.logits, expected, TOL)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    assert close(
        trained_readout.loss.double(),
        F.cross_entropy(expected.flatten(0, 1), targets.flatten(), ignore_index=-100),
        TOL,
    )
    assert close(last.logits, logits[-1], TOL) and close(second.logits, logits[1], TOL)
    assert close(half.logits, by_threshold, TOL)
    assert close(one_step.logits, logits[0], TOL)
    assert not close(expected, logits[-1], 1e-3)  # the readouts differ: each comparison can fail


# ---------------------------------------------------------------------------------------------- retrofit


def test_untrained_mixers_are_exact_no_ops(base):
    model = retrofitted(base, SleepConfig(window=16, passes=1))
    assert [int(i) for i in model.model.jet_mixers] == MIXER_LAYERS
    assert all(torch.count_nonzero(m.self_attn.o_proj.weight) == 0 for m in model.model.jet_mixers.values())
    assert all(m.mlp is None for m in model.model.jet_mixers.values())
    ids, labels = random_batch(2, 10, base.config.vocab_size)
    with torch.no_grad():
        # Native forward of the retrofitted model (no sleep) vs the base, every readout: bit-for-bit.
        model.config.sleep_config = None
        for kwargs in ({}, {"labels": labels}, {"exit_threshold": 0.5}, {"ut_steps": 1}):
            assert torch.equal(model(ids, **kwargs).logits, base(ids, **kwargs).logits), kwargs
        # Sleeping N = 1, L >= T: the base model's one-step forward.
        one = engine_for(model, window=16, passes=1).forward(ids, labels=labels, return_logits=True)
        assert close(one.logits, base(ids, ut_steps=1).logits)
        # Wake with wake_passes = total_ut_steps, L >= T: the base model's last-step (native inference) logits.
        woke = engine_for(model, window=16, passes=STEPS, wake_passes=STEPS).forward(ids, return_logits=True)
        assert close(woke.logits, base(ids, exit_at_step=STEPS - 1).logits)
        assert close(woke.logits, base(ids).logits)
        assert not close(one.logits, woke.logits, 1e-3)


def test_insertion_is_idempotent_and_survives_save_and_load(base, tmp_path):
    sleep = SleepConfig(window=4, passes=3, eviction="sliding")
    model = retrofitted(base, sleep, trained=True)
    before = dict(model.named_parameters())
    apply_sleep(model, sleep)  # again: nothing inserted twice
    assert dict(model.named_parameters()).keys() == before.keys()
    assert all(p is before[n] for n, p in model.named_parameters())
    new = set(before) - set(dict(base.named_parameters()))
    assert set(model.jet_mixer_parameter_names()) == new and all(n.startswith("model.jet_mixers.") for n in new)
    model.config.jet_mixer_layers = [0, 2]
    with pytest.raises(ValueError, match="already inserted"):
        apply_sleep(model, sleep)
    model.config.jet_mixer_layers = MIXER_LAYERS

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["jet_mixer_layers"] == MIXER_LAYERS and saved["jet_mixer_config"] == TINY_MIXER
    assert saved["sleep_config"] == sleep.to_dict()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == (set(), set())
    assert loaded.sleep_config == sleep
    assert all(torch.equal(p, before[n]) for n, p in loaded.named_parameters())  # trained o_proj, not re-zeroed
    apply_sleep(loaded, sleep)
    assert len(loaded.model.jet_mixers) == len(MIXER_LAYERS)
    ids, labels = random_batch(2, 11, base.config.vocab_size)
    with torch.no_grad():
        assert close(model(ids).logits, loaded.eval()(ids).logits)
        assert close(model(ids, labels=labels).loss, loaded(ids, labels=labels).loss)


# ---------------------------------------------------------------------------------------------- engine semantics


@pytest.fixture(scope="module")
def trained(base) -> OuroForCausalLM:
    """The retrofitted model with non-zero mixer outputs, as after training (so the fast state matters)."""
    model = retrofitted(base, trained=True)
    model.config.sleep_config = None
    return model


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_one_pass_with_window_over_sequence_equals_plain_forward(trained, eviction):
    ids, labels = random_batch(2, 13, trained.config.vocab_size)
    with torch.no_grad():
        plain = trained.plain_forward(ids, labels=labels, ut_steps=1)
        out = engine_for(trained, window=13, passes=1, eviction=eviction).forward(
            ids, labels=labels, return_logits=True
        )
    assert close(out.logits, plain.logits) and close(out.loss, plain.loss)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_wake_logits_equal_token_by_token_streaming(trained, eviction):
    engine = engine_for(trained, window=4, passes=3, eviction=eviction)
    assert (engine.prelude, engine.loop, engine.coda) == (range(0, 0), range(0, 6), range(6, 6))
    assert [b.kind for b in engine.adapter.blocks] == ["attention", "attention", "linear"] * 2
    ids, _ = random_batch(2, 11, trained.config.vocab_size)
    with torch.no_grad():
        batched = engine.forward(ids, return_logits=True).logits
        streamed, _ = stream_wake_logits(engine, ids)
        one_pass = engine_for(trained, window=4, passes=1, eviction=eviction).forward(ids, return_logits=True).logits
    assert close(batched, streamed)
    assert not close(batched[:, 4:], one_pass[:, 4:], 1e-6)  # the sleep passes matter


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_left_padding_by_whole_windows_is_invisible(trained, eviction):
    engine = engine_for(trained, window=4, passes=3, eviction=eviction)
    reference, padded = left_padding_runs(engine, trained.config.vocab_size)
    assert close(padded.loss, reference.loss)
    states = [(a, b) for a, b in zip(padded.states, reference.states, strict=True) if isinstance(b, LinearState)]
    assert len(states) == len(MIXER_LAYERS)
    assert all(close(a.recurrent, b.recurrent) and close(a.conv[0], b.conv[0]) for a, b in states)


def test_config_rejects_bad_mixer_layers_and_layer_types():
    with pytest.raises(Exception, match="jet_mixer_layers"):
        OuroConfig(**(tiny_config() | {"jet_mixer_layers": [3, 1]}))
    with pytest.raises(Exception, match="jet_mixer_layers"):
        OuroConfig(**(tiny_config() | {"jet_mixer_layers": [4]}))
    with pytest.raises(Exception, match="full_attention"):
        OuroConfig(**(tiny_config() | {"layer_types": ["sliding_attention"] * 4}))
    assert set(LAYER_NORMS) <= {n.split(".")[-2] for n in official_shapes(tiny_config())}


def test_a_refused_retrofit_leaves_the_model_as_it_was(base):
    model = copy.deepcopy(base)
    model.config.jet_mixer_layers = [9]  # set after loading, past the 4 layers
    with pytest.raises(ValueError, match=r"jet_mixer_layers = \[9\]"):
        apply_sleep(model, SleepConfig(window=4))
    model.config.jet_mixer_layers = MIXER_LAYERS
    with pytest.raises(ValueError, match="out of bounds"):  # 4 layers + 2 mixers = 6 blocks
        apply_sleep(model, SleepConfig(window=4, loop_range=(0, 7)))
    assert len(model.model.jet_mixers) == 0 and model.config.sleep_config is None


def test_a_recipe_may_loop_over_the_inserted_mixers_too(tmp_path):
    """4 layers + 2 mixers are 6 blocks: `loop_range: [0, 6]` is the default range, not out of bounds."""
    config = {k: tiny_config()[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "total_ut_steps")}
    config |= {"num_attention_heads": 4, "num_key_value_heads": 4, "layer_types": ["full_attention"] * 4}
    config |= {"model_type": "ouro", "jet_mixer_layers": MIXER_LAYERS, "jet_mixer_config": TINY_MIXER}
    recipe = minimal_recipe(model={"config": config}, sleep={"window": 24, "passes": 2, "loop_range": [0, 6]})
    assert resolve(Recipe.model_validate(recipe)).sleep.loop_range == (0, 6)
    recipe["sleep"]["loop_range"] = [0, 7]
    with pytest.raises(RecipeError, match="the model has 6 blocks"):
        resolve(Recipe.model_validate(recipe))


def test_exit_options_name_the_bad_value_and_do_not_apply_while_sleeping(base):
    ids, _ = random_batch(1, 6, base.config.vocab_size)
    with pytest.raises(ValueError, match=f"exit_at_step = {STEPS}: choose a step in \\[0, {STEPS}\\)"):
        base(ids, exit_at_step=STEPS)
    with pytest.raises(ValueError, match="ut_steps = 0"):
        base(ids, ut_steps=0)
    with pytest.raises(ValueError, match="exit_at_step, exit_threshold and use_weighted_exit do not apply"):
        retrofitted(base)(ids, exit_at_step=0)
    with pytest.raises(ValueError, match="without position_ids"):
        retrofitted(base)(ids, position_ids=torch.arange(6)[None])
    with pytest.raises(ValueError, match="labels are not supported with a cache"):
        base(ids, labels=ids, use_cache=True)


def test_position_ids_are_honoured(base, checkpoint):
    """`position_ids` with a gap give the float64 recomputation at those RoPE positions (and differ from the
    default positions, so the check can fail)."""
    written = {name: t.double() for name, t in checkpoint[1].items()}
    ids, _ = random_batch(1, 8, base.config.vocab_size)
    positions = torch.tensor([0, 1, 2, 9, 10, 11, 30, 31])
    expected = reference_steps(written, tiny_config(), ids, positions)[-1] @ written["lm_head.weight"].T
    with torch.no_grad():
        moved = base(ids, position_ids=positions[None], exit_at_step=STEPS - 1).logits
        default = base(ids, exit_at_step=STEPS - 1).logits
    assert close(moved, expected)
    assert not close(moved, default, 1e-3)


# ---------------------------------------------------------------------------------------------- bf16 exit rule


def published_threshold_exit(gate_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """The published inference rule, written from its description: sigmoid, the per-step exit probabilities
    (`p_t = lambda_t * surviving mass`, the last step the rest) and their cumulative sum, all in the gate's dtype;
    per token the first step whose cumulative probability reaches `threshold`, else the last.
    `[S, B, T]` -> `[B, T]`."""
    steps = gate_logits.shape[0]
    lam = [torch.sigmoid(gate_logits[t]) for t in range(steps)]
    remaining = torch.ones_like(lam[0])
    pdf = []
    for t in range(steps):
        if t == steps - 1:
            pdf.append(remaining)
        else:
            pdf.append(lam[t] * remaining)
            remaining = remaining * (1 - lam[t])
    cumulative = torch.cumsum(torch.stack(pdf), dim=0)
    exit_step = torch.full(gate_logits.shape[1:], steps - 1)
    for t in reversed(range(steps)):
        exit_step = torch.where(cumulative[t] >= threshold, t, exit_step)
    return exit_step


def test_bf16_threshold_exit_follows_the_published_rule(checkpoint):
    """bf16, published threshold 1.0: the exit steps are those of the rule computed in bf16, many tokens exit before
    the last step, and the fp32 rule would pick other steps (what the model did before it matched the published
    code)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.bfloat16).eval()
    assert model.config.early_exit_threshold == 1.0
    with torch.no_grad():
        model.model.early_exit_gate.bias.fill_(4.0)  # confident gates: the cumulative mass nears 1 early
    captured = []
    hook = model.model.early_exit_gate.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    ids, _ = random_batch(2, 24, model.config.vocab_size, seed=11)
    with torch.no_grad():
        logits = model(ids).logits
        hook.remove()
        states = captured[0]  # [S, B, T, D]: the normed state after every step
        gate = (states @ model.model.early_exit_gate.weight.T + model.model.early_exit_gate.bias)[..., 0]
        exit_step = published_threshold_exit(gate, 1.0)
        chosen = states.gather(0, exit_step[None, ..., None].expand(1, *states.shape[1:]))[0]
        expected = chosen @ model.lm_head.weight.T
        per_step = [model(ids, exit_at_step=s).logits for s in range(STEPS)]
    assert torch.equal(logits, expected)
    assert (exit_step < STEPS - 1).float().mean() > 0.5  # most tokens exit early in bf16
    assert torch.equal(logits[exit_step == 0], per_step[0][exit_step == 0])
    fp32_step = published_threshold_exit(gate.float(), 1.0)
    assert (fp32_step != exit_step).any()


def test_weighted_exit_comes_after_the_threshold(base, checkpoint):
    """As published: with a threshold (the config's 1.0), `use_weighted_exit` does not change the readout; without
    one, it gives `sum_t p_t lm_head(h_t)`, recomputed here in float64 from the spec (`reference_steps`)."""
    written = {name: t.double() for name, t in checkpoint[1].items()}
    ids, _ = random_batch(1, 9, base.config.vocab_size)
    steps = reference_steps(written, tiny_config(), ids)
    gate_w, gate_b = written["model.early_exit_gate.weight"], written["model.early_exit_gate.bias"]
    lam = [torch.sigmoid(h @ gate_w.T + gate_b)[..., 0] for h in steps]
    survive, expected = torch.ones_like(lam[0]), 0
    for t, h in enumerate(steps):
        p = survive if t == STEPS - 1 else lam[t] * survive
        expected = expected + p[..., None] * (h @ written["lm_head.weight"].T)
        survive = survive * (1 - lam[t])
    model = copy.deepcopy(base)
    with torch.no_grad():
        assert torch.equal(model(ids, use_weighted_exit=True).logits, model(ids).logits)
        model.config.early_exit_threshold = None
        weighted = model(ids, use_weighted_exit=True).logits
    assert close(weighted, expected)
    assert not close(weighted, model(ids).logits, 1e-3)


# ---------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("trained_mixers", [False, True])
def test_the_model_without_sleep_decodes_through_a_kv_cache(base, trained_mixers):
    """Streaming the plain model (each UT step with its own KV and mixer state) in uneven segments, left-padded,
    gives the uncached forward's logits; greedy `generate` equals the argmax of the uncached forward."""
    model = retrofitted(base, trained=True) if trained_mixers else copy.deepcopy(base)
    model.config.sleep_config = None
    ids, _ = random_batch(2, 13, base.config.vocab_size, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cache = StreamCache()
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        parts = [
            model(ids[:, s:e], attention_mask=mask[:, :e], **{CACHE_NAME: cache}).logits
            for s, e in ((0, 5), (5, 6), (6, 13))
        ]
        streamed = torch.cat(parts, dim=1)
        assert cache.get_seq_length() == 13 and len(cache.windows) == STEPS
        assert close(streamed[mask.bool()], whole[mask.bool()])
        model.generation_config.eos_token_id = None
        out = model.generate(ids[:1, :6], max_new_tokens=7, do_sample=False)
        assert torch.equal(model(out).logits[:, 5:-1].argmax(-1), out[:, 6:])


# ---------------------------------------------------------------------------------------------- recipes

REPO = Path(__file__).resolve().parents[1]
QWEN_TOKENIZER = REPO.parent / "shared" / "fixtures" / "jet-nemotron"  # any local tokenizer: the check is offline


def ouro_recipe(name: str, tmp_path: Path):
    """Load a shipped Ouro recipe with the Hub checkpoint replaced by a local config of Ouro-1.4B's shape.

    Ouro's own tokenizer is not available offline, so the stand-in reads the Qwen2 fixture tokenizer and its
    vocabulary is sized to cover it (the recipe refuses a model whose vocabulary is smaller than the tokenizer)."""
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip(f"{QWEN_TOKENIZER} is absent (the fixtures live in ../shared/fixtures)")
    published = tiny_config(num_layers=24, total_ut_steps=4) | {
        "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
        "vocab_size": 151936, "rope_theta": 1e6,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(published))
    overrides = [f"model.pretrained={tmp_path}", f"task.options.tokenizer={QWEN_TOKENIZER}"]
    return load_recipe(REPO / "recipes" / name, overrides).recipe


def test_hard_eviction_recipe_validates(tmp_path):
    resolved = resolve(ouro_recipe("gsm-infinite-ouro-1.4b.yaml", tmp_path))
    assert (resolved.sleep.window, resolved.sleep.passes, resolved.sleep.eviction) == (2000, 4, "hard")
    assert resolved.sleep.loop_range is None  # the model's default: the whole stack, mixers included


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("passes", [1, 4, 8])
def test_ouro_1_4b_shape_sleep_trains_on_gpu(passes):
    """Ouro-1.4B's shape (random init, bf16) with the default 6 mixers: one forward+backward of a T = 3300 sequence
    under L = 2000, hard eviction, `checkpointing: pass`. Prints the step time and the peak memory."""
    config = OuroConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OuroForCausalLM(config).to(torch.bfloat16)
    sleep = SleepConfig(window=2000, passes=passes, eviction="hard", checkpointing="pass")
    apply_sleep(model, sleep)
    assert len(model.model.jet_mixers) == 6 and model.default_loop_range() == (0, 30)
    model.train()
    ids = torch.randint(0, config.vocab_size, (1, 3300), device="cuda")
    labels = ids.clone()
    labels[:, :2000] = -100  # supervise the second chunk, after a sleep
    loss, elapsed, peak = timed_gpu_training_step(model, ids, labels)
    assert torch.isfinite(loss)
    mixer_grads = [p.grad for n, p in model.named_parameters() if n in set(model.jet_mixer_parameter_names())]
    assert all(g is not None for g in mixer_grads)
    print(f"\nOuro-1.4B shape + 6 Jet mixers, N={passes}, L=2000, T=3300: step {elapsed:.2f} s, peak {peak:.1f} GiB")
