"""The GPU benchmark suite runs end to end on a CPU (`--dry-run`), and counts the ideal cost correctly; Triton
autotuning results travel between GPU machines."""

from __future__ import annotations

import json
import tarfile

import pytest

from benchmarks import run, triton_cache


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


def test_dry_run_measures_issue_23s_items_on_transformers_own_qwen3_5(tmp_path, capsys):
    assert run.main(["--dry-run", "--suite", "de", "--model", "qwen3_5_2b", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "dry-run-qwen3_5_2b.json").read_text())
    assert result["shape"]["model"] == "qwen3_5_2b" and sorted(result["results"]) == ["d", "e"]
    rows = result["results"]["d"]["rows"]
    assert set(map(int, rows)) == set(run.DRY_SHAPE.contexts)
    assert all(row["sleep_ms"] > 0 and row["no_sleep_ms"] > 0 for row in rows.values())
    assert result["results"]["e"]["prefill_seconds"] > 0
    assert "| d | slowest" in capsys.readouterr().out


def test_unknown_items_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--dry-run", "--suite", "az"])
    assert exc.value.code == 2
    assert "--suite: unknown item(s) z" in capsys.readouterr().err


def test_autotune_results_seed_a_cache_and_new_ones_are_harvested(tmp_path):
    """The kept results go into an empty cache once; the cache's own new results come back in a tar, the kept
    ones do not; compiled kernels next to them never travel."""
    kept, cache, result = tmp_path / "kept", tmp_path / "cache", '{"key": [1], "configs_timings": []}'
    (kept / "H1").mkdir(parents=True)
    (kept / "H1" / f"chunk_fwd_kernel_o{triton_cache.SUFFIX}").write_text(result)
    assert triton_cache.seed(cache, kept) == 1
    assert (cache / "H1" / f"chunk_fwd_kernel_o{triton_cache.SUFFIX}").read_text() == result
    assert triton_cache.seed(cache, kept) == 0
    (cache / "H2").mkdir()
    (cache / "H2" / f"l2norm_fwd_kernel{triton_cache.SUFFIX}").write_text("{}")
    (cache / "H2" / "l2norm_fwd_kernel.cubin").write_bytes(b"\0")
    archive = tmp_path / "out" / "autotune.tar"
    assert triton_cache.harvest(cache, archive, kept) == 1
    with tarfile.open(archive) as tar:
        assert tar.getnames() == [f"H2/l2norm_fwd_kernel{triton_cache.SUFFIX}"]


def test_kept_autotune_results_are_valid_json():
    kept = triton_cache.autotune_results(triton_cache.SEEDS)
    assert kept
    for name in kept:
        record = json.loads((triton_cache.SEEDS / name).read_text())
        assert record["configs_timings"] and "key" in record, name


def _run(name: str, mode: str, losses: dict, **more) -> dict:
    return {"run": name, "model": name.split("/")[0], "mode": mode, "status": "ok", "losses": losses, **more}


def test_distributed_reports_of_two_calls_merge(tmp_path):
    """A rerun replaces the earlier run and is compared anew with the single-GPU reference of the other call; a
    check that could not run in the later call keeps the earlier result."""
    from benchmarks import distributed

    steps = range(1, distributed.STEPS + 1)
    single = {str(s): 4.0 for s in steps}
    environment = {"date": "2026-11-22", "gpus": [], "versions": {}}
    tolerances = {"first": 1e-2, "all": 5e-2}
    first = {
        "environment": environment,
        "tolerances": tolerances,
        "runs": [
            _run("tiny/single_gpu", "single_gpu", single),
            _run("tiny/zero3", "zero3", {str(s): 4.4 for s in steps}, comparison={"passed": False}),
        ],
        "checks": {"frozen base under zero3": {"passed": True}},
    }
    second = {
        "environment": environment,
        "tolerances": tolerances,
        "runs": [_run("tiny/zero3", "zero3", {str(s): 4.0 * (1 + 1e-3) for s in steps})],
        "checks": {"frozen base under zero3": {"passed": False, "error": "missing checkpoint"}},
    }
    merged = distributed.merge_reports([first, second], tmp_path)
    runs = {r["run"]: r for r in merged["runs"]}
    assert set(runs) == {"tiny/single_gpu", "tiny/zero3"} and runs["tiny/zero3"]["call"] == 2
    comparison = runs["tiny/zero3"]["comparison"]
    assert comparison["passed"] and comparison["rel_max"] == pytest.approx(1e-3)
    assert merged["checks"]["frozen base under zero3"] == {"passed": True}


def test_distributed_reload_checks_merge_across_calls(tmp_path):
    """A call that reloaded only the 2-GPU folders is scored against the reference folders another call reloaded."""
    from benchmarks import distributed

    def report(reloaded: dict) -> dict:
        check = distributed.score_reload({"runs": reloaded}, "2b", tmp_path, 5e-2)
        return {
            "environment": {"date": "2026-11-22", "gpus": [], "versions": {}},
            "tolerances": {"first": 1e-2, "all": 5e-2},
            "runs": [],
            "checks": {"reload 2b (from_pretrained)": check},
        }

    def entry(loss: float, missing: list[str] | None = None) -> dict:
        return {"loss": loss, "missing_keys": missing or [], "unexpected_keys": []}

    first = report({"2b/single_gpu": entry(2.0), "2b/zero2_1gpu": entry(2.1), "2b/zero3": entry(9.0)})
    second = report({"2b/zero3": entry(2.12), "2b/zero2": entry(2.14), "2b/multi_gpu": entry(2.02)})
    assert not first["checks"]["reload 2b (from_pretrained)"]["passed"]
    assert "no reloaded 2b/single_gpu, 2b/zero2_1gpu" in second["checks"]["reload 2b (from_pretrained)"]["error"]
    check = distributed.merge_reports([first, second], tmp_path)["checks"]["reload 2b (from_pretrained)"]
    assert check["passed"] and set(check["runs"]) == {
        "2b/single_gpu",
        "2b/zero2_1gpu",
        "2b/zero3",
        "2b/zero2",
        "2b/multi_gpu",
    }
    assert check["runs"]["2b/zero2"]["rel_to_reference"] == pytest.approx(0.04 / 2.1)
    assert check["runs"]["2b/multi_gpu"]["rel_to_reference"] == pytest.approx(0.01)
    third = report({"2b/multi_gpu": entry(2.0, missing=["lm_head.weight"])})
    merged = distributed.merge_reports([first, second, third], tmp_path)
    assert not merged["checks"]["reload 2b (from_pretrained)"]["passed"]


def test_2b_zero3_is_held_to_the_split_spread_after_step_one(tmp_path):
    """A 2B ZeRO-3 run 20% off its reference at step 11 passes (two one-process runs differing only in micro-batch
    split were 33% apart there); the same drift fails 2B DDP (which repeats its reference's forward) and a tiny run,
    and a 2B ZeRO-3 run 2% off at step 1 fails."""
    from benchmarks import distributed

    plan = {r.name: r for r in distributed.plan_runs(tmp_path)}
    steps = range(1, distributed.STEPS + 1)
    reference = {"run": "ref", "losses": {s: 2.0 for s in steps}}

    def compared(name: str, drift: dict[int, float]) -> bool:
        losses = {s: 2.0 * (1 + drift.get(s, 0.0)) for s in steps}
        return distributed.compare({"losses": losses}, reference, plan[name], 1e-2, 5e-2)["passed"]

    assert compared("2b/zero3", {11: 0.2}) and compared("2b/multi_gpu", {11: 0.04})
    assert not compared("2b/multi_gpu", {11: 0.2}) and not compared("2b/zero2", {11: 0.2})
    assert not compared("tiny/zero3", {11: 0.2})
    assert not compared("2b/zero3", {1: 0.02}) and not compared("2b/zero3", {11: 0.4})


def test_a_reload_is_scored_on_its_own_evaluation_when_measured(tmp_path):
    """With `save_gap` the reloaded model must give its run's final eval loss, and needs no reference; a reload that
    could not measure it fails; without either (an older call) the fixed-batch loss must be its reference's."""
    from benchmarks import distributed

    def entry(loss: float, **more) -> dict:
        return {"loss": loss, "missing_keys": [], "unexpected_keys": [], **more}

    def score(runs: dict) -> dict:
        return distributed.score_reload({"runs": runs}, "2b", tmp_path, 5e-2)

    assert score({"2b/zero3": entry(9.0, save_gap=1e-3)})["passed"]  # 9.0: far from any reference, not judged
    assert score({"2b/zero3": entry(2.0, save_gap=0.2)})["failed"] == ["2b/zero3"]
    assert score({"2b/single_gpu": entry(2.0, save_gap_error="no results.json")})["failed"] == ["2b/single_gpu"]
    assert "no reloaded 2b/zero2_1gpu" in score({"2b/zero2": entry(2.0)})["error"]
    mixed = score({"2b/zero2_1gpu": entry(2.0), "2b/zero2": entry(2.04), "2b/zero3": entry(2.6, save_gap=5e-3)})
    assert mixed["passed"] and mixed["runs"]["2b/zero3"]["rel_to_reference"] == pytest.approx(0.3)
    assert not score({"2b/zero2_1gpu": entry(2.0), "2b/zero2": entry(2.2)})["passed"]


def test_save_gap_compares_the_final_evaluation_bucket_by_bucket(tmp_path):
    from benchmarks.distributed_worker import save_gap
    from retrofit.evaluation import Bucket, EvalResult

    def result(step: int, losses: list[float]) -> EvalResult:
        buckets = [Bucket(d, 4, 0, 0.0, loss) for d, loss in zip((1, 2), losses, strict=True)]
        return EvalResult("rule110", step, buckets)

    (tmp_path / "results.json").write_text(json.dumps(result(20, [1.0, 2.0]).to_dict()))
    gap = save_gap(tmp_path, result(0, [1.01, 1.9]))
    assert gap["eval_step"] == 20 and gap["save_gap"] == pytest.approx(0.05)
    assert save_gap(tmp_path, result(0, [1.0, float("nan")]))["save_gap"] == float("inf")
    assert "save_gap_error" in save_gap(tmp_path / "elsewhere", result(0, [1.0, 2.0]))


def test_the_native_benchmark_dry_run_measures_both_items(tmp_path, capsys):
    from benchmarks import native

    assert native.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "native-dry-run.json").read_text())["results"]
    assert result["train"]["seconds"]["ours"] > 0 and result["train"]["seconds"]["theirs"] > 0
    assert result["decode"]["ms_per_token"]["ours"] > 0 and result["decode"]["value"] > 0
    assert "| train (T=64, N=1, no eviction) |" in capsys.readouterr().out
    assert native.main(["--dry-run", "--items", "decode", "--out", str(tmp_path)]) == 0
    assert set(json.loads((tmp_path / "native-dry-run.json").read_text())["results"]) == {"decode"}
    assert "| train" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        native.main(["--dry-run", "--items", "prefill"])
