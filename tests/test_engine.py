"""The sleep engine against DESIGN.md's semantics, on tiny float64 hybrids (exact comparisons)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from retrofit import SleepConfig, SleepEngine, apply_sleep
from retrofit.blocks import LinearState
from retrofit.checkpoint import checkpoint_offloaded
from retrofit.engine import next_token_targets, sequence_positions
from tests.helpers import random_batch, stream_wake_logits, tiny_hybrid

ALL_KINDS = ("full_attention", "linear_attention", "sliding_attention", "linear_attention", "full_attention")


def engine_for(model, **config) -> SleepEngine:
    return SleepEngine(model.get_sleep_adapter(), SleepConfig(**config))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol)


def flat_states(states) -> list[torch.Tensor]:
    out = []
    for s in states:
        if isinstance(s, LinearState):
            out.extend([s.recurrent, *s.conv])
    return out


# ---------------------------------------------------------------------------------------------- N = 1


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_one_pass_with_window_over_sequence_equals_plain_forward(eviction):
    model = tiny_hybrid(ALL_KINDS)
    ids, labels = random_batch(2, 23, model.config.vocab_size)
    plain = model(ids, labels=labels)
    out = engine_for(model, window=23, passes=1, eviction=eviction).forward(ids, labels=labels, return_logits=True)
    assert close(out.logits, plain.logits)
    assert close(out.loss, plain.loss)


def test_a_batch_without_label_tokens_has_loss_zero_with_and_without_sleep():
    """A process whose share of the batch has no labels (padding) must not put a NaN into the gradients."""
    model = tiny_hybrid()
    ids, labels = random_batch(2, 12, model.config.vocab_size)
    labels[:] = -100
    assert model(ids, labels=labels).loss.item() == 0.0
    assert engine_for(model, window=4, passes=2).forward(ids, labels=labels).loss.item() == 0.0


def test_a_last_chunk_without_loss_tokens_wakes_without_the_head():
    """context_only: the last chunk wakes whether or not it has loss tokens; without any, the head has nothing to do."""
    model = tiny_hybrid()
    engine = engine_for(model, window=4, passes=2, sleep_on="context_only")
    ids, labels = random_batch(2, 12, model.config.vocab_size)
    labels[:, :5], labels[:, 8:] = -100, -100  # next-token targets 5..7: loss tokens in the middle chunk only
    head, rows = engine.adapter.head, []
    engine.adapter.head = lambda h: rows.append(h.shape[0]) or head(h)
    loss = engine.forward(ids, labels=labels).loss
    assert rows == [6]  # the middle chunk's 2 x 3 loss positions, once
    reference = engine_for(model, window=4, passes=2, sleep_on="every_chunk").forward(ids, labels=labels).loss
    assert close(loss, reference)  # the middle chunk sleeps in every_chunk too, and nothing after it counts


def test_head_at_label_positions_only_gives_the_same_loss():
    model = tiny_hybrid()
    ids, labels = random_batch(2, 30, model.config.vocab_size)
    labels[:, :20] = -100
    engine = engine_for(model, window=7, passes=2)
    assert close(engine.forward(ids, labels=labels).loss, engine.forward(ids, labels=labels, return_logits=True).loss)


# Ops whose result the host must wait for (a device-to-host read): on a GPU each drains the queued kernels.
HOST_READS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::masked_select"}


class RecordOps(TorchDispatchMode):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        is_bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        self.log.append("aten::nonzero" if is_bool_index else name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sleep_on", ["every_chunk", "context_only"])
def test_forward_reads_nothing_back_once_blocks_run(sleep_on):
    """Counting loss tokens or finding their positions after the first block is queued would make the host wait
    for all the GPU work queued so far (item b of the benchmarks); the engine reads them before."""
    model = tiny_hybrid()
    ids, labels = random_batch(2, 30, model.config.vocab_size)
    labels[0, :12], labels[1, 20:25] = -100, -100  # chunks with some, all and no loss tokens (window 7)
    labels[:, 7:14] = -100
    log: list[str] = []
    hooks = [b.register_forward_pre_hook(lambda *_: log.append("block")) for b in model.get_sleep_adapter().blocks]
    engine = engine_for(model, window=7, passes=2, sleep_on=sleep_on)
    with RecordOps(log):
        loss = engine.forward(ids, labels=labels).loss
    for hook in hooks:
        hook.remove()
    first_block = log.index("block")
    assert HOST_READS & set(log[:first_block]), "the test no longer sees the up-front reads"
    assert not HOST_READS & set(log[first_block:]), [op for op in log[first_block:] if op in HOST_READS]
    reference = engine_for(model, window=7, passes=2, sleep_on=sleep_on).forward(ids, labels=labels, return_logits=True)
    assert close(loss, reference.loss)


def test_context_only_equals_every_chunk_with_one_pass():
    model = tiny_hybrid(mild_decay=True)
    ids, labels = random_batch(2, 30, model.config.vocab_size)
    labels[:, :22] = -100  # loss only in the last chunks
    grads = []
    for mode in ("every_chunk", "context_only"):
        model.zero_grad()
        loss = engine_for(model, window=8, passes=1, sleep_on=mode).forward(ids, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert close(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1])
    assert all(close(a, b) for a, b in zip(grads[0][1], grads[1][1], strict=True))


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("passes,loop_range", [(1, None), (3, None), (2, (1, 4))])
def test_wake_logits_equal_token_by_token_streaming(eviction, passes, loop_range):
    model = tiny_hybrid(ALL_KINDS)
    engine = engine_for(model, window=6, passes=passes, eviction=eviction, loop_range=loop_range)
    ids, _ = random_batch(2, 20, model.config.vocab_size)
    with torch.no_grad():
        batched = engine.forward(ids, return_logits=True)
        streamed, chunk_ends = stream_wake_logits(engine, ids)
    assert close(batched.logits, streamed)
    if passes == 1:  # a one-pass sleep leaves exactly the streaming wake state and KV
        token_states, _ = chunk_ends[-1]
        assert all(close(a, b) for a, b in zip(flat_states(batched.states), flat_states(token_states), strict=True))


def test_chunk_positions_restart_rope_and_still_stream():
    assert sequence_positions(torch.ones(1, 12, dtype=torch.bool), "chunk", 5).tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    ]
    model = tiny_hybrid()
    ids, _ = random_batch(1, 12, model.config.vocab_size)
    logits = {}
    with torch.no_grad():
        for eviction in ("hard", "sliding"):
            for positions in ("global", "chunk"):
                engine = engine_for(model, window=5, passes=2, positions=positions, eviction=eviction)
                logits[eviction, positions] = engine.forward(ids, return_logits=True).logits
                assert close(logits[eviction, positions], stream_wake_logits(engine, ids)[0])
    # RoPE is relative: inside one chunk the offset cancels; across a retained window it does not.
    assert close(logits["hard", "global"], logits["hard", "chunk"], 1e-9)
    assert not close(logits["sliding", "global"][:, 5:], logits["sliding", "chunk"][:, 5:], 1e-6)


# ---------------------------------------------------------------------------------------------- sleep


def test_sleep_changes_the_state_and_the_next_chunk():
    model = tiny_hybrid()
    ids, _ = random_batch(2, 8, model.config.vocab_size)
    positions = sequence_positions(torch.ones_like(ids, dtype=torch.bool), "global", 8)
    empty = [None] * 4
    with torch.no_grad():
        wake_states, _ = engine_for(model, window=8, passes=1).sleep(ids, 0, positions, empty, empty)
        slept_states, _ = engine_for(model, window=8, passes=3).sleep(ids, 0, positions, empty, empty)
    for wake, slept in zip(flat_states(wake_states), flat_states(slept_states), strict=True):
        assert not close(wake, slept, 1e-6)
    ids2, _ = random_batch(2, 16, model.config.vocab_size)
    with torch.no_grad():
        one = engine_for(model, window=8, passes=1).forward(ids2, return_logits=True).logits
        three = engine_for(model, window=8, passes=3).forward(ids2, return_logits=True).logits
    assert close(one[:, :8], three[:, :8])  # the first chunk's wake is before any sleep
    assert not close(one[:, 8:], three[:, 8:], 1e-6)


@pytest.mark.parametrize("loop_range", [None, (1, 4)])
def test_sleep_matches_algorithm_1_written_out(loop_range):
    """Prelude once; the loop N times, feeding h forward and carrying S; the coda once on the refined h."""
    model = tiny_hybrid(ALL_KINDS)
    passes, window = 3, 6
    ids, _ = random_batch(2, 2 * window, model.config.vocab_size)
    engine = engine_for(model, window=window, passes=passes, loop_range=loop_range)
    adapter = engine.adapter
    start, stop = loop_range or (0, 5)
    first = engine.chunk_for_tokens(0, torch.arange(window).expand(2, -1), torch.ones(2, window, dtype=torch.bool))
    with torch.no_grad():
        states = [None] * 5
        h = adapter.embed(ids[:, :window])
        for i in range(start):
            h, states[i], _ = adapter.blocks[i](h, states[i], None, first)
        for _ in range(passes):
            for i in range(start, stop):
                h, states[i], _ = adapter.blocks[i](h, states[i], None, first)
        for i in range(stop, 5):
            h, states[i], _ = adapter.blocks[i](h, states[i], None, first)
        # The second chunk's wake from the slept state gives its logits.
        second = engine.chunk_for_tokens(
            window, torch.arange(window, 2 * window).expand(2, -1), torch.ones(2, window, dtype=torch.bool)
        )
        h = adapter.embed(ids[:, window:])
        for i in range(5):
            h, states[i], _ = adapter.blocks[i](h, states[i], None, second)
        expected = adapter.head(h)
        actual = engine.forward(ids, return_logits=True).logits[:, window:]
    assert close(actual, expected)


def test_first_sleep_pass_reuses_the_wake_pass():
    """N passes cost N loop passes per sleeping chunk, not N + 1: count block calls."""
    model = tiny_hybrid()
    calls = {"n": 0}
    hook = model.model.layers[0].register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    ids, labels = random_batch(1, 12, model.config.vocab_size)
    with torch.no_grad():
        engine_for(model, window=4, passes=3).forward(ids, labels=labels)
    hook.remove()
    assert calls["n"] == 3 + 3 + 1  # two sleeping chunks of 3 passes, and the last chunk's wake


class RecordingAdapter:
    """Wraps an adapter, keeping each chunk's embeddings (with grad) and the KV lengths blocks see."""

    def __init__(self, adapter):
        self.inner = adapter
        self.blocks = [RecordingBlock(b, self) for b in adapter.blocks]
        self.default_loop_range = adapter.default_loop_range
        self.embeddings: list[torch.Tensor] = []
        self.kv_lengths: list[tuple[int, int]] = []

    def embed(self, ids):
        h = self.inner.embed(ids)
        if h.requires_grad:
            h.retain_grad()
        self.embeddings.append(h)
        return h

    def head(self, h):
        return self.inner.head(h)

    def rope(self, positions):
        return self.inner.rope(positions)


class RecordingBlock:
    def __init__(self, block, owner):
        self.block, self.owner, self.kind, self.kv_window = block, owner, block.kind, block.kv_window

    def __call__(self, h, state, kv, chunk):
        if self.kind != "linear":
            self.owner.kv_lengths.append((kv.length if kv is not None else 0, h.shape[1]))
        return self.block(h, state, kv, chunk)


def first_chunk_embedding_grad(model, **config) -> torch.Tensor | None:
    adapter = RecordingAdapter(model.get_sleep_adapter())
    engine = SleepEngine(adapter, SleepConfig(**config))
    ids, labels = random_batch(2, 18, model.config.vocab_size)
    labels[:, :13] = -100  # loss only on the last chunk
    engine.forward(ids, labels=labels).loss.backward()
    return adapter.embeddings[0].grad


def test_gradient_reaches_the_first_chunk_through_the_state():
    grad = first_chunk_embedding_grad(tiny_hybrid(mild_decay=True), window=6, passes=3)
    assert grad is not None and grad.abs().sum() > 1e-8


@pytest.mark.parametrize("truncation", [{"truncate_chunks": 1}, {"grad_passes": 1}])
def test_truncation_stops_the_gradient(truncation):
    grad = first_chunk_embedding_grad(tiny_hybrid(mild_decay=True), window=6, passes=3, **truncation)
    assert grad is None or grad.abs().sum() == 0


def test_grad_passes_keeps_the_gradient_of_the_last_passes():
    model = tiny_hybrid(mild_decay=True)
    ids, labels = random_batch(2, 12, model.config.vocab_size)
    labels[:, :7] = -100
    engine_for(model, window=6, passes=3, grad_passes=2).forward(ids, labels=labels).loss.backward()
    a_log = model.model.layers[1].self_attn.A_log
    assert a_log.grad is not None and a_log.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("eviction,bound", [("hard", lambda L: (0, L)), ("sliding", lambda L: (L - 1, L))])
def test_kv_never_exceeds_the_window(eviction, bound):
    model = tiny_hybrid(ALL_KINDS)
    window = 4
    adapter = RecordingAdapter(model.get_sleep_adapter())
    engine = SleepEngine(adapter, SleepConfig(window=window, passes=2, eviction=eviction))
    ids, _ = random_batch(1, 10 * window + 3, model.config.vocab_size)
    with torch.no_grad():
        out = engine.forward(ids)
    retained_max, chunk_max = bound(window)
    assert adapter.kv_lengths
    assert max(r for r, _ in adapter.kv_lengths) == retained_max
    assert max(c for _, c in adapter.kv_lengths) == chunk_max
    kept = [w.length for w in out.windows if w is not None]
    assert all(k <= window - 1 for k in kept) and (kept or eviction == "hard")


# ---------------------------------------------------------------------------------------------- padding


def pad(t: torch.Tensor, value: int, left: int, right: int) -> torch.Tensor:
    return torch.cat([torch.full((1, left), value), t, torch.full((1, right), value)], dim=1)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("passes", [1, 3])
def test_left_padding_by_whole_windows_and_right_padding_are_invisible(eviction, passes):
    model = tiny_hybrid(ALL_KINDS)
    window, vocab = 5, model.config.vocab_size
    ids, labels = random_batch(1, 13, vocab)
    engine = engine_for(model, window=window, passes=passes, eviction=eviction)
    with torch.no_grad():
        reference = engine.forward(ids, labels=labels).loss
        for left, right in [(window, 0), (2 * window, 3), (0, 4)]:
            mask = pad(torch.ones_like(ids), 0, left, right)
            padded = engine.forward(
                pad(ids, 3, left, right), attention_mask=mask, labels=pad(labels, -100, left, right)
            ).loss
            assert close(padded, reference), (left, right)


def test_padding_inside_a_chunk_leaves_the_state_untouched():
    """A chunk whose first tokens are padding yields the state of its real tokens alone (Depo's layout)."""
    model = tiny_hybrid()
    ids, _ = random_batch(1, 8, model.config.vocab_size)
    valid = torch.tensor([[False, False, False, True, True, True, True, True]])
    engine = engine_for(model, window=8, passes=2)
    with torch.no_grad():
        padded = engine.forward(ids, attention_mask=valid.long())
        real = engine.forward(ids[:, 3:])
    for a, b in zip(flat_states(padded.states), flat_states(real.states), strict=True):
        assert close(a, b)


@pytest.mark.parametrize("kinds", [ALL_KINDS, ("linear_attention",)])
def test_padding_is_invisible_to_a_multi_pass_sleep(kinds):
    """Every sleep pass replays the chunk's padding too: it must not touch the conv windows the pass carries."""
    model = tiny_hybrid(kinds)
    ids, _ = random_batch(1, 8, model.config.vocab_size)
    valid = torch.tensor([[False, False, False, True, True, True, True, True]])
    engine = engine_for(model, window=8, passes=3)
    empty = [None] * len(kinds)
    with torch.no_grad():
        padded, _ = engine.sleep(ids, 0, sequence_positions(valid, "global", 8), empty, empty, valid)
        real, _ = engine.sleep(ids[:, 3:], 0, torch.arange(5)[None], empty, empty)
    for a, b in zip(flat_states(padded), flat_states(real), strict=True):
        assert close(a, b)


def test_padded_and_unpadded_rows_in_one_batch():
    model = tiny_hybrid()
    ids, labels = random_batch(2, 12, model.config.vocab_size)
    engine = engine_for(model, window=4, passes=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels[1, :4] = -100
    with torch.no_grad():
        batched = engine.forward(ids, attention_mask=mask, return_logits=True).logits
        row0 = engine.forward(ids[:1], return_logits=True).logits
        row1 = engine.forward(ids[1:, 4:], return_logits=True).logits
    assert close(batched[0], row0[0])
    assert close(batched[1, 4:], row1[0])


@pytest.mark.parametrize("sleep_on", ["every_chunk", "context_only"])
def test_token_scores_equal_those_of_the_whole_logits(monkeypatch, sleep_on):
    """Evaluation's per-position loss and argmax hit, computed a few head rows at a time, against the same numbers
    taken from the `[B, T, V]` logits of the same sleeping forward."""
    monkeypatch.setattr("retrofit.ops.cross_entropy.HEAD_ROWS", 3)  # many row chunks per engine chunk
    model = tiny_hybrid(ALL_KINDS)
    ids, labels = random_batch(3, 19, model.config.vocab_size)
    labels[0, :12] = -100  # context only in the first chunks of row 0
    labels[1, 5:9] = -100
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding
    engine = engine_for(model, window=5, passes=3, eviction="sliding", loop_range=(1, 4), sleep_on=sleep_on)
    head, rows = engine.adapter.head, []
    engine.adapter.head = lambda h: rows.append(h.shape[:-1].numel()) or head(h)
    scored = engine.forward(ids, mask, labels, return_token_scores=True)
    assert rows and max(rows) <= 3  # never more than HEAD_ROWS rows of logits at once
    engine.adapter.head = head
    whole = engine.forward(ids, mask, labels, return_logits=True)
    targets = next_token_targets(labels, mask.bool())
    supervised = targets != -100
    loss = torch.nn.functional.cross_entropy(whole.logits.transpose(1, 2), targets, reduction="none")
    hit = whole.logits.argmax(-1) == targets
    assert supervised.sum() > 10 and (~supervised).sum() > 10
    assert close(scored.token_loss, torch.where(supervised, loss, 0))
    assert torch.equal(scored.token_correct, hit | ~supervised)
    assert close(scored.loss, whole.loss)
    assert scored.logits is None


# ---------------------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("mode", ["pass", "chunk"])
def test_checkpointing_gives_the_same_gradients(mode):
    model = tiny_hybrid(ALL_KINDS, mild_decay=True)
    ids, labels = random_batch(2, 17, model.config.vocab_size)
    results = []
    for checkpointing in ("none", mode):
        model.zero_grad()
        config = dict(window=5, passes=3, eviction="sliding", loop_range=(1, 4), checkpointing=checkpointing)
        loss = engine_for(model, **config).forward(ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    assert all(close(results[0][1][n], results[1][1][n]) for n in results[0][1])


@pytest.fixture
def process_group():
    """A gloo group of this one process: what DDP, ZeRO and FSDP2 run under."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["none", "pass", "chunk"])
def test_every_weight_accumulates_its_gradient_once_per_backward_under_a_process_group(mode, process_group):
    """DDP, DeepSpeed ZeRO and FSDP2 reduce a weight's gradient when autograd accumulates it. A looped weight runs N
    times in each of several chunks, yet under every checkpointing mode its gradient must arrive once."""
    model = tiny_hybrid(ALL_KINDS, mild_decay=True)
    ids, labels = random_batch(2, 17, model.config.vocab_size)
    arrivals = Counter()
    for name, parameter in model.named_parameters():
        parameter.register_post_accumulate_grad_hook(lambda _, name=name: arrivals.update([name]))
    config = dict(window=5, passes=3, eviction="sliding", loop_range=(1, 4), checkpointing=mode)
    engine_for(model, **config).forward(ids, labels=labels).loss.backward()
    loop_prefixes = ("model.layers.1.", "model.layers.2.", "model.layers.3.")
    looped = [name for name, _ in model.named_parameters() if name.startswith(loop_prefixes)]
    assert looped and all(arrivals[name] == 1 for name in looped)
    assert set(arrivals.values()) == {1}


@pytest.mark.parametrize("grouped", [False, True], ids=["one process (reentrant)", "process group (non-reentrant)"])
def test_a_checkpointed_pass_keeps_only_its_inputs_and_gives_the_plain_gradients(request, grouped):
    """Outside the pass, only the pass's tensor inputs (nested ones too) are saved: those are what waits on the host
    on CUDA. Inside, nothing is kept, and backward recomputes the same gradients as an uncheckpointed call."""
    if grouped:
        request.getfixturevalue("process_group")
    torch.manual_seed(0)
    weight = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    state, scale = torch.randn(6, 6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)

    def one_pass(h, states, extra):
        x = torch.tanh(h @ weight) * extra["scale"]
        return x.sin() @ states[0], [states[0] + x.T @ x]

    def loss_and_grads(call):
        weight.grad = h.grad = None
        out, (new_state,) = call(h, [state], {"scale": scale})
        (out.square().sum() + new_state.sum()).backward()
        return weight.grad.clone(), h.grad.clone()

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        checkpoint_offloaded(one_pass, h, [state], {"scale": scale})
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in (h, state, scale))
    checkpointed = loss_and_grads(lambda *args: checkpoint_offloaded(one_pass, *args))
    plain = loss_and_grads(one_pass)
    assert all(torch.equal(a, b) for a, b in zip(checkpointed, plain, strict=True))


# ---------------------------------------------------------------------------------------------- config


def test_apply_sleep_round_trips_through_save_pretrained(tmp_path):
    model = tiny_hybrid()
    config = SleepConfig(window=6, passes=3, eviction="sliding", loop_range=(1, 3), checkpointing="pass")
    assert apply_sleep(apply_sleep(model, config), config) is model  # idempotent
    assert model.sleep_config == config
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.sleep_config == config
    ids, _ = random_batch(2, 20, model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        plain = model.plain_forward(ids).logits
    assert not close(model(ids).logits, plain, 1e-6)  # the sleeping forward is really different


def test_apply_sleep_rejects_a_loop_range_outside_the_model():
    with pytest.raises(ValueError, match="loop_range"):
        apply_sleep(tiny_hybrid(), SleepConfig(window=4, loop_range=(0, 9)))
