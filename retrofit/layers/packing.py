"""Input projections packed for decoding: the linears that a block applies to one input, as one matrix multiply.

At batch 1 each projection of a decoded token is a matrix-vector product, and each costs at least one kernel
(about 4.3 us on an H100) however few its outputs. Jet-Nemotron-2B's JetBlock reads its input through five (q, k,
v, the output gate and the kernel generator's w1), 22 us a layer as five products. Packed, a decoded token of that
shape took 2.58 rather than 3.04 ms on an H100 (benchmarks/README.md, issue 23).

A module declares such a group with `input_projections()` and computes it with `project`.
`pack_input_projections` makes the weights of every declared group consecutive rows of one tensor, in place: each
parameter keeps its object, name and value and becomes a view of the packed tensor, so state dicts, optimizers and
adapters see the model as before (transformers' `save_pretrained` writes such views as separate tensors). `project`
runs a group as one `F.linear` over the packed tensor in a compiled step without gradients, while something holds
that tensor (a `SleepCache(compile=True)` does, for its life); anywhere else it calls each linear: training, eager
code, an adapter such as a LoRA layer, a module with hooks (ZeRO-3 gathering, accelerate's offloading).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrofit.layers.gates import compiled_inference, is_plain_linear

PACKING = "packed_input_projections"  # the attribute of a group's first linear that holds its `Packing`


@dataclass(frozen=True, eq=False)
class Packing:
    """A packed group: its linears in order and weak references to the packed weight (and bias), which live as long
    as whoever packed them holds them, so a dropped cache never leaves a stale tensor in use or in memory."""

    members: tuple[nn.Module, ...]
    weight: weakref.ref
    bias: weakref.ref | None

    def __reduce__(self) -> tuple:
        """A copied or pickled model is not packed: its parameters are no views of these tensors."""
        return type(None), ()


def project(x: Tensor, linears: Sequence[nn.Module]) -> tuple[Tensor, ...]:
    """`linear(x)` for each of `linears`: one multiply over their packed weight in a compiled step without gradients
    while the packing is live and every linear still plain, else one call per linear."""
    packed = _live(linears) if compiled_inference() else None
    if packed is None:
        return tuple(linear(x) for linear in linears)
    weight, bias = packed
    return F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)


def pack_input_projections(modules: Iterable[nn.Module]) -> list[Tensor]:
    """Pack the group that each module under `modules` declares with `input_projections()`, where every member is a
    plain `nn.Linear` of one dtype, device and input size, all with a bias or none, over plain tensors. Returns the
    packed tensors: `project` uses a packing while its tensors are held. Packing again copies nothing."""
    held: list[Tensor] = []
    taken: set[int] = set()  # a module may be reached twice (Ouro's loops); a linear joins one group
    for root in modules:
        for module in root.modules():
            declared = getattr(module, "input_projections", None)
            if declared is None:
                continue
            group = tuple(declared())
            if len(group) < 2 or any(id(linear) in taken for linear in group) or not _packable(group):
                continue
            taken.update(id(linear) for linear in group)
            with torch.no_grad(), torch.inference_mode(False):
                weight = _stacked([linear.weight for linear in group])
                bias = _stacked([linear.bias for linear in group]) if group[0].bias is not None else None
            setattr(group[0], PACKING, Packing(group, weakref.ref(weight), None if bias is None else weakref.ref(bias)))
            held += [weight] if bias is None else [weight, bias]
    return held


def _live(linears: Sequence[nn.Module]) -> tuple[Tensor, Tensor | None] | None:
    """The packed weight and bias of exactly `linears`, if they are packed, held, and all still plain."""
    packing = getattr(linears[0], PACKING, None)
    if packing is None or packing.members != tuple(linears) or not all([is_plain_linear(m) for m in linears]):
        return None
    weight = packing.weight()
    bias = packing.bias() if packing.bias is not None else None
    if weight is None or (packing.bias is not None and bias is None):
        return None
    return weight, bias


def _packable(group: tuple[nn.Module, ...]) -> bool:
    """Plain linears of one dtype, device and input size, all with a bias or none, whose parameters hold plain
    tensors (not a tensor subclass such as FSDP2's DTensor shards)."""
    if not all(is_plain_linear(linear) for linear in group):
        return False
    parameters = [p for linear in group for p in (linear.weight, linear.bias) if p is not None]
    if any(type(p.data) is not torch.Tensor for p in parameters):
        return False
    first = group[0].weight
    same = all(
        linear.weight.dtype == first.dtype
        and linear.weight.device == first.device
        and linear.in_features == group[0].in_features
        for linear in group
    )
    return same and len({linear.bias is None for linear in group}) == 1


def _stacked(parameters: list[nn.Parameter]) -> Tensor:
    """One tensor whose consecutive leading blocks are `parameters`, which become views of it (they stay as they are
    where they already are such blocks)."""
    existing = _consecutive(parameters)
    if existing is not None:
        return existing
    stacked = torch.cat([parameter.detach() for parameter in parameters])
    for parameter, rows in zip(parameters, stacked.split([p.shape[0] for p in parameters]), strict=True):
        parameter.data = rows
    return stacked


def _consecutive(parameters: list[nn.Parameter]) -> Tensor | None:
    """The tensor over the storage that holds `parameters` back to back, in order, or None if they are not."""
    first = parameters[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for parameter in parameters:
        if (
            not parameter.is_contiguous()
            or parameter.untyped_storage().data_ptr() != storage.data_ptr()
            or parameter.storage_offset() != offset
        ):
            return None
        offset += parameter.numel()
    shape = (sum(p.shape[0] for p in parameters), *first.shape[1:])
    return first.detach().new_empty(0).set_(storage, first.storage_offset(), shape)
