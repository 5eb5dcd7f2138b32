"""Packed input projections (`retrofit.layers.packing`): one multiply per group in a compiled decoding step, and a
model that is otherwise unchanged (same parameter objects, names and values; copies and pickles not packed)."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrofit.layers.attention import Attention
from retrofit.layers.mlp import SwiGLU
from retrofit.layers.packing import PACKING, pack_input_projections, project


class Group(nn.Module):
    """A module that declares its linears as one group, as the blocks do."""

    def __init__(self, *linears: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList(linears)

    def input_projections(self) -> tuple[nn.Module, ...]:
        return tuple(self.members)


def traced_linears(function, *args) -> tuple[int, object]:
    """(number of linear/matmul nodes in the graph torch.compile traces for `function(*args)`, its result)."""
    torch._dynamo.reset()
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    result = torch.compile(function, backend=backend, fullgraph=True)(*args)
    return sum("linear" in t or "matmul" in t for t in traced), result


def test_packing_makes_each_group_views_of_one_tensor_and_keeps_the_model():
    torch.manual_seed(0)
    mlp, attention = SwiGLU(6, 5), Attention(6, 2, 1, 3, qkv_bias=True)
    root = nn.ModuleList([mlp, attention])
    before = {name: value.clone() for name, value in root.state_dict().items()}
    parameters = dict(root.named_parameters())
    held = pack_input_projections([root])
    assert len(held) == 3  # the MLP's gate|up weight; attention's q|k|v weight and bias
    assert all(parameters[name] is p for name, p in root.named_parameters())  # the same objects, same names
    assert all(torch.equal(value, before[name]) for name, value in root.state_dict().items())
    assert torch.equal(held[0], torch.cat([before["0.gate_proj.weight"], before["0.up_proj.weight"]]))
    assert torch.equal(held[2], torch.cat([before[f"1.{p}_proj.bias"] for p in "qkv"]))
    assert mlp.up_proj.weight.data_ptr() == held[0][5:].data_ptr()  # a view of the packed rows, not a copy
    assert attention.v_proj.bias.data_ptr() == held[2][9:].data_ptr()  # after q (6) and k (3)
    assert mlp.down_proj.weight.untyped_storage().data_ptr() != held[0].untyped_storage().data_ptr()  # not a member
    again = pack_input_projections([root])
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in held]  # packing again copies nothing
    root.double()  # moves every parameter to a new tensor of its own: packing copies again
    moved = pack_input_projections([root])
    assert moved[0].dtype == torch.float64 and mlp.up_proj.weight.data_ptr() == moved[0][5:].data_ptr()


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_project_is_one_multiply_over_the_packed_weight_equal_to_each_linear(bias):
    """Compiled without gradients while the packed tensors are held: one linear, equal to each float64 linear map.
    With gradients, or once the packed tensors are dropped, one linear per member."""
    gen = torch.Generator().manual_seed(0)
    group = tuple(nn.Linear(24, n, bias=bias) for n in (7, 3, 9))
    x = torch.randn(3, 2, 24, generator=gen)
    expected = [F.linear(x.double(), m.weight.double(), None if m.bias is None else m.bias.double()) for m in group]
    held = pack_input_projections([Group(*group)])
    with torch.no_grad():
        count, outputs = traced_linears(project, x, group)
    assert count == 1
    for out, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    assert traced_linears(project, x, group)[0] == 3  # with gradients: the modules themselves
    del held
    gc.collect()
    with torch.no_grad():
        count, outputs = traced_linears(project, x, group)
    assert count == 3  # nothing holds the packing: nothing reads it
    for out, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_adapters_hooks_and_tensor_subclasses_keep_their_own_calls():
    class Adapted(nn.Linear):  # as a LoRA layer wraps a projection
        def forward(self, x):
            return super().forward(x) + 1

    class Shard(torch.Tensor):  # as FSDP2's DTensor holds a shard
        pass

    torch.manual_seed(0)
    adapted = (nn.Linear(8, 4), Adapted(8, 3))
    sharded = (nn.Linear(8, 4), nn.Linear(8, 3))
    sharded[1].weight = nn.Parameter(sharded[1].weight.detach().as_subclass(Shard))
    for group in (adapted, sharded):
        assert pack_input_projections([Group(*group)]) == []
        assert group[0].weight.untyped_storage().data_ptr() != group[1].weight.untyped_storage().data_ptr()
    hooked = (nn.Linear(8, 4), nn.Linear(8, 3))
    held = pack_input_projections([Group(*hooked)])
    assert held
    hooked[1].register_forward_hook(lambda module, args, out: out + 1)  # as ZeRO-3 or offloading would, later
    x = torch.randn(2, 8)
    with torch.no_grad():
        count, (_, second) = traced_linears(project, x, hooked)
    assert count == 2
    torch.testing.assert_close(second, F.linear(x, hooked[1].weight, hooked[1].bias) + 1)


def test_copies_and_pickles_of_a_packed_model_are_not_packed():
    group = (nn.Linear(8, 4), nn.Linear(8, 3))
    owner = Group(*group)
    held = pack_input_projections([owner])
    assert getattr(group[0], PACKING).weight() is held[0]
    for twin in (copy.deepcopy(owner), pickle.loads(pickle.dumps(owner))):
        assert getattr(twin.members[0], PACKING) is None
        assert torch.equal(twin.members[1].weight, group[1].weight)
        assert twin.members[1].weight.data_ptr() != group[1].weight.data_ptr()


def test_a_packed_model_trains_exactly_as_before():
    """Gradients and optimizer steps on packed parameters equal those on a twin that was never packed, and the
    parameters stay views of the packed tensor, which follows every update."""
    torch.manual_seed(0)
    packed = SwiGLU(6, 5).double()
    twin = copy.deepcopy(packed)
    held = pack_input_projections([packed])
    initial = held[0].clone()
    x = torch.randn(4, 6, dtype=torch.float64)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=0.1) for model in (packed, twin)]
    for _ in range(3):
        for model, optimizer in zip((packed, twin), optimizers, strict=True):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(packed.parameters(), twin.parameters(), strict=True))
    assert torch.equal(held[0], torch.cat([twin.gate_proj.weight, twin.up_proj.weight]))
    assert not torch.equal(held[0], initial)  # it trained
