"""Jet-Nemotron: loading the published layout on transformers 5, the engine's semantics, and JetBlock references.

Checkpoints are tiny and random, written by `tests.jet_checkpoint` from the published key names and shapes (not from
our modules). Comparisons run in float64.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import retrofit
from model_patches.jet_nemotron import JetBlock, JetNemotronConfig, JetNemotronForCausalLM
from retrofit import SleepConfig, SleepEngine, apply_sleep
from retrofit.blocks import Chunk, LinearState
from retrofit.cli import main
from retrofit.generation import SleepCache
from retrofit.layers.packing import PACKING, pack_input_projections
from retrofit.ops.naive import naive_gated_delta_rule
from retrofit.ops.naive_dynamic_conv import naive_dynamic_conv
from tests.helpers import left_padding_runs, random_batch, stream_wake_logits, timed_gpu_training_step
from tests.jet_checkpoint import official_shapes, tiny_config, write_official_checkpoint

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "jet-nemotron"
TOL = 1e-10


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


def flat_states(states) -> list[torch.Tensor]:
    return [t for s in states if isinstance(s, LinearState) for t in (s.recurrent, *s.conv)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp("jet-official")
    return directory, write_official_checkpoint(directory)


@pytest.fixture(scope="module")
def model(checkpoint) -> JetNemotronForCausalLM:
    assert retrofit.__version__  # `import retrofit` registers the family
    return AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float64).eval()


def engine_for(model, **config) -> SleepEngine:
    return SleepEngine(model.get_sleep_adapter(), SleepConfig(**config))


# ---------------------------------------------------------------------------------------------- loading


def test_official_layout_loads_without_remote_code(checkpoint):
    directory, written = checkpoint
    loaded, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64, output_loading_info=True)
    assert isinstance(loaded, JetNemotronForCausalLM)  # our registration wins over auto_map (the stubs would raise)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    state = loaded.state_dict()
    assert all(torch.equal(state[name], tensor.double()) for name, tensor in written.items())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied
    assert loaded.model.rotary_emb.theta == 10000.0
    assert [layer.kind for layer in loaded.model.layers] == [
        "linear", "attention", "linear", "sliding", "linear", "linear", "attention", "linear"
    ]  # fmt: skip
    assert loaded.model.layers[3].self_attn.window == 5
    assert AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False).dtype == torch.bfloat16


def test_retrofitted_checkpoint_round_trips_exactly(model, checkpoint, tmp_path):
    sleep = SleepConfig(window=5, passes=3, eviction="sliding")
    apply_sleep(model, sleep)
    try:
        model.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert "auto_map" not in saved and saved["model_type"] == "jet_nemotron"
        assert saved["layer_types"] == list(tiny_config()["layer_types"])
        assert saved["efficient_attention_config"] == tiny_config()["efficient_attention_config"]
        assert saved["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            assert set(f.keys()) == set(checkpoint[1])  # publishable in the official layout
        (tmp_path / "modeling_jet_nemotron.py").write_text('raise RuntimeError("no remote code")\n')
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
        assert loaded.sleep_config == sleep
        ids, _ = random_batch(2, 12, model.config.vocab_size)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)
    finally:
        model.config.sleep_config = None


def test_config_round_trips_and_rejects_unknown_layer_types(tmp_path):
    config = JetNemotronConfig(**tiny_config())
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, JetNemotronConfig)
    assert again.to_dict() | {"_name_or_path": ""} == config.to_dict()
    assert again.jet_block_settings().norm_eps == 1e-5 and again.jet_block_settings().head_v_dim == 16
    with pytest.raises(Exception, match="gdn"):
        JetNemotronConfig(**(tiny_config() | {"layer_types": ["jet", "gdn", "attn", "swa"], "num_hidden_layers": 4}))
    with pytest.raises(Exception, match="num_hidden_layers"):
        JetNemotronConfig(**(tiny_config() | {"num_hidden_layers": 3}))


PUBLISHED = {
    "2B": dict(
        loop=(7, 21),
        attn=[14, 19],
        swa=[20, 21],
        window=1152,
        shapes={"q_proj": (1152, 1536), "v_proj": (3072, 1536), "w2": (12288, 384), "w1": (384, 1536)},
    ),
    "4B": dict(
        loop=(9, 27),
        attn=[17, 20, 32],
        swa=[5, 16, 19, 21, 22, 25, 27],
        window=2048,
        shapes={"q_proj": (2048, 2048), "v_proj": (4096, 2048), "w2": (16384, 512), "w1": (512, 2048)},
    ),
}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_config_builds_the_published_shapes_on_meta(size, tmp_path):
    source = FIXTURES / f"config-{size}.json"
    if not source.exists():
        pytest.skip(f"{source} is absent (the published configs live in ../shared/fixtures)")
    shutil.copy(source, tmp_path / "config.json")
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, JetNemotronConfig) and not hasattr(config, "auto_map")
    assert config.rope_parameters["rope_theta"] == 1e6
    with torch.device("meta"):
        built = AutoModelForCausalLM.from_config(config)
    assert all(p.is_meta for p in built.parameters())
    # Every tensor the published layout has, with its shape, and nothing else (lm_head is tied).
    published = json.loads(source.read_text())
    expected = official_shapes(published)
    shapes = {name: tuple(p.shape) for name, p in built.named_parameters()}
    assert shapes == expected
    spec = PUBLISHED[size]
    jet = "model.layers.0.self_attn."
    assert shapes[jet + "q_proj.weight"] == spec["shapes"]["q_proj"]
    assert shapes[jet + "v_proj.weight"] == spec["shapes"]["v_proj"]
    assert shapes[jet + "dynamic_conv1d.kernel_generator.w1.weight"] == spec["shapes"]["w1"]
    assert shapes[jet + "dynamic_conv1d.kernel_generator.w2.weight"] == spec["shapes"]["w2"]
    assert shapes[jet + "o_norm.weight"] == (256,)
    kinds = [layer.kind for layer in built.model.layers]
    assert [i for i, k in enumerate(kinds) if k == "attention"] == spec["attn"]
    assert [i for i, k in enumerate(kinds) if k == "sliding"] == spec["swa"]
    assert {built.model.layers[i].self_attn.window for i in spec["swa"]} == {spec["window"]}
    assert built.default_loop_range() == spec["loop"]
    assert built.lm_head.weight is built.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------- engine semantics


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_one_pass_with_window_over_sequence_equals_plain_forward(model, eviction):
    ids, labels = random_batch(2, 13, model.config.vocab_size)
    with torch.no_grad():
        plain = model(ids, labels=labels)
        out = engine_for(model, window=13, passes=1, eviction=eviction).forward(ids, labels=labels, return_logits=True)
    assert close(out.logits, plain.logits)
    assert close(out.loss, plain.loss)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_wake_logits_equal_token_by_token_streaming(model, eviction):
    engine = engine_for(model, window=4, passes=3, eviction=eviction)
    assert (engine.prelude, engine.loop, engine.coda) == (range(0, 2), range(2, 6), range(6, 8))
    ids, _ = random_batch(2, 11, model.config.vocab_size)
    with torch.no_grad():
        batched = engine.forward(ids, return_logits=True).logits
        streamed, _ = stream_wake_logits(engine, ids)
        one_pass = engine_for(model, window=4, passes=1, eviction=eviction).forward(ids, return_logits=True).logits
    assert close(batched, streamed)
    assert not close(batched[:, 4:], one_pass[:, 4:], 1e-6)  # the sleep passes matter


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_sliding_window_layers_keep_only_the_keys_they_can_read(model, eviction):
    """With L=12 over a 5-token sliding-window layer, streaming through `SleepCache` keeps at most the 4 keys that
    layer's next query can read, while the full-attention layers keep the L - 1 = 11 a query can read under either
    eviction, in buffers that never grow; and the logits still equal the batched engine's."""
    sleep = SleepConfig(window=12, passes=2, eviction=eviction)
    apply_sleep(model, sleep)
    try:
        ids, _ = random_batch(1, 30, model.config.vocab_size)
        cache, logits, held = SleepCache(), [], []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                logits.append(model(ids[:, t : t + 1], cache=cache).logits)
                held.append([sum(lengths) for lengths in cache.kv_lengths()])
            batched = SleepEngine(model.get_sleep_adapter(), sleep).forward(ids, return_logits=True).logits
    finally:
        model.config.sleep_config = None
    assert close(torch.cat(logits, dim=1), batched)
    full, sliding, *_ = zip(*held, strict=True)  # attention blocks in order: layers 1 (attn), 3 (swa), 6 (attn)
    assert max(sliding) == 4
    assert max(full) == 11
    rings = [ring for ring in cache.rings if ring is not None]
    assert [ring.capacity for ring in rings] == [11, 4, 11]
    assert [ring.keys.shape[2] for ring in rings] == [16, 8, 16]  # storage: a multiple of 8 slots


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_left_padding_by_whole_windows_is_invisible(model, eviction):
    engine = engine_for(model, window=4, passes=3, eviction=eviction)
    reference, padded = left_padding_runs(engine, model.config.vocab_size)
    assert close(padded.loss, reference.loss)
    assert all(close(a, b) for a, b in zip(flat_states(padded.states), flat_states(reference.states), strict=True))


# ---------------------------------------------------------------------------------------------- JetBlock


def reference_jet_block(block: JetBlock, x: torch.Tensor, state: LinearState | None):
    """JetBlock written out from the spec with the naive ops: per-token dynamic conv and gated delta rule."""
    B, T, _ = x.shape
    H, K, V = block.num_heads, block.head_k_dim, block.head_v_dim
    D, W = H * V, 4
    conv = block.dynamic_conv1d.kernel_generator
    kernels = (F.silu(x @ conv.w1.weight.T) @ conv.w2.weight.T + conv.w2.bias).view(B, T, D, W)
    v, conv_state = naive_dynamic_conv(
        x @ block.v_proj.weight.T, kernels, initial_state=None if state is None else state.conv[0], activation="silu"
    )
    q = F.silu(x @ block.q_proj.weight.T).view(B, T, H, K)
    k = F.silu(x @ block.k_proj.weight.T).view(B, T, H, K)
    g = -block.A_log.exp() * F.softplus(x @ block.a_proj.weight.T + block.dt_bias)
    beta = torch.sigmoid(x @ block.b_proj.weight.T)
    o, S = naive_gated_delta_rule(
        q, k, v.view(B, T, H, V), g, beta, initial_state=None if state is None else state.recurrent, use_qk_l2norm=True
    )
    gate = (x @ block.g_proj.weight.T).view(B, T, H, V)
    rms = (o.square().mean(-1, keepdim=True) + block.o_norm.eps).sqrt()
    o = o / rms * block.o_norm.weight * gate * torch.sigmoid(gate)  # gated RMSNorm per value head
    return o.reshape(B, T, D) @ block.o_proj.weight.T, S, conv_state


def whole_chunk(x: torch.Tensor, valid: torch.Tensor | None = None) -> Chunk:
    B, T, _ = x.shape
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid
    return Chunk(0, torch.arange(T).expand(B, T), valid, None, None, not bool(valid.all()))


def test_jet_block_matches_the_naive_reference_across_calls(model):
    block = model.model.layers[0].self_attn
    x = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ref_out, ref_S, ref_conv = reference_jet_block(block, x, None)
        assert ref_out.abs().mean() > 1e-3 and ref_conv.abs().mean() > 1e-3  # not vacuous
        whole, state, _ = block(x, None, None, whole_chunk(x))
        first, carried, _ = block(x[:, :2], None, None, whole_chunk(x[:, :2]))  # shorter than the conv
        second, carried, _ = block(x[:, 2:], carried, None, whole_chunk(x[:, 2:]))
        _, ref_S1, ref_conv1 = reference_jet_block(block, x[:, :2], None)
        ref_second, ref_S2, ref_conv2 = reference_jet_block(block, x[:, 2:], LinearState(ref_S1, (ref_conv1,)))
    assert close(whole, ref_out) and close(state.recurrent, ref_S) and close(state.conv[0], ref_conv)
    assert close(torch.cat([first, second], dim=1), ref_out)
    assert close(second, ref_second) and close(carried.recurrent, ref_S2) and close(carried.conv[0], ref_conv2)


def test_packed_jet_block_compiled_is_one_input_multiply_equal_to_the_naive_reference(model, checkpoint, tmp_path):
    """Packed for decoding, a compiled JetBlock without gradients reads q, k, v, the output gate and the kernel
    generator's w1 in one multiply (then w2 and o_proj: three in all, seven unpacked) and still equals the naive
    reference; the packed model saves in the official layout and loads back equal."""
    packed = copy.deepcopy(model)
    held = pack_input_projections(packed.get_sleep_adapter().blocks)  # project uses them while they are held
    assert {t.dtype for t in held} == {torch.float64}
    for layer in packed.model.layers:  # every mixer's (JetBlock or attention) inputs, every MLP's gate and up
        for group in (layer.self_attn.input_projections(), layer.mlp.input_projections()):
            assert getattr(group[0], PACKING).weight() is not None
            assert group[-1].weight.untyped_storage().data_ptr() == group[0].weight.untyped_storage().data_ptr()
    block = packed.model.layers[0].self_attn
    x = torch.randn(2, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out, state, _ = torch.compile(block, backend=backend)(x, None, None, whole_chunk(x))
        ref_out, ref_S, ref_conv = reference_jet_block(block, x, None)
    assert sum("linear" in t for t in traced) == 3, traced
    assert close(out, ref_out) and close(state.recurrent, ref_S) and close(state.conv[0], ref_conv)
    packed.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(checkpoint[1])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    reference = model.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in loaded.state_dict().items())


def test_jet_block_padding_leaves_the_state_untouched(model):
    block = model.model.layers[2].self_attn
    x = torch.randn(1, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    valid = torch.tensor([[False, False, False, True, True, True, True]])
    with torch.no_grad():
        _, padded, _ = block(x, None, None, whole_chunk(x, valid))
        out, real, _ = block(x[:, 3:], None, None, whole_chunk(x[:, 3:]))
        padded_out, _, _ = block(x, None, None, whole_chunk(x, valid))
        # Padding after real tokens: g = 0 and beta = 0 keep the (non-zero) recurrent state exactly.
        _, after, _ = block(x[:, :4], real, None, whole_chunk(x[:, :4], torch.zeros(1, 4, dtype=torch.bool)))
    assert close(padded.recurrent, real.recurrent) and close(padded.conv[0], real.conv[0])
    assert close(padded_out[:, 3:], out)
    assert torch.equal(after.recurrent, real.recurrent)


def test_default_loop_range_is_the_middle_half():
    for layers, expected in [(28, (7, 21)), (36, (9, 27)), (8, (2, 6))]:
        config = tiny_config(layer_types=("jet",) * layers)
        with torch.device("meta"):
            built = JetNemotronForCausalLM(JetNemotronConfig(**config))
        assert built.default_loop_range() == expected


# ---------------------------------------------------------------------------------------------- GPU


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


# fla's gated delta rule output is accurate to ~1.5e-3 relative in fp32 (TF32 dots; benchmarks/README.md, probe).
FLA_OUTPUT_PRECISION = 1.5e-3


def jet_loss_and_grads(model, ids, labels, output_noise: float = 0.0, seed: int = 0):
    """Loss and gradients of a sleeping tiny Jet; `output_noise` scales each gated-delta-rule output by
    (1 + noise * N(0, 1)), a perturbation the size of a kernel's rounding error."""
    import retrofit.layers.gated_deltanet as mixers

    exact, generator = mixers.gated_delta_rule, torch.Generator(device=ids.device).manual_seed(seed)

    def perturbed(*args, **kwargs):
        o, state = exact(*args, **kwargs)
        noise = torch.randn(o.shape, generator=generator, device=o.device, dtype=o.dtype)
        return o * (1 + output_noise * noise), state

    mixers.gated_delta_rule = perturbed if output_noise else exact
    try:
        model.zero_grad()
        sleep = SleepConfig(window=40, passes=3, eviction="sliding", checkpointing="pass")
        loss = SleepEngine(model.get_sleep_adapter(), sleep).forward(ids, labels=labels).loss
        loss.backward()
    finally:
        mixers.gated_delta_rule = exact
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sleeping_jet_on_fla_matches_the_torch_path(monkeypatch, tmp_path):
    """fla's kernels against the torch path on CUDA (float32, same model): the loss and every gradient, each within
    what the kernel's own precision allows.

    The model has the family's own initialisation (std 0.02), as a trained model is well-conditioned. With the
    unit-scale weights of `write_official_checkpoint` instead, 8 layers x 3 passes x 4 windows are chaotic:
    perturbing every gated-delta-rule output by a relative 1.5e-3 (fla's fp32 precision, TF32 dots) moves the median
    gradient by 80% and layer 0's A_log by 4x (CPU, float64 reference), so no fp32 kernel could match the torch path
    there; that was this test's failure on an H100. Some gradients stay sensitive here too (A_log of a looped layer:
    4e-2 under that noise), so each gradient's tolerance is the larger of 2e-2 and 3x how far the torch path's own
    gradient moves under output noise at fla's precision; a semantic difference (a wrong gate, state or conv
    handling) moves well-conditioned gradients by O(1) and fails.
    """
    config = tiny_config()
    config["efficient_attention_config"]["jet"] |= {"head_dim": 8, "expand_v": 2}  # the hybrid GPU tests' sizes
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path), dtype=torch.float32).cuda()
    with torch.no_grad():  # mild decays, so that gradients reach back over several windows
        for name, param in model.named_parameters():
            if name.endswith("A_log"):
                param.fill_(-4.0)
    ids, labels = (t.cuda() for t in random_batch(2, 150, config["vocab_size"]))
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    fla_loss, fla_grads = jet_loss_and_grads(model, ids, labels)
    monkeypatch.setenv("RETROFIT_OPS", "torch")
    torch_loss, torch_grads = jet_loss_and_grads(model, ids, labels)
    noisy = [jet_loss_and_grads(model, ids, labels, FLA_OUTPUT_PRECISION, seed)[1] for seed in (1, 2)]
    assert rel(fla_loss, torch_loss) < 5e-3
    assert fla_grads.keys() == torch_grads.keys()
    over = []
    for name, reference in torch_grads.items():
        sensitivity = max(rel(grads[name], reference) for grads in noisy)
        error = rel(fla_grads[name], reference)
        if error > max(2e-2, 3 * sensitivity):
            over.append((error, sensitivity, name))
    assert not over, sorted(over, reverse=True)[:5]
    well_conditioned = [n for n in torch_grads if max(rel(g[n], torch_grads[n]) for g in noisy) < 1e-2]
    assert len(well_conditioned) > len(torch_grads) // 2  # the tolerance stays tight for most of the model


# The published 2B config.json, shipped with the benchmarks so that the GPU machine has it without ../shared.
PUBLISHED_2B_CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "jet-nemotron-2b.json"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", ["none", "pass"])
def test_jet_nemotron_2b_shape_sleep_trains_on_gpu(checkpointing, tmp_path):
    """Jet-Nemotron-2B's published shape (random init, bf16): forward+backward of T = 4000 with sleep N = 2 over
    L = 2000 windows and the default middle-14 loop. Prints the step time and the peak memory."""
    shutil.copy(PUBLISHED_2B_CONFIG, tmp_path / "config.json")
    config = AutoConfig.from_pretrained(tmp_path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    apply_sleep(model, SleepConfig(window=2000, passes=2, eviction="hard", checkpointing=checkpointing))
    assert model.default_loop_range() == (7, 21)
    model.train()
    ids = torch.randint(0, config.vocab_size, (1, 4000), device="cuda")
    loss, elapsed, peak = timed_gpu_training_step(model, ids, ids)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    print(
        f"\nJet-Nemotron-2B shape, N=2, L=2000, T=4000, checkpointing={checkpointing}: "
        f"step {elapsed:.2f} s, peak {peak:.1f} GiB"
    )


def test_a_config_override_that_reshapes_weights_is_a_recipe_error(tmp_path, capsys):
    """The checkpoint no longer fits the overridden config: exit 2 naming the key, before any training."""
    write_official_checkpoint(tmp_path / "ckpt", tiny_config() | {"vocab_size": 160})  # covers Rule 110's tokens
    overrides = [f"model.pretrained={tmp_path / 'ckpt'}", "model.config=null", "output_dir=" + str(tmp_path / "run")]
    argv = ["validate", "rule110-tiny", "--dry-run", *(a for o in overrides for a in ("--set", o))]
    assert main(argv) == 0
    assert main([*argv, "--set", "model.config_overrides={intermediate_size: 64}"]) == 2
    assert "model.config_overrides: the checkpoint does not fit the changed config" in capsys.readouterr().err


def test_bf16_norms_multiply_by_the_weight_in_float32_then_cast(checkpoint):
    """Jet-Nemotron's published RMSNorm: normalise in float32, multiply by the weight in float32, cast to bf16; every
    norm of the model (final and per block) follows it, and Qwen2's order (cast, then multiply) would differ."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.bfloat16).eval()
    x = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    eps = model.config.rms_norm_eps
    norms = [model.model.norm] + [
        m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    for norm in norms:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            xf = x.float()
            normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
            assert torch.equal(norm(x), (norm.weight.float() * normed).to(torch.bfloat16))
            assert not torch.equal(norm(x), norm.weight * normed.to(torch.bfloat16))
