"""The GPU benchmark suite runs end to end on a CPU (`--dry-run`), and counts the ideal cost correctly."""

from __future__ import annotations

import json

import pytest

from benchmarks import run


def expected_layer_passes(passes: int) -> int:
    """Block calls of one step of the dry-run model, written out from DESIGN.md's chunk schedule: 8 blocks with
    the loop range [2, 6), T = 80, L = 40, sleep on every chunk but the last. Chunk 1 runs the prelude (2), the
    wake loop pass (4) and the wake coda (2), then N - 1 more loop passes and the coda again, unless N = 1 (its
    coda is the wake coda); chunk 2 only wakes (8)."""
    first = 8 if passes == 1 else 2 + 4 + 2 + 4 * (passes - 1) + 2
    return first + 8


def test_dry_run_measures_every_item(tmp_path, capsys):
    assert run.main(["--dry-run", "--suite", "all", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "dry-run.json").read_text())["results"]
    assert sorted(result) == list(run.ITEMS)
    rows = result["a"]["rows"]
    assert {int(n): row["layer_passes"] for n, row in rows.items()} == {n: expected_layer_passes(n) for n in (1, 2)}
    assert all(row["seconds"] > 0 for row in rows.values())
    assert set(map(int, result["d"]["rows"])) == set(run.DRY_SHAPE.contexts)
    table = capsys.readouterr().out
    assert "| a | worst efficiency" in table and (tmp_path / "dry-run.md").read_text().strip() in table


def test_unknown_items_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--dry-run", "--suite", "az"])
    assert exc.value.code == 2
    assert "--suite: unknown item(s) z" in capsys.readouterr().err
