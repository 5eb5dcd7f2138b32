"""Streaming inference with sleep: `generate` equals the engine's wake pass, KV stays bounded, idle-time sleep."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

import retrofit
from retrofit import SleepConfig, apply_sleep
from retrofit.blocks import join_windows
from retrofit.engine import SleepEngine
from retrofit.generation import CACHE_NAME, SleepCache, StreamCache
from retrofit.layers.packing import PACKING
from tests.helpers import random_batch, stream_wake_logits, tiny_hybrid
from tests.jet_checkpoint import write_official_checkpoint as write_jet
from tests.ouro_checkpoint import write_official_checkpoint as write_ouro

TOL = 1e-9
OURO_MIXERS = {"num_heads": 2, "head_dim": 8, "expand_v": 2, "conv_size": 4, "dconv_generator_reduction": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models spend their time in thread synchronisation on a busy shared CPU: use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(directory: Path) -> torch.nn.Module:
    assert retrofit.__version__  # registers the families
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Callable[[SleepConfig], torch.nn.Module]]:
    """Builders of a tiny float64 sleeping model per family; Ouro's mixers get random output projections."""
    jet_dir, ouro_dir = tmp_path_factory.mktemp("jet"), tmp_path_factory.mktemp("ouro")
    write_jet(jet_dir)
    write_ouro(ouro_dir)
    jet, ouro = _load(jet_dir), _load(ouro_dir)

    def hybrid(sleep: SleepConfig) -> torch.nn.Module:
        return apply_sleep(tiny_hybrid(vocab_size=37), sleep)

    def jet_nemotron(sleep: SleepConfig) -> torch.nn.Module:
        return apply_sleep(copy.deepcopy(jet), sleep)

    def ouro_model(sleep: SleepConfig) -> torch.nn.Module:
        model = copy.deepcopy(ouro)
        model.config.jet_mixer_layers, model.config.jet_mixer_config = [1, 3], OURO_MIXERS
        apply_sleep(model, sleep)
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for mixer in model.model.jet_mixers.values():
                weight = mixer.self_attn.o_proj.weight
                weight.copy_(
                    torch.randn(weight.shape, generator=generator, dtype=weight.dtype) / weight.shape[1] ** 0.5
                )
        return model

    return {"hybrid": hybrid, "jet_nemotron": jet_nemotron, "ouro": ouro_model}


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("family", ["hybrid", "jet_nemotron", "ouro"])
def test_greedy_generate_equals_the_engine_wake_argmax(families, family, eviction):
    """Over 4 windows (prompt 6 + 10 generated, L=4, N=3): every generated token is the argmax of
    `engine.forward(full_sequence)` at its predecessor, and the scores `generate` saw are those wake logits."""
    model = families[family](SleepConfig(window=4, passes=3, eviction=eviction))
    model.generation_config.eos_token_id = None  # generate all 10 tokens
    prompt, _ = random_batch(1, 6, 37, seed=3)
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        reference = model.sleep_engine().forward(out.sequences, return_logits=True).logits
    sequence = out.sequences
    assert sequence.shape[1] == 16
    assert torch.equal(reference[:, 5:-1].argmax(-1), sequence[:, 6:])
    assert torch.allclose(torch.stack(out.logits, dim=1), reference[:, 5:-1].float(), atol=1e-5)


def test_batched_generate_with_left_padding_matches_each_row():
    """Two prompts of different lengths, left-padded: each row follows the engine on the padded batch."""
    model = apply_sleep(tiny_hybrid(), SleepConfig(window=3, passes=2, eviction="sliding"))
    ids, _ = random_batch(2, 7, 19, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
        reference = model.sleep_engine().forward(out, full_mask, return_logits=True).logits
    assert torch.equal(reference[:, 6:-1].argmax(-1), out[:, 7:])


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_segments_of_any_size_equal_token_by_token_streaming(eviction):
    """Feeding the stream in uneven segments (a prompt, then single tokens, then a long segment) gives the logits of
    the independent token-by-token reference `tests.helpers.stream_wake_logits`."""
    model = apply_sleep(tiny_hybrid(), SleepConfig(window=4, passes=3, eviction=eviction))
    ids, _ = random_batch(1, 17, 19, seed=5)
    cache = SleepCache()
    with torch.no_grad():
        parts = [model(ids[:, s:e], cache=cache).logits for s, e in ((0, 6), (6, 7), (7, 8), (8, 17))]
        reference, _ = stream_wake_logits(model.sleep_engine(), ids)
    assert (torch.cat(parts, dim=1) - reference).abs().max() < TOL
    assert cache.get_seq_length() == 17


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_kv_memory_stays_bounded_by_the_window(eviction):
    """Generating 10·L tokens, each attention block holds at most the L-1 tokens a query can read (retained ones
    only under sliding eviction), at every step, in the same storage as after the first token: nothing grows."""
    window = 3
    model = apply_sleep(tiny_hybrid(), SleepConfig(window=window, passes=2, eviction=eviction))
    cache = SleepCache()
    token = torch.tensor([[1]])
    with torch.no_grad():
        for step in range(10 * window):
            token = model(token, cache=cache).logits[:, -1:].argmax(-1)
            storage = [t.data_ptr() for ring in cache.rings if ring is not None for t in (ring.keys, ring.values)]
            storage += [s.recurrent.data_ptr() for s in cache.states if s is not None]
            if step == 0:
                first_storage = storage
            assert storage == first_storage
            lengths = cache.kv_lengths()
            assert len(lengths) == 2  # the two attention blocks
            for retained, chunk in lengths:
                assert retained + chunk <= window - 1
                assert retained <= (window - 1 if eviction == "sliding" else 0)
    assert cache.get_seq_length() == 10 * window


def stream_with_boundaries(engine: SleepEngine, ids: torch.Tensor, boundaries: list[int]) -> torch.Tensor:
    """Token-by-token wake logits that sleep (`engine.sleep`, from each chunk's starting state) at the given stream
    positions instead of every L tokens: the reference for idle-time sleep, written like
    `tests.helpers.stream_wake_logits` and independently of `SleepCache`."""
    adapter, num_blocks, length = engine.adapter, len(engine.adapter.blocks), ids.shape[1]
    positions = torch.arange(length)[None]
    valid = torch.ones_like(ids, dtype=torch.bool)
    states, windows, logits = [None] * num_blocks, [None] * num_blocks, []
    for s, e in zip([0, *boundaries], [*boundaries, length], strict=True):
        token_states, chunk_kv = list(states), [None] * num_blocks
        for t in range(s, e):
            chunk = engine.chunk_for_tokens(t, positions[:, t : t + 1], valid[:, t : t + 1])
            h = adapter.embed(ids[:, t : t + 1])
            for i, block in enumerate(adapter.blocks):
                h, token_states[i], own = block(h, token_states[i], join_windows(windows[i], chunk_kv[i]), chunk)
                if own is not None:
                    chunk_kv[i] = join_windows(chunk_kv[i], own)
            logits.append(adapter.head(h))
        if e < length:
            states, windows = engine.sleep(ids[:, s:e], s, positions[:, s:e], states, windows)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_idle_sleep_equals_a_chunk_boundary_at_that_position(eviction):
    """`model.sleep(cache)` after P < L tokens changes the state and the next logits; the logits that follow equal
    those of token-by-token streaming that sleeps at P and then every L tokens (`stream_with_boundaries`)."""
    window, prefix = 5, 3
    model = apply_sleep(tiny_hybrid(), SleepConfig(window=window, passes=3, eviction=eviction))
    ids, _ = random_batch(1, 14, 19, seed=6)
    with torch.no_grad():
        awake, slept = SleepCache(), SleepCache()
        model(ids[:, :prefix], cache=awake)
        model(ids[:, :prefix], cache=slept)
        before = [s.recurrent.clone() for s in slept.states if s is not None]
        assert model.sleep(slept) == prefix
        after = [s.recurrent for s in slept.states if s is not None]
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(before, after, strict=True))
        logits_awake = model(ids[:, prefix:], cache=awake).logits
        logits_slept = model(ids[:, prefix:], cache=slept).logits
        assert (logits_awake - logits_slept).abs().max() > 1e-6
        reference = stream_with_boundaries(model.sleep_engine(), ids, list(range(prefix, ids.shape[1], window)))
    assert (logits_slept - reference[:, prefix:]).abs().max() < TOL
    assert model.sleep(SleepCache()) == 0  # nothing to consolidate


def test_a_stream_started_in_inference_mode_sleeps_and_continues_outside_it():
    """A server may decode under `torch.inference_mode()` and sleep or continue under `no_grad`: the cache's buffers,
    updated in place, take both, and the logits equal streaming that sleeps at 4, 6 (idle) and 10."""
    model = apply_sleep(tiny_hybrid(), SleepConfig(window=4, passes=2, eviction="sliding"))
    ids, _ = random_batch(1, 14, 19, seed=7)
    cache = SleepCache()
    with torch.inference_mode():
        first = model(ids[:, :6], cache=cache).logits
    assert model.sleep(cache) == 2
    with torch.no_grad():
        rest = model(ids[:, 6:], cache=cache).logits
        reference = stream_with_boundaries(model.sleep_engine(), ids, [4, 6, 10])
    assert (torch.cat([first, rest], dim=1) - reference).abs().max() < TOL


@pytest.mark.parametrize("family", ["hybrid", "jet_nemotron"])
def test_a_model_without_sleep_decodes_through_a_kv_cache(families, family):
    """Without a sleep config `generate` streams through a `StreamCache` (no eviction): uneven segments of a
    left-padded batch give the uncached forward's logits, and greedy tokens its argmax."""
    model = families[family](SleepConfig(window=4))
    model.config.sleep_config = None
    model.generation_config.eos_token_id = None
    ids, _ = random_batch(2, 11, 37, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cache = StreamCache()
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        parts = [model(ids[:, s:e], attention_mask=mask[:, :e], **{CACHE_NAME: cache}).logits for s, e in SEGMENTS]
        out = model.generate(ids[1:, :4], max_new_tokens=6, do_sample=False)
        reference = model(out).logits
    assert (torch.cat(parts, dim=1) - whole)[mask.bool()].abs().max() < TOL
    assert cache.get_seq_length() == 11
    assert torch.equal(reference[:, 3:-1].argmax(-1), out[:, 4:])


SEGMENTS = ((0, 4), (4, 5), (5, 11))


def test_beam_search_on_a_model_without_sleep_reorders_its_cache():
    """`StreamCache.reorder_cache` keeps the chosen beams' states and keys: cached beam search gives the beams that
    beam search without a cache (the plain forward over each whole sequence) gives."""
    model = tiny_hybrid()
    model.generation_config.eos_token_id = None
    prompt, _ = random_batch(2, 5, 19, seed=13)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_streaming_refuses_multi_pass_wake():
    model = apply_sleep(tiny_hybrid(), SleepConfig(window=4, passes=3, wake_passes=2))
    with pytest.raises(ValueError, match="wake_passes"):
        model(torch.tensor([[1, 2]]), use_cache=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["hybrid", "jet_nemotron", "ouro"])
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_generate_on_cuda_scores_every_token_as_the_cpu_float64_engine(families, family, eviction, monkeypatch):
    """fla's kernels decode on CUDA in float32 (prompt 10 + 20 generated, L=8, N=3): the logits `generate` saw at
    every step equal the float64 CPU engine's wake logits of the sequence it produced, within float32 kernel error."""
    monkeypatch.setenv("RETROFIT_OPS", "fla")
    sleep = SleepConfig(window=8, passes=3, eviction=eviction)
    reference_model = families[family](sleep)
    model = copy.deepcopy(reference_model).float().cuda()
    model.generation_config.eos_token_id = None
    prompt, _ = random_batch(1, 10, 37, seed=8)
    with torch.no_grad():
        out = model.generate(
            prompt.cuda(), max_new_tokens=20, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        monkeypatch.setenv("RETROFIT_OPS", "torch")
        reference = reference_model.sleep_engine().forward(out.sequences.cpu(), return_logits=True).logits
    seen = torch.stack(out.logits, dim=1).double().cpu()
    expected = reference[:, 9:-1]
    assert out.sequences.shape[1] == 30
    assert float((seen - expected).norm() / expected.norm()) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["hybrid", "jet_nemotron", "ouro"])
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("batch", [1, 4])
def test_decoding_through_the_captured_graph_equals_eager_decoding(families, family, eviction, batch):
    """Greedy decoding of 40 tokens over 5 windows (L=8, N=3; rows left-padded by 0-3 tokens): the replayed CUDA
    graphs of the wake step and of a full window's sleep pick the same tokens as eager steps, with the same scores."""
    model = families[family](SleepConfig(window=8, passes=3, eviction=eviction)).float().cuda()
    (captured, captured_logits, cache), (eager, eager_logits, eager_cache) = (
        _greedy_decoding(model, batch, SleepCache(capture=capture)) for capture in (True, False)
    )
    assert cache._captured is not None and cache._captured.graph is not None  # the wake graph was replayed
    assert cache._captured_sleep is not None and cache._captured_sleep.graph is not None  # and the sleep graph
    assert eager_cache._captured is None and eager_cache._captured_sleep is None
    assert torch.equal(captured, eager)
    assert torch.allclose(captured_logits, eager_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["hybrid", "jet_nemotron", "ouro", "qwen3_5"])
def test_decoding_through_the_compiled_graph_equals_eager_decoding(families, family):
    """The same decoding (sliding eviction, batch 4) with the wake step compiled by inductor before capture: the
    same tokens as eager steps, with the same scores; also on transformers' own Qwen3.5, patched."""
    sleep = SleepConfig(window=8, passes=3, eviction="sliding")
    if family == "qwen3_5":
        torch.manual_seed(0)
        config = Qwen3_5TextConfig(
            vocab_size=37, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=16, intermediate_size=48,
        )  # fmt: skip
        model = apply_sleep(AutoModelForCausalLM.from_config(config).eval(), sleep).cuda()
    else:
        model = families[family](sleep).float().cuda()
    (compiled, compiled_logits, cache), (eager, eager_logits, _) = (
        _greedy_decoding(model, 4, SleepCache(capture=capture, compile=capture)) for capture in (True, False)
    )
    assert cache._captured is not None and cache._captured.graph is not None
    assert cache._captured.wake is not cache._wake  # the replayed graph holds the compiled step
    blocks = model.get_sleep_adapter().blocks
    groups = [m.input_projections() for b in blocks for m in b.modules() if hasattr(m, "input_projections")]
    groups = [group for group in groups if len(group) > 1]
    assert groups and all(getattr(group[0], PACKING).weight() is not None for group in groups)  # read packed
    assert torch.equal(compiled, eager)
    assert torch.allclose(compiled_logits, eager_logits, atol=1e-4, rtol=1e-4)


def _greedy_decoding(model: torch.nn.Module, batch: int, cache: SleepCache) -> tuple[Tensor, Tensor, SleepCache]:
    """40 greedy tokens after a 10-token prompt whose row r is left-padded by r tokens: the sequences, the logits
    of every step and the cache."""
    model.generation_config.eos_token_id = None
    prompt, _ = random_batch(batch, 10, 37, seed=9)
    mask = torch.ones_like(prompt)
    for row in range(batch):
        mask[row, :row] = 0
    with torch.no_grad():
        out = model.generate(
            prompt.cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **{CACHE_NAME: cache},
        )
    return out.sequences, torch.stack(out.logits, dim=1), cache
