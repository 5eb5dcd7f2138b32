"""From-scratch initialisation under DeepSpeed ZeRO-3, emulated on CPU.

Under ZeRO-3, transformers initialises a new model module by module (`integrations.deepspeed.
initialize_weights_zero3`): transformers 5.17 (the GPU kit's) gathers only that module's own parameters, 5.23 also
those of its direct children, so any other parameter is an empty shard while `_init_weights(module)` runs. A family
whose `_init_weights` reaches below the module (as Jet's once did: `KernelGenerator` set `w2.bias`, which crashed
on 2x H200 under 5.17) fails at `zero.Init` with "size of tensor a (0) must match". Here every parameter but the
module's own is emptied (the stricter of the two), so no DeepSpeed is needed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import retrofit
from tests.helpers import tiny_hybrid
from tests.jet_checkpoint import tiny_config as tiny_jet_config
from tests.ouro_checkpoint import tiny_config as tiny_ouro_config


def build(family: str) -> nn.Module:
    assert retrofit.__version__  # registers the families
    if family == "hybrid":
        return tiny_hybrid(dtype=torch.float32)
    config = tiny_jet_config() if family == "jet_nemotron" else tiny_ouro_config() | {"jet_mixer_layers": [1]}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


def gathered_as_zero3(module: nn.Module) -> set[int]:
    """The parameters every supported transformers gathers while it initialises `module` under ZeRO-3."""
    return {id(p) for p in module.parameters(recurse=False)}


@pytest.mark.parametrize("family", ["hybrid", "jet_nemotron", "ouro"])
def test_init_weights_reads_only_what_zero3_gathers(family):
    model = build(family)
    assert any(isinstance(m, nn.Linear) for m in model.modules())
    params = list(model.parameters())
    full = {id(p): p.data for p in params}
    for module in model.modules():
        gathered = gathered_as_zero3(module)
        for p in params:
            p.data = full[id(p)] if id(p) in gathered else torch.empty(0, dtype=p.dtype)
        model._init_weights(module)  # an empty shard read or written here raises
    for p in params:
        p.data = full[id(p)]
