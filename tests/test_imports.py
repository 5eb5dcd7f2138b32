"""Any entry point can be imported first, and importing retrofit registers the families without fla's kernels."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = (
    "import retrofit; from transformers import AutoConfig; "
    "assert type(AutoConfig.for_model('jet_nemotron')).__name__ == 'JetNemotronConfig'; "
    "assert type(AutoConfig.for_model('sleep_hybrid')).__name__ == 'SleepHybridConfig'; "
    "import sys; assert 'fla.ops' not in sys.modules and 'triton' not in sys.modules, 'fla kernels imported eagerly'"
)


@pytest.mark.parametrize(
    "first",
    ["import retrofit", "import model_patches.hybrid", "import model_patches.jet_nemotron", "import retrofit.engine"],
)
def test_import_order(first):
    result = subprocess.run([sys.executable, "-c", f"{first}; {CHECK}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_core_never_imports_a_family():
    """`retrofit/` finds families through `retrofit.registry` (entry points), never by importing `model_patches`."""
    core = Path(__file__).resolve().parents[1] / "retrofit"
    offenders = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(core.parent)}: {n}" for n in names if n.split(".")[0] == "model_patches"]
    assert offenders == []


def test_families_register_through_the_entry_point():
    from importlib.metadata import entry_points

    from retrofit.registry import ENTRY_POINT_GROUP, supported_model_types

    assert [e.value for e in entry_points(group=ENTRY_POINT_GROUP)] == ["model_patches"]
    native = ["olmo_hybrid", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next"]
    assert supported_model_types() == sorted(["jet_nemotron", "ouro", "sleep_hybrid", *native])
