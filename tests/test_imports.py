"""Any entry point can be imported first, and importing retrofit registers the families without fla's kernels."""

from __future__ import annotations

import subprocess
import sys

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
